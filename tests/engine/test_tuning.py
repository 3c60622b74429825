"""Self-tuning (runner.batch_size=auto, runner.engine=auto): the memory arithmetic, the rows
search on fake timings, the engine probe, the config key, and one tiny-model job end to end.

Timings are a fake clock that a fake engine advances by a chosen seconds-per-step curve, so every
assertion is about a decision, never about how long anything took.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, T5Config

import batchgen
from batchgen.config import RunnerConfig, SamplingConfig
from batchgen.config_checks import validate
from batchgen.engine import memory, tuning
from batchgen.engine.batching import Batcher, batch_tokens
from batchgen.engine.choice import PROBE, choose_engine
from batchgen.engine.interface import Sample
from batchgen.errors import ConfigError
from batchgen.inputs.prompts import PromptRecord
from batchgen.job import run as job_runner
from batchgen.store import records as run_records
from batchgen.store.summary import format_summary

GIB = 2**30
# SmolLM2-135M's shape: 30 layers, 9 heads of which 3 KV heads, hidden 576.
SMOL = LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
)
# Output tokens/s of static batching by batch size on this project's CPU (docs/benchmarks.md:
# 82.6, 95.4 and 96.5 at 16, 32 and 64 rows), and the decoding rates they imply once prefill,
# which costs the same at any size, is taken out (about 190, 264 and 267); below 16 and above
# 64 the curves are extended as measured curves bend: slower below, flat to slightly down above.
CPU_JOB_CURVE = {8: 60.0, 16: 82.6, 32: 95.4, 64: 96.5, 128: 96.0, 256: 95.0, 512: 94.0}
CPU_DECODE_CURVE = {8: 122.0, 16: 190.0, 32: 264.0, 64: 267.0, 128: 262.0, 256: 255.0}


def fake_records(lengths):
    return [PromptRecord(i, f"r{i}", "x", [1] * n) for i, n in enumerate(lengths)]


def bench_like(n):
    """``n`` prompts of 37 to 545 tokens, as scripts/bench.py's workload."""
    return fake_records([37 + (i * 131) % 509 for i in range(n)])


def interpolate(curve):
    """Tokens/s at any row count, linear in log2(rows) between the curve's points."""
    xs = np.log2(sorted(curve))
    ys = [curve[k] for k in sorted(curve)]
    return lambda rows: float(np.interp(math.log2(rows), xs, ys))


class FakeModel:
    """What the memory plan reads of a model: its config and its parameters' dtype."""

    def __init__(self, config, dtype=torch.float32):
        self.config = config
        self.weight = torch.zeros(1, dtype=dtype)

    def parameters(self):
        yield self.weight


class FakeEngine:
    """An engine whose decoding steps take rows / ``rate(rows)`` seconds on a fake clock.

    ``oom_over``: batches of more token slots raise a CUDA out-of-memory error. ``continuous``:
    tokens/s of ``generate_all``.
    """

    encoder_decoder = False
    logprobs = False
    top_logprobs = 0
    chunked_prefill = True
    padded_tokens = 0

    def __init__(self, rate, device="cpu", oom_over=None, continuous=None, config=SMOL):
        self.kind = "static" if continuous is None else "continuous"
        self.rate = rate
        self.device = torch.device(device)
        self.model = FakeModel(config)
        self.oom_over = oom_over
        self.continuous = continuous
        self.on_step = None
        self.now = 0.0
        self.calls: list[int] = []  # rows of each generate call that ran
        self.continuous_calls: list[int] = []
        self.slots: list[int] = []
        self.ooms: list[int] = []  # token slots of each batch that ran out of memory

    def generate(self, records, seed, sampling):
        slots = batch_tokens(records, sampling)
        if self.oom_over is not None and slots > self.oom_over:
            self.ooms.append(slots)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.calls.append(len(records))
        self.slots.append(slots)
        for _ in range(sampling.max_new_tokens):
            self.now += len(records) / self.rate(len(records))
            if self.on_step is not None:
                self.on_step(len(records))
        n = sampling.max_new_tokens
        return [[Sample(f"{r.id}", "length", n)] for r in records]

    def serves(self, sampling, per_row):
        return self.continuous is not None and not sampling.do_sample and not per_row

    def generate_all(self, records, seed, sampling, on_finished=None, stop=None):
        self.continuous_calls.append(len(records))
        n = 64
        self.now += len(records) * n / self.continuous
        outs = [[Sample(f"{r.id}", "length", n)] for r in records]
        if on_finished is not None:
            on_finished(list(zip(records, outs, strict=True)))
        return outs


