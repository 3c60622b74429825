"""Parquet shard files: schema, atomic publication, and what an output folder already holds.

A shard is complete exactly when ``part-NNNNN.parquet`` exists: it is written under a temp
name, fsynced, and hard-linked into place, so a crash at any instant leaves complete shards and
temp files (``.NAME.tmp-*``: a leading dot, which folder readers skip) that no reader sees.

Temp names are unique per writer (host, pid, and random bytes: containers often all run as pid
1), created exclusively, and published by a link from the writer's own closed file, so no
writer ever writes into a file that another has published or is writing. A temp file older
than a claim's lease belongs to a writer that died or froze past its lease, whose shard has
been given to another worker: ``remove_abandoned`` deletes it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.errors import ConfigError

SHARD_RE = re.compile(r"^part-(\d{5,})\.parquet$")
# Temp files of this version (.NAME.tmp-HOST-PID-RANDOM) and of earlier ones (NAME.tmp-PID).
TEMP_RE = re.compile(r"^\.?[^/]+\.tmp-[^/]+$")
SHARD_TEMP_RE = re.compile(r"^\.?(part-\d{5,}\.parquet)\.tmp-")

log = logging.getLogger(__name__)


def temp_path(path: Path) -> Path:
    """A temp name beside ``path``, unique to this writer across hosts and pid namespaces."""
    tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    return path.with_name(f".{path.name}.tmp-{tag}")


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


# Columns a job writes only when its settings ask for them (``rows.OutputSpec.columns``).
_TOP = pa.struct([("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32())])
OPTIONAL_FIELDS = {
    f.name: f
    for f in [
        pa.field("reasoning", pa.string()),
        pa.field("reasoning_truncated", pa.bool_()),
        pa.field("valid", pa.bool_()),
        pa.field("token_logprobs", pa.list_(pa.float32())),
        pa.field("logprob_sum", pa.float64()),
        pa.field("top_logprobs", pa.list_(pa.list_(_TOP))),
    ]
}

KEPT_PREFIX = "input_"
OUTPUT_NAMES = frozenset(f.name for f in BASE_FIELDS) | frozenset(OPTIONAL_FIELDS)


def kept_name(column: str) -> str:
    """The output column of a kept input column: its own name, or ``input_NAME`` where that
    name is an output column already (eval sets often carry ``prompt``, ``id``, ``response``)."""
    return f"{KEPT_PREFIX}{column}" if column in OUTPUT_NAMES else column


def check_kept_columns(columns: list[str]) -> None:
    """Refuse kept columns whose output names would collide.

    Raises:
        ConfigError: naming ``dataset.keep_columns`` and the clash.
    """
    names = [kept_name(c) for c in columns]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ConfigError(
            f"dataset.keep_columns={columns}: {clash} would be written twice (a kept column "
            f"named like an output column is written as {KEPT_PREFIX}NAME); keep one of them."
        )


def output_schema(
    kept_types: dict[str, pa.DataType], metadata: dict[str, Any], optional: tuple[str, ...] = ()
) -> pa.Schema:
    """The shard schema: the fixed output columns, the ``optional`` ones the job asks for (in
    ``OPTIONAL_FIELDS`` order), then kept input columns, with run metadata."""
    extra = [f for name, f in OPTIONAL_FIELDS.items() if name in optional]
    kept = [pa.field(kept_name(name), t) for name, t in kept_types.items()]
    fields = BASE_FIELDS + extra + kept
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
    identical copy is dropped. So is the copy of a writer whose temp file was removed as
    abandoned while it was frozen.

    Returns:
        True when this call published the shard, False when it was already there or the
        temp file was gone.

    Raises:
        OSError: writing failed (a full disk...), with the temp file's name as ``filename``.
    """
    final = out_dir / name
    tmp = temp_path(final)
    table = pa.Table.from_pylist(rows, schema=schema)
    try:
        try:
            with tmp.open("xb") as f:
                # Page checksums let a resume tell a damaged shard from a good one (verify).
                pq.write_table(table, f, compression=compression, write_page_checksum=True)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(tmp)) from e
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        except FileNotFoundError:
            if tmp.exists():
                raise
            log.warning("%s was removed as abandoned while this worker wrote it; dropping it", tmp)
            return False
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(out_dir)
    return True


