"""Data-parallel scaling: one worker with one thread against two workers with one thread each.

Both runs are the same CPU-bound job (the embedded model over the bundled prompts), measured in
wall-clock time from launch to the last worker's exit, start-up included, side by side:

    python scripts/scaling.py [--max-new-tokens 64] [--rows-per-shard 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq


def job(out: Path, args, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "batchgen",
        f"output.dir={out}",
        "runner.progress=false",
        f"sampling.max_new_tokens={args.max_new_tokens}",
        f"output.rows_per_shard={args.rows_per_shard}",
        f"runner.batch_size={args.batch_size}",
        *extra,
    ]


def timed(commands: list[list[str]]) -> float:
    """Wall seconds from starting every command to the last one's exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL) for c in commands]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a worker failed: exit codes {codes}")
    return time.perf_counter() - started


def rows(out: Path) -> list[dict]:
    return [r for f in sorted(out.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rows-per-shard", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        one, two = Path(tmp) / "one", Path(tmp) / "two"
        single = timed([job(one, args)])
        pair = timed([job(two, args, f"runner.rank={r}", "runner.world_size=2") for r in (0, 1)])
        same = rows(one) == rows(two)
    print(f"1 worker x 1 thread : {single:7.1f} s")
    print(f"2 workers x 1 thread: {pair:7.1f} s")
    print(
        f"ratio (2 workers / 1 worker): {pair / single:.2f}  (target <= 0.60); "
        f"outputs identical: {same}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
