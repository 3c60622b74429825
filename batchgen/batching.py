"""Run a shard through an engine: plan batches, split on out-of-memory, adapt the budget."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from batchgen.config import RunnerConfig, SamplingConfig
from batchgen.continuous import ContinuousEngine
from batchgen.engine import Engine, Sample
from batchgen.errors import ConfigError
from batchgen.prompts import PromptRecord
from batchgen.sharding import plan_batches

# Clean batches after an out-of-memory before the token budget grows back by GROWTH.
GROW_AFTER = 8
GROWTH = 1.25


# Devices where continuous batching beat static batching in scripts/bench.py (docs/benchmarks.md).
AUTO_CONTINUOUS_DEVICES = ("cpu",)


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

    def __init__(self, engine: Engine, runner: RunnerConfig, sampling: SamplingConfig, seed: int):
        self.engine = engine
        self.runner = runner
        self.sampling = sampling
        self.seed = seed
        self.budget = Budget(runner.max_batch_tokens)

    def run(
        self, records: list[PromptRecord], on_rows: Callable[[int, int], None]
    ) -> dict[int, list[Sample]]:
        """Generate every record; ``on_rows(rows, tokens)`` reports progress as batches finish.

        Returns:
            row index -> that row's samples.
        """
        if isinstance(self.engine, ContinuousEngine):
            outs = self.engine.generate(records, self.seed, on_row=lambda t: on_rows(1, t))
            return {r.index: o for r, o in zip(records, outs, strict=True)}
        results: dict[int, list[Sample]] = {}
        batches = plan_batches(
            records,
            self.runner.batch_size,
            self.budget.current,
            self.sampling.max_new_tokens,
            self.sampling.num_return_sequences,
        )
        for batch in batches:
            for record, outs in self._generate(batch):
                results[record.index] = outs
            on_rows(len(batch), sum(s.completion_tokens for r in batch for s in results[r.index]))
        return results

    def _generate(self, batch: list[PromptRecord]) -> list[tuple[PromptRecord, list[Sample]]]:
        try:
            outs = self.engine.generate(batch, self.seed)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_out_of_memory(e) or len(batch) == 1:
                raise
            # Outputs do not depend on batch composition, so halves give the same samples.
            self.budget.shrink(batch_tokens(batch, self.sampling))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(batch) // 2
            return self._generate(batch[:half]) + self._generate(batch[half:])
        self.budget.succeeded()
        return list(zip(batch, outs, strict=True))
