"""Which devices and CPU threads each worker of one command gets (``runner.devices``).

Invariant: no two workers of a command share a CUDA device, and on the CPU they share the cores
evenly. The plan is made once, in the command's own process, before any model loads; a worker
is a ``Slot``: one device, or a tensor-parallel group of ``model.tp_size`` devices (on the CPU,
of that many processes), which runs as one data-parallel worker. A process that a launcher
(Slurm, torchrun, Kubernetes, or ``runner.rank``) made one rank of a run is one worker, as it
always was: ``auto`` then means one worker (one group), and asking for more is refused, naming
the key.
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
        threads: torch CPU threads for it (for each process of its group); None: as
            ``runner.threads`` says.
        group: the processes of its tensor-parallel group (``model.tp_size``): one per device
            on CUDA, the cores shared on the CPU.
    """

    indices: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    threads: int | None = None
    group: int = 1

    def describe(self, kind: str) -> str:
        """Its devices for messages: ``cuda:1`` (as this process numbers it), else ``kind``
        (``cpu x2`` for a tensor-parallel group of two processes)."""
        return ",".join(f"cuda:{i}" for i in self.indices) or (
            f"{kind} x{self.group}" if self.group > 1 else kind
        )

    def runner_devices(self) -> int | list[int]:
        """``runner.devices`` for this slot's own worker: 1, or its group (its devices, as a
        process pinned to them numbers them; on the CPU, its number of processes)."""
        if self.group == 1:
            return 1
        return list(range(self.group)) if self.indices else self.group


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
    devices: Any, kind: str, visible: list[str], launched: bool, group: int, env: Mapping[str, str]
) -> list[int] | None:
    """The workers' processes as CUDA indices (``kind`` cuda) or as ``range(N)`` (the CPU), in
    groups of ``group`` (``model.tp_size``); None for one worker in this process with its
    settings as they are, as before ``runner.devices`` existed.

    Raises:
        ConfigError: see ``plan_workers``.
    """
    key = f"runner.devices={devices}"
    if devices == AUTO:
        if kind == "cuda" and len(visible) < group:
            raise ConfigError(
                f"model.tp_size={group} splits the model over {group} CUDA devices, but "
                f"{len(visible)} are visible to this process: lower model.tp_size."
            )
        # Every visible device, in whole groups; one rank of a launcher's run takes one group.
        n = len(visible) - len(visible) % group if kind == "cuda" and not launched else group
        return list(range(n)) if n > 1 else None
    if devices == 1:
        return None
    count = len(devices) if isinstance(devices, list) else devices
    if launched and count != group:
        raise ConfigError(
            f"{key} starts workers of its own, but a launcher (or runner.rank) made this process "
            "one rank of a run already: start one batchgen per device (per tensor-parallel "
            "group) through the launcher, or leave runner.devices at auto."
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
    group: int = 1,
) -> Placement:
    """The workers ``runner.devices`` asks for, on this machine.

    ``auto``: one worker per visible CUDA device (``model.device`` auto or ``cuda``) unless
    ``launched``, else one. A number N: N workers, on the first N visible CUDA devices or on the
    CPU with its cores split (``cores // N`` threads each, unless ``runner.threads`` is set). A
    list: those CUDA devices, numbered as this process sees them. With ``group`` (``model.tp_size``)
    K above 1, those devices (processes, on the CPU) go in consecutive groups of K, one worker
    each. A single worker stays in this process with its settings as they are (a one-device list
    pins ``model.device`` to it).

    Args:
        devices: ``runner.devices`` (checked by ``validate``: a multiple of ``group``).
        model_device: ``model.device``.
        threads: ``runner.threads``.
        launched: a launcher or ``runner.rank`` gave this process its rank.
        most: at most this many workers (the job's shards: more would idle); None: no bound.
        env: the environment (``CUDA_VISIBLE_DEVICES``, ``SLURM_CPUS_PER_TASK``).
        group: the processes of each worker's tensor-parallel group.

    Raises:
        ConfigError: more workers than visible CUDA devices, a device id not visible, a list
            of devices on the CPU, several workers on one named device, fewer CUDA devices than
            one group needs, or several workers asked of a process that is already one rank
            of a launcher's run.
    """
    kind = _kind(model_device)
    visible = visible_cuda(env) if kind == "cuda" else []
    cores = cpu_cores(env)
    chosen = _count(devices, kind, visible, launched, group, env)
    if chosen is None:
        return Placement(kind, (Slot(),), cores)
    groups = [tuple(chosen[i : i + group]) for i in range(0, len(chosen), group)]
    asked = None
    if most is not None and len(groups) > most:
        asked, groups = len(groups), groups[: max(most, 1)]
    share = threads or max(1, cores // (len(groups) * group))
    if kind == "cpu":
        if len(groups) == 1 and group == 1:
            return Placement(kind, (Slot(),), cores, asked)
        return Placement(
            kind, tuple(Slot(threads=share, group=group) for _ in groups), cores, asked
        )
    if len(groups) == 1:  # runner.devices=[3]: this process, on that device (or group)
        one = Slot(groups[0], tuple(visible[i] for i in groups[0]), threads, group)
        return Placement(kind, (one,), cores, asked)
    slots = tuple(Slot(g, tuple(visible[i] for i in g), share, group) for g in groups)
    return Placement(kind, slots, cores, asked)
