"""A pool's worker processes as the pool (``batchgen.job.pool``) sees them: ``start`` one,
pinned to its slot, and judge how it ended (``judge``).

Invariant: a worker process gets the finished config pickled on its stdin (never converted
again), its own ``CUDA_VISIBLE_DEVICES`` and threads, its stderr in its log, a pipe of its own for
its counts and a session of its own (a terminal's Ctrl-C reaches it through the pool, once); how
it ended is judged from its exit status, and a death's cause from the last message in its log.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from batchgen.cluster.watchdog import STALL_EXIT_CODE
from batchgen.config import JobConfig
from batchgen.engine.placement import Slot
from batchgen.errors import last_message
from batchgen.store import layout

# What a worker exits with when a second Ctrl-C interrupted it at once (as the command line).
INTERRUPTED_EXIT = 130


@dataclass
class Worker:
    """One worker process of the pool, as the pool sees it."""

    rank: int
    world_size: int
    where: str  # its devices, for messages
    proc: subprocess.Popen
    log: Path
    counts: dict | None = None  # its last report (``Progress.counts``)
    ended: str | None = None  # how it ended, once it has
    said: str = ""  # its last message (batchgen's last paragraph on its stderr), if it died
    ok: bool = True
    pending: dict[int, bytes] = field(default_factory=dict)  # an unfinished line per pipe

    def name(self) -> str:
        """``worker 1 of 2 (cuda:1, pid 4242)``."""
        return f"worker {self.rank} of {self.world_size} ({self.where}, pid {self.proc.pid})"


def start(cfg: JobConfig, slot: Slot, kind: str, rank: int, world: int, out: Path) -> Worker:
    """Start worker ``rank`` of ``world``: the finished config on its stdin, pinned to ``slot``
    (``kind``: what the slots are, for messages), its log and claims in ``out``.

    Raises:
        OSError: the process could not be started (no such Python, no memory).
    """
    runner = replace(
        cfg.runner,
        rank=rank,
        world_size=world,
        devices=slot.runner_devices(),
        progress=False,
        threads=slot.threads,
    )
    model = replace(cfg.model, device="cuda") if slot.indices else cfg.model
    env = dict(os.environ)
    if slot.names:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(slot.names)
    read, write = os.pipe()
    log = layout.worker_log(out, rank, world)
    args = [sys.executable, "-m", "batchgen.job.pool_worker", str(write)]
    with log.open("wb") as err:
        proc = subprocess.Popen(
            args + (["--banner"] if rank == 0 else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            pass_fds=(write,),
            start_new_session=True,  # Ctrl-C reaches it through the pool, once
        )
    os.close(write)
    try:
        proc.stdin.write(pickle.dumps(replace(cfg, runner=runner, model=model)))
        proc.stdin.flush()  # kept open: a worker whose stdin closes stops (the pool died)
    except BrokenPipeError:
        pass  # it died starting up: judged by its exit status, named from its log
    worker = Worker(rank, world, slot.describe(kind), proc, log)
    worker.pending[read] = b""
    return worker


def judge(w: Worker, signum: int | None) -> None:
    """Judge how ``w`` ended: fine, stopped by the forwarded signal, or died (and how)."""
    code = w.proc.returncode
    if code == 0:
        w.ended = "finished"
        return
    if signum is not None and code in (128 + signum, -signum, INTERRUPTED_EXIT):
        w.ended = f"stopped by {signal.Signals(signum).name}"
        return
    w.ok = False
    if code < 0:  # killed: whatever it printed last says nothing of why
        w.ended = f"killed by {signal.Signals(-code).name}"
        return
    w.ended = "stalled (exit status 3)" if code == STALL_EXIT_CODE else f"exited with status {code}"
    try:
        text = w.log.read_text(errors="replace")
    except OSError:
        text = ""
    w.said = last_message(text).removeprefix("batchgen: ").removeprefix("error: ")
    if not w.said:  # a traceback: its last line
        w.said = next((x.strip() for x in reversed(text.splitlines()) if x.strip()), "")
    if w.said:
        w.ended += ": " + w.said.splitlines()[0]
