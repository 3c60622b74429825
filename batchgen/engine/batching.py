"""Run records through an engine: group them by how they decode, plan batches, split on
out-of-memory, adapt the budget, and tune the batch size and engine when asked to
(``batchgen.engine.tuning``).

Invariant: one ``Batcher`` lives as long as its engine (a whole job, or every call of a
``Generator``), so the batch size and engine are measured once and kept; each call names the
sampling it decodes with.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from batchgen.config import RunnerConfig, SamplingConfig
from batchgen.engine import tuning
from batchgen.engine.batch_plan import plan_batches, sampling_groups
from batchgen.engine.choice import PROBE
from batchgen.engine.interface import Engine, Sample
from batchgen.engine.memory import Budget, batch_tokens, model_memory
from batchgen.errors import Interrupted, WorkerDied
from batchgen.inputs.prompts import PromptRecord, Skipped

log = logging.getLogger(__name__)

# Rows failing one after another, each alone, before the job stops: past this it is the model or
# the device that is broken, not the rows.
FAILING_STREAK_LIMIT = 8
# An engine that schedules a shard itself hands its finished rows on to be checkpointed in groups
# of this many, or after this long: a kill loses at most that much, and a shard of a thousand
# rows does not leave a thousand checkpoint files.
FLUSH_ROWS = 32
FLUSH_SECONDS = 30.0


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA/MPS out-of-memory errors, which a smaller batch can avoid."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


class Flusher:
    """Rows an engine finished on its own schedule, handed on in groups: progress as they come,
    checkpoints (``on_batch``) every ``FLUSH_ROWS`` rows or ``FLUSH_SECONDS``, and the rest when
    ``flush`` is called (at the end, or on a stop: a stop loses no finished row)."""

    def __init__(self, on_rows, on_batch):
        self.on_rows = on_rows
        self.on_batch = on_batch
        self.pending: list[tuple[int, list[Sample]]] = []
        self.since = time.monotonic()

    def add(self, finished: list[tuple[PromptRecord, list[Sample]]]) -> None:
        """Rows the engine has just finished."""
        self.pending += [(record.index, samples) for record, samples in finished]
        tokens = sum(s.completion_tokens for _, samples in finished for s in samples)
        self.on_rows(len(finished), tokens)
        if len(self.pending) >= FLUSH_ROWS or time.monotonic() - self.since >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Hand the rows not yet checkpointed to ``on_batch``."""
        if self.pending and self.on_batch is not None:
            self.on_batch(self.pending)
        self.pending, self.since = [], time.monotonic()