@pytest.fixture
def fake_clock(monkeypatch):
    """Point tuning's clock at the engine's fake one; returns a function that does it."""

    def use(engine):
        monkeypatch.setattr(tuning, "clock", lambda: engine.now)
        return engine

    return use


@pytest.fixture
def ram(monkeypatch):
    """Set the CPU's available memory (bytes)."""

    def set_ram(nbytes):
        monkeypatch.setattr(memory, "available_ram", lambda: nbytes)

    set_ram(16 * GIB)
    return set_ram


@pytest.fixture
def cuda(monkeypatch):
    """A fake CUDA device: ``free`` bytes free and ``reserved`` held by torch beyond ``base``."""
    state = {"free": 40 * GIB, "base": 1 * GIB, "reserved": 1 * GIB}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["base"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: state["reserved"])
    return state


GREEDY = SamplingConfig(max_new_tokens=64)


def run_all(engine, records, runner, sampling=GREEDY, kind=None):
    batcher = Batcher(engine, runner, 0, engine_kind=kind)
    results, failed = batcher.run(records, sampling, lambda rows, tokens: None)
    assert failed == [] and sorted(results) == [r.index for r in records]
    return batcher


# --- memory arithmetic --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config,dtype_bytes,expected",
    [
        # Llama-2-7B-like, fp16: 32 layers x 32 KV heads x 128 x 2 x 2 = 512 KiB per token.
        (LlamaConfig(hidden_size=4096, num_attention_heads=32, num_hidden_layers=32), 2, 524_288),
        # Qwen2.5-0.5B-like, GQA (2 KV heads of 14), head_dim unset (896 / 14 = 64), bf16.
        (
            Qwen2Config(
                hidden_size=896, num_attention_heads=14, num_key_value_heads=2, num_hidden_layers=24
            ),
            2,
            24 * 2 * 64 * 2 * 2,
        ),
        # flan-t5-small-like: decoder layers, no KV heads key, d_kv=64 (not 512 / 6), fp32.
        (
            T5Config(d_model=512, num_heads=6, d_kv=64, num_layers=8, num_decoder_layers=8),
            4,
            8 * 6 * 64 * 2 * 4,
        ),
        # SmolLM2-135M, fp32.
        (SMOL, 4, 30 * 3 * 64 * 2 * 4),
    ],
    ids=["llama", "qwen-gqa", "t5", "smollm2"],
)
def test_kv_bytes_per_token(config, dtype_bytes, expected):
    assert memory.kv_bytes_per_token(config, dtype_bytes) == expected


def test_encoder_decoder_counts_decoder_layers():
    deep_decoder = T5Config(d_model=64, num_heads=4, d_kv=16, num_layers=2, num_decoder_layers=6)
    assert memory.kv_bytes_per_token(deep_decoder, 4) == 6 * 4 * 16 * 2 * 4


