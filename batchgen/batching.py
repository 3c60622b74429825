"""Run a shard through an engine: plan batches, split on out-of-memory, adapt the budget."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from batchgen.config import RunnerConfig, SamplingConfig
from batchgen.continuous import ContinuousEngine
from batchgen.engine import Engine, Sample
from batchgen.errors import ConfigError
from batchgen.prompts import PromptRecord, Skipped
from batchgen.sharding import plan_batches

log = logging.getLogger(__name__)

# Rows failing one after another, each alone, before the job stops: past this it is the model or
# the device that is broken, not the rows.
FAILING_STREAK_LIMIT = 8
# Clean batches after an out-of-memory before the token budget grows back by GROWTH.
GROW_AFTER = 8
GROWTH = 1.25


# Devices where continuous batching beat static batching in scripts/bench.py (docs/benchmarks.md).
# On the CPU it lost (0.89x vs 4.66x the baseline); no GPU run has been measured yet.
AUTO_CONTINUOUS_DEVICES: tuple[str, ...] = ()


def choose_engine(
    runner: RunnerConfig, sampling: SamplingConfig, encoder_decoder: bool, device: str
) -> str:
    """``static`` or ``continuous`` for this job; ``auto`` picks the faster one that applies.

    Raises:
        ConfigError: ``runner.engine=continuous`` for a job it cannot serve.
    """
    unsupported = [
        why
        for applies, why in (
            (sampling.do_sample, "sampling.do_sample=true"),
            (bool(sampling.stop), "sampling.stop"),
            (encoder_decoder, "an encoder-decoder model"),
        )
        if applies
    ]
    if runner.engine == "continuous" and unsupported:
        raise ConfigError(
            f"runner.engine=continuous: transformers' continuous batching cannot serve "
            f"{', '.join(unsupported)} batch-invariantly; use runner.engine=static or auto."
        )
    if runner.engine == "auto":
        auto_ok = not unsupported and device.split(":")[0] in AUTO_CONTINUOUS_DEVICES
        return "continuous" if auto_ok else "static"
    return runner.engine


class Interrupted(Exception):
    """A stop was requested (signal, Ctrl-C) between two batches."""


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA/MPS out-of-memory errors, which a smaller batch can avoid."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


@dataclass
class Budget:
    """The padded-token budget of a batch: halved on out-of-memory, grown back after clean runs."""

    limit: int | None  # configured runner.max_batch_tokens; None: bounded by batch_size only
    current: int | None = None
    clean: int = 0
    splits: int = 0

    def __post_init__(self) -> None:
        self.current = self.limit

    def shrink(self, failed_tokens: int) -> None:
        """A batch of ``failed_tokens`` token slots ran out of memory."""
        self.current = max(1, min(self.current or failed_tokens, failed_tokens) // 2)
        self.clean = 0
        self.splits += 1

    def succeeded(self) -> None:
        """A batch went through; after enough of them, give back some of the budget."""
        self.clean += 1
        if self.clean >= GROW_AFTER and self.current != self.limit:
            grown = int(self.current * GROWTH) + 1
            self.current = grown if self.limit is None or grown < self.limit else self.limit
            self.clean = 0


def batch_tokens(batch: list[PromptRecord], sampling: SamplingConfig) -> int:
    """Token slots a batch occupies: rows x samples x (longest prompt + new tokens)."""
    longest = max(len(r.token_ids) for r in batch)
    return len(batch) * sampling.num_return_sequences * (longest + sampling.max_new_tokens)


class BatchRunner:
    """Feeds records to an engine in planned batches; one instance lives for the whole job."""

    def __init__(
        self,
        engine: Engine,
        runner: RunnerConfig,
        sampling: SamplingConfig,
        seed: int,
        stop: threading.Event | None = None,
    ):
        self.engine = engine
        self.runner = runner
        self.sampling = sampling
        self.seed = seed
        self.budget = Budget(runner.max_batch_tokens)
        self.stop = stop or threading.Event()
        self.failing_streak = 0

    def run(
        self,
        records: list[PromptRecord],
        on_rows: Callable[[int, int], None],
        on_batch: Callable[[list[tuple[int, list[Sample]]]], None] | None = None,
    ) -> tuple[dict[int, list[Sample]], list[Skipped]]:
        """Generate every record; ``on_rows(rows, tokens)`` reports progress as batches finish.

        ``on_batch`` receives each finished batch's (row index, samples) pairs as it finishes,
        to persist them (``batchgen.checkpoints``).

        Returns:
            (row index -> that row's samples, rows that failed alone with the error)

        Raises:
            Interrupted: ``stop`` was set; the records are not all done.
            Exception: the error of a run of failing rows (see FAILING_STREAK_LIMIT).
        """
        if isinstance(self.engine, ContinuousEngine) and not self.stop.is_set():
            try:
                outs = self.engine.generate_all(records, self.seed, on_row=lambda t: on_rows(1, t))
                if on_batch is not None:
                    on_batch([(r.index, o) for r, o in zip(records, outs, strict=True)])
                return {r.index: o for r, o in zip(records, outs, strict=True)}, []
            except Exception as e:  # noqa: BLE001 - the static path below handles rows one by one
                log.warning(
                    "continuous batching failed (%s); redoing the shard in static batches", e
                )
        results: dict[int, list[Sample]] = {}
        failed: list[Skipped] = []
        pending = records
        while pending:
            planned_with = self.budget.current
            batches = self._plan(pending)
            pending = []
            for i, batch in enumerate(batches):
                if self.stop.is_set():
                    raise Interrupted
                finished = []
                for record, outs in self._generate(batch):
                    if isinstance(outs, Skipped):
                        failed.append(outs)
                    else:
                        results[record.index] = outs
                        finished.append((record.index, outs))
                if on_batch is not None:
                    on_batch(finished)
                tokens = sum(s.completion_tokens for r in batch for s in results.get(r.index, []))
                on_rows(len(batch), tokens)
                if self.budget.current != planned_with:
                    # Re-plan the rest: each batch planned before an out-of-memory would run
                    # out again before splitting.
                    pending = [r for later in batches[i + 1 :] for r in later]
                    break
        return results, failed

    def _plan(self, records: list[PromptRecord]) -> list[list[PromptRecord]]:
        return plan_batches(
            records,
            self.runner.batch_size,
            self.budget.current,
            self.sampling.max_new_tokens,
            self.sampling.num_return_sequences,
            self.runner.max_padding,
        )

    def _generate(self, batch: list[PromptRecord]) -> list[tuple[PromptRecord, Any]]:
        outs = None
        try:
            outs = self.engine.generate(batch, self.seed)
        except Exception as e:  # noqa: BLE001 - any row may be the culprit; isolate it
            if len(batch) == 1:
                return [(batch[0], self._failed(batch[0], e))]
            if is_out_of_memory(e):
                self.budget.shrink(batch_tokens(batch, self.sampling))
        if outs is None:
            # Out of the except block, the error's traceback no longer holds the failed
            # attempt's tensors (its KV cache), so the halves get that memory back.
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            # Outputs do not depend on batch composition, so halves give the same samples.
            half = len(batch) // 2
            return self._generate(batch[:half]) + self._generate(batch[half:])
        self.budget.succeeded()
        self.failing_streak = 0
        return list(zip(batch, outs, strict=True))

    def _failed(self, record: PromptRecord, error: Exception) -> Skipped:
        self.failing_streak += 1
        if self.failing_streak >= FAILING_STREAK_LIMIT:
            raise error  # not a bad row: generation itself is broken
        log.warning("row %s failed alone and is recorded as failed: %s", record.id, error)
        return Skipped(
            record.index, record.id, f"generation failed: {type(error).__name__}: {error}"
        )
