"""The sweep launchers' summary and exit status, without Slurm: fake submitit jobs for the
verdicts, and real local sweeps (``hydra/launcher=local``) for the exit status Hydra turns them
into and the folder they leave to the readers. tests/test_slurm.py does the same on a real
Slurm."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn, JobStatus
from submitit.core.utils import FailedJobError, UncompletedJobError

from batchgen import launcher, run
from batchgen.store import layout


class FakeJob:
    """What ``describe`` asks of a submitit job."""

    def __init__(self, job_id, error=None, result=None, state="COMPLETED", log="", out=None):
        self.job_id, self._error, self._result, self.state, self._log, self._out = (
            job_id,
            error,
            result,
            state,
            log,
            out,
        )

    def exception(self):
        return self._error

    def results(self):
        return [self._result]

    def stderr(self):
        return self._log

    def stdout(self):
        return self._out


def _trace(last: str) -> FailedJobError:
    rule = "----------------------"
    return FailedJobError(
        f"Job (task=0) failed during processing with trace:\n{rule}\nTraceback (most recent "
        f'call last):\n  File "x.py", line 1, in <module>\n{last}\n\n{rule}\nYou can check full '
        "logs with 'job.stderr(0)'"
    )


def test_describe_names_each_fate():
    done = JobReturn(overrides=["runner.rank=0"], status=JobStatus.COMPLETED)
    assert launcher.describe(0, FakeJob("7_0", result=done)).result is done
    cancelled = launcher.describe(
        1, FakeJob("7_1", UncompletedJobError("no output"), state="CANCELLED by 0")
    )
    assert (cancelled.state, cancelled.detail) == ("cancelled", "Slurm state CANCELLED by 0")
    exited = launcher.describe(
        2,
        FakeJob(
            "7_2",
            UncompletedJobError("no output"),
            state="FAILED",
            log="noise\nbatchgen: error: dataset.path: no such file 'x.jsonl'.\nsrun: error\n",
        ),
    )
    assert exited.line() == (
        "  #2   7_2        failed: batchgen: error: dataset.path: no such file 'x.jsonl'."
    )
    raised = launcher.describe(3, FakeJob("7_3", _trace("ValueError: boom")))
    assert (raised.state, raised.detail) == ("failed", "ValueError: boom")
    caught = JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("bad\nmore"))
    assert launcher.describe(4, FakeJob("7_4", result=caught)).detail == "bad"
    unknown = launcher.describe(5, FakeJob("7_5", UncompletedJobError("x"), state="NODE_FAIL"))
    assert unknown.detail == "ended without a result (state NODE_FAIL)"
    requeued = launcher.TaskReport(6, "7_6", "completed", requeues=2)
    assert requeued.line().endswith("completed, requeued 2 times")


def test_a_failed_job_return_is_read_without_a_word_on_stderr(capsys):
    # Hydra's return_value raises the job's error and announces it on stderr; the summary alone
    # speaks.
    caught = JobReturn(overrides=["a=1"], status=JobStatus.FAILED)
    caught.return_value = ValueError("no such column 'uid'")
    report = launcher.describe(0, FakeJob("7_0", result=caught))
    assert (report.state, report.detail) == ("failed", "no such column 'uid'")
    assert capsys.readouterr().err == ""


REFUSED = (
    "batchgen: error: output.dir='/o' holds a run with a different config fingerprint "
    "(_batchgen/run.json); resuming would mix outputs of two configs. What differs (recorded -> "
    "now):\n  sampling.max_new_tokens: 8 -> 9\nStart a new folder with output.dir=SOMEWHERE_ELSE, "
    "or rerun with the recorded settings. Finished shards were not touched.\n"
)


def test_a_task_that_exited_shows_batchgen_last_message_whole():
    job = FakeJob(
        "7_0",
        UncompletedJobError("no output"),
        state="FAILED",
        log="batchgen: an earlier warning\n" + REFUSED + "srun: error: n1: task 0: Exited\n",
        out="batchgen: greedy, max_new_tokens 9\n",
    )
    assert launcher.describe(0, job).line().splitlines() == [
        "  #0   7_0        failed: batchgen: error: output.dir='/o' holds a run with a different "
        "config fingerprint (_batchgen/run.json); resuming would mix outputs of two configs. What "
        "differs (recorded -> now):",
        "         sampling.max_new_tokens: 8 -> 9",
        "       Start a new folder with output.dir=SOMEWHERE_ELSE, or rerun with the recorded "
        "settings. Finished shards were not touched.",
    ]
    assert launcher.last_message("batchgen: error: a\n  b\n\nlater noise\n") == (
        "batchgen: error: a\n  b"
    )
    # What a worker printed on stdout when it started is no reason for its end.
    silent = FakeJob("7_1", UncompletedJobError("x"), state="FAILED", out="batchgen: greedy\n")
    assert launcher.describe(1, silent).detail == "ended without a result (state FAILED)"


def test_requeues_are_counted_from_sacct_duplicates(monkeypatch):
    seen = {}

    def sacct(cmd, **kwargs):
        seen["cmd"] = cmd
        out = "7_0|COMPLETED\n7_1|REQUEUED\n7_1|REQUEUED\n7_1|COMPLETED\n9_0|CANCELLED by 0\n"
        return subprocess.CompletedProcess(cmd, 0, out, "")

    monkeypatch.setattr(launcher.subprocess, "run", sacct)
    counts = launcher.count_requeues(["7_0", "7_1", "9_0"])
    assert counts == {"7_1": 2} and counts["7_0"] == 0
    assert "-D" in seen["cmd"] and seen["cmd"][-1] == "7,9"

    def missing(cmd, **kwargs):
        raise FileNotFoundError("sacct")

    monkeypatch.setattr(launcher.subprocess, "run", missing)
    assert launcher.count_requeues(["7_0"]) == {}


@pytest.fixture
def finished(tiny_models, prompts_file, tmp_path, make_job) -> Path:
    """A finished 3-shard output folder."""
    out = tmp_path / "out"
    run(make_job(tiny_models["chat"], prompts_file, out, output__rows_per_shard=4))
    return out


def test_complete_output_exits_0_whatever_the_tasks(finished, capsys):
    ok = JobReturn(overrides=["runner.rank=0"], status=JobStatus.COMPLETED)
    tasks = [
        launcher.TaskReport(0, "7_0", "completed", result=ok),
        launcher.TaskReport(1, "7_1", "cancelled", "Slurm state CANCELLED by 0"),
    ]
    returns = launcher.conclude(tasks, [finished], [["runner.rank=0"], ["runner.rank=1"]], "slurm")
    assert returns[0] is ok
    assert returns[1].status == JobStatus.COMPLETED
    assert returns[1].overrides == ["runner.rank=1"]
    assert returns[1].return_value is None  # what Hydra's sweeper reads: no exception
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "batchgen sweep summary: 2 slurm tasks, 1 completed",
        "  #0   7_0        completed",
        "  #1   7_1        cancelled: Slurm state CANCELLED by 0",
        f"output complete: 3/3 shards in {finished}",
    ]


def test_incomplete_or_missing_output_exits_1(finished, tmp_path, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(finished, partial)
    (partial / "part-00001.parquet").unlink()
    tasks = [launcher.TaskReport(0, "7_0", "failed", "batchgen: error: x")]
    with pytest.raises(SystemExit) as stop:
        launcher.conclude(tasks, [partial], [[]], "slurm")
    assert stop.value.code == 1
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"output incomplete: 2/3 shards done in {partial}; rerun the same command to resume"
    )
    with pytest.raises(SystemExit) as stop:
        launcher.conclude(tasks, [finished, tmp_path / "nothing"], [[]], "local")
    assert stop.value.code == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2] == f"output complete: 3/3 shards in {finished}"
    assert lines[-1].startswith(f"output incomplete: no shard done in {tmp_path / 'nothing'}: ")


def test_each_output_folder_is_read_once_through_the_one_reader(finished, tmp_path, folder_reads):
    folder_reads.clear()  # the job's own closing summary read it too
    complete, lines = launcher.output_lines([finished, tmp_path / "nothing"])
    assert not complete and lines[0] == f"output complete: 3/3 shards in {finished}"
    assert folder_reads == [finished, tmp_path / "nothing"]


def _local_sweep(model: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """A local sweep of ranks 0 and 5 of 2: rank 5 fails its config check at once."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "batchgen",
            "-m",
            "hydra/launcher=local",
            "runner.rank=0,5",
            "runner.world_size=2",
            f"model.name_or_path={model}",
            "model.gguf_file=null",
            "dataset=local",
            f"dataset.path={data}",
            "dataset.id_column=uid",
            "sampling.max_new_tokens=8",
            "output.rows_per_shard=4",
            "runner.progress=false",
            f"output.dir={out}",
            *extra,
        ],
        cwd=out.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_local_sweep_exit_status_follows_the_output(tiny_models, prompts_file, tmp_path):
    out = tmp_path / "out"
    # Without stealing, rank 0 does shards 0 and 2; rank 1's shard 1 has no worker.
    first = _local_sweep(tiny_models["chat"], prompts_file, out, "runner.steal=false")
    log = first.stdout + first.stderr
    assert first.returncode == 1, log
    assert "Traceback" not in log
    assert f"output incomplete: 2/3 shards done in {out}; rerun the same command" in log
    assert "failed: batchgen: error: rank=5 from runner.rank/runner.world_size" in log
    # The same sweep with stealing: rank 0 takes shard 1; rank 5 still fails, the output is whole.
    second = _local_sweep(tiny_models["chat"], prompts_file, out)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log
    assert "Traceback" not in log
    assert "batchgen sweep summary: 2 local tasks, 1 completed" in log
    assert f"output complete: 3/3 shards in {out}" in log


