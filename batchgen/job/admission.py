"""Admission to a run: the first worker records the run's identity, every later one joins it or
is refused, however close their starts.

Invariant: a worker generates nothing before it is admitted, and no folder holds two configs'
shards. Under the folder's run-record guard (an ``flock``, ``records.run_file_guard``) a worker
reads ``run.json``, is judged against it (``manifest.check_run_file``), writes it when it is the
first (or replaces a run that never published a shard), and records in its own run lock the
fingerprint it was admitted under, so a replacement can see the live workers of another config.
"""

from __future__ import annotations

from pathlib import Path

from batchgen.cluster import claims
from batchgen.cluster.lock import RunLock, live_fingerprints
from batchgen.config import JobConfig
from batchgen.store import manifest
from batchgen.store.records import run_file_guard, write_run_file


def admit(cfg: JobConfig, out_dir: Path, lock: RunLock, parts: dict) -> dict:
    """Join the run recorded in ``out_dir`` or record this one, atomically with other workers;
    return the fingerprint parts to generate under: the recorded ones where they describe this
    run though they differ (``manifest.same_run``: each difference said in one line), else
    ``parts``.

    Raises:
        ResumeError: the folder holds another config's run (``manifest.check_run_file``).
    """
    identity = {
        "fingerprint": manifest.fingerprint(parts),
        "fingerprint_parts": parts,
        "config": cfg.to_dict(),
        "versions": manifest.versions(),
    }
    with run_file_guard(out_dir):
        parts, write, said = manifest.check_run_file(
            out_dir,
            parts,
            lambda: claims.live_indices(out_dir, cfg.runner.lease_seconds),
            lambda: live_fingerprints(out_dir, cfg.runner.lease_seconds, lock.path),
            dtype_auto=cfg.model.dtype == "auto",
        )
        if write:
            write_run_file(out_dir, identity)
        lock.attach(manifest.fingerprint(parts))
    for line in said:
        print(f"batchgen: {line}.", flush=True)
    return parts
