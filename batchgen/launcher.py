"""Hydra's submitit launchers (Slurm and local) that judge a sweep by its output, not its tasks.

Invariant: once every task of a ``-m`` sweep has ended, the submitting command prints one
summary (each task's fate, then the output folder's state) and exits 0 when every shard is
published, 1 when not, never with a traceback. A task cancelled or failed while the others took
over its shards is no failure of the job: the output is what was asked for. A local sweep's
tasks each get a CUDA device of their own, in turn (``placement.pin``), as Slurm's do.

The exit status. Hydra's multirun ignores what ``launch`` returns, except that its sweeper reads
``return_value`` of each ``JobReturn``, which re-raises a failed job's error; an exception out of
``launch`` (the stock launcher's ``job.results()`` raises submitit's ``UncompletedJobError`` for
a cancelled task) becomes a traceback and exit 1. So ``launch`` here submits like
hydra-submitit-launcher 1.2.0, waits for every task with ``job.exception()`` (which returns the
error instead of raising it), reads the output with ``batchgen.store.folder.read_folder``,
prints the summary, then either returns one ``COMPLETED`` ``JobReturn`` per task (output
complete: Hydra ends normally, exit 0) or raises ``SystemExit(1)``, which is no ``Exception``:
neither the sweeper nor Hydra's error report catch it, and Python exits 1 without a traceback.
(Hydra's default sweeper launches a sweep as one batch; with ``hydra.sweeper.max_batch_size``
each batch is judged when it ends.)

Hydra instantiates launchers only by names under ``hydra_plugins.`` (those its plugin scan
finds). Importing this module registers both classes as ``hydra_plugins.batchgen_launcher.*``,
the ``_target_`` of ``batchgen/conf/hydra/launcher/{slurm,local}.yaml``; ``batchgen.cli``
imports it.
They keep their real module, so the job unpickles the launcher from ``batchgen.launcher``.
That registration, the submission and submitit's wait for a result file lean on internals:
``batchgen.hydra_compat`` does them, after checking the packages' versions.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from omegaconf import OmegaConf

from batchgen import hydra_compat
from batchgen.engine.placement import pin, visible_cuda
from batchgen.errors import last_message

# The separator submitit puts around a failed task's traceback in FailedJobError.
_TRACE_RULE = "----------------------"
# Slurm states of a task that has not ended (a requeued task is PENDING again, then RUNNING).
_LIVE = ("PENDING", "RUNNING", "REQUEUE", "COMPLETING", "CONFIGURING", "RESIZING", "SUSPENDED")
# A detail's further lines sit under the task line's job id.
_MORE = " " * 7


@dataclass
class TaskReport:
    """What became of one task of the sweep.

    Attributes:
        num: Hydra's job number (``#num`` in the sweep's log).
        job_id: the scheduler's id, e.g. ``47_1`` for task 1 of Slurm array 47.
        state: ``completed``, ``cancelled``, ``timed out`` or ``failed``.
        detail: why, for a task that did not complete: the last line of a Python exception's
            trace, the first line of an error the job returned, or batchgen's whole last message
            (``batchgen: error: ...`` and the lines that go with it).
        requeues: how many times the scheduler requeued it (submitit after ``SIGUSR2``).
        result: the task's own ``JobReturn`` when it completed.
    """

    num: int
    job_id: str
    state: str
    detail: str = ""
    requeues: int = 0
    result: JobReturn | None = None

    def line(self) -> str:
        """The task's summary: ``#1  47_1  completed, requeued 1 time``, or ``failed: DETAIL``
        with a detail's further lines indented under it."""
        text = f"  #{self.num:<3} {self.job_id:<10} {self.state}"
        if self.requeues:
            text += f", requeued {self.requeues} time{'s' if self.requeues > 1 else ''}"
        first, *more = self.detail.splitlines() or [""]
        return "\n".join([text + (f": {first}" if first else ""), *(_MORE + x for x in more)])


def failure_of(ret: JobReturn) -> Any:
    """The error a job that did not complete returned (Hydra's task catches it, returns it).

    Hydra's public ``return_value`` raises it for such a job, after writing ``Error executing
    job with overrides: ...`` to stderr: caught here, with that line kept out of the summary.
    """
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return ret.return_value
    except Exception as e:
        return e