def test_free_memory_to_token_budget():
    plan = memory.plan_memory(
        free=10 * GIB, kv_per_token=12_288, row_bytes=151_936 * 16, new_tokens=256, reserve=GIB
    )
    usable = int(10 * GIB * (1 - memory.MARGIN)) - GIB
    slot = 12_288 + math.ceil(151_936 * 16 / 257)
    assert (plan.usable, plan.slot_bytes, plan.budget) == (usable, slot, usable // slot)
    # Short rows pay more of their logits per slot: the budget is smaller.
    short = memory.plan_memory(10 * GIB, 12_288, 151_936 * 16, 16, GIB)
    assert short.budget < plan.budget
    # Nothing free: still one slot (a row alone always gets a batch).
    assert memory.plan_memory(0, 12_288, 0, 16, GIB).budget == 1


def test_cuda_budget_and_rows_from_free_memory(cuda):
    qwen = Qwen2Config(
        vocab_size=151_936,
        hidden_size=896,
        intermediate_size=4864,
        num_attention_heads=14,
        num_key_value_heads=2,
        num_hidden_layers=24,
    )
    cuda["reserved"] = 3 * GIB  # 2 GiB cached by torch beyond the weights: free to reuse
    device = torch.device("cuda")
    plan = memory.model_memory(FakeModel(qwen, torch.bfloat16), device, 256, 2048, chunked=True)
    kv, act = 12_288, (4 * 896 + 2 * 4864) * 2
    free = 42 * GIB
    usable = int(free * (1 - memory.MARGIN)) - 2048 * (kv + act)
    slot = kv + math.ceil(151_936 * 4 * memory.LOGIT_COPIES / 257)
    assert (plan.free, plan.usable, plan.budget) == (free, usable, usable // slot)
    assert "CUDA memory free" in plan.describe()
    tuner = tuning.Tuner(RunnerConfig(batch_size="auto"), plan, device, "static", "")
    assert tuner.token_budget == plan.budget
    # The start: the rows the budget holds at the shard's mean row (300 prompt + 256 new).
    assert tuner.plan_rows(100_000, 556, plan.budget) == plan.budget // 556


def test_a_tensor_parallel_gpu_caches_its_share_of_the_heads(cuda, ram):
    from transformers.distributed import DistributedConfig

    qwen = Qwen2Config(num_attention_heads=14, num_key_value_heads=2, num_hidden_layers=24)
    whole = memory.model_memory(
        FakeModel(qwen, torch.bfloat16), torch.device("cuda"), 256, 2048, True
    )
    qwen.distributed_config = DistributedConfig(tp_size=2)
    split = memory.model_memory(
        FakeModel(qwen, torch.bfloat16), torch.device("cuda"), 256, 2048, True
    )
    assert whole.slot_bytes - split.slot_bytes == memory.kv_bytes_per_token(qwen, 2) // 2
    # On the CPU the group's processes share one RAM: each plans for the whole cache.
    cpu = [
        memory.model_memory(FakeModel(qwen, torch.bfloat16), torch.device("cpu"), 256, 2048, True)
    ]
    qwen.distributed_config = None
    cpu.append(
        memory.model_memory(FakeModel(qwen, torch.bfloat16), torch.device("cpu"), 256, 2048, True)
    )
    assert cpu[0].slot_bytes == cpu[1].slot_bytes


def test_unknown_device_or_shape_plans_no_budget(ram):
    assert memory.model_memory(FakeModel(SMOL), torch.device("meta"), 64, 2048, True) is None
    assert memory.model_memory(FakeModel(object()), torch.device("cpu"), 64, 2048, True) is None


# --- the rows search on fake timings ------------------------------------------------------------


@pytest.mark.parametrize("start", [8, 16, 32])
@pytest.mark.parametrize("curve", [CPU_JOB_CURVE, CPU_DECODE_CURVE], ids=["job", "decode"])
def test_cpu_search_stops_where_the_benchmark_flattens(curve, start, fake_clock, ram, monkeypatch):
    # From any start below the knee, the rule lands in 32..64: the start only sets the cost.
    monkeypatch.setattr(tuning, "START_ROWS", start)
    engine = fake_clock(FakeEngine(interpolate(curve)))
    batcher = run_all(engine, bench_like(400), RunnerConfig(batch_size="auto"))
    choice = batcher.choices()
    assert 32 <= choice["batch_size"] <= 64
    # It doubled while decoding got faster by over 10%, up to 64 (+1%: not worth its memory),
    # then kept the smallest size within 10% of the fastest.
    ladder = [start * 2**k for k in range(int(math.log2(64 // start)) + 1)]
    assert engine.calls[: len(ladder)] == ladder
    assert set(engine.calls[len(ladder) : -1]) == {choice["batch_size"]}
    assert list(choice["decode_tokens_per_second"]) == [str(r) for r in ladder]
    assert "the smallest size within 10% of the fastest" in choice["why"]["batch_size"]
    assert choice["engine"] == "static"
    assert "not probed on cpu" in choice["why"]["engine"]
    assert "available RAM" in choice["why"]["max_batch_tokens"]


def test_rows_that_would_leave_a_short_batch_join_the_probe(fake_clock, ram, monkeypatch):
    def calls(n):
        engine = fake_clock(FakeEngine(interpolate(CPU_DECODE_CURVE)))
        run_all(engine, bench_like(n), RunnerConfig(batch_size="auto"))
        return engine.calls

    assert calls(64) == [32, 32]
    assert calls(40) == [40]  # not 32 and then 8
    monkeypatch.setattr(tuning, "START_ROWS", 16)
    # 16 measured; a batch of 32 would leave 16 behind: the 48 go together.
    assert calls(64) == [16, 48]


def test_search_keeps_growing_while_it_pays_and_stops_at_the_memory_bound(fake_clock, ram):
    rising = lambda rows: 50.0 * rows**0.5  # noqa: E731 - +41% per doubling, never flat
    engine = fake_clock(FakeEngine(rising))
    run_all(engine, bench_like(2000), RunnerConfig(batch_size="auto"))
    assert engine.calls[:5] == [32, 64, 128, 256, 512]
    # Little memory: the budget binds before the curve flattens, and on the CPU there is no
    # headroom to measure, so the search settles below it.
    ram(2 * GIB)
    engine = fake_clock(FakeEngine(rising))
    batcher = run_all(engine, bench_like(2000), RunnerConfig(batch_size="auto"))
    choice = batcher.choices()
    assert max(engine.slots) <= choice["max_batch_tokens"]
    assert choice["batch_size"] < 512
    assert "more memory than the token budget" in choice["why"]["batch_size"]


def test_out_of_memory_stops_growth_and_lowers_the_ceiling(fake_clock, ram):
    rising = lambda rows: 50.0 * rows**0.5  # noqa: E731
    engine = fake_clock(FakeEngine(rising, oom_over=30_000))
    batcher = run_all(engine, bench_like(400), RunnerConfig(batch_size="auto"))
    # 32 ran; 64 rows of long prompts ran out of memory and ran as two halves.
    assert engine.calls[:3] == [32, 32, 32] and len(engine.ooms) >= 1
    assert batcher.budget.splits >= 1 and not batcher.tuner.searching
    assert batcher.choices()["batch_size"] == 32
    assert batcher.budget.limit < engine.ooms[0]  # never again the size that failed
    assert max(engine.slots) < engine.ooms[0]
    assert "ran out of memory" in batcher.choices()["why"]["batch_size"]


def test_cuda_sizes_rows_from_memory_and_grows_only_with_headroom(fake_clock, cuda):
    rising = lambda rows: 50.0 * rows**0.5  # noqa: E731 - decoding that never flattens
    records = bench_like(3000)
    cuda["free"] = 2 * GIB
    # The batches took 2 GiB beyond the weights: no headroom past the estimate.
    cuda["reserved"] = 3 * GIB
    engine = fake_clock(FakeEngine(rising, device="cuda"))
    batcher = run_all(engine, records, RunnerConfig(batch_size="auto"))
    plan, choice = batcher.tuner.memory, batcher.choices()
    assert choice["max_batch_tokens"] == plan.budget and max(engine.slots) <= plan.budget
    # The rows the budget holds at the mean row; the budget trims batches of longer prompts.
    assert choice["batch_size"] == plan.budget // tuning.row_slots(records, GREEDY)
    assert "more memory than the token budget" in choice["why"]["batch_size"]
    assert "CUDA memory free" in choice["why"]["max_batch_tokens"]
    # The batches took a sliver: the estimate was pessimistic, and the budget doubled past it.
    cuda["reserved"] = 1 * GIB + 2**20
    engine = fake_clock(FakeEngine(rising, device="cuda"))
    batcher = run_all(engine, records, RunnerConfig(batch_size="auto"))
    plan, choice = batcher.tuner.memory, batcher.choices()
    assert choice["max_batch_tokens"] >= 2 * plan.budget
    assert max(engine.slots) > plan.budget
    assert "doubled" in choice["why"]["max_batch_tokens"]


def test_fixed_batch_size_is_not_searched(fake_clock, ram):
    engine = fake_clock(FakeEngine(interpolate(CPU_DECODE_CURVE)))
    batcher = run_all(engine, bench_like(100), RunnerConfig(batch_size=24))
    assert set(engine.calls[:-1]) == {24}
    choice = batcher.choices()
    assert choice["batch_size"] == 24 and choice["max_batch_tokens"] is None
    assert choice["why"]["batch_size"] == "runner.batch_size=24"
    assert choice["decode_tokens_per_second"] == {}


# --- the engine ---------------------------------------------------------------------------------


def test_auto_engine_probes_only_where_both_apply():
    auto = RunnerConfig(engine="auto")
    assert choose_engine(auto, SamplingConfig(), False, "cuda") == PROBE
    assert choose_engine(auto, SamplingConfig(), False, "cuda:1") == PROBE
    assert choose_engine(auto, SamplingConfig(), False, "cpu") == "static"
    assert choose_engine(auto, SamplingConfig(do_sample=True), False, "cuda") == "static"
    assert choose_engine(auto, SamplingConfig(), True, "cuda") == "static"
    assert choose_engine(auto, SamplingConfig(), False, "cuda", logprobs=True) == "static"


@pytest.mark.parametrize("continuous,winner", [(5000.0, "continuous"), (10.0, "static")])
def test_engine_probe_keeps_the_faster_and_its_outputs(continuous, winner, fake_clock):
    flat = lambda rows: 100.0  # noqa: E731 - static: 100 tok/s at any size
    engine = fake_clock(FakeEngine(flat, device="cuda", continuous=continuous))
    records = bench_like(40)
    batcher = run_all(engine, records, RunnerConfig(batch_size=8), kind=PROBE)
    choice = batcher.choices()
    assert choice["engine"] == winner
    assert set(choice["engine_tokens_per_second"]) == {"static", "continuous"}
    assert "probed on 8 rows each" in choice["why"]["engine"]
    # The probe's rows, 8 per engine, alternate by length, and are kept: 40 rows generated once.
    assert engine.calls[0] == 8 and engine.continuous_calls[0] == 8
    done = sum(engine.calls) + sum(engine.continuous_calls)
    assert done == len(records)
    assert (len(engine.continuous_calls) > 1) == (winner == "continuous")


def test_no_probe_when_one_engine_applies(fake_clock):
    engine = fake_clock(FakeEngine(lambda rows: 100.0, device="cuda", continuous=5000.0))
    sampled = SamplingConfig(max_new_tokens=64, do_sample=True)
    kind = choose_engine(RunnerConfig(), sampled, False, "cuda")
    batcher = run_all(engine, bench_like(20), RunnerConfig(batch_size=8), sampled, kind)
    assert engine.continuous_calls == []
    assert batcher.choices()["why"]["engine"] == (
        "auto: continuous batching cannot serve sampling.do_sample=true"
    )


# --- the setting --------------------------------------------------------------------------------


def test_batch_size_setting_takes_auto_or_rows():
    assert batchgen.compose([]).runner.batch_size == "auto"
    assert batchgen.compose(["runner.batch_size=auto"]).runner.batch_size == "auto"
    assert batchgen.compose(["runner.batch_size=32"]).runner.batch_size == 32
    validate(batchgen.compose(["runner.batch_size=32", "output.dir=/tmp/x"]))
    for bad in ("big", "0", "true", "1.5"):
        job = batchgen.compose([f"runner.batch_size={bad}", "output.dir=/tmp/x"])
        with pytest.raises(ConfigError, match=r"^runner\.batch_size: must be"):
            validate(job)


# --- end to end ---------------------------------------------------------------------------------


def test_job_with_auto_batch_size_records_its_choice(tiny_models, prompts_file, tmp_path, make_job):
    out = tmp_path / "auto"
    cfg = make_job(
        tiny_models["chat"], prompts_file, out, runner__batch_size="auto", output__rows_per_shard=6
    )
    summary = job_runner.run(cfg)
    choice = summary["tuning"]
    assert isinstance(choice["batch_size"], int) and choice["batch_size"] >= 1
    assert choice["engine"] == "static"
    assert choice["why"]["batch_size"].startswith("auto:")
    assert choice["max_batch_tokens"] >= 1
    # The worker's record holds it; run.json, the run's shared identity, does not.
    run = run_records.read_run_file(out)
    workers = run_records.read_workers(out, run)
    assert workers[0].summary.tuning == json.loads(json.dumps(choice))
    assert workers[0].engine == "static" and "tuning" not in run
    lines = format_summary(summary)
    assert f"  batch size  {choice['batch_size']} (auto:" in lines
    assert "  engine      static (auto: continuous batching is not probed on cpu" in lines
    # Tuning changes batching only: the rows are those of a hand-tuned run.
    fixed = make_job(
        tiny_models["chat"], prompts_file, tmp_path / "fixed", output__rows_per_shard=6
    )
    job_runner.run(fixed)
    assert _rows(out) == _rows(tmp_path / "fixed")


def _rows(out):
    import pyarrow.dataset as ds

    table = ds.dataset(str(out), format="parquet").to_table().to_pylist()
    return sorted((r["id"], r["response"]) for r in table)
