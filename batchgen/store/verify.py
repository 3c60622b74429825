"""Whether a finished shard file can be trusted on resume, and moving aside one that cannot.

A shard published by rename is whole when written, but a file can still be damaged later: a
copy cut short, a disk error, a flipped bit. ``verify_shard`` decodes every data page rather
than trusting the footer, and sorts what it finds into three kinds of reason, each the prefix
of the returned string, so the caller can act on them differently:

- ``corrupt: ...``: the file cannot be read whole; quarantine it and generate the shard again.
- ``other config: ...``: a readable shard of another run; refuse to resume (never overwrite it).
- ``wrong rows: ...``: readable, this run's, but not the rows the plan expects; quarantine it.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.store import layout, manifest
from batchgen.store.writer import BASE_FIELDS, META_KEY

CORRUPT = "corrupt"
OTHER_CONFIG = "other config"
WRONG_ROWS = "wrong rows"


def reason_kind(reason: str) -> str:
    """The kind of a ``verify_shard`` reason: ``CORRUPT``, ``OTHER_CONFIG`` or ``WRONG_ROWS``."""
    return reason.partition(":")[0]


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160]}" if text else type(error).__name__


def _schema_problem(schema: pa.Schema) -> str | None:
    for want in BASE_FIELDS:
        index = schema.get_field_index(want.name)
        if index < 0:
            return f"column {want.name!r} missing"
        if schema.field(index).type != want.type:
            return f"column {want.name!r} is {schema.field(index).type}, not {want.type}"
    return None


def _rows_problem(
    ids: list[str],
    sample_index: list[int],
    expected_ids: list[str] | None,
    samples_per_row: int | None,
) -> str | None:
    """Compare the (id, sample_index) sequence with the plan: rows in order, samples 0..n-1."""
    if samples_per_row is not None:
        n = samples_per_row
        if expected_ids is not None and len(ids) != len(expected_ids) * n:
            want = len(expected_ids) * n
            return f"{len(ids)} rows, expected {want} ({len(expected_ids)} ids x {n} samples)"
        if len(ids) % n:
            return f"{len(ids)} rows, not a multiple of {n} samples per row"
        if len(set(ids[::n])) != len(ids) // n:
            return "an id appears in more than one row"
        for j, (got_id, got_k) in enumerate(zip(ids, sample_index, strict=True)):
            want_id = ids[j - j % n] if expected_ids is None else expected_ids[j // n]
            if (got_id, got_k) != (want_id, j % n):
                return (
                    f"row {j} is id {got_id!r} sample {got_k}, "
                    f"expected id {want_id!r} sample {j % n}"
                )
        return None
    # Without one count for all (rows may have their own), each id's samples are consecutive
    # rows numbered from 0: compare the runs of ids.
    runs: list[str] = []
    for j, (got_id, got_k) in enumerate(zip(ids, sample_index, strict=True)):
        first = j == 0 or ids[j - 1] != got_id
        runs += [got_id] if first else []
        want_k = 0 if first else sample_index[j - 1] + 1
        if got_k != want_k:
            return f"row {j} is id {got_id!r} sample {got_k}, expected sample {want_k}"
    if len(set(runs)) != len(runs):
        return "an id appears in more than one row"
    if expected_ids is None:
        return None
    if len(runs) != len(expected_ids):
        return f"{len(runs)} ids, expected {len(expected_ids)}"
    for j, (got, want) in enumerate(zip(runs, expected_ids, strict=True)):
        if got != want:
            return f"id number {j} is {got!r}, expected {want!r}"
    return None


def verify_shard(
    path: Path,
    fingerprint: str,
    expected_ids: list[str] | None,
    samples_per_row: int | None,
) -> str | None:
    """Check that a shard file is whole, from this run, and holds the planned rows.

    Reads the footer, then every data page (verifying page checksums where the writer stored
    them) and validates the decoded arrays, so damage anywhere in the file is caught, not only
    in the footer.

    Args:
        path: the shard file.
        fingerprint: this run's config fingerprint.
        expected_ids: the ids the shard must hold, in row order (the shard's planned rows less
            those the caller knows were skipped or failed); None to skip the id check.
        samples_per_row: samples per id (``sampling.num_return_sequences``), so rows must be
            each id repeated with ``sample_index`` 0..n-1; None where rows may have their own
            count (``dataset.sampling_column``): each id's rows are numbered 0, 1, ... and
            they add up to the samples the footer counts.

    Returns:
        None when the shard can be trusted, else a one-line reason starting with ``CORRUPT``,
        ``OTHER_CONFIG`` or ``WRONG_ROWS`` and ``": "`` (see ``reason_kind``).

    Raises:
        OSError: the file cannot be opened at all (missing, no permission): not a verdict on
            its content.
    """
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return f"{CORRUPT}: empty file (0 bytes)"
        # Any failure to decode, whatever pyarrow raises for it, means the bytes are damaged.
        try:
            parquet = pq.ParquetFile(f, page_checksum_verification=True)
            schema = parquet.schema_arrow
        except Exception as e:
            return f"{CORRUPT}: footer unreadable ({_short(e)})"
        problem = _schema_problem(schema)
        if problem:
            return f"{CORRUPT}: {problem}"
        try:
            meta = json.loads((schema.metadata or {})[META_KEY])
            recorded = meta["fingerprint"]
        except Exception as e:
            return f"{CORRUPT}: batchgen metadata unreadable ({_short(e)})"
        # The fingerprint is the hash of the settings recorded beside it: if they disagree,
        # the footer was damaged, and the shard must not pass for another config's.
        parts = meta.get("fingerprint_parts")
        if parts is not None and manifest.fingerprint(parts) != recorded:
            return f"{CORRUPT}: batchgen metadata damaged (fingerprint does not match its settings)"
        if recorded != fingerprint:
            return (
                f"{OTHER_CONFIG}: shard records fingerprint {recorded!r}, "
                f"this run is {fingerprint!r}"
            )
        try:
            table = parquet.read()
            table.validate(full=True)
        except Exception as e:
            return f"{CORRUPT}: data unreadable ({_short(e)})"
    if table.num_rows != parquet.metadata.num_rows:
        return f"{CORRUPT}: {table.num_rows} rows decoded, footer says {parquet.metadata.num_rows}"
    totals = (meta.get("shard") or {}).get("totals") or {}
    rows = totals.get("rows")
    if samples_per_row is not None and rows is not None and rows * samples_per_row != len(table):
        return f"{WRONG_ROWS}: {len(table)} rows for {rows} ids x {samples_per_row} samples"
    samples = totals.get("samples")
    if samples_per_row is None and samples is not None and samples != len(table):
        return f"{WRONG_ROWS}: {len(table)} rows, the footer counts {samples} samples"
    problem = _rows_problem(
        table.column("id").to_pylist(),
        table.column("sample_index").to_pylist(),
        expected_ids,
        samples_per_row,
    )
    return f"{WRONG_ROWS}: {problem}" if problem else None


def quarantine(path: Path) -> Path | None:
    """Move a shard that failed verification aside, out of the ``*.parquet`` namespace.

    The file becomes ``_batchgen/quarantine/part-NNNNN.corrupt-YYYYMMDDTHHMMSSZ`` (``-1``, ``-2``...
    appended if that exists), so it is regenerated and kept for inspection rather than deleted.
    The name drops ``.parquet``: duckdb and ``datasets`` look for Parquet files below the
    output folder, ``_batchgen/`` included.

    Args:
        path: the shard file.

    Returns:
        The new path; None when the file was gone already (another worker moved it).
    """
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = layout.quarantine_dir(path.parent)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{path.stem}.corrupt-{stamp}"
    n = 0
    while target.exists():
        n += 1
        target = folder / f"{path.stem}.corrupt-{stamp}-{n}"
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return None
    # Make the move durable, so a crash right after cannot bring the bad shard back.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return target
