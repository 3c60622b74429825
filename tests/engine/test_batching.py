"""Batch planning, engine equivalence, batch-invariant sampling, and out-of-memory splits."""

from __future__ import annotations

import pytest
import torch

from batchgen.config import ModelConfig, RunnerConfig, SamplingConfig
from batchgen.engine import choice, devices
from batchgen.engine.batch_plan import plan_batches
from batchgen.engine.batching import Batcher, Budget, batch_tokens
from batchgen.engine.choice import choose_engine
from batchgen.engine.continuous import ContinuousEngine
from batchgen.engine.static import StaticEngine
from batchgen.errors import ConfigError
from batchgen.inputs import models
from batchgen.inputs.prompts import PromptRecord

WORDS = ["one", "two", "three", "four", "five", "six"] + ["seven", "eight", "nine", "ten"] * 2


def recs(tok, n=10):
    texts = [" ".join(WORDS[: 1 + (i * 5) % 12]) for i in range(n)]
    return [PromptRecord(i, f"r{i}", t, tok(t)["input_ids"]) for i, t in enumerate(texts)]


def fake_records(lengths):
    return [PromptRecord(i, str(i), "x", [1] * n) for i, n in enumerate(lengths)]


def test_plan_respects_batch_size_and_token_budget_and_keeps_every_row():
    records = fake_records([3, 50, 7, 20, 20, 5, 90, 1, 12, 40])
    batches = plan_batches(records, batch_size=4, max_batch_tokens=200, new_tokens=10, samples=2)
    assert sorted(r.index for b in batches for r in b) == list(range(10))
    for b in batches:
        assert len(b) <= 4
        longest = max(len(r.token_ids) for r in b)
        assert len(b) == 1 or len(b) * 2 * (longest + 10) <= 200
        assert [len(r.token_ids) for r in b] == sorted((len(r.token_ids) for r in b), reverse=True)
    # The long prompt (90 + 10 new, x2 samples = 200) fills a batch alone; short ones share.
    assert [[len(r.token_ids) for r in b] for b in batches] == [
        [90],
        [50],
        [40, 20],
        [20, 12, 7],
        [5, 3, 1],
    ]


def test_plan_bounds_padding_over_the_shard():
    records = fake_records([100, 95, 90, 60, 58, 10, 9])
    batches = plan_batches(records, batch_size=8, max_padding=0.1)
    assert [[len(r.token_ids) for r in b] for b in batches] == [[100, 95, 90], [60, 58], [10, 9]]
    # The bound is on the shard so far: long prompts first leave room for an uneven short batch.
    batches = plan_batches(fake_records([100, 100, 100, 100, 10, 5]), batch_size=4, max_padding=0.1)
    assert [[len(r.token_ids) for r in b] for b in batches] == [[100] * 4, [10, 5]]
    lengths = [len(r.token_ids) for b in batches for r in b]
    pads = sum(len(b[0].token_ids) * len(b) - sum(len(r.token_ids) for r in b) for b in batches)
    assert pads <= 0.1 * sum(lengths)


def test_plan_without_budget_is_length_sorted_chunks():
    batches = plan_batches(fake_records([5, 1, 9, 3]), batch_size=2)
    assert [[r.index for r in b] for b in batches] == [[2, 0], [3, 1]]


def test_budget_halves_and_grows_back():
    budget = Budget(1000)
    budget.shrink(800)
    assert budget.current == 400 and budget.splits == 1
    for _ in range(8):
        budget.succeeded()
    assert budget.current == 501
    for _ in range(80):
        budget.succeeded()
    assert budget.current == 1000


def unbounded(engine, batch_size, seed):
    """A Batcher whose batches are bounded by size alone, so tests know their shapes."""
    return Batcher(engine, RunnerConfig(batch_size=batch_size, max_padding=None), seed)


def load(path, sampling):
    cfg = ModelConfig(name_or_path=str(path))
    source = models.resolve_source(cfg)
    config, tok = models.load_config_and_tokenizer(source, cfg)
    return devices.load_model(source, config, cfg, "cpu", "float32"), tok


