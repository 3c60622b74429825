"""Parquet shard files: schema, atomic publication, and what an output folder already holds.

A shard is complete exactly when ``part-NNNNN.parquet`` exists: it is written under a temp
name, fsynced, and renamed into place, so a crash at any instant leaves complete shards and
temp files (``*.parquet.tmp-*``) that readers of ``*.parquet`` never see.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SHARD_RE = re.compile(r"^part-(\d{5,})\.parquet$")
META_KEY = b"batchgen"

BASE_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("response", pa.string(), nullable=False),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("prompt_tokens", pa.int32(), nullable=False),
    pa.field("completion_tokens", pa.int32(), nullable=False),
]


def output_schema(kept_types: dict[str, pa.DataType], metadata: dict[str, Any]) -> pa.Schema:
    """The shard schema: the fixed output columns, then kept input columns, with run metadata."""
    fields = BASE_FIELDS + [pa.field(name, t) for name, t in kept_types.items()]
    return pa.schema(fields, metadata={META_KEY: json.dumps(metadata).encode()})


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(
    out_dir: Path,
    name: str,
    rows: list[dict[str, Any]],
    schema: pa.Schema,
    compression: str = "zstd",
) -> bool:
    """Publish ``rows`` as ``out_dir/name`` atomically, unless that shard already exists.

    The final name is created with a hard link, which fails when it exists: of two workers
    that generated the same shard (a stolen claim), exactly one publishes; the other's
    identical copy is dropped.

    Returns:
        True when this call published the shard, False when it was already there.
    """
    final = out_dir / name
    tmp = out_dir / f"{name}.tmp-{os.getpid()}"
    table = pa.Table.from_pylist(rows, schema=schema)
    try:
        with tmp.open("wb") as f:
            # Page checksums let a resume tell a damaged shard from a good one (batchgen.verify).
            pq.write_table(table, f, compression=compression, write_page_checksum=True)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(out_dir)
    return True


def write_text_atomic(path: Path, text: str) -> None:
    """Replace a text file atomically (temp file, fsync, rename)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Replace a JSON file atomically (temp file, fsync, rename)."""
    write_text_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")


def finished_shards(out_dir: Path) -> dict[int, Path]:
    """Shard index -> path for every published shard file in ``out_dir``."""
    if not out_dir.is_dir():
        return {}
    found = {}
    for entry in out_dir.iterdir():
        m = SHARD_RE.match(entry.name)
        if m:
            found[int(m.group(1))] = entry
    return found


def shard_metadata(path: Path) -> dict[str, Any]:
    """The batchgen metadata stored in a shard's Parquet footer (reads the footer only)."""
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(META_KEY, b"{}"))
