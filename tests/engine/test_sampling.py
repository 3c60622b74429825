"""Per-sample Gumbel noise: a pure function of (key, step, token) that samples the softmax."""

from __future__ import annotations

import torch

from batchgen.config import SamplingConfig
from batchgen.engine.sampling import gumbel_noise, sample_keys, sampling_processors


def test_noise_is_a_function_of_key_step_token_only():
    keys = torch.tensor([11, 22, 33], dtype=torch.int64)
    full = gumbel_noise(keys, step=5, vocab=100)
    alone = gumbel_noise(keys[1:2], step=5, vocab=100)
    assert torch.equal(full[1:2], alone)  # independent of the other rows
    assert not torch.equal(gumbel_noise(keys, step=6, vocab=100), full)
    assert torch.equal(gumbel_noise(keys, step=5, vocab=100), full)
    assert torch.equal(gumbel_noise(keys, step=5, vocab=150)[:, :100], full)


def test_argmax_of_noised_logits_follows_softmax():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64))
    keys = torch.arange(20_000, dtype=torch.int64)
    picks = (logits + gumbel_noise(keys, 0, 3)).argmax(-1)
    freq = torch.bincount(picks, minlength=3).double() / len(keys)
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), atol=0.015)


def test_keys_differ_by_row_sample_and_seed():
    keys = sample_keys(0, ["a", "b"], 2)
    assert len(set(keys)) == 4
    assert sample_keys(0, ["b"], 2) == keys[2:]
    assert sample_keys(1, ["a"], 1)[0] != keys[0]


def test_a_row_seed_replaces_the_job_seed_for_that_row_only():
    keys = sample_keys(0, ["a", "b"], 1, [7, None])
    assert keys[0] == sample_keys(7, ["a"], 1)[0] and keys[1] == sample_keys(0, ["b"], 1)[0]


def test_min_p_cuts_tokens_below_its_share_of_the_top_probability():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    keys = list(range(4000))
    s = SamplingConfig(do_sample=True, min_p=0.2)  # cut below 0.2 x 0.5 = 0.1
    procs = sampling_processors(s, keys[:1], 0, "cpu")
    scores = procs[0](torch.zeros(1, 0, dtype=torch.long), probs.log())
    assert torch.isinf(scores[0, 3]) and torch.isfinite(scores[0, :3]).all()
    rows = probs.log().expand(len(keys), -1).clone()
    picks = sampling_processors(s, keys, 0, "cpu")(
        torch.zeros(len(keys), 0, dtype=torch.long), rows
    )
    counts = torch.bincount(picks.argmax(-1), minlength=4)
    assert counts[3] == 0 and counts[2] > 0