def texts_of(run_result, records):
    results, failed = run_result
    assert failed == []
    return [[s.text for s in results[r.index]] for r in records]


def reference(model, tok, sampling, records, batch_size):
    """The texts of a clean run at ``batch_size``, with a fresh engine and seed 0."""
    runner = unbounded(StaticEngine(model, tok), batch_size, 0)
    return texts_of(runner.run(records, sampling, lambda r, t: None), records)


def test_greedy_equal_across_engines_and_batch_sizes(tiny_models):
    sampling = SamplingConfig(max_new_tokens=10)
    model, tok = load(tiny_models["nopad"], sampling)
    records = recs(tok)
    outs = []
    for engine_cls, batch_size in (
        (StaticEngine, 1),
        (StaticEngine, 4),
        (StaticEngine, 10),
        (ContinuousEngine, 1),
    ):
        runner = Batcher(engine_cls(model, tok), RunnerConfig(batch_size=batch_size), seed=0)
        outs.append(texts_of(runner.run(records, sampling, lambda r, t: None), records))
    assert outs[0] == outs[1] == outs[2] == outs[3]


def test_sampling_is_batch_invariant(tiny_models):
    sampling = SamplingConfig(
        max_new_tokens=10,
        do_sample=True,
        temperature=0.9,
        top_p=0.95,
        top_k=50,
        num_return_sequences=2,
    )
    model, tok = load(tiny_models["chat"], sampling)
    records = recs(tok)
    runs = []
    for batch_size, budget in ((1, None), (8, None), (10, 150)):
        runner = Batcher(
            StaticEngine(model, tok),
            RunnerConfig(batch_size=batch_size, max_batch_tokens=budget),
            seed=3,
        )
        runs.append(texts_of(runner.run(records, sampling, lambda r, t: None), records))
    assert runs[0] == runs[1] == runs[2]
    assert any(a != b for a, b in runs[0])  # two samples of a row differ
    other_seed = unbounded(StaticEngine(model, tok), 8, 4)
    assert texts_of(other_seed.run(records, sampling, lambda r, t: None), records) != runs[0]


def test_out_of_memory_splits_batch_and_keeps_outputs(tiny_models, monkeypatch):
    sampling = SamplingConfig(max_new_tokens=6)
    model, tok = load(tiny_models["chat"], sampling)
    records = recs(tok, 8)
    expected = reference(model, tok, sampling, records, 8)
    engine = StaticEngine(model, tok)
    real = engine.generate
    sizes = []

    def flaky(batch, seed, sampling=None):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(batch, seed, sampling)

    monkeypatch.setattr(engine, "generate", flaky)
    runner = unbounded(engine, 8, 0)
    progress = []
    got = texts_of(runner.run(records, sampling, lambda r, t: progress.append(r)), records)
    assert got == expected
    assert sizes == [8, 4, 2, 2, 4, 2, 2]
    assert sum(progress) == 8 and runner.budget.splits == 3
    sorted_records = sorted(records, key=lambda r: (-len(r.token_ids), r.index))
    # The next plan is bounded by at most half of the last batch that failed.
    assert 0 < runner.budget.current <= batch_tokens(sorted_records[4:8], sampling) // 2


def test_after_out_of_memory_the_rest_of_the_shard_is_replanned(tiny_models, monkeypatch):
    sampling = SamplingConfig(max_new_tokens=6)
    model, tok = load(tiny_models["chat"], sampling)
    records = recs(tok, 16)
    expected = reference(model, tok, sampling, records, 4)
    engine = StaticEngine(model, tok)
    real = engine.generate
    first = plan_batches(records, 4, new_tokens=6)[0]
    memory = batch_tokens(first, sampling) // 2  # token slots that fit on the "device"
    ooms = []

    def flaky(batch, seed, sampling=None):
        if batch_tokens(batch, sampling) > memory:
            ooms.append(len(batch))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(batch, seed, sampling)

    monkeypatch.setattr(engine, "generate", flaky)
    runner = unbounded(engine, 4, 0)
    assert texts_of(runner.run(records, sampling, lambda r, t: None), records) == expected
    # One out-of-memory; the rest is planned under the halved budget, so it never recurs.
    assert ooms == [4] and runner.budget.splits == 1