def describe(num: int, job: Any) -> TaskReport:
    """Wait for a submitit job and say what became of it, without raising its error.

    Args:
        num: Hydra's job number.
        job: a finished or running ``submitit.Job`` whose function returns a ``JobReturn``.

    Returns:
        The task's report (``requeues`` left at 0; see ``count_requeues``).
    """
    error = job.exception()  # waits for the job to end
    if error is None:
        ret = job.results()[0]
        if ret.status == JobStatus.COMPLETED:
            return TaskReport(num, job.job_id, "completed", result=ret)
        error = failure_of(ret)
        first = str(error).strip().splitlines() or [type(error).__name__]
        return TaskReport(num, job.job_id, "failed", first[0])
    text = str(error)
    if text.count(_TRACE_RULE) >= 2:  # FailedJobError: a Python exception in the task
        trace = [x for x in text.split(_TRACE_RULE)[1].splitlines() if x.strip()]
        return TaskReport(num, job.job_id, "failed", trace[-1].strip() if trace else "")
    # UncompletedJobError: the task ended without a result (cancelled, killed, nonzero exit).
    state = str(job.state)
    for word, fate in (("CANCELLED", "cancelled"), ("TIMEOUT", "timed out")):
        if word in state.upper():
            return TaskReport(num, job.job_id, fate, f"Slurm state {state}")
    try:
        said = last_message(job.stderr() or "")
    except OSError:
        said = ""
    return TaskReport(num, job.job_id, "failed", said or f"ended without a result (state {state})")


