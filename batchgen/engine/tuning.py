"""Self-tuning batch size, token budget and engine: ``runner.batch_size=auto`` and
``runner.engine=auto`` measure instead of guessing.

Invariant: tuning changes how rows are grouped and which engine decodes them, never what they
decode to (sampling is batch-invariant, and greedy outputs do not depend on the engine), so every
probe batch is real work whose outputs are kept.

The rules, the same on every device:

- Memory sets a ceiling. A batch holds rows x samples x (longest prompt + new tokens) token slots
  of KV cache and, per row, a few fp32 copies of one step's logits. The token budget
  (``runner.max_batch_tokens``, when unset) is what fits in the memory free once the weights are
  loaded (CUDA: ``torch.cuda.mem_get_info``; CPU: the system's available memory), less a margin
  and a reserve for one prefill pass: ``batchgen.engine.memory``.
- Throughput sets the rows. From a start, the rows double while a batch's decoding tokens/s beats
  the last size's by more than ``GAIN`` per doubling; then the search settles on the smallest size
  within ``GAIN`` of the fastest measured: past the knee a larger batch buys no speed and costs
  memory and KV-cache padding. The start: on a device whose memory is far away (the CPU),
  ``START_ROWS``; on CUDA, the rows the budget holds at the shard's mean row, since a GPU decodes
  faster with every row until memory binds. Growing past the budget takes measured headroom (on
  CUDA: the batches so far used at most ``HEADROOM`` of the usable memory); the budget then
  doubles too. Without it the search settles.
- Out of memory: ``memory.Budget`` halves the budget and splits the batch, as for any job; the
  search stops growing, and an automatic budget's ceiling drops below the size that failed.
- Engine: where both apply on a ``PROBE_DEVICES`` device, ``batching.Batcher`` runs a
  shard's first rows through both, alternately by prompt length, and the faster output tokens/s
  (prefill included: continuous batching interleaves it) decides the rest of the job.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from statistics import fmean

import torch

from batchgen.config import RunnerConfig, SamplingConfig
from batchgen.engine.memory import MemoryPlan
from batchgen.inputs.prompts import PromptRecord

AUTO = "auto"
# Where the rows search starts when memory is far away (the CPU). Every batch below the knee is
# probe cost that a small job never earns back: started at 16, a 64-prompt job ran 17% slower
# than at 32 (16 rows, then 48). 32 is the low end of the CPU's knee (docs/benchmarks.md); the
# search decides from there whether more rows pay.
START_ROWS = 32
# A doubling of the rows must raise decoding tokens/s by more than this to be kept.
GAIN = 0.10
# Growth past the token budget needs the batches so far to have used at most this share of it.
HEADROOM = 0.5
# Batches in a row no larger than the largest measured (small shards, a budget that trims them)
# before the search settles.
UNMEASURED_LIMIT = 4

# Devices where auto probes both engines and keeps the faster. Not the CPU: transformers runs
# paged attention eagerly there, 5x slower than static batching (docs/benchmarks.md), so a probe
# would cost more than any job could win back.
PROBE_DEVICES: tuple[str, ...] = ("cuda",)

clock: Callable[[], float] = time.perf_counter  # tests replace it


def continuous_blockers(
    sampling: SamplingConfig, encoder_decoder: bool, logprobs: bool, per_row: bool
) -> list[str]:
    """The job's settings that transformers' continuous batching cannot serve (it takes no
    logits processors): empty when it applies."""
    return [
        why
        for applies, why in (
            (sampling.do_sample, "sampling.do_sample=true"),
            (bool(sampling.stop), "sampling.stop"),
            (sampling.json_schema is not None, "sampling.json_schema"),
            (sampling.regex is not None, "sampling.regex"),
            (encoder_decoder, "an encoder-decoder model"),
            (logprobs, "output.logprobs"),
            (per_row, "dataset.sampling_column"),
        )
        if applies
    ]


def engine_reason(
    runner: RunnerConfig, kind: str, device: torch.device, blockers: list[str]
) -> str:
    """Why ``batching.choose_engine`` gave ``kind``, for the run's records (a probe's result
    replaces it)."""
    if runner.engine != AUTO:
        return f"runner.engine={runner.engine}"
    if kind == AUTO:
        return "auto: both apply; the first rows decide"
    if kind == "continuous":
        return f"auto: continuous batching measured faster on {device.type}"
    if blockers:
        return f"auto: continuous batching cannot serve {', '.join(blockers)}"
    if device.type not in PROBE_DEVICES:
        slower = " (5x slower than static there)" if device.type == "cpu" else ""
        return f"auto: continuous batching is not probed on {device.type}{slower}"
    return "auto: continuous batching cannot serve dataset.sampling_column"


def row_slots(records: list[PromptRecord], sampling: SamplingConfig) -> int:
    """Token slots of the mean record: samples x (prompt + new tokens)."""
    mean = fmean(len(r.token_ids) for r in records)
    return max(1, round(sampling.num_return_sequences * (mean + sampling.max_new_tokens)))


class StepClock:
    """An engine ``on_step`` hook that times decoding steps, then calls the hook it wraps.

    A step reports the tokens its still-running rows produced; the first step follows the prompt
    pass, so the steps after it over the time since it are the batch's decoding rate, free of
    prefill (which costs the same per prompt token at any batch size).
    """

    def __init__(self, inner: Callable[[int], None] | None):
        self.inner = inner
        self.times: list[float] = []
        self.tokens: list[int] = []

    def __call__(self, tokens: int) -> None:
        self.times.append(clock())
        self.tokens.append(tokens)
        if self.inner is not None:
            self.inner(tokens)

    def rate(self) -> float | None:
        """Decoded tokens/s after the first step; None with too few steps to tell."""
        if len(self.times) < 3 or self.times[-1] <= self.times[0]:
            return None
        return sum(self.tokens[1:]) / (self.times[-1] - self.times[0])


def gain_per_doubling(rows: int, rate: float, before_rows: int, before_rate: float) -> float:
    """Relative speed-up per doubling of the rows, from ``before_rows`` to ``rows``."""
    return (rate / before_rate) ** (1 / math.log2(rows / before_rows)) - 1


class Tuner:
    """The job's batch size, token budget and engine, tuned as batches run (one per job).

    Args:
        runner: the settings; ``batch_size`` and ``max_batch_tokens`` as set are kept as set.
        memory: ``model_memory`` for the loaded model, None when unknown or not asked for.
        device: the model's; on ``cuda`` the rows search starts at the memory ceiling.
        engine: ``static`` or ``continuous`` when decided, None to decide by probe.
        engine_why: why ``engine`` was decided without a probe.
    """

    def __init__(
        self,
        runner: RunnerConfig,
        memory: MemoryPlan | None,
        device: torch.device,
        engine: str | None,
        engine_why: str,
    ):
        self.auto = runner.batch_size == AUTO
        self.memory = memory if self.auto else None
        self.device = device
        # Bytes allocated before any batch (the weights): what batches take comes on top.
        self.base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        self.engine = engine
        self.engine_why = engine_why
        self.engine_rates: dict[str, float] = {}
        limit = runner.max_batch_tokens
        if self.memory is not None:
            limit = min(limit or self.memory.budget, self.memory.budget)
        self.token_budget: int | None = limit  # the Budget's ceiling to start with
        self.budget_why = (
            self.memory.describe()
            if self.memory is not None and limit == self.memory.budget
            else f"runner.max_batch_tokens={limit}"
            if limit is not None
            else "none (runner.max_batch_tokens unset)"
        )
        from_memory = self.auto and device.type == "cuda" and self.memory is not None
        # None until the first plan on CUDA, where the start depends on the shard's rows.
        self.rows: int | None = runner.batch_size
        if self.auto:
            self.rows = None if from_memory else START_ROWS
        self.searching = self.auto
        self.rates: dict[int, float] = {}  # rows -> decoding tokens/s, as measured
        self.row_slots = 1  # token slots of the mean row of the shard last planned
        self.unmeasured = 0
        self.rows_why = f"runner.batch_size={runner.batch_size}"

    def plan_rows(self, rows_left: int, row_slots: int, budget: int | None) -> int:
        """The batch size to plan the ``rows_left`` rows of a shard with, whose mean row takes
        ``row_slots`` token slots. While growing, fewer than twice the size go in one batch
        rather than leave a short one behind: a larger batch is the next probe anyway."""
        self.row_slots = row_slots
        if self.rows is None:  # CUDA: the rows the budget holds at the mean row
            self.rows = max(1, (budget or row_slots) // row_slots)
            self.rows_why = f"auto: the rows the token budget holds at {row_slots} slots per row"
        if self.searching and rows_left < 2 * self.rows:
            return rows_left
        return self.rows

    def observed(self, rows: int, rate: float | None, budget) -> None:
        """A clean batch of ``rows`` decoded at ``rate`` tokens/s.

        ``budget`` is the job's ``memory.Budget``, doubled here when growth needs it and the
        memory the batches took leaves headroom.
        """
        if not self.searching:
            return
        if rate is None:  # too few decoding steps to matter: prefill dominates at any size
            self._settle("decoding is too short to measure")
            return
        largest = max(self.rates, default=0)
        if rows <= largest:  # a small shard, or a batch the budget trimmed: nothing new
            self.unmeasured += 1
            if self.unmeasured >= UNMEASURED_LIMIT:
                self._settle(f"no batch went past {largest} rows (small shards or budget)")
            return
        self.unmeasured = 0
        self.rates[rows] = rate
        if largest:
            gain = gain_per_doubling(rows, rate, largest, self.rates[largest])
            if gain <= GAIN:
                self._settle(f"{rows} rows gained {gain:+.0%} per doubling, not over {GAIN:.0%}")
                return
        grown = max(self.rows, 2 * rows)  # a shard smaller than the size does not lower it
        short = budget.current is not None and grown * self.row_slots > budget.current
        if short and not self._headroom(budget):
            # Memory binds: as many rows as the budget holds, which trims each batch.
            self._settle("the next size needs more memory than the token budget", keep=True)
            return
        self.rows = grown

    def used(self) -> int | None:
        """Bytes the batches so far took at their peak (CUDA: what the allocator holds beyond
        the weights, a high-water mark), None where unknown."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.memory_reserved(self.device) - self.base

    def _headroom(self, budget) -> bool:
        """Double ``budget`` when the batches so far used at most HEADROOM of the usable memory
        (the estimate was pessimistic); whether it did."""
        used = self.used()
        if self.memory is None or used is None or used > HEADROOM * self.memory.usable:
            return False
        budget.limit = budget.current = 2 * budget.current
        self.budget_why = (
            f"{self.memory.describe()}, doubled: batches used {used / 2**30:.1f} GiB at most"
        )
        return True

    def out_of_memory(self, budget, rows: int, slots: int) -> None:
        """A batch of ``rows`` rows and ``slots`` token slots ran out of memory (``budget`` has
        halved already): stop growing, and keep an automatic ceiling below what failed."""
        if self.memory is not None and budget.limit is not None and budget.limit >= slots:
            budget.limit = max(1, slots - 1)
            self.budget_why = f"{self.memory.describe()}; lowered below {slots} after out of memory"
        if self.searching:
            fits = [r for r in self.rates if r < rows]
            self.rows = max(fits) if fits else max(1, rows // 2)
            self.searching = False
            self.rows_why = f"auto: {rows} rows ran out of memory"

    def _settle(self, why: str, keep: bool = False) -> None:
        """Stop searching at the smallest measured size within GAIN of the fastest, or, with
        ``keep``, at the size the search was at (the token budget bounds each batch)."""
        self.searching = False
        rule = "the size reached, bounded by the token budget"
        if self.rates and not keep:
            best = max(self.rates.values())
            self.rows = min(r for r, v in self.rates.items() if v >= (1 - GAIN) * best)
            rule = f"the smallest size within {GAIN:.0%} of the fastest"
        measured = ", ".join(f"{r} rows {v:,.1f}" for r, v in sorted(self.rates.items()))
        self.rows_why = f"auto: decoding tok/s {measured or 'not measured'}; {why}; {rule}"

    def engines_probed(self, rows: int, static: float, continuous: float | None) -> None:
        """Decide the engine from output tokens/s measured on ``rows`` rows of each (None:
        continuous batching failed on its rows, which static batching then redid)."""
        self.engine_rates = {"static": static}
        if continuous is None:
            self.engine, self.engine_why = "static", "auto: continuous batching failed its probe"
            return
        self.engine_rates["continuous"] = continuous
        self.engine = "continuous" if continuous > static else "static"
        self.engine_why = (
            f"auto: probed on {rows} rows each: static {static:,.1f} tok/s, "
            f"continuous {continuous:,.1f} tok/s"
        )

    def record(self, budget_limit: int | None) -> dict:
        """The choices and why, for the run's records and its summary (JSON-serialisable).

        A search the job ended before it settled reports the largest size it ran.
        """
        rows, why = self.rows, self.rows_why
        if self.engine == "vllm":  # it batches the shard's requests itself
            rows = None if self.auto else self.rows
            why = f"vllm schedules its own batches (max_num_seqs: {rows or 'its default'})"
        elif self.searching:
            rows = max(self.rates, default=self.rows)
            measured = ", ".join(f"{r} rows {v:,.1f}" for r, v in sorted(self.rates.items()))
            why = f"auto: decoding tok/s {measured or 'not measured'}; the job ended while growing"
        return {
            "batch_size": rows,
            "max_batch_tokens": budget_limit,
            "engine": self.engine or "static",
            "why": {
                "batch_size": why,
                "max_batch_tokens": self.budget_why,
                "engine": self.engine_why if self.engine else "auto: no shard had rows to probe",
            },
            "decode_tokens_per_second": {str(r): v for r, v in sorted(self.rates.items())},
            "engine_tokens_per_second": self.engine_rates,
        }