class Batcher:
    """Feeds records to an engine in planned batches; one instance lives as long as its engine.

    ``engine_kind`` is ``choose_engine``'s answer (None: the engine's own kind); ``PROBE`` runs
    the first rows through both engines. ``tuner`` holds the batch size, token budget and engine
    as tuned so far (``batchgen.engine.tuning``), ``budget`` the token budget in force; both are
    set up by the first ``run``, whose sampling sizes the memory plan.
    """

    def __init__(
        self,
        engine: Engine,
        runner: RunnerConfig,
        seed: int,
        stop: threading.Event | None = None,
        engine_kind: str | None = None,
    ):
        self.engine = engine
        self.runner = runner
        self.seed = seed
        self.kind = engine_kind or engine.kind
        self.logprobs = bool(engine.logprobs or engine.top_logprobs)
        self.tuner: tuning.Tuner | None = None
        self.budget = Budget(None)
        self.stop = stop or threading.Event()
        engine.stop = self.stop  # the engine stops inside a batch, at its next step
        self.failing_streak = 0

    def _tune(self, sampling: SamplingConfig) -> tuning.Tuner:
        """The tuner, set up at the first call (its memory plan needs the new tokens per row)."""
        if self.tuner is None:
            engine, runner = self.engine, self.runner
            blockers = tuning.continuous_blockers(
                sampling, engine.encoder_decoder, self.logprobs, False
            )
            memory = None
            if runner.batch_size == tuning.AUTO and engine.model is not None:
                memory = model_memory(
                    engine.model,
                    engine.device,
                    sampling.max_new_tokens,
                    runner.prefill_tokens,
                    engine.chunked_prefill,
                )
            self.tuner = tuning.Tuner(
                runner,
                memory,
                engine.device,
                None if self.kind == PROBE else self.kind,
                tuning.engine_reason(runner, self.kind, engine.device, blockers),
            )
            self.budget = Budget(self.tuner.token_budget)
        return self.tuner

    def choices(self) -> dict:
        """The batch size, token budget and engine it runs with, and why (``Tuner.record``).

        Raises:
            RuntimeError: nothing has run yet, so nothing was chosen.
        """
        if self.tuner is None:
            raise RuntimeError("Batcher.choices: no call has run yet")
        return self.tuner.record(self.budget.limit)

    def run(
        self,
        records: list[PromptRecord],
        sampling: SamplingConfig,
        on_rows: Callable[[int, int], None],
        on_batch: Callable[[list[tuple[int, list[Sample]]]], None] | None = None,
    ) -> tuple[dict[int, list[Sample]], list[Skipped]]:
        """Generate every record; ``on_rows(rows, tokens)`` reports progress as batches finish.

        ``sampling`` is the call's (a job's, or one ``Generator`` call's); records with their
        own (``record.sampling``) are batched with those that decode alike
        (``sampling_groups``): rows that differ only in ``max_new_tokens`` share batches, each
        row stopping at its own limit. ``on_batch`` receives each finished batch's (row index,
        samples) pairs as it finishes, to persist them (``batchgen.store.checkpoints``).

        Returns:
            (row index -> that row's samples, rows that failed alone with the error)

        Raises:
            Interrupted: ``stop`` was set; the records are not all done.
            Exception: the error of a run of failing rows (see FAILING_STREAK_LIMIT).
        """
        tuner = self._tune(sampling)
        results: dict[int, list[Sample]] = {}
        failed: list[Skipped] = []
        uniform = all(r.sampling is None for r in records)
        if not uniform:
            # A batch of mixed rows decodes with its first row's settings, but for each row's
            # own constraint: rows without settings of their own carry the call's explicitly.
            records = [
                r if r.sampling else dataclasses.replace(r, sampling=sampling) for r in records
            ]
        whole = self.engine.serves(sampling, per_row=not uniform)
        if whole and tuner.engine is None and len(records) >= 2:
            records = self._probe_engines(records, sampling, results, failed, on_rows, on_batch)
        if whole and tuner.engine == self.engine.kind and records and not self.stop.is_set():
            outs = self._whole_shard(records, sampling, on_rows, on_batch)
            if outs is not None:
                return {**results, **outs}, failed
        groups = [(sampling, records)] if uniform else sampling_groups(records, sampling)
        for group_sampling, group in groups:
            self._run_group(group, group_sampling, results, failed, on_rows, on_batch)
        return results, failed

    def _whole_shard(self, records, sampling, on_rows, on_batch) -> dict[int, list[Sample]] | None:
        """Every record through the engine's own scheduling (``generate_all``), finished rows
        checkpointed as they come (``Flusher``); None when continuous batching failed (redo the
        rows in static batches: the continuous engine is a static one too)."""
        flusher = Flusher(on_rows, on_batch)
        try:
            outs = self.engine.generate_all(records, self.seed, sampling, flusher.add, self.stop)
        except Exception as e:
            if self.engine.kind != "continuous":
                raise
            log.warning("continuous batching failed (%s); redoing the rows in static batches", e)
            return None
        finally:
            flusher.flush()
        return {r.index: o for r, o in zip(records, outs, strict=True)}

    def _probe_engines(
        self, records, sampling, results, failed, on_rows, on_batch
    ) -> list[PromptRecord]:
        """Generate the first rows by both engines, alternately by length so each gets alike
        prompts, and let the tuner keep the faster; returns the records left."""
        ordered = sorted(records, key=lambda r: (-len(r.token_ids), r.index))
        rows = self.tuner.plan_rows(
            len(ordered), tuning.row_slots(ordered, sampling), self.budget.current
        )
        half = min(rows, len(ordered) // 2)
        static, continuous = ordered[: 2 * half : 2], ordered[1 : 2 * half : 2]
        started = tuning.clock()
        self._run_group(static, sampling, results, failed, on_rows, on_batch)
        static_rate = self._tokens(static, results) / max(tuning.clock() - started, 1e-9)
        if self.stop.is_set():
            raise Interrupted
        started = tuning.clock()
        outs = self._whole_shard(continuous, sampling, on_rows, on_batch)
        if outs is None:
            self.tuner.engines_probed(half, static_rate, None)
            self._run_group(continuous, sampling, results, failed, on_rows, on_batch)
        else:
            results.update(outs)
            seconds = max(tuning.clock() - started, 1e-9)
            self.tuner.engines_probed(
                half, static_rate, self._tokens(continuous, results) / seconds
            )
        return ordered[2 * half :]

    @staticmethod
    def _tokens(records: list[PromptRecord], results: dict[int, list[Sample]]) -> int:
        return sum(s.completion_tokens for r in records for s in results.get(r.index, []))

    def _run_group(self, records, sampling, results, failed, on_rows, on_batch) -> None:
        """Generate records that decode with the same ``sampling``, into ``results``/``failed``."""
        pending = records
        while pending:
            size = self.tuner.plan_rows(
                len(pending), tuning.row_slots(pending, sampling), self.budget.current
            )
            planned_with = (self.budget.current, self.tuner.rows)
            batches = plan_batches(
                pending,
                size,
                self.budget.current,
                sampling.max_new_tokens,
                sampling.num_return_sequences,
                self.runner.max_padding,
            )
            pending = []
            for i, batch in enumerate(batches):
                if self.stop.is_set():
                    raise Interrupted
                finished = []
                try:
                    pairs = self._measured(batch, sampling)
                except Interrupted as stopped:  # inside the batch: keep the rows it finished
                    kept = [(r.index, outs) for r, outs in stopped.partial]
                    results.update(kept)
                    if on_batch is not None and kept:
                        on_batch(kept)
                    raise
                for record, outs in pairs:
                    if isinstance(outs, Skipped):
                        failed.append(outs)
                    else:
                        results[record.index] = outs
                        finished.append((record.index, outs))
                if on_batch is not None:
                    on_batch(finished)
                on_rows(len(batch), self._tokens(batch, results))
                if (self.budget.current, self.tuner.rows) != planned_with:
                    # Re-plan the rest: after an out-of-memory each batch planned before would
                    # run out again before splitting; after a tuning step, at the new size.
                    pending = [r for later in batches[i + 1 :] for r in later]
                    break

    def _measured(self, batch, sampling) -> list[tuple[PromptRecord, Any]]:
        """``_generate``, timing the decoding steps for the tuner while it searches."""
        if not self.tuner.searching:
            return self._generate_or_split(batch, sampling)
        clock = tuning.StepClock(self.engine.on_step)
        self.engine.on_step, splits = clock, self.budget.splits
        try:
            pairs = self._generate_or_split(batch, sampling)
        finally:
            self.engine.on_step = clock.inner
        if self.budget.splits == splits:  # a split batch's steps time several calls
            self.tuner.observed(len(batch), clock.rate(), self.budget)
        return pairs

    def _generate_or_split(
        self, batch: list[PromptRecord], sampling: SamplingConfig
    ) -> list[tuple[PromptRecord, Any]]:
        outs = None
        try:
            outs = self.engine.generate(batch, self.seed, sampling)
        except (Interrupted, WorkerDied):  # a process of its group died: no row's fault
            raise
        except Exception as e:  # noqa: BLE001 - any row may be the culprit; isolate it
            if len(batch) == 1:
                return [(batch[0], self._failed(batch[0], e))]
            if is_out_of_memory(e):
                slots = batch_tokens(batch, sampling)
                self.budget.shrink(slots)
                self.tuner.out_of_memory(self.budget, len(batch), slots)
        if outs is None:
            # Out of the except block, the error's traceback no longer holds the failed
            # attempt's tensors (its KV cache), so the halves get that memory back.
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            # Outputs do not depend on batch composition, so halves give the same samples.
            half = len(batch) // 2
            return self._generate_or_split(batch[:half], sampling) + self._generate_or_split(
                batch[half:], sampling
            )
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
