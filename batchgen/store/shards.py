"""Shards: contiguous row ranges, the unit of work, output and resume."""

from __future__ import annotations

from dataclasses import dataclass

from batchgen.store import layout


@dataclass(frozen=True)
class Shard:
    """Rows ``[start, stop)`` of the dataset, written as ``part-{index:05d}.parquet``."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return layout.shard_name(self.index)


def plan_shards(num_rows: int, rows_per_shard: int) -> list[Shard]:
    """Split ``num_rows`` rows into contiguous shards; depends on nothing but its arguments."""
    return [
        Shard(i, start, min(start + rows_per_shard, num_rows))
        for i, start in enumerate(range(0, num_rows, rows_per_shard))
    ]