def test_failed_attempt_memory_is_released_before_the_halves_run(tiny_models, monkeypatch):
    import weakref

    sampling = SamplingConfig(max_new_tokens=4)
    model, tok = load(tiny_models["chat"], sampling)
    engine = StaticEngine(model, tok)
    real = engine.generate
    attempts, alive = [], []

    class Cache:  # stands for the KV cache a failed attempt allocated
        pass

    def flaky(batch, seed, sampling=None):
        alive.append(sum(ref() is not None for ref in attempts))
        cache = Cache()
        attempts.append(weakref.ref(cache))
        if len(batch) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(batch, seed, sampling)

    monkeypatch.setattr(engine, "generate", flaky)
    unbounded(engine, 4, 0).run(recs(tok, 4), sampling, lambda r, t: None)
    assert len(alive) == 7 and alive == [0] * 7  # 4 -> 2+2 -> 1+1+1+1


def test_row_failing_alone_is_recorded_and_neighbours_survive(tiny_models, monkeypatch):
    sampling = SamplingConfig(max_new_tokens=4)
    model, tok = load(tiny_models["chat"], sampling)
    engine = StaticEngine(model, tok)
    records = recs(tok, 6)
    expected = reference(model, tok, sampling, records, 6)
    real = engine.generate

    def poisoned(batch, seed, sampling=None):
        if any(r.id == "r3" for r in batch):
            raise torch.OutOfMemoryError("CUDA out of memory (a huge row)")
        return real(batch, seed, sampling)

    monkeypatch.setattr(engine, "generate", poisoned)
    results, failed = unbounded(engine, 6, 0).run(records, sampling, lambda r, t: None)
    assert [(f.id, f.index) for f in failed] == [("r3", 3)]
    assert "generation failed: OutOfMemoryError" in failed[0].reason
    assert sorted(results) == [0, 1, 2, 4, 5]
    assert [[s.text for s in results[r.index]] for r in records if r.id != "r3"] == [
        e for r, e in zip(records, expected, strict=True) if r.id != "r3"
    ]


def test_systematic_failure_stops_the_job(tiny_models, monkeypatch):
    sampling = SamplingConfig(max_new_tokens=4)
    model, tok = load(tiny_models["chat"], sampling)
    engine = StaticEngine(model, tok)
    calls = []

    def broken(batch, seed, sampling=None):
        calls.append(len(batch))
        raise RuntimeError("device-side assert triggered")

    monkeypatch.setattr(engine, "generate", broken)
    with pytest.raises(RuntimeError, match="device-side assert"):
        Batcher(engine, RunnerConfig(batch_size=4), 0).run(recs(tok, 12), sampling, print)
    assert calls.count(1) == 8  # eight rows failed alone in a row, then it gave up


def test_engine_choice(monkeypatch):
    greedy, sampled = SamplingConfig(), SamplingConfig(do_sample=True)
    assert choose_engine(RunnerConfig(engine="auto"), greedy, False, "cpu") == "static"
    assert choose_engine(RunnerConfig(engine="continuous"), greedy, False, "cpu") == "continuous"
    monkeypatch.setattr(choice, "AUTO_CONTINUOUS_DEVICES", ("cpu",))
    assert choose_engine(RunnerConfig(engine="auto"), greedy, False, "cpu") == "continuous"
    assert choose_engine(RunnerConfig(engine="auto"), sampled, False, "cpu") == "static"
    assert choose_engine(RunnerConfig(engine="auto"), greedy, True, "cpu") == "static"
    assert choose_engine(RunnerConfig(engine="static"), greedy, False, "cpu") == "static"
    with pytest.raises(ConfigError, match="runner.engine=continuous.*sampling.stop"):
        choose_engine(RunnerConfig(engine="continuous"), SamplingConfig(stop=["x"]), False, "cpu")
