"""Integration against a real one-node Slurm: a 4-worker array through Hydra's submitit launcher,
one task cancelled mid-run, the others finish its shards; the union equals a single process.

The cluster comes up through scripts/start_slurm.sh (munge, MariaDB, slurmdbd, slurmctld,
slurmd). The test skips, saying why, only where that script reports that Slurm cannot run here
(exit 3: not root, ports taken, packages unavailable).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchgen.runner import run

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def slurm():
    """A running local Slurm with four CPUs advertised (two cores, oversubscribed)."""
    env = {**os.environ, "SLURM_NCPUS": "4"}
    started = subprocess.run(
        ["bash", str(REPO / "scripts/start_slurm.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if started.returncode == 3:
        pytest.skip(f"Slurm cannot start on this machine: {started.stderr.strip()}")
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    yield
    subprocess.run(["bash", str(REPO / "scripts/stop_slurm.sh")], capture_output=True, timeout=120)


def _rows(out: Path) -> list[dict]:
    return [row for f in sorted(out.glob("*.parquet")) for row in pq.read_table(f).to_pylist()]


def _shard_ranks(out: Path) -> dict[int, int]:
    ranks = {}
    for f in sorted(out.glob("part-*.parquet")):
        shard = json.loads(pq.read_schema(f).metadata[b"batchgen"])["shard"]
        ranks[shard["index"]] = shard["worker"]["rank"]
    return ranks


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _array_tasks() -> dict[str, str]:
    """Running or pending array tasks of ours: 'JOBID_TASK' -> state."""
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True)
    return dict(line.split() for line in out.stdout.splitlines() if "_" in line)


def test_array_with_a_cancelled_task_equals_single_process(slurm, tiny_models, tmp_path, make_job):
    data = tmp_path / "prompts.jsonl"
    with data.open("w") as f:
        for i in range(40):
            f.write(
                json.dumps({"uid": f"u{i}", "prompt": f"prompt {i} " + "word " * (i % 9)}) + "\n"
            )
    settings = {
        "sampling__do_sample": True,
        "sampling__max_new_tokens": 40,
        "output__rows_per_shard": 2,
        "runner__batch_size": 2,
    }
    reference = tmp_path / "single"
    run(make_job(tiny_models["chat"], data, reference, **settings))

    out = tmp_path / "slurm"
    sweep = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchgen",
            "-m",
            "hydra/launcher=slurm",
            "runner.rank=range(4)",
            "runner.world_size=4",
            "runner.lease_seconds=5",
            f"model.name_or_path={tiny_models['chat']}",
            "model.gguf_file=null",
            "dataset=local",
            f"dataset.path={data}",
            "dataset.id_column=uid",
            "sampling.do_sample=true",
            "sampling.max_new_tokens=40",
            "output.rows_per_shard=2",
            "runner.batch_size=2",
            "runner.progress=false",
            f"output.dir={out}",
        ],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Cancel rank 1 as soon as it has published one shard: it still has others to do.
        _wait(
            lambda: 1 in _shard_ranks(out).values() if out.exists() else False,
            240,
            "rank 1's first shard",
        )
        victim = next(t for t in _array_tasks() if t.endswith("_1"))
        subprocess.run(["scancel", victim], check=True)
        status = [sys.executable, "-m", "batchgen.status", str(out)]
        _wait(
            lambda: subprocess.run(status, capture_output=True).returncode == 0,
            300,
            "every shard published",
        )
        log = sweep.communicate(timeout=300)[0]
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert _rows(out) == _rows(reference), log[-3000:]
    ranks = _shard_ranks(out)
    assert sorted(ranks) == list(range(20))
    rank1_share = set(range(1, 20, 4))
    stolen = {i for i in rank1_share if ranks[i] != 1}
    assert stolen, f"rank 1's shards were all done by rank 1 before the cancel: {ranks}"
    sacct = subprocess.run(
        ["sacct", "-n", "-X", "-o", "JobID,State", "-j", victim.split("_")[0]],
        capture_output=True,
        text=True,
    ).stdout
    assert "CANCELLED" in sacct, sacct
    assert not list(out.glob("*.tmp-*"))
