"""Shards (contiguous row ranges, the unit of resume) and the batches inside them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from batchgen.prompts import PromptRecord


@dataclass(frozen=True)
class Shard:
    """Rows ``[start, stop)`` of the dataset, written as ``part-{index:05d}.parquet``."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}.parquet"


def plan_shards(num_rows: int, rows_per_shard: int) -> list[Shard]:
    """Split ``num_rows`` rows into contiguous shards; depends on nothing but its arguments."""
    return [
        Shard(i, start, min(start + rows_per_shard, num_rows))
        for i, start in enumerate(range(0, num_rows, rows_per_shard))
    ]


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from the base seed and any labels (shard index, batch index, ...).

    Hash-based, so neighbouring shards get unrelated streams and the value never depends on
    which process or in what order the work runs.
    """
    key = ":".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def plan_batches(records: list[PromptRecord], batch_size: int) -> list[list[PromptRecord]]:
    """Group a shard's records into batches of similar prompt length.

    Sorting by length (longest first, ties by row index) keeps padding low and makes a batch
    that runs out of memory show up at the start; the plan depends only on the records, so a
    resumed shard is batched exactly as before. Callers restore row order from ``index``.
    """
    ordered = sorted(records, key=lambda r: (-len(r.token_ids), r.index))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
