"""Tensor parallel (``model.tp_size``): one model split over a group of processes by
transformers' own plan for its architecture, run as one data-parallel worker.

Invariant: a group's processes run the same engine over the same inputs, step for step, so no
collective is ever left waiting. Only the leader (the worker's own process, group rank 0) reads
prompts, decides and writes. Each follower (``batchgen.engine.tp_follower``) loads its part of
the weights as the leader loads its own, then runs every batch the leader sends it (records,
seed, sampling: hence the same per-row seeds and the same tokens), and takes the leader's
answer each time the engine asks whether to stop. A follower lives as long as its leader: it
exits when told, when its stdin (a pipe from the leader) closes, or when a collective fails; a
follower that dies is named by the leader (``batchgen.engine.tp_leader``), which stops rather
than wait on it. This module holds what both sides share: the group's settings, joining it,
its messages and its stop flag.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from batchgen.config import ModelConfig, RunnerConfig
from batchgen.engine.placement import cpu_cores
from batchgen.errors import ConfigError

# Liveness is judged by the processes (a pipe that closes, a peer that resets), not by a timer:
# a leader may wait long between batches (other workers' shards, a slow read) and stay healthy.
GROUP_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Spec:
    """One worker's tensor-parallel group.

    Attributes:
        size: its processes (``model.tp_size``).
        devices: each process's device, the leader's first: ``cuda:N`` as this process numbers
            them, or ``cpu`` for each.
        threads: torch CPU threads for each of its processes; None: as torch decides.
    """

    size: int
    devices: tuple[str, ...]
    threads: int | None


def spec(model: ModelConfig, runner: RunnerConfig, device: str) -> Spec | None:
    """The group ``model.tp_size`` asks for on ``device`` (``resolve_device_dtype``'s answer);
    None for a model in one process. Its devices are ``runner.devices`` when that lists them
    (the slot ``plan_workers`` gave this worker), else the first ``tp_size`` visible ones."""
    k = model.tp_size
    if k == 1:
        return None
    if not device.startswith("cuda"):  # the cores shared, as between data-parallel workers
        return Spec(k, (device,) * k, runner.threads or max(1, cpu_cores() // k))
    ids = runner.devices if isinstance(runner.devices, list) else list(range(k))
    return Spec(k, tuple(f"cuda:{i}" for i in ids), runner.threads)


def check_model(config: Any, size: int) -> None:
    """Refuse a model that ``size`` cannot split, before any weights load: transformers loads
    a model whose head counts ``size`` does not divide, and then fails inside ``generate``.

    Raises:
        ConfigError: no tensor-parallel plan for the architecture, an encoder-decoder model, or
            head counts that ``size`` does not divide (each named with its count).
    """
    key = f"model.tp_size={size}"
    if getattr(config, "is_encoder_decoder", False) or not getattr(
        config, "base_model_tp_plan", None
    ):
        raise ConfigError(
            f"{key}: transformers has no tensor-parallel plan for {type(config).__name__} "
            f"({getattr(config, 'model_type', '?')}); use model.tp_size=1, or model.device_map "
            "to split it over devices."
        )
    counts = {
        name: getattr(config, name, None) for name in ("num_attention_heads", "num_key_value_heads")
    }
    bad = {name: n for name, n in counts.items() if isinstance(n, int) and n % size}
    if bad:
        named = ", ".join(f"{name}={n}" for name, n in bad.items())
        raise ConfigError(
            f"{key}: the model's {named} cannot be split in {size} equal parts; use a "
            "model.tp_size that divides each."
        )


@contextlib.contextmanager
def bound_to(device: str):
    """While loading: the ``LOCAL_RANK`` through which transformers binds this process to its
    device in a tensor-parallel load (``cuda:N``: N), restored afterwards (a launcher's
    ``LOCAL_RANK`` names this worker's rank, which batchgen reads elsewhere)."""
    before = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = device.partition(":")[2] or "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LOCAL_RANK", None)
        else:
            os.environ["LOCAL_RANK"] = before


def join(rank: int, size: int, port: int, device: str):
    """Join the group's process group as ``rank``; returns the group batchgen's own messages
    travel on (gloo, on the host: a batch and a stop flag are small, and never wait on a GPU).
    The model's collectives use the default group: NCCL on CUDA, gloo on the CPU."""
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=GROUP_TIMEOUT,
    )
    return dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT) if backend != "gloo" else None


def broadcast(message: list, group) -> list:
    """``message`` (a one-item list) from rank 0, received in place on the other ranks."""
    import torch.distributed as dist

    dist.broadcast_object_list(message, src=0, group=group)
    return message


def receive(group) -> tuple:
    """A follower's next message from its leader (``Group``'s messages)."""
    return broadcast([None], group)[0]


def ask_stop(event: threading.Event | None, group) -> bool:
    """Whether the leader's ``event`` is set: the leader's answer, in every process."""
    import torch.distributed as dist

    flag = torch.tensor([int(event is not None and event.is_set())])
    dist.broadcast(flag, src=0, group=group)
    return bool(flag.item())


class GroupStop:
    """A stop event as the engine reads it inside a group: every process asks at the same
    steps, and all get the leader's answer (a follower's own ``event`` is None)."""

    def __init__(self, event: threading.Event | None, ask):
        self.event = event
        self.ask = ask

    def is_set(self) -> bool:
        return self.ask(self.event)
