"""Integration against a real one-node Slurm through Hydra's submitit launcher (batchgen.launcher):

- a 4-worker array, one task cancelled mid-run: the others finish its shards, the union equals a
  single process, and the submitting command prints one summary and exits 0 (no traceback);
- a 2-worker array, one task sent SIGUSR2 (what Slurm sends `signal_delay_s` before the time
  limit): batchgen stops between batches, submitit requeues the task, the requeued task resumes
  its own shards, and the command exits 0.

The cluster comes up through scripts/start_slurm.sh (munge, MariaDB, slurmdbd, slurmctld,
slurmd). The tests skip, saying why, only where that script reports that Slurm cannot run here
(exit 3: not root, ports taken, packages unavailable); under CI=true they fail with that reason.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from batchgen import run
from batchgen.store import layout

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def slurm(unavailable):
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
        unavailable(f"Slurm cannot start on this machine: {started.stderr.strip()}")
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


def _wait(condition, timeout: float, what: str, sweep: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sweep is not None and sweep.poll() is not None:
            log = sweep.communicate()[0]
            raise AssertionError(f"the sweep exited {sweep.returncode} before {what}:\n{log}")
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _array_tasks() -> dict[str, str]:
    """Running or pending array tasks of ours: 'JOBID_TASK' -> state."""
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True)
    return dict(line.split() for line in out.stdout.splitlines() if "_" in line)


def _prompts(tmp_path: Path) -> Path:
    data = tmp_path / "prompts.jsonl"
    with data.open("w") as f:
        for i in range(40):
            f.write(
                json.dumps({"uid": f"u{i}", "prompt": f"prompt {i} " + "word " * (i % 9)}) + "\n"
            )
    return data


def _sweep(model: Path, data: Path, out: Path, workers: int, new_tokens: int, *extra: str):
    """`make slurm`'s command (sampled, 2 rows a shard and a batch), running in the background."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchgen",
            "-m",
            "hydra/launcher=slurm",
            f"runner.rank=range({workers})",
            f"runner.world_size={workers}",
            f"model.name_or_path={model}",
            "model.gguf_file=null",
            "dataset=local",
            f"dataset.path={data}",
            "dataset.id_column=uid",
            "sampling.do_sample=true",
            f"sampling.max_new_tokens={new_tokens}",
            "output.rows_per_shard=2",
            "runner.batch_size=2",
            "runner.progress=false",
            f"output.dir={out}",
            *extra,
        ],
        cwd=out.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _reference(make_job, model: Path, data: Path, out: Path, new_tokens: int) -> Path:
    """The same job in this process, one worker: what the union of the workers must equal.

    One torch thread, like each Slurm task: two spinning OpenMP threads on a busy 2-core
    machine are many times slower.
    """
    settings = {
        "runner__threads": 1,
        "sampling__do_sample": True,
        "sampling__max_new_tokens": new_tokens,
        "output__rows_per_shard": 2,
        "runner__batch_size": 2,
    }
    threads = torch.get_num_threads()
    try:
        run(make_job(model, data, out, **settings))
    finally:
        torch.set_num_threads(threads)  # runner.threads is process-wide; later tests get it back
    return out


def _sacct(task: str) -> list[str]:
    """States of every attempt of an array task, oldest first (requeues leave REQUEUED)."""
    cmd = ["sacct", "-n", "-P", "-D", "-X", "-o", "State", "-j", task]
    return subprocess.run(cmd, capture_output=True, text=True).stdout.split()


def _squeue(task: str) -> str:
    """'STATE REASON' of an array task, '' once it has left the queue."""
    cmd = ["squeue", "-h", "-j", task, "-o", "%T %r"]
    return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()


def _rank1_after_its_first_shard(out: Path, sweep: subprocess.Popen) -> str:
    """Rank 1's array task, once it has published a shard (it still has others to do)."""
    _wait(
        lambda: 1 in _shard_ranks(out).values() if out.exists() else False,
        240,
        "rank 1's first shard",
        sweep,
    )
    return next(t for t in _array_tasks() if t.endswith("_1"))