def count_requeues(job_ids: list[str]) -> Counter[str]:
    """Requeues per Slurm job id, from the accounting records (``sacct --duplicates``).

    Each requeue leaves a ``REQUEUED`` record of the attempt it ended. Without ``sacct`` (or
    accounting) the count is empty: the summary then says nothing about requeues.
    """
    arrays = sorted({j.split("_")[0] for j in job_ids})
    cmd = ["sacct", "-n", "-P", "-D", "-X", "-o", "JobID,State", "-j", ",".join(arrays)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return Counter()
    pairs = (line.split("|")[:2] for line in out.splitlines() if "|" in line)
    return Counter(jid for jid, state in pairs if state.startswith("REQUEUED"))


def output_lines(out_dirs: list[Path]) -> tuple[bool, list[str]]:
    """Whether every output folder is complete, and one ``output ...`` line per folder."""
    from batchgen.errors import NotAnOutputDir
    from batchgen.store import folder  # pyarrow: only once the tasks ended

    complete, lines = True, []
    for out in out_dirs:
        state = folder.read_folder(out)
        try:
            state.require_plan()
        except NotAnOutputDir as e:
            complete = False
            lines.append(f"output incomplete: no shard done in {out}: {e}")
            continue
        done, total = len(state.done), state.shards_total
        if state.complete:
            lines.append(f"output complete: {done}/{total} shards in {out}")
        else:
            complete = False
            lines.append(
                f"output incomplete: {done}/{total} shards done in {out}; "
                "rerun the same command to resume"
            )
    return complete, lines


def conclude(
    tasks: list[TaskReport], out_dirs: list[Path], overrides: list[list[str]], where: str
) -> list[JobReturn]:
    """Print the sweep's summary; return COMPLETED job returns, or exit 1 when output is missing.

    Args:
        tasks: one report per task, in Hydra's job order.
        out_dirs: the distinct ``output.dir`` of the sweep's jobs.
        overrides: each task's overrides, for the returns of tasks that left none.
        where: the executor's name, for the heading (``slurm``, ``local``).

    Raises:
        SystemExit: code 1, when some output folder lacks a shard.
    """
    complete, outputs = output_lines(out_dirs)
    ok = sum(t.state == "completed" for t in tasks)
    head = f"batchgen sweep summary: {len(tasks)} {where} tasks, {ok} completed"
    print("\n".join([head, *(t.line() for t in tasks), *outputs]), flush=True)
    if not complete:
        raise SystemExit(1)
    return [
        t.result or JobReturn(overrides=o, status=JobStatus.COMPLETED)
        for t, o in zip(tasks, overrides, strict=True)
    ]


class _OutputJudged:
    """The ``launch`` shared by both launchers (mixed in before submitit's classes)."""

    # submitit's executor: "slurm" or "local".
    cluster: str
    # Seconds to wait for the result file of a task that ended without one (submitit: 15 s, for
    # slow shared file systems); None keeps submitit's default.
    _result_wait_s: float | None = None
    # The CUDA devices the submitting process sees, as CUDA_VISIBLE_DEVICES names them, for a
    # local sweep: submitit gives every local task the same ones (CUDA_VISIBLE_DEVICES=0, or
    # none), so each task takes one of these in turn instead. Slurm gives each its own.
    _devices: tuple[str, ...] = ()

    def _wait(self, job: Any) -> None:
        """Until the task has ended. On Slurm its result file is not proof: when the requeue's
        SIGTERM kills submitit's ``scontrol requeue`` before it returns (seen on this project's
        Slurm), the attempt it ended still writes one, and the requeued attempt runs on."""
        job.wait()
        if self.cluster == "slurm":
            # Ended only when two looks in a row say so: a requeue passes through states that
            # read as ended (its attempt cancelled) before the task is PENDING again.
            ended = 0
            while ended < 2:
                live = job.get_info(mode="force").get("State", "").startswith(_LIVE)
                ended = 0 if live else ended + 1
                if ended < 2:
                    time.sleep(2)

    def _output_dirs(self, job_overrides: list[list[str]]) -> list[Path]:
        """The ``output.dir`` of each job, composed as the job itself composes it."""
        dirs: list[Path] = []
        holder = HydraConfig.instance()
        saved = holder.cfg
        try:
            for overrides in job_overrides:
                cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
                holder.set_config(cfg)  # ${hydra:runtime.choices...} in output.dir
                path = Path(str(OmegaConf.select(cfg, "output.dir", default="(no output.dir)")))
                path = path.absolute()
                if path not in dirs:
                    dirs.append(path)
        finally:
            holder.cfg = saved
        return dirs

    def _submit(self, job_overrides: list[list[str]], initial_job_idx: int) -> list[Any]:
        """Submit one task per override list (``hydra_compat.submit``).

        Raises:
            SystemExit: one line, when the scheduler refuses the array or cannot be run.
        """
        import submitit

        try:
            return hydra_compat.submit(self, self.cluster, job_overrides, initial_job_idx)
        except (submitit.core.utils.FailedJobError, OSError) as e:  # sbatch refused, or absent
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SystemExit(
                f"batchgen: error: submitting the sweep to {self.cluster}: {first}"
            ) from None

    def __call__(
        self,
        sweep_overrides: list[str],
        job_dir_key: str,
        job_num: int,
        job_id: str,
        singleton_state: dict,
    ) -> JobReturn:
        """Run one task in its own process (submitit unpickles the launcher there): the
        presets' resolvers are registered while Hydra resolves the task's config. A local
        task is pinned to a CUDA device of its own first (``_devices``), before anything in
        its process starts CUDA."""
        from batchgen.composition import hydra_registered

        if self._devices:
            os.environ["CUDA_VISIBLE_DEVICES"] = pin(self._devices, job_num)
        with hydra_registered():
            return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)

    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:
        """Submit the sweep, wait for every task, print one summary; exit 1 if output is missing.

        Returns:
            One COMPLETED ``JobReturn`` per task when every output folder is complete.

        Raises:
            SystemExit: code 1 when some shard is missing (after the summary).
        """
        job_overrides = [list(o) for o in job_overrides]
        out_dirs = self._output_dirs(job_overrides)
        if self.cluster == "local":  # recorded before the launcher is pickled for the tasks
            self._devices = tuple(visible_cuda())
        jobs = self._submit(job_overrides, initial_job_idx)
        tasks = []
        for num, job in enumerate(jobs, initial_job_idx):
            if self._result_wait_s is not None:
                hydra_compat.set_result_wait(job, self._result_wait_s)
            self._wait(job)
            tasks.append(describe(num, job))
        if self.cluster == "slurm":
            requeues = count_requeues([t.job_id for t in tasks])
            for t in tasks:
                t.requeues = requeues[t.job_id]
        return conclude(tasks, out_dirs, job_overrides, self.cluster)


class SlurmLauncher(_OutputJudged, submitit_launcher.SlurmLauncher):
    """``hydra/launcher=slurm``: one Slurm array task per job, judged by the output."""

    cluster = "slurm"


class LocalLauncher(_OutputJudged, submitit_launcher.LocalLauncher):
    """``hydra/launcher=local``: one local process per job, judged by the output."""

    cluster = "local"

    # A local task writes its result before its process ends: nothing to wait for after that.
    _result_wait_s = 1.0


def register() -> None:
    """Let Hydra instantiate both launchers by their ``hydra_plugins.batchgen_launcher.*`` names
    (idempotent; done on import, see the module docstring).

    Raises:
        SystemExit: Hydra, its submitit launcher or submitit is of a version batchgen was not
            verified with.
    """
    for cls in (SlurmLauncher, LocalLauncher):
        hydra_compat.register_launcher(f"hydra_plugins.batchgen_launcher.{cls.__name__}", cls)


register()
