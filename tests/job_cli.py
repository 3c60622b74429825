"""Tests that run batchgen as a process: its command line over a tiny model and a local file,
and what its output folder holds (shared by tests/test_faults.py, tests/job/test_pool.py and
tests/engine/test_tensor_parallel.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

# Offline, and one thread per process: several run side by side on a small machine.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def command(model: Path, data: Path, out: Path, *settings: str) -> list[str]:
    """``python -m batchgen`` over ``model`` (a folder) and ``data`` (a jsonl), into ``out``."""
    return [
        sys.executable,
        "-m",
        "batchgen",
        f"model.name_or_path={model}",
        "model.gguf_file=null",
        "dataset=local",
        f"dataset.path={data}",
        f"output.dir={out}",
        *settings,
    ]


def finish(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``args`` (a ``command``) to its end, its output captured as text."""
    return subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=timeout)


def rows(out: Path) -> list[dict]:
    """Every row of the folder's shards, in shard order."""
    return [r for f in sorted(out.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]


def shards(out: Path) -> int:
    """The shards published in ``out`` so far."""
    return len(list(out.glob("part-*.parquet"))) if out.exists() else 0