def test_array_with_a_cancelled_task_equals_single_process(slurm, tiny_models, tmp_path, make_job):
    data = _prompts(tmp_path)
    reference = _reference(make_job, tiny_models["chat"], data, tmp_path / "single", 40)
    out = tmp_path / "slurm"
    sweep = _sweep(tiny_models["chat"], data, out, 4, 40, "runner.lease_seconds=5")
    try:
        victim = _rank1_after_its_first_shard(out, sweep)  # then cancel it
        subprocess.run(["scancel", victim], check=True)
        status = [sys.executable, "-m", "batchgen", "status", str(out)]
        _wait(
            lambda: subprocess.run(status, capture_output=True).returncode == 0,
            300,
            "every shard published",
        )
        log = sweep.communicate(timeout=300)[0]
    finally:
        if sweep.poll() is None:
            sweep.kill()
    # One summary, exit 0: the output is whole although a task was cancelled.
    assert sweep.returncode == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert "batchgen sweep summary: 4 slurm tasks, 3 completed" in log, log[-3000:]
    assert re.search(rf"#1 +{victim} +cancelled: Slurm state CANCELLED", log), log[-3000:]
    assert f"output complete: 20/20 shards in {out}" in log, log[-3000:]
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


def test_sigusr2_requeues_the_task_which_resumes(slurm, tiny_models, tmp_path, make_job):
    data = _prompts(tmp_path)
    # Longer completions than above, so that rank 1 is mid-way when the signal lands.
    reference = _reference(make_job, tiny_models["chat"], data, tmp_path / "single", 64)
    out = tmp_path / "slurm"
    # No stealing: rank 1's shards wait for rank 1, so its requeued attempt must do them.
    sweep = _sweep(tiny_models["chat"], data, out, 2, 64, "runner.steal=false")
    try:
        victim = _rank1_after_its_first_shard(out, sweep)
        # What Slurm does `signal_delay_s` before the time limit (sbatch --signal=USR2@N): the
        # signal goes to the job's steps, i.e. the python process that srun runs (not --batch).
        subprocess.run(["scancel", "--signal=USR2", victim], check=True)
        _wait(lambda: "REQUEUED" in _sacct(victim), 120, f"{victim} to be requeued")
        # Slurm holds a requeued job about 2 minutes (BeginTime); start it now.
        _wait(
            lambda: _squeue(victim).split()[:1] in (["PENDING"], ["RUNNING"], []),
            60,
            f"{victim} back in the queue",
        )
        if "BeginTime" in _squeue(victim):
            subprocess.run(["scontrol", "update", f"JobId={victim}", "StartTime=now"])
        log = sweep.communicate(timeout=300)[0]
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert re.search(rf"#1 +{victim} +completed, requeued 1 time\n", log), log[-3000:]
    assert f"output complete: 20/20 shards in {out}" in log, log[-3000:]
    # Accounting may record the end a moment after the result file appeared.
    _wait(lambda: _sacct(victim) == ["REQUEUED", "COMPLETED"], 60, f"sacct: {victim} requeued once")
    logs = layout.sweeps_dir(out).glob(f"multirun-*/.submitit/{victim}/*_log.*")
    task_log = "".join(p.read_text() for p in logs)
    assert "Caught signal SIGUSR2" in task_log and f"Requeued job {victim}" in task_log
    # Two attempts, each with batchgen's summary: the second resumed the first's shards and
    # generated the rest of rank 1's share.
    attempts = re.findall(r"this run +(\d+) rows.*?(\d+) shards resumed", task_log)
    assert len(attempts) == 2, task_log[-3000:]
    (first_rows, _), (second_rows, resumed) = ((int(a), int(b)) for a, b in attempts)
    assert first_rows > 0 and second_rows > 0 and resumed > 0, attempts
    assert set(_shard_ranks(out).items()) == {(i, i % 2) for i in range(20)}
    assert _rows(out) == _rows(reference), log[-3000:]
    assert not list(out.glob("*.tmp-*"))
