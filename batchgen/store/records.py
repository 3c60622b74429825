"""Who ran the job and how it went: the shared run record and one record per worker.

Invariant: no worker's facts are overwritten by another's. ``run.json`` holds only what every
worker of a run shares (fingerprint, its parts, versions, and the config, whose per-worker
settings such as ``runner.rank`` are its first writer's and read by no tool), written atomically
by the first worker admitted, under ``run_file_guard`` (``batchgen.store.manifest``), and
rewritten only to replace a run that never published a shard. Everything a worker knows of
itself alone (status, device, engine, host, pid, summary) goes to its own
``workers/rank-R-of-W.record``, which only that rank writes: a restart of the rank replaces it, and
no worker's record is lost to another's. Readers get them typed (``read_workers``) and merge
them in ``batchgen.store.folder``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchgen.errors import NotAnOutputDir
from batchgen.store import layout
from batchgen.store.summary import WorkerSummary
from batchgen.store.writer import write_json_atomic

RUN_KEYS = ("fingerprint", "fingerprint_parts", "config", "versions")


@contextlib.contextmanager
def run_file_guard(out_dir: Path) -> Iterator[None]:
    """Hold the folder's run-record guard: an exclusive ``flock`` on ``run.guard``, which
    serializes admission to the run across processes and hosts (NFS emulates ``flock`` with
    byte-range locks); the kernel drops it when its holder dies.

    Raises:
        OSError: the guard file cannot be created or locked (its name as ``filename``).
    """
    path = layout.run_guard_file(out_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        guard = path.open("a")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e
    with guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        yield


def write_run_file(out_dir: Path, meta: dict[str, Any]) -> None:
    """Write ``run.json``: the run's identity (``RUN_KEYS`` of ``meta``), the same for every worker.

    Raises:
        OSError: the file cannot be written (its name as ``filename``).
    """
    write_json_atomic(layout.run_file(out_dir), {k: meta[k] for k in RUN_KEYS})


def write_worker_file(
    out_dir: Path,
    meta: dict[str, Any],
    rank: int,
    world_size: int,
    status: str,
    summary: WorkerSummary | None = None,
) -> None:
    """Write this worker's record: its own part of ``meta`` (device, engine), status and summary.

    Raises:
        OSError: the file cannot be written (its name as ``filename``).
    """
    payload = {
        "rank": rank,
        "world_size": world_size,
        "fingerprint": meta["fingerprint"],
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **{k: v for k, v in meta.items() if k not in RUN_KEYS},
        "status": status,
        "updated_at": time.time(),
    }
    if summary is not None:
        payload["summary"] = summary.to_dict()
    write_json_atomic(layout.worker_file(out_dir, rank, world_size), payload)


def read_run_file(out_dir: Path) -> dict[str, Any]:
    """The run record of ``out_dir``.

    Raises:
        NotAnOutputDir: no such folder, no ``run.json``, or one that is not JSON or has no
            fingerprint; the message names the file.
    """
    out_dir = Path(out_dir)
    path = layout.run_file(out_dir)
    if not out_dir.is_dir():
        raise NotAnOutputDir(f"{str(out_dir)!r} is not a folder.")
    try:
        run = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotAnOutputDir(
            f"{str(out_dir)!r} has no {path.relative_to(out_dir)}: not a batchgen output folder, "
            "or no run has started in it yet."
        ) from None
    except (OSError, ValueError) as e:
        raise NotAnOutputDir(
            f"{path} cannot be read as JSON ({e}): remove it and rerun the job, which rewrites "
            "it (each shard records the fingerprint too)."
        ) from None
    if not isinstance(run, dict) or "fingerprint" not in run:
        raise NotAnOutputDir(f"{path} has no fingerprint: not written by batchgen.")
    return run


@dataclass
class WorkerRecord:
    """One worker's record as read back; what it lacks is None."""

    rank: int | None
    world_size: int | None
    status: str | None  # running, complete, interrupted, incomplete, stalled
    host: str | None = None
    pid: int | None = None
    device: str | None = None
    engine: str | None = None
    updated_at: float | None = None
    summary: WorkerSummary | None = None  # once it finished

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerRecord:
        """The record ``write_worker_file`` wrote (or an earlier version's)."""
        summary = d.get("summary")
        return cls(
            rank=d.get("rank"),
            world_size=d.get("world_size"),
            status=d.get("status"),
            host=d.get("host"),
            pid=d.get("pid"),
            device=d.get("device"),
            engine=d.get("engine"),
            updated_at=d.get("updated_at"),
            summary=WorkerSummary.from_dict(summary) if isinstance(summary, dict) else None,
        )


def read_workers(out_dir: Path, run: dict[str, Any]) -> list[WorkerRecord]:
    """The worker records of the run in ``out_dir``, by world size and rank.

    Args:
        out_dir: the output folder.
        run: its run record (``read_run_file``; ``{}`` when there is none: then only records
            without a fingerprint would match, so none do).

    Returns:
        One record per worker of this run (records of an earlier fingerprint are left out); a
        folder written before per-worker records gives its ``run.json`` as the one record.
    """
    records = []
    for path in sorted(layout.workers_dir(out_dir).glob(layout.WORKER_RECORD_GLOB)):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # written atomically, so only a hand-edited file; the others still count
        # Records of an earlier fingerprint (output.rows_per_shard changed before any shard was
        # published) describe a run that no longer exists.
        if isinstance(record, dict) and record.get("fingerprint") == run.get("fingerprint"):
            records.append(record)
    if not records and "status" in run:
        # Written before per-worker records: run.json carried the one worker's record.
        records.append({k: v for k, v in run.items() if k not in RUN_KEYS})
    typed = [WorkerRecord.from_dict(r) for r in records]
    return sorted(typed, key=lambda r: (r.world_size or 0, r.rank or 0))
