"""Per-sample Gumbel noise: a pure function of (key, step, token) that samples the softmax."""

from __future__ import annotations

import torch

from batchgen.sampling import gumbel_noise, sample_keys


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
