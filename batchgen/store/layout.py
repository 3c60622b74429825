"""The output folder's file names: this module owns every one of them.

Invariant: the only files that folder readers see are the finished shards. pandas, pyarrow and
Spark given the folder read every file whose path has no part starting with ``_`` or ``.``;
duckdb and ``datasets`` read every ``*.parquet`` below it, ``_batchgen/`` included. So everything
else batchgen writes lives under ``_batchgen/`` (or has a leading dot) and no name of it ends in
``.parquet`` (checkpoints are Parquet files named ``.ckpt``). ``datasets`` also picks its loader
by the most common extension below the folder, ``_batchgen/`` included: so files that grow with
the number of workers carry no extension it loads (worker records are JSON named ``.record``,
their error lists JSON lines named ``.errors``), or a thousand workers' ``.json`` files would
outvote the shards. A ``-m`` sweep's files (``batchgen.launcher``) grow with the workers too:
Hydra's ``multirun.yaml``, and submitit's pickles and task logs (``.pkl``, ``.out``, ``.err``,
inside a hidden ``.submitit/`` at that); ``datasets`` loads none of those extensions. They sit in
``sweeps_dir`` below: the config's ``hydra.sweep.dir`` is ``${batchgen.sweeps_dir:${output.dir}}``
and a time stamp, and submitit's folder is hydra-submitit-launcher's default, inside it::

    OUT/part-NNNNN.parquet                  a finished shard (the outputs)
    OUT/.part-NNNNN.parquet.tmp-HOST-PID-R  a shard being written (same folder: hard link)
    OUT/_batchgen/run.json                  the run's identity: fingerprint, config, versions
    OUT/_batchgen/run.guard                 empty; its flock serializes writing run.json
    OUT/_batchgen/workers/rank-RRRRR-of-WWWWW.record  one worker's status and summary
    OUT/_batchgen/workers/rank-RRRRR-of-WWWWW.errors  skipped and failed rows of the shards
                                            that worker published
    OUT/_batchgen/workers/rank-RRRRR-of-WWWWW.engine.log  the engine's own messages (vLLM's)
    OUT/_batchgen/workers/rank-RRRRR-of-WWWWW.log  what a worker that runner.devices started
                                            printed (its stderr): warnings, why it ended
    OUT/_batchgen/claims/part-NNNNN[.G].claim
    OUT/_batchgen/locks/NAME.lock           a worker's run lock (and NAME.lock.guard)
    OUT/_batchgen/checkpoints/part-NNNNN/rows-*.ckpt   finished batches of an unfinished shard
    OUT/_batchgen/quarantine/part-NNNNN.corrupt-TIME
    OUT/_batchgen/report.html, README.md    the report and the dataset card
    OUT/_batchgen/sweeps/multirun-TIME/     one ``-m`` sweep: Hydra's multirun.yaml, each job's
                                            worker-N/ folder (empty: chdir is off, Hydra logs
                                            to stdout), .submitit/JOBID/ (submitit's pickles and
                                            each task's JOBID_T_log.out and .err)
"""

from __future__ import annotations

from pathlib import Path

META_DIR = "_batchgen"
SHARD_PREFIX = "part-"
# A worker's files are named by rank and world size alone, never by host or pid: a restarted
# rank replaces its own record instead of leaving a stale one beside it.
WORKER_RECORD_GLOB = "rank-*-of-*.record"


def meta_dir(out_dir: Path) -> Path:
    """``OUT/_batchgen``: batchgen's own files."""
    return Path(out_dir) / META_DIR


def shard_name(index: int) -> str:
    """The file name of shard ``index``."""
    return f"{SHARD_PREFIX}{index:05d}.parquet"


def run_file(out_dir: Path) -> Path:
    """The run record (``run.json``)."""
    return meta_dir(out_dir) / "run.json"


def run_guard_file(out_dir: Path) -> Path:
    """The empty file whose ``flock`` serializes admission to the run (``run_file_guard``)."""
    return meta_dir(out_dir) / "run.guard"


def workers_dir(out_dir: Path) -> Path:
    """The worker records: each worker writes its own files there, and only those."""
    return meta_dir(out_dir) / "workers"


def worker_name(rank: int, world_size: int) -> str:
    """The stem of worker ``rank`` of ``world_size``'s files (``rank-00003-of-00008``)."""
    return f"rank-{rank:05d}-of-{world_size:05d}"


def worker_file(out_dir: Path, rank: int, world_size: int) -> Path:
    """A worker's record: its status, device, engine and summary (matches WORKER_RECORD_GLOB)."""
    return workers_dir(out_dir) / f"{worker_name(rank, world_size)}.record"


def worker_errors_file(out_dir: Path, rank: int, world_size: int) -> Path:
    """Skipped and failed rows of the shards a worker published, one JSON line each."""
    return workers_dir(out_dir) / f"{worker_name(rank, world_size)}.errors"


def worker_engine_log(out_dir: Path, rank: int, world_size: int) -> Path:
    """A worker's engine's own messages (vLLM's start-up report and warnings)."""
    return workers_dir(out_dir) / f"{worker_name(rank, world_size)}.engine.log"


def worker_log(out_dir: Path, rank: int, world_size: int) -> Path:
    """What a worker of a ``runner.devices`` pool printed to its stderr (``batchgen.job.pool``)."""
    return workers_dir(out_dir) / f"{worker_name(rank, world_size)}.log"


def pool_files(out_dir: Path, world_size: int, suffix: str) -> str:
    """Every worker of ``world_size``'s file ending in ``suffix`` (``.errors``, ``.log``), as
    one glob pattern, for messages that point at all of them."""
    return str(workers_dir(out_dir) / f"rank-*-of-{world_size:05d}{suffix}")


def claims_dir(out_dir: Path) -> Path:
    """The shard claims."""
    return meta_dir(out_dir) / "claims"


def locks_dir(out_dir: Path) -> Path:
    """The running workers' locks."""
    return meta_dir(out_dir) / "locks"


def worker_lock_name(rank: int, world_size: int) -> str:
    """The run lock's name of worker ``rank`` of ``world_size`` (one holder per rank)."""
    return f"run-rank{rank}-of{world_size}"


def lock_file(out_dir: Path, name: str) -> Path:
    """A run lock's file."""
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


def sweeps_dir(out_dir: Path) -> Path:
    """The ``-m`` sweeps' folders: Hydra's and submitit's files, kept with the run they made."""
    return meta_dir(out_dir) / "sweeps"


def report_file(out_dir: Path) -> Path:
    """The HTML report's default place."""
    return meta_dir(out_dir) / "report.html"


def card_file(out_dir: Path) -> Path:
    """The dataset card that ``finalize`` writes."""
    return meta_dir(out_dir) / "README.md"
