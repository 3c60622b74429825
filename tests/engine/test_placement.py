"""Placing a command's workers (``runner.devices``): one per CUDA device, the CPU's cores split,
refusals naming the key; and the local sweep's device per task. CUDA is faked: this machine has
none (tests/test_gpu.py runs on a real one)."""

from __future__ import annotations

import pytest
import torch

from batchgen.engine.placement import Placement, Slot, pin, plan_workers, visible_cuda
from batchgen.errors import ConfigError


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n)``: this process sees ``n`` CUDA devices."""

    def fake(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return fake


def test_auto_is_one_worker_per_visible_cuda_device_unless_a_launcher_placed_it(gpus):
    gpus(4)
    env = {"CUDA_VISIBLE_DEVICES": "2,3,5,7", "SLURM_CPUS_PER_TASK": "16"}
    placed = plan_workers("auto", "auto", None, launched=False, env=env)
    assert placed.kind == "cuda" and placed.cores == 16
    assert [s.indices for s in placed.slots] == [(0,), (1,), (2,), (3,)]
    assert [s.names for s in placed.slots] == [("2",), ("3",), ("5",), ("7",)]
    assert {s.threads for s in placed.slots} == {4}
    assert placed.slots[3].describe("cuda") == "cuda:3"
    # Slurm, torchrun, Kubernetes or runner.rank made this process one rank: as before.
    assert plan_workers("auto", "auto", None, launched=True, env=env).slots == (Slot(),)
    # One device, or a device named in model.device: this process, as before.
    gpus(1)
    assert plan_workers("auto", "cuda", None, launched=False, env={}).slots == (Slot(),)
    gpus(4)
    assert plan_workers("auto", "cuda:2", None, launched=False, env={}).slots == (Slot(),)


def test_auto_on_the_cpu_is_one_worker(gpus):
    gpus(0)
    assert plan_workers("auto", "auto", None, launched=False, env={}) == Placement(
        "cpu", (Slot(),), plan_workers(1, "cpu", None, False, env={}).cores
    )


def test_a_number_on_the_cpu_splits_the_cores(gpus):
    gpus(0)
    env = {"SLURM_CPUS_PER_TASK": "8"}
    placed = plan_workers(2, "auto", None, launched=False, env=env)
    assert placed.kind == "cpu" and placed.slots == (Slot(threads=4), Slot(threads=4))
    assert [s.threads for s in plan_workers(3, "cpu", None, False, env=env).slots] == [2, 2, 2]
    assert [s.threads for s in plan_workers(16, "cpu", None, False, env=env).slots] == [1] * 16
    assert [s.threads for s in plan_workers(2, "cpu", 3, False, env=env).slots] == [3, 3]
    assert plan_workers(1, "cpu", None, False, env=env).slots == (Slot(),)


def test_a_number_or_a_list_picks_cuda_devices_as_this_process_numbers_them(gpus):
    gpus(3)
    env = {"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b,GPU-c", "SLURM_CPUS_PER_TASK": "6"}
    two = plan_workers(2, "auto", None, False, env=env)
    assert [(s.indices, s.names, s.threads) for s in two.slots] == [
        ((0,), ("GPU-a",), 3),
        ((1,), ("GPU-b",), 3),
    ]
    listed = plan_workers([2, 0], "cuda", None, False, env=env)
    assert [(s.indices, s.names) for s in listed.slots] == [((2,), ("GPU-c",)), ((0,), ("GPU-a",))]
    # One listed device: this process, pinned to it (its threads as runner.threads says).
    assert plan_workers([1], "auto", None, False, env=env).slots == (Slot((1,), ("GPU-b",)),)
    assert plan_workers([1], "auto", None, True, env=env).slots == (Slot((1,), ("GPU-b",)),)
    assert visible_cuda({}) == ["0", "1", "2"]


def test_workers_are_never_more_than_the_shards(gpus):
    gpus(4)
    env = {"SLURM_CPUS_PER_TASK": "8"}
    placed = plan_workers("auto", "auto", None, False, most=2, env=env)
    assert [s.indices for s in placed.slots] == [(0,), (1,)] and placed.asked == 4
    assert {s.threads for s in placed.slots} == {4}  # the cores split between those two
    one = plan_workers([3, 1], "auto", None, False, most=1, env=env)
    assert one.slots == (Slot((3,), ("3",)),) and one.asked == 2
    assert plan_workers(2, "auto", None, False, most=5, env=env).asked is None
    gpus(0)
    assert plan_workers(4, "cpu", None, False, most=1, env=env).slots == (Slot(),)


@pytest.mark.parametrize(
    "devices,device,launched,visible,message",
    [
        (3, "auto", False, 2, r"^runner\.devices=3: 2 CUDA device\(s\) are visible"),
        ([0, 4], "auto", False, 2, r"^runner\.devices=\[0, 4\]: 2 CUDA device\(s\) are visible"),
        (2, "cuda", False, 0, r"^runner\.devices=2: 0 CUDA device\(s\) are visible \(CUDA_VISIBLE"),
        ([0, 1], "auto", False, 0, r"^runner\.devices=\[0, 1\] names CUDA devices, but this job"),
        (2, "auto", True, 2, r"^runner\.devices=2 starts workers of its own, but a launcher"),
        (2, "cuda:1", False, 2, r"^runner\.devices=2: model\.device=cuda:1 names one device"),
        (2, "mps", False, 0, r"^runner\.devices=2: model\.device=mps names one device"),
    ],
)
def test_refusals_name_the_key_and_the_fix(gpus, devices, device, launched, visible, message):
    gpus(visible)
    with pytest.raises(ConfigError, match=message):
        plan_workers(devices, device, None, launched, env={"CUDA_VISIBLE_DEVICES": "0,1"})


def test_a_local_sweep_gives_each_task_a_device_of_its_own_in_turn():
    assert [pin(["3", "5"], n) for n in range(5)] == ["3", "5", "3", "5", "3"]
    assert [pin(("GPU-a",), n) for n in range(2)] == ["GPU-a", "GPU-a"]


def test_tensor_parallel_groups_are_workers_of_consecutive_devices(gpus):
    gpus(8)
    env = {"SLURM_CPUS_PER_TASK": "32"}
    placed = plan_workers("auto", "auto", None, launched=False, env=env, group=2)
    assert [s.indices for s in placed.slots] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert {s.group for s in placed.slots} == {2} and {s.threads for s in placed.slots} == {4}
    assert placed.slots[1].describe("cuda") == "cuda:2,cuda:3"
    assert placed.slots[1].runner_devices() == [0, 1]  # as its pinned worker numbers them
    # Visible devices that do not fill a group are left out; most= counts workers (groups).
    gpus(7)
    assert len(plan_workers("auto", "auto", None, False, env=env, group=2).slots) == 3
    assert len(plan_workers("auto", "auto", None, False, most=2, env=env, group=2).slots) == 2
    # One group: this process leads it, on those devices; a launcher's rank takes one group.
    one = plan_workers([4, 6], "auto", None, launched=False, env=env, group=2).slots
    assert one == (Slot((4, 6), ("4", "6"), None, 2),)
    assert plan_workers("auto", "auto", None, True, env=env, group=2).slots[0].indices == (0, 1)
    gpus(1)
    with pytest.raises(ConfigError, match=r"model.tp_size=2 splits the model over 2 CUDA dev"):
        plan_workers("auto", "auto", None, launched=False, env={}, group=2)


def test_tensor_parallel_groups_on_the_cpu_share_its_cores(gpus):
    gpus(0)
    env = {"SLURM_CPUS_PER_TASK": "8"}
    one = plan_workers("auto", "auto", None, launched=False, env=env, group=2)
    assert one.slots == (Slot(threads=4, group=2),) and one.slots[0].describe("cpu") == "cpu x2"
    assert one.slots[0].runner_devices() == 2
    two = plan_workers(4, "cpu", None, launched=False, env=env, group=2)
    assert two.slots == (Slot(threads=2, group=2),) * 2
    # A launcher's rank asking for one group is that group; for more, refused.
    assert plan_workers(2, "cpu", None, True, env=env, group=2).slots == (Slot(threads=4, group=2),)
    with pytest.raises(ConfigError, match="runner.devices=4 starts workers of its own"):
        plan_workers(4, "cpu", None, launched=True, env=env, group=2)
