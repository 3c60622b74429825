"""Shards (contiguous row ranges, the unit of resume) and the batches inside them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from batchgen import layout
from batchgen.prompts import PromptRecord


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


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from the base seed and any labels (shard index, batch index, ...).

    Hash-based, so neighbouring shards get unrelated streams and the value never depends on
    which process or in what order the work runs.
    """
    key = ":".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def plan_batches(
    records: list[PromptRecord],
    batch_size: int,
    max_batch_tokens: int | None = None,
    new_tokens: int = 0,
    samples: int = 1,
    max_padding: float | None = None,
) -> list[list[PromptRecord]]:
    """Group a shard's records into batches of similar prompt length.

    Sorting by length (longest first, ties by row index) keeps padding low and puts the most
    memory-hungry batch first, where an out-of-memory shows at once. A batch holds at most
    ``batch_size`` records and, when ``max_batch_tokens`` is set, at most that many token slots
    (rows x samples x (longest prompt + new tokens)): short prompts travel in large batches,
    long ones in small. A record too long for the budget alone still gets a batch of its own.
    With ``max_padding``, a batch also closes before the shard's pad tokens so far would exceed
    that fraction of its real prompt tokens. Callers restore row order from ``index``.
    """
    ordered = sorted(records, key=lambda r: (-len(r.token_ids), r.index))
    batches: list[list[PromptRecord]] = []
    pads = real = 0  # over the closed batches, for the padding bound
    for record in ordered:
        size = len(record.token_ids)
        if batches and _fits(
            batches[-1],
            size,
            pads,
            real,
            batch_size,
            max_batch_tokens,
            new_tokens,
            samples,
            max_padding,
        ):
            batches[-1].append(record)
        else:
            if batches:
                longest = len(batches[-1][0].token_ids)
                pads += sum(longest - len(r.token_ids) for r in batches[-1])
                real += sum(len(r.token_ids) for r in batches[-1])
            batches.append([record])
    return batches


def _fits(batch, size, pads, real, batch_size, max_batch_tokens, new_tokens, samples, max_padding):
    """Whether a record of ``size`` prompt tokens may join the open ``batch`` (longest first).

    The padding bound is on the shard so far, not per batch: the long prompts that come first
    leave room for a few uneven batches later, which keeps batches large.
    """
    rows = len(batch) + 1
    longest = len(batch[0].token_ids)
    if rows > batch_size:
        return False
    if max_batch_tokens is not None and rows * samples * (longest + new_tokens) > max_batch_tokens:
        return False
    if max_padding is None:
        return True
    batch_real = sum(len(r.token_ids) for r in batch) + size
    return pads + rows * longest - batch_real <= max_padding * (real + batch_real)
