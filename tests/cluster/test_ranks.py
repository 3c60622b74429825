"""Rank and world size from config and each launcher's environment; shard assignment."""

from __future__ import annotations

import pytest

from batchgen.cluster.ranks import WorkerInfo, assign_shards, resolve_worker
from batchgen.errors import ConfigError

ARRAY = {"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "5"}
SRUN = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
TORCHRUN = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}


def test_single_worker_when_nothing_is_set():
    assert resolve_worker(None, None, {}) == WorkerInfo(0, 1, None, "single")


def test_config_wins_over_every_environment():
    env = {**ARRAY, **SRUN, **TORCHRUN, "JOB_COMPLETION_INDEX": "0"}
    assert resolve_worker(1, 3, env) == WorkerInfo(1, 3, None, "config")


@pytest.mark.parametrize(
    ("rank", "world", "key"),
    [(1, None, "runner.world_size"), (None, 2, "runner.rank")],
)
def test_one_config_value_without_the_other_is_refused(rank, world, key):
    with pytest.raises(ConfigError, match=key):
        resolve_worker(rank, world, {})


def test_offset_slurm_array_maps_ids_to_ranks_from_zero():
    ranks = [
        resolve_worker(None, None, {**ARRAY, "SLURM_ARRAY_TASK_ID": str(t)}).rank
        for t in range(5, 9)
    ]
    assert ranks == [0, 1, 2, 3]
    info = resolve_worker(None, None, {**ARRAY, **SRUN, **TORCHRUN})
    assert info == WorkerInfo(1, 4, None, "slurm-array")


def test_stepped_slurm_array_and_count_from_max():
    env = {
        "SLURM_ARRAY_TASK_ID": "8",
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_MAX": "12",
        "SLURM_ARRAY_TASK_STEP": "4",
    }
    assert resolve_worker(None, None, env) == WorkerInfo(2, 4, None, "slurm-array")


def test_srun_tasks_then_torchrun():
    assert resolve_worker(None, None, {**SRUN, **TORCHRUN}) == WorkerInfo(3, 8, 1, "srun")
    assert resolve_worker(None, None, TORCHRUN) == WorkerInfo(2, 4, 0, "torchrun")
    assert resolve_worker(None, None, {"RANK": "0", "WORLD_SIZE": "2"}).local_rank is None


def test_kubernetes_world_size_from_config_or_env():
    env = {"JOB_COMPLETION_INDEX": "2"}
    assert resolve_worker(None, 5, env) == WorkerInfo(2, 5, None, "kubernetes")
    with_env = {**env, "BATCHGEN_WORLD_SIZE": "3"}
    assert resolve_worker(None, None, with_env) == WorkerInfo(2, 3, None, "kubernetes")
    with pytest.raises(ConfigError, match="BATCHGEN_WORLD_SIZE"):
        resolve_worker(None, None, env)


@pytest.mark.parametrize(
    ("rank", "world", "env", "match"),
    [
        (2, 2, {}, r"rank=2 from runner.rank/runner.world_size: must be in \[0, 2\)"),
        (-1, 2, {}, r"rank=-1"),
        (0, 0, {}, r"world_size=0"),
        (None, None, {"RANK": "4", "WORLD_SIZE": "4"}, r"rank=4 from the torchrun environment"),
        (None, None, {"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, r"SLURM_PROCID='x'"),
        (None, None, {"JOB_COMPLETION_INDEX": "3", "BATCHGEN_WORLD_SIZE": "3"}, r"rank=3"),
    ],
)
def test_out_of_range_or_malformed_values_name_the_culprit(rank, world, env, match):
    with pytest.raises(ConfigError, match=match):
        resolve_worker(rank, world, env)


def test_array_without_a_count_is_refused():
    with pytest.raises(ConfigError, match="SLURM_ARRAY_TASK_COUNT"):
        resolve_worker(None, None, {"SLURM_ARRAY_TASK_ID": "0"})


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 20])
def test_assignment_partitions_the_shards(world):
    indices = [0, 2, 3, 5, 8, 9, 10, 13, 14]
    parts = [assign_shards(indices, r, world) for r in range(world)]
    assert sorted(i for p in parts for i in p) == indices
    for r, p in enumerate(parts):
        assert all(i % world == r for i in p)


def test_assignment_is_strided_and_keeps_order():
    assert assign_shards(list(range(10)), 1, 3) == [1, 4, 7]
    assert assign_shards([7, 4, 1, 2], 1, 3) == [7, 4, 1]
    with pytest.raises(ConfigError):
        assign_shards([0, 1], 3, 3)