def write_text_atomic(path: Path, text: str) -> None:
    """Replace a text file atomically (a temp file of this writer's own, fsync, rename)."""
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("x") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e


def remove_abandoned(folder: Path, older_than: float) -> int:
    """Delete the temp files in ``folder`` that no live writer can still publish.

    That is a temp file not modified for ``older_than`` seconds (a live writer creates, writes
    and renames its own within seconds: one this old belongs to a writer that died, or froze
    for longer than a lease and lost its claim), and a shard's temp file once that shard is
    published (its writer's copy can only be dropped: its link would fail).

    Returns:
        How many were removed.
    """
    removed = 0
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not TEMP_RE.match(entry.name):
            continue
        shard = SHARD_TEMP_RE.match(entry.name)
        try:
            moot = shard is not None and (Path(folder) / shard.group(1)).exists()
            if moot or now - entry.stat().st_mtime > older_than:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue  # published, or removed by another worker meanwhile
    return removed


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


def _batchgen_metadata(parquet: pq.FileMetaData) -> dict[str, Any]:
    meta = parquet.schema.to_arrow_schema().metadata or {}
    return json.loads(meta.get(META_KEY, b"{}"))


def shard_metadata(path: Path) -> dict[str, Any]:
    """The batchgen metadata stored in a shard's Parquet footer (reads the footer only)."""
    return _batchgen_metadata(pq.read_metadata(path))


class Footer(NamedTuple):
    """A published shard file, its parsed Parquet footer and its batchgen metadata."""

    path: Path
    meta: dict[str, Any] | None  # None: unreadable, or without a shard record with totals
    # The parsed footer, for opening the file without parsing it again
    # (``pq.ParquetFile(path, metadata=...)``); None when it could not be read.
    parquet: pq.FileMetaData | None = None

    @property
    def shard(self) -> dict[str, Any]:
        """The footer's ``shard`` part: index, rows, digest, totals, skipped and failed rows."""
        if self.meta is None:
            raise ValueError(f"{self.path} has no readable batchgen footer")
        return self.meta["shard"]

    def open(self) -> pq.ParquetFile:
        """The shard's Parquet file, opened on the footer already parsed.

        Raises:
            OSError: the file is gone or cannot be read.
            pyarrow.ArrowException: its data is damaged (found when read).
        """
        return pq.ParquetFile(self.path, metadata=self.parquet)


def read_footers(out_dir: Path) -> dict[int, Footer]:
    """Shard index -> footer for every published shard: the one reader of what shards recorded.

    Reads each footer only, never the rows, and parses it once: ``Footer.open`` reuses it. A
    shard whose footer cannot be read, or lacks the ``shard`` record with its ``totals``, comes
    back with ``meta`` None (damaged files are verify's business; each caller decides how to
    show them).
    """
    footers = {}
    for index, path in sorted(finished_shards(out_dir).items()):
        try:
            parquet = pq.read_metadata(path)
            meta = _batchgen_metadata(parquet)
        except (OSError, ValueError, pa.ArrowException):
            parquet, meta = None, None
        shard = meta.get("shard") if isinstance(meta, dict) else None
        readable = isinstance(shard, dict) and isinstance(shard.get("totals"), dict)
        footers[index] = Footer(path, meta if readable else None, parquet)
    return footers


def writable_dir(path: Path) -> Path:
    """``output.dir``, created if need be, once a real write in it succeeded.

    Raises:
        ConfigError: it cannot be created or written, naming the key and the reason.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output.dir={str(path)!r} cannot be created: {e.strerror}.") from e
    probe = path / f".write-test-{os.getpid()}"
    try:  # os.access says yes to root on a read-only mount; a real write tells the truth
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output.dir={str(path)!r} is not writable: {e.strerror}.") from e
    return path
