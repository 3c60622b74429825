"""The output folder's file names: this module owns every one of them.

Invariant: the only files that folder readers see are the finished shards. pandas, pyarrow and
Spark given the folder read every file whose path has no part starting with ``_`` or ``.``;
duckdb and ``datasets`` read every ``*.parquet`` below it, ``_batchgen/`` included. So everything
else batchgen writes lives under ``_batchgen/`` (or has a leading dot) and no name of it ends in
``.parquet`` (checkpoints are Parquet files named ``.ckpt``)::

    OUT/part-NNNNN.parquet                  a finished shard (the outputs)
    OUT/.part-NNNNN.parquet.tmp-HOST-PID-R  a shard being written (same folder: hard link)
    OUT/_batchgen/run.json                  identity, config, status and summary of the run
    OUT/_batchgen/errors.jsonl              skipped and failed rows
    OUT/_batchgen/claims/part-NNNNN[.G].claim
    OUT/_batchgen/locks/NAME.lock           a worker's run lock (and NAME.lock.guard)
    OUT/_batchgen/checkpoints/part-NNNNN/rows-*.ckpt   finished batches of an unfinished shard
    OUT/_batchgen/quarantine/part-NNNNN.corrupt-TIME
    OUT/_batchgen/report.html, README.md    the report and the dataset card
"""

from __future__ import annotations

from pathlib import Path

META_DIR = "_batchgen"
SHARD_PREFIX = "part-"


def meta_dir(out_dir: Path) -> Path:
    """``OUT/_batchgen``: batchgen's own files."""
    return Path(out_dir) / META_DIR


def shard_name(index: int) -> str:
    """The file name of shard ``index``."""
    return f"{SHARD_PREFIX}{index:05d}.parquet"


def run_file(out_dir: Path) -> Path:
    """The run record (``run.json``)."""
    return meta_dir(out_dir) / "run.json"


def errors_file(out_dir: Path) -> Path:
    """Skipped and failed rows, one JSON line each (``errors.jsonl``)."""
    return meta_dir(out_dir) / "errors.jsonl"


def claims_dir(out_dir: Path) -> Path:
    """The shard claims."""
    return meta_dir(out_dir) / "claims"


def locks_dir(out_dir: Path) -> Path:
    """The running workers' locks."""
    return meta_dir(out_dir) / "locks"


def lock_file(out_dir: Path, name: str) -> Path:
    """A worker's run lock."""
    return locks_dir(out_dir) / f"{name}.lock"


def checkpoints_dir(out_dir: Path) -> Path:
    """The finished batches of every shard in progress."""
    return meta_dir(out_dir) / "checkpoints"


def checkpoint_dir(out_dir: Path, index: int) -> Path:
    """The finished batches of shard ``index`` while it is unfinished."""
    return checkpoints_dir(out_dir) / shard_name(index).removesuffix(".parquet")


def quarantine_dir(out_dir: Path) -> Path:
    """Where damaged shards are moved, kept for inspection."""
    return meta_dir(out_dir) / "quarantine"


def report_file(out_dir: Path) -> Path:
    """The HTML report's default place."""
    return meta_dir(out_dir) / "report.html"


def card_file(out_dir: Path) -> Path:
    """The dataset card that ``finalize`` writes."""
    return meta_dir(out_dir) / "README.md"
