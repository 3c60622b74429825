"""Which worker this process is (rank of world size), and which shards that rank owns.

Rank and world size come from the config when set, else from the launcher's environment, in a
fixed order of precedence so that a job started by one launcher inside another (a Slurm array
whose tasks call torchrun, say) resolves the same way every time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from batchgen.errors import ConfigError

# Sources, as recorded in WorkerInfo.source.
CONFIG = "config"
SLURM_ARRAY = "slurm-array"
SLURM_TASKS = "srun"
TORCHRUN = "torchrun"
KUBERNETES = "kubernetes"
SINGLE = "single"


@dataclass(frozen=True)
class WorkerInfo:
    """This process's place in a data-parallel run.

    Attributes:
        rank: 0-based worker index, ``0 <= rank < world_size``.
        world_size: number of workers sharing the shards.
        local_rank: index of this worker on its node (picks the GPU) when the launcher says so.
        source: where rank and world size came from: ``config``, ``slurm-array``, ``srun``,
            ``torchrun``, ``kubernetes`` or ``single``.
    """

    rank: int
    world_size: int
    local_rank: int | None
    source: str


def _int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={raw!r} is not an integer; batchgen reads it to "
            f"find this worker's rank (set runner.rank and runner.world_size to override)."
        ) from None


def _slurm_array(env: Mapping[str, str]) -> WorkerInfo | None:
    task = _int(env, "SLURM_ARRAY_TASK_ID")
    if task is None:
        return None
    # Arrays need not start at 0 (--array=5-8) and may step (--array=0-15:4): the rank is the
    # task's position in the array, not its id.
    low = _int(env, "SLURM_ARRAY_TASK_MIN") or 0
    step = _int(env, "SLURM_ARRAY_TASK_STEP") or 1
    count = _int(env, "SLURM_ARRAY_TASK_COUNT")
    if count is None:
        high = _int(env, "SLURM_ARRAY_TASK_MAX")
        if high is None:
            raise ConfigError(
                f"SLURM_ARRAY_TASK_ID={task} is set but neither SLURM_ARRAY_TASK_COUNT nor "
                f"SLURM_ARRAY_TASK_MAX is, so the number of workers is unknown; set "
                f"runner.world_size (and runner.rank)."
            )
        count = (high - low) // step + 1
    offset = task - low
    if offset % step:
        raise ConfigError(
            f"SLURM_ARRAY_TASK_ID={task} is not on the array's step {step} from "
            f"SLURM_ARRAY_TASK_MIN={low}; set runner.rank and runner.world_size explicitly."
        )
    # One worker per array task: Slurm's CUDA_VISIBLE_DEVICES already picks its GPUs.
    return WorkerInfo(offset // step, count, None, SLURM_ARRAY)


def _from_env(env: Mapping[str, str]) -> WorkerInfo | None:
    array = _slurm_array(env)
    if array is not None:
        return array
    procid, ntasks = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
    if procid is not None and ntasks is not None:
        return WorkerInfo(procid, ntasks, _int(env, "SLURM_LOCALID"), SLURM_TASKS)
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    if rank is not None and world is not None:
        return WorkerInfo(rank, world, _int(env, "LOCAL_RANK"), TORCHRUN)
    return None


def _kubernetes(env: Mapping[str, str], world_size: int | None) -> WorkerInfo | None:
    index = _int(env, "JOB_COMPLETION_INDEX")
    if index is None:
        return None
    # An indexed Job exposes its index but not its completions count.
    world = world_size if world_size is not None else _int(env, "BATCHGEN_WORLD_SIZE")
    if world is None:
        raise ConfigError(
            f"JOB_COMPLETION_INDEX={index} is set (Kubernetes indexed job) but the number of "
            f"workers is unknown: set runner.world_size or the environment variable "
            f"BATCHGEN_WORLD_SIZE to the job's completions."
        )
    return WorkerInfo(index, world, None, KUBERNETES)


def _check(info: WorkerInfo) -> WorkerInfo:
    where = (
        "runner.rank/runner.world_size"
        if info.source == CONFIG
        else f"the {info.source} environment"
    )
    if info.world_size < 1:
        raise ConfigError(f"world_size={info.world_size} from {where}: must be at least 1.")
    if not 0 <= info.rank < info.world_size:
        raise ConfigError(
            f"rank={info.rank} from {where}: must be in [0, {info.world_size}) for "
            f"world_size={info.world_size}."
        )
    return info


def resolve_worker(
    rank: int | None,
    world_size: int | None,
    env: Mapping[str, str] = os.environ,
) -> WorkerInfo:
    """Find this worker's rank and world size.

    Precedence: ``runner.rank`` and ``runner.world_size`` (both set), then a Slurm array
    (``SLURM_ARRAY_TASK_ID`` / ``_COUNT`` / ``_MIN`` / ``_STEP``), then ``srun`` tasks
    (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``), then torchrun (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``), then a Kubernetes indexed job (``JOB_COMPLETION_INDEX``,
    with the world size from ``runner.world_size`` or ``BATCHGEN_WORLD_SIZE``), else a single
    worker (rank 0 of 1).

    Args:
        rank: ``runner.rank`` or None.
        world_size: ``runner.world_size`` or None.
        env: the environment to read; ``os.environ`` by default.

    Returns:
        The resolved, validated worker.

    Raises:
        ConfigError: only one of rank/world size is set (outside Kubernetes), a variable is not
            an integer, or the rank is outside ``[0, world_size)``.
    """
    if rank is not None and world_size is not None:
        return _check(WorkerInfo(rank, world_size, None, CONFIG))
    if rank is not None:
        raise ConfigError(
            f"runner.rank={rank} is set without runner.world_size; set both or neither "
            f"(neither: the launcher's environment decides)."
        )
    if world_size is not None:
        info = _kubernetes(env, world_size)
        if info is None:
            raise ConfigError(
                f"runner.world_size={world_size} is set without runner.rank; set both or neither "
                f"(runner.world_size alone is only for Kubernetes indexed jobs)."
            )
        return _check(info)
    info = _from_env(env) or _kubernetes(env, None) or WorkerInfo(0, 1, None, SINGLE)
    return _check(info)


def assign_shards(indices: list[int], rank: int, world_size: int) -> list[int]:
    """The shards that worker ``rank`` starts with: shard ``i`` belongs to rank ``i % world_size``.

    Striding by shard index (not by position in ``indices``) keeps a shard's owner fixed when
    some shards are already finished, so a resumed run hands out the same work; neighbouring
    shards go to different workers, which evens out datasets whose prompts grow along the file.

    Args:
        indices: shard indices (any order; typically the unfinished ones).
        rank: this worker, ``0 <= rank < world_size``.
        world_size: number of workers.

    Returns:
        The indices of ``indices`` that belong to ``rank``, in their given order.

    Raises:
        ConfigError: rank or world size out of range.
    """
    _check(WorkerInfo(rank, world_size, None, CONFIG))
    return [i for i in indices if i % world_size == rank]
