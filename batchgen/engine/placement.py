"""Which devices and CPU threads each worker of one command gets (``runner.devices``).

Invariant: no two workers of a command share a CUDA device, and on the CPU they share the cores
evenly. The plan is made once, in the command's own process, before any model loads; a worker
is a ``Slot``, which owns a tuple of devices so that a worker may later own a tensor-parallel
group. A process that a launcher (Slurm, torchrun, Kubernetes, or ``runner.rank``) made one
rank of a run is one worker, as it always was: ``auto`` then means one worker, and asking for
more is refused, naming the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from batchgen.errors import ConfigError

AUTO = "auto"


@dataclass(frozen=True)
class Slot:
    """One worker's share of the machine.

    Attributes:
        indices: the CUDA devices it owns, as this process numbers them (``cuda:N``); empty on
            the CPU, and for a single worker that keeps ``model.device`` as it is.
        names: the same devices as ``CUDA_VISIBLE_DEVICES`` names them here (an index or a
            UUID), for the worker's own ``CUDA_VISIBLE_DEVICES``.
        threads: torch CPU threads for it; None: as ``runner.threads`` says.
    """

    indices: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    threads: int | None = None

    def describe(self, kind: str) -> str:
        """Its devices for messages: ``cuda:1`` (as this process numbers it), else ``kind``."""
        return ",".join(f"cuda:{i}" for i in self.indices) or kind


@dataclass(frozen=True)
class Placement:
    """The workers this command runs.

    Attributes:
        kind: what they run on: ``cuda``, ``cpu``, ``mps`` or the device ``model.device`` names.
        slots: one per worker; one slot is the command's own process, as before.
        cores: the CPU cores this process may use, split between the workers.
        asked: the workers asked for, when the job's shards were fewer; else None.
    """

    kind: str
    slots: tuple[Slot, ...]
    cores: int
    asked: int | None = None


def cpu_cores(env: Mapping[str, str] = os.environ) -> int:
    """Cores for this process: Slurm's ``SLURM_CPUS_PER_TASK``, else its CPU affinity."""
    slurm = env.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def visible_cuda(env: Mapping[str, str] = os.environ) -> list[str]:
    """The CUDA devices this process sees, as ``CUDA_VISIBLE_DEVICES`` names them (position
    ``i`` is ``cuda:i``); without that variable, their indices. Empty without CUDA."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [x.strip() for x in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    if "CUDA_VISIBLE_DEVICES" in env and len(listed) >= count:
        return listed[:count]
    return [str(i) for i in range(count)]


def pin(visible: Sequence[str], position: int) -> str:
    """``CUDA_VISIBLE_DEVICES`` for the task at ``position`` of a local sweep: one device of
    ``visible`` each, in turn, so tasks up to their number never share one."""
    return visible[position % len(visible)]


def _kind(model_device: str) -> str:
    if model_device != AUTO:
        return model_device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def _count(
    devices: Any, kind: str, visible: list[str], launched: bool, env: Mapping[str, str]
) -> list[int] | None:
    """The workers as CUDA indices (``kind`` cuda) or as ``range(N)`` (the CPU); None for one
    worker in this process with its settings as they are, as before ``runner.devices`` existed.

    Raises:
        ConfigError: see ``plan_workers``.
    """
    key = f"runner.devices={devices}"
    if devices == AUTO:
        many = kind == "cuda" and len(visible) > 1 and not launched
        return list(range(len(visible))) if many else None
    if devices == 1:
        return None
    if launched and not (isinstance(devices, list) and len(devices) == 1):
        raise ConfigError(
            f"{key} starts workers of its own, but a launcher (or runner.rank) made this process "
            "one rank of a run already: start one batchgen per device through the launcher, or "
            "leave runner.devices at auto."
        )
    if kind not in ("cuda", "cpu"):
        raise ConfigError(
            f"{key}: model.device={kind} names one device; set model.device=auto (or cuda) to "
            "spread workers over CUDA devices, or leave runner.devices at auto."
        )
    if kind == "cpu":
        if isinstance(devices, list):
            raise ConfigError(
                f"{key} names CUDA devices, but this job runs on the CPU: give a number of "
                "workers, e.g. runner.devices=2, to split the cores between them."
            )
        return list(range(devices))
    wanted = list(range(devices)) if isinstance(devices, int) else list(devices)
    if max(wanted) >= len(visible):
        seen = env.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={seen})" if seen is not None else ""
        numbered = f", numbered 0 to {len(visible) - 1}" if visible else ""
        raise ConfigError(
            f"{key}: {len(visible)} CUDA device(s) are visible{where}{numbered}; ask for no more, "
            "or runner.devices=auto."
        )
    return wanted


def plan_workers(
    devices: Any,
    model_device: str,
    threads: int | None,
    launched: bool,
    most: int | None = None,
    env: Mapping[str, str] = os.environ,
) -> Placement:
    """The workers ``runner.devices`` asks for, on this machine.

    ``auto``: one worker per visible CUDA device (``model.device`` auto or ``cuda``) unless
    ``launched``, else one. A number N: N workers, on the first N visible CUDA devices or on the
    CPU with its cores split (``cores // N`` threads each, unless ``runner.threads`` is set). A
    list: those CUDA devices, numbered as this process sees them. A single worker stays in this
    process with its settings as they are (a one-device list pins ``model.device`` to it).

    Args:
        devices: ``runner.devices`` (checked by ``validate``).
        model_device: ``model.device``.
        threads: ``runner.threads``.
        launched: a launcher or ``runner.rank`` gave this process its rank.
        most: at most this many workers (the job's shards: more would idle); None: no bound.
        env: the environment (``CUDA_VISIBLE_DEVICES``, ``SLURM_CPUS_PER_TASK``).

    Raises:
        ConfigError: more workers than visible CUDA devices, a device id not visible, a list
            of devices on the CPU, several workers on one named device, or several workers
            asked of a process that is already one rank of a launcher's run.
    """
    kind = _kind(model_device)
    visible = visible_cuda(env) if kind == "cuda" else []
    cores = cpu_cores(env)
    chosen = _count(devices, kind, visible, launched, env)
    asked = None
    if chosen is not None and most is not None and len(chosen) > most:
        asked, chosen = len(chosen), chosen[: max(most, 1)]
    if chosen is None or (kind == "cpu" and len(chosen) == 1):
        return Placement(kind, (Slot(),), cores, asked)
    if len(chosen) == 1:  # runner.devices=[3]: this process, on that device
        return Placement(kind, (Slot((chosen[0],), (visible[chosen[0]],)),), cores, asked)
    share = threads or max(1, cores // len(chosen))
    if kind == "cpu":
        return Placement(kind, tuple(Slot(threads=share) for _ in chosen), cores, asked)
    slots = tuple(Slot((i,), (visible[i],), share) for i in chosen)
    return Placement(kind, slots, cores, asked)
