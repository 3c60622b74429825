"""Batch checkpoints: the finished batches of an unfinished shard, kept across a stop or a kill.

Invariant: a checkpoint only ever adds rows that an uninterrupted run would have produced. Each
finished batch is written atomically (its writer's own temp name, then a rename) as a small
Parquet file under ``_batchgen/checkpoints/part-NNNNN/``, recording the run's fingerprint and the
shard's digest; a resume reuses exactly the rows whose checkpoint matches both (sampling is keyed
by row id and sample index, never by batch, so the remaining rows come out as they would have).
Any worker may reuse any checkpoint of a shard it holds, so a stolen shard resumes too; the
folder is removed once its shard is published.

Nothing damaged is reused: a file's name carries the SHA-256 of its bytes (``rows-FIRST-SUM.ckpt``),
which covers its rows and its recorded identity alike, and is checked before the file is parsed.
A file whose bytes do not match (a flipped bit, a cut, a copy torn by a host crash), that does not
parse, or that has no sum (written by an older batchgen) is discarded with one warning line
naming it, and its rows are generated again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchgen.store import layout
from batchgen.store.writer import temp_path

if TYPE_CHECKING:  # the engine imports torch, which `status` must not pay for
    from batchgen.engine.interface import Sample

META_KEY = b"batchgen_checkpoint"
# rows-FIRSTROW-SUM.ckpt: SUM is the first 32 hex digits of the SHA-256 of the file's bytes.
NAME_RE = re.compile(r"^rows-(\d{9})-([0-9a-f]{32})\.ckpt$")
TOP_LOGPROB = pa.struct([pa.field("token_id", pa.int32()), pa.field("logprob", pa.float32())])
SCHEMA = pa.schema(
    [
        pa.field("index", pa.int64()),
        pa.field("sample_index", pa.int32()),
        pa.field("text", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("completion_tokens", pa.int32()),
        # Null when the run records none. float32 as recorded: the values round-trip exactly.
        pa.field("logprobs", pa.list_(pa.float32())),
        pa.field("top_logprobs", pa.list_(pa.list_(TOP_LOGPROB))),
    ]
)


def save(out_dir: Path, shard: int, identity: dict, batch: list[tuple[int, list[Sample]]]) -> None:
    """Persist one finished batch: (row index, its samples) pairs.

    Args:
        identity: ``{"fingerprint": ..., "digest": ...}`` of the run and the shard.
    """
    if not batch:
        return
    rows = [
        {
            "index": index,
            "sample_index": k,
            "text": s.text,
            "finish_reason": s.finish_reason,
            "completion_tokens": s.completion_tokens,
            "logprobs": s.logprobs,
            "top_logprobs": None
            if s.top_logprobs is None
            else [[{"token_id": t, "logprob": p} for t, p in step] for step in s.top_logprobs],
        }
        for index, samples in batch
        for k, s in enumerate(samples)
    ]
    schema = SCHEMA.with_metadata({META_KEY: json.dumps(identity).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    data = sink.getvalue().to_pybytes()
    folder = layout.checkpoint_dir(out_dir, shard)
    folder.mkdir(parents=True, exist_ok=True)
    # Parquet inside, but not named so: duckdb and datasets would take it for an output shard.
    # Two writers of the same batch write the same bytes under the same name: either rename wins.
    final = folder / f"rows-{batch[0][0]:09d}-{_checksum(data)}.ckpt"
    tmp = temp_path(final)
    try:
        with tmp.open("xb") as f:  # a Python file: a full disk raises with its errno
            f.write(data)
        os.replace(tmp, final)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(final)) from e
    finally:
        tmp.unlink(missing_ok=True)


def _checksum(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _read(path: Path) -> tuple[pa.Table | None, dict | None, str | None]:
    """(rows, recorded identity, None), or (None, None, what is wrong) for a damaged file; a
    file removed meanwhile (its shard published) reads as (None, None, None)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None, None
    except OSError as e:
        return None, None, f"unreadable ({e.strerror})"
    named = NAME_RE.match(path.name)
    if named is None:
        return None, None, "no checksum in its name (written by an older batchgen)"
    if _checksum(data) != named.group(2):
        return None, None, "its bytes do not match its checksum"
    try:
        table = pq.read_table(pa.BufferReader(data))
        return table, json.loads((table.schema.metadata or {})[META_KEY]), None
    except (OSError, KeyError, ValueError, pa.ArrowException) as e:
        return None, None, f"not a checkpoint ({type(e).__name__})"


def _discard(out_dir: Path, path: Path, why: str) -> None:
    print(
        f"batchgen: checkpoint {path.relative_to(out_dir)} is damaged ({why}); discarded, its "
        "rows are generated again",
        flush=True,
    )
    path.unlink(missing_ok=True)


def load(
    out_dir: Path, shard: int, identity: dict, samples: int | Mapping[int, int]
) -> dict[int, list[Sample]]:
    """The rows of ``shard`` that earlier attempts finished under the same identity.

    A damaged file is discarded with a warning (module docstring); a file of another identity,
    or missing samples of a row, contributes nothing.

    Args:
        samples: the samples a row has: one count for every row, or each row index's own (rows
            with their own ``num_return_sequences``); a row not in the mapping is not reused.
    """
    from batchgen.engine.interface import Sample

    found: dict[int, list[Sample]] = {}
    folder = layout.checkpoint_dir(out_dir, shard)
    for path in sorted(folder.glob("rows-*.ckpt")) if folder.is_dir() else []:
        table, recorded, damage = _read(path)
        if damage is not None:
            _discard(out_dir, path, damage)
        if recorded != identity:
            continue
        by_row: dict[int, list[Sample]] = {}
        for row in table.to_pylist():
            by_row.setdefault(row["index"], []).append(_sample(Sample, row))
        wanted = samples.get if isinstance(samples, Mapping) else lambda _: samples
        found.update({i: s for i, s in by_row.items() if len(s) == wanted(i)})
    return found


def _sample(cls: type[Sample], row: dict) -> Sample:
    top = row["top_logprobs"]
    return cls(
        row["text"],
        row["finish_reason"],
        row["completion_tokens"],
        row["logprobs"],
        None if top is None else [[(p["token_id"], p["logprob"]) for p in step] for step in top],
    )


def finished_batches(out_dir: Path) -> list[dict]:
    """Every checkpointed batch, whatever its identity: ``mtime``, ``rows``,
    ``completion_tokens``, for progress reports (``batchgen status``)."""
    found = []
    for path in layout.checkpoints_dir(out_dir).glob("*/rows-*.ckpt"):
        try:
            # Rows are counted by index: rows of one batch may have different sample counts.
            table = pq.read_table(path, columns=["index", "completion_tokens"])
            found.append(
                {
                    "mtime": path.stat().st_mtime,
                    "rows": pc.count_distinct(table["index"]).as_py(),
                    "completion_tokens": pc.sum(table["completion_tokens"]).as_py() or 0,
                }
            )
        except (OSError, pa.ArrowException):
            continue  # published and cleared meanwhile, or damaged
    return found


def clear(out_dir: Path, shard: int | None = None) -> None:
    """Remove a shard's checkpoints once the shard is published; every shard's when None."""
    if shard is None:
        folder = layout.checkpoints_dir(out_dir)
    else:
        folder = layout.checkpoint_dir(out_dir, shard)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(folder)