def test_each_local_task_is_pinned_to_a_cuda_device_of_its_own(monkeypatch):
    # submitit starts every local task with the same CUDA_VISIBLE_DEVICES (measured: 0); the
    # launcher records the devices it sees at submission and each task takes one in turn, in
    # its own process, before anything there starts CUDA. Slurm's tasks keep Slurm's.
    seen = []

    def task_body(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state):
        seen.append(os.environ.get("CUDA_VISIBLE_DEVICES"))

    # The class the launchers inherit from (Hydra's plugin scan may load its module twice).
    base = next(c for c in launcher.LocalLauncher.__mro__ if c.__name__ == "BaseSubmititLauncher")
    monkeypatch.setattr(base, "__call__", task_body)
    local = launcher.LocalLauncher.__new__(launcher.LocalLauncher)
    local._devices = ("4", "6")
    for num in range(3):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
        local([f"runner.rank={num}"], "hydra.sweep.dir", num, f"job_id_for_{num}", {})
    assert seen == ["4", "6", "4"]
    slurm = launcher.SlurmLauncher.__new__(launcher.SlurmLauncher)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    slurm(["runner.rank=1"], "hydra.sweep.dir", 1, "job_id_for_1", {})
    assert seen[-1] == "2"


@pytest.mark.parametrize("executor", ["local", "slurm"])
def test_sweep_folders_lie_in_the_meta_folder(tmp_path, executor):
    from hydra import compose, initialize_config_dir

    from batchgen import paths
    from batchgen.composition import hydra_registered

    out = tmp_path / "out"
    with hydra_registered(), initialize_config_dir(config_dir=paths.CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[f"hydra/launcher={executor}", f"output.dir={out}"],
            return_hydra_config=True,
        )
        sweep = Path(cfg.hydra.sweep.dir)
        submitit = Path(cfg.hydra.launcher.submitit_folder)
    assert sweep.parent == layout.sweeps_dir(out)
    assert sweep.name.startswith("multirun-")
    assert submitit.parent == sweep / ".submitit"


