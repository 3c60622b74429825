"""Batch planning: a shard's records grouped by how they decode, then by prompt length under the
size and token budgets."""

from __future__ import annotations

import dataclasses
import json

from batchgen.config import SamplingConfig
from batchgen.inputs.prompts import PromptRecord


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


# Settings a row may have of its own within one batch: its constraint (the constraint processor
# reads each row's) and its token limit (the engine stops each row at its own); every other
# sampling setting is shared by a batch. A row's seed is its record's, never its batch's.
PER_ROW_IN_BATCH = ("json_schema", "regex", "max_new_tokens")


def sampling_groups(
    records: list[PromptRecord], job: SamplingConfig
) -> list[tuple[SamplingConfig, list[PromptRecord]]]:
    """Records grouped by how they decode (their own sampling, else the job's), in order of
    first appearance; each group's sampling is its first record's, run to the group's longest
    ``max_new_tokens`` (the engine stops each row at its own, ``row_limit``)."""
    groups: dict[str, tuple[SamplingConfig, list[PromptRecord]]] = {}
    for record in records:
        sampling = record.sampling or job
        shared = {
            k: v for k, v in dataclasses.asdict(sampling).items() if k not in PER_ROW_IN_BATCH
        }
        key = json.dumps(shared, sort_keys=True)
        groups.setdefault(key, (sampling, []))[1].append(record)
    return [
        (dataclasses.replace(s, max_new_tokens=max(row_limit(r, s) for r in group)), group)
        for s, group in groups.values()
    ]


def row_limit(record: PromptRecord, batch: SamplingConfig) -> int:
    """The new tokens a row may generate: its own ``max_new_tokens``, else its batch's."""
    own = record.sampling
    return own.max_new_tokens if own is not None else batch.max_new_tokens
