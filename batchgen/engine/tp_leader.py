"""The leader's side of a tensor-parallel group (``batchgen.engine.tensor_parallel``): its
followers' processes, the messages to them, and the engine that sends each batch before it runs
it.

Invariant: every message and every stop flag goes from the leader to all of its followers in
the order its engine meets them; a follower that has ended is named (rank, device, pid, how)
before any message would wait on it, and the worker stops with ``WorkerDied``: a model split over
the group cannot run without one of its parts.
"""

from __future__ import annotations

import atexit
import contextlib
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from typing import Any

from batchgen.config import SamplingConfig
from batchgen.engine.interface import Engine, Sample
from batchgen.engine.tensor_parallel import GroupStop, Spec, ask_stop, broadcast, join
from batchgen.errors import ModelError, WorkerDied
from batchgen.inputs.prompts import PromptRecord

# How long a leader that is done waits for its followers to exit before killing them.
END_SECONDS = 30.0
# How often a leader joining its group looks whether a follower has died meanwhile.
JOIN_POLL_SECONDS = 0.2
# How long a leader whose collective failed looks for the follower that died.
DEATH_SECONDS = 5.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Group:
    """The leader's side of a tensor-parallel group: its followers and the messages to them.

    Messages, each broadcast from rank 0: ``("engine", options)`` once, the engine the
    followers build; ``("generate", records, seed, sampling)`` per batch; ``("end",)``.
    """

    def __init__(self, spec: Spec, followers: list[subprocess.Popen], control):
        self.spec = spec
        self.followers = followers
        self.control = control
        self.ended = False

    @classmethod
    def start(cls, model: Any, spec: Spec) -> Group:
        """Start ``spec.size - 1`` followers of ``model`` (a ``devices.Model`` without its
        weights) and join them; the caller then loads its own part of the weights.

        Raises:
            ModelError: a follower could not be started, or the group did not form.
        """
        port = _free_port()
        followers = []
        for rank in range(1, spec.size):
            own = replace(model, device=spec.devices[rank])
            payload = pickle.dumps(
                {
                    "model": own,
                    "threads": spec.threads,
                    "rank": rank,
                    "size": spec.size,
                    "port": port,
                }
            )
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "batchgen.engine.tp_follower"],
                    stdin=subprocess.PIPE,
                    start_new_session=True,  # a terminal's Ctrl-C reaches the leader alone
                )
                proc.stdin.write(payload)
                proc.stdin.flush()  # kept open: it closes when the leader ends, however
            except (OSError, BrokenPipeError) as e:
                for p in followers:
                    p.kill()
                raise ModelError(
                    f"model.tp_size={spec.size}: could not start rank {rank}: {e}"
                ) from e
            followers.append(proc)
        group = cls(spec, followers, None)
        atexit.register(group.end)
        group.control = group._join(port)
        return group

    def _join(self, port: int):
        """Join the group as rank 0, watching the followers meanwhile: one that dies before it
        joins would leave the others waiting for it as long as the group's timeout.

        Raises:
            ModelError: a follower ended first, or joining failed.
        """
        joined: dict[str, Any] = {}

        def attempt() -> None:
            try:
                joined["control"] = join(0, self.spec.size, port, self.spec.devices[0])
            except (RuntimeError, ValueError) as e:
                joined["error"] = e

        waiting = threading.Thread(target=attempt, name="batchgen-tp-join", daemon=True)
        waiting.start()
        while waiting.is_alive():
            waiting.join(JOIN_POLL_SECONDS)
            lost = self.lost()
            if lost and waiting.is_alive():
                self.end(wait=0)
                raise ModelError(f"model.tp_size={self.spec.size}: {lost} before the group formed")
        if "error" in joined:
            self.end(wait=0)
            raise ModelError(f"model.tp_size={self.spec.size}: {joined['error']}")
        return joined["control"]

    def lost(self) -> str | None:
        """A follower that has ended, named (rank, pid, how), or None."""
        for rank, proc in enumerate(self.followers, 1):
            code = proc.poll()
            if code is not None:
                how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
                where = self.spec.devices[rank]
                return (
                    f"tensor-parallel rank {rank} of {self.spec.size} ({where}, pid {proc.pid}) "
                    f"ended ({how})"
                )
        return None

    def send(self, *message: Any) -> None:
        """Broadcast ``message`` to the followers.

        Raises:
            WorkerDied: a follower has ended; the group cannot compute without it.
        """
        self._alive()
        self._collective(lambda: broadcast([message], self.control))

    def stop_flag(self, event: threading.Event | None) -> bool:
        """The leader's answer to "stop?", the same in every process of the group."""
        return self._collective(lambda: ask_stop(event, self.control))

    def _alive(self, grace: float = 0.0) -> None:
        """Raise if a follower has ended, looking for ``grace`` seconds: a collective that
        failed on a dead peer's closed socket may fail before its death can be seen."""
        deadline = time.monotonic() + grace
        lost = self.lost()
        while lost is None and time.monotonic() < deadline:
            time.sleep(JOIN_POLL_SECONDS)
            lost = self.lost()
        if lost:
            raise WorkerDied(
                f"{lost}; this worker stops, as its model cannot run without it: finished rows "
                "are kept, and the same command resumes"
            )

    def _collective(self, call):
        import torch.distributed as dist

        try:
            return call()
        except (RuntimeError, dist.DistBackendError) as e:
            self._alive(DEATH_SECONDS)
            raise WorkerDied(f"tensor-parallel group of {self.spec.size} failed: {e}") from e

    def end(self, wait: float = END_SECONDS) -> None:
        """Tell the followers to exit, wait for them (``wait`` seconds), kill any left, and
        leave the process group (this process may form another)."""
        import torch.distributed as dist

        if self.ended:
            return
        self.ended = True
        if self.lost() is None:
            with contextlib.suppress(Exception):
                broadcast([("end",)], self.control)
        for proc in self.followers:
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if dist.is_initialized():
            dist.destroy_process_group()

    def lead(self, engine: Engine, options: dict) -> Leader:
        """``engine`` as the group's leader: the followers build theirs from ``options``."""
        self.send("engine", options)
        return Leader(engine, self)


class Leader(Engine):
    """The leader's engine: sends each batch to the followers, then runs it itself."""

    def __init__(self, engine: Engine, group: Group):
        self.__dict__["inner"] = engine
        self.__dict__["group"] = group
        self.stop = None  # asked at every step from now on, as the followers ask

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "stop":  # the engine asks the group, which answers with the leader's event
            value = GroupStop(value, self.group.stop_flag)
        setattr(self.inner, name, value)

    def generate(
        self, records: list[PromptRecord], seed: int, sampling: SamplingConfig
    ) -> list[list[Sample]]:
        """The samples of every record, computed by the whole group."""
        self.group.send("generate", records, seed, sampling)
        try:
            return self.inner.generate(records, seed, sampling)
        except RuntimeError:
            self.group._alive(DEATH_SECONDS)  # a follower died mid-batch: say which
            raise