def test_sweeps_leave_the_folder_to_the_readers(tiny_models, prompts_file, tmp_path, readers):
    """Hydra's and submitit's files stay out of the readers' way, whatever became of the tasks."""
    out = tmp_path / "out"
    # Every task fails (rank 0: no such column; rank 5: no such rank).
    failed = _local_sweep(tiny_models["chat"], prompts_file, out, "dataset.id_column=nope")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert [p.name for p in out.iterdir()] == [layout.META_DIR]
    assert len(list(layout.sweeps_dir(out).glob("multirun-*/multirun.yaml"))) == 1
    assert list(layout.sweeps_dir(out).glob("multirun-*/.submitit/*/*_log.err"))
    done = _local_sweep(tiny_models["chat"], prompts_file, out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in out.iterdir() if p.name != layout.META_DIR) == [
        layout.shard_name(i) for i in range(3)
    ]
    assert len(list(layout.sweeps_dir(out).glob("multirun-*/.submitit/*/*_log.out"))) == 4
    counts = readers(out)
    assert counts == dict.fromkeys(counts, 12)
    # Resuming with another setting: every task refuses, the summary shows why, whole.
    refused = _local_sweep(tiny_models["chat"], prompts_file, out, "sampling.max_new_tokens=9")
    lines = (refused.stdout + refused.stderr).splitlines()
    assert "Traceback" not in refused.stdout + refused.stderr
    at = next(i for i, x in enumerate(lines) if x.startswith("  #0 "))
    assert lines[at].endswith(
        f"failed: batchgen: error: output.dir={str(out)!r} holds a run with a different config "
        "fingerprint (_batchgen/run.json); resuming would mix outputs of two configs. What "
        "differs (recorded -> now):"
    )
    assert lines[at + 1 : at + 3] == [
        "         sampling.max_new_tokens: 8 -> 9",
        "       Start a new folder with output.dir=SOMEWHERE_ELSE, or rerun with the recorded "
        "settings. Finished shards were not touched.",
    ]
    assert lines[at + 3].startswith("  #1 ")
    counts = readers(out)
    assert counts == dict.fromkeys(counts, 12)
