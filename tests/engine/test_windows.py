"""Windowed decoding attention: each run of rows attends over its own cache columns only, and
the engine's outputs equal those of attention over the whole static cache."""

from __future__ import annotations

from contextlib import nullcontext

import engines
import pytest
import torch
from test_prefill import TEXTS, records

from batchgen.config import SamplingConfig
from batchgen.engine import static as engine_module
from batchgen.engine import windows
from batchgen.engine.windows import applies, row_runs, windowed


def test_runs_group_rows_that_start_alike_in_order():
    assert row_runs([0, 0, 0, 5, 9, 9]) == [(0, 3, 0), (3, 4, 5), (4, 6, 9)]
    assert row_runs([4, 0, 4]) == [(0, 1, 4), (1, 2, 0), (2, 3, 4)]  # only neighbours share


def load(path, sampling):
    return engines.load(path, sampling, prefill_tokens=32)[0]


def whole_cache(engine, recs, seed, monkeypatch):
    """The same batch with decoding attention over the whole static cache, as before windows."""
    with monkeypatch.context() as m:
        m.setattr(engine.engine, "windowed", False)
        return engine.generate(recs, seed)


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig(max_new_tokens=10),
        SamplingConfig(
            do_sample=True, temperature=1.0, top_p=0.9, num_return_sequences=3, max_new_tokens=8
        ),
    ],
    ids=["greedy", "sampled"],
)
@pytest.mark.parametrize("chat", [False, True])
def test_windowed_decoding_equals_attention_over_the_whole_cache(
    tiny_models, monkeypatch, sampling, chat
):
    engine = load(tiny_models["chat"], sampling)
    assert engine.windowed
    recs = records(engine.tokenizer, chat=chat)  # mixed lengths, 1 to ~80 tokens, unsorted
    recs = sorted(recs, key=lambda r: -len(r.token_ids))  # as batches are planned
    seen = []
    with monkeypatch.context() as m:
        attend = windows.sdpa_attention_forward

        def spy(module, query, key, value, mask, **kwargs):
            seen.append((query.shape[0], key.shape[2]))
            return attend(module, query, key, value, mask, **kwargs)

        m.setattr(windows, "sdpa_attention_forward", spy)
        out = engine.generate(recs, seed=3)
    # Decoding attended in runs narrower than the whole batch's cache.
    rows = len(recs) * sampling.num_return_sequences
    assert any(batch < rows for batch, _ in seen)
    assert out == whole_cache(engine, recs, 3, monkeypatch)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_rows_tokens_do_not_depend_on_its_batch(tiny_models, dtype):
    """Each row attends over its own columns only: alone or beside longer and shorter prompts,
    its tokens are the same, in either dtype."""
    model, tok = engines.load_model(tiny_models["chat"])
    engine = engines.Bound(
        engine_module.StaticEngine(model.to(getattr(torch, dtype)), tok, prefill_tokens=32),
        SamplingConfig(max_new_tokens=12),
    )
    recs = sorted(records(tok, chat=True), key=lambda r: -len(r.token_ids))
    together = engine.generate(recs, seed=0)
    for i in (0, 3, len(recs) - 1):
        assert engine.generate(recs[i : i + 1], seed=0) == together[i : i + 1]
    assert engine.generate(recs[2:6], seed=0) == together[2:6]


def test_outside_the_engine_sdpa_is_transformers_own(tiny_models):
    """Registered in place of "sdpa", the windowed function changes nothing outside a batch."""
    from transformers import StaticCache

    engine = load(tiny_models["chat"], SamplingConfig(max_new_tokens=4))
    ids = torch.tensor([records(engine.tokenizer, TEXTS[1:2])[0].token_ids])
    with torch.inference_mode():
        before = engine.model(input_ids=ids).logits
        engine.generate(records(engine.tokenizer), seed=0)  # registers it
        after = engine.model(input_ids=ids).logits
        one = ids[:, :1]
        other = StaticCache(config=engine.model.config, max_cache_len=8)
        with windowed(other, [0]):  # attention over no cache of the batch's is not windowed
            inside = engine.model(input_ids=ids).logits, engine.model(input_ids=one).logits
    assert torch.equal(before, after) and torch.equal(before, inside[0])
    assert torch.equal(inside[1], engine.model(input_ids=one).logits)


def test_applies_on_the_cpu_with_sdpa_only(tiny_models):
    model, _ = engines.load_model(tiny_models["chat"])
    assert applies(model, torch.device("cpu"))
    assert not applies(model, torch.device("cuda"))
    model.config._attn_implementation = "eager"
    assert not applies(model, torch.device("cpu"))


def test_compiled_decoding_keeps_the_whole_cache(tiny_models):
    engine = load(tiny_models["chat"], SamplingConfig(max_new_tokens=4))
    engine.compile = True
    assert isinstance(engine._windows([], 1, 4, object()), nullcontext)
