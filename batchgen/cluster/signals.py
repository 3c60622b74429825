"""Graceful stop on SIGTERM, SIGUSR1 (Slurm's warning before a time limit or preemption) and Ctrl-C.

The handler says at once, in one line, what will happen, and sets a flag: the engine stops at
its next decoding step, keeping the rows it had finished; the shard loop abandons the shard in
progress (nothing half-written is ever published; finished rows stay in its checkpoints),
releases its claims and exits with 128 + the signal's number; a handler that was there before
(submitit's requeue) is then called. A second Ctrl-C interrupts at once, for a user who really
means it. A process that runs workers of its own (``batchgen.job.pool``) hands each signal on
to them (``ForwardStops``), and they stop so.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from types import FrameType

# SIGUSR2 is what submitit (Hydra's Slurm launcher) asks Slurm to send before a time limit.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


def acknowledge(signum: int) -> None:
    """Say at once, in one line on stderr, what a stop signal does."""
    again = "; Ctrl-C again to stop at once" if signum == signal.SIGINT else ""
    # os.write, not print: a signal may arrive while the progress bar is mid-write.
    os.write(
        2,
        f"\nbatchgen: {signal.Signals(signum).name}: stopping at the next decoding step; "
        f"finished rows are kept{again}\n".encode(),
    )


class StopRequested:
    """Installs the handlers on enter and restores the previous ones on exit."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.event.is_set():
            raise KeyboardInterrupt
        self.signum = signum
        self.event.set()
        acknowledge(signum)

    def __enter__(self) -> StopRequested:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def chain(self) -> None:
        """Hand the signal on to the handler installed before ours, once the folder is clean.

        Under submitit that handler requeues the Slurm job (and exits); Ctrl-C is not chained.
        """
        previous = self._previous.get(self.signum)
        if self.signum != signal.SIGINT and callable(previous):
            previous(self.signum, None)

    @property
    def exit_code(self) -> int:
        """The shell's convention, 128 + signal number (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + (self.signum or signal.SIGTERM)

    @property
    def name(self) -> str:
        """The signal's name, for messages."""
        return signal.Signals(self.signum).name if self.signum else "stop"


class ForwardStops:
    """Hands every stop signal (``STOP_SIGNALS``) this process gets on to each process it was
    given (``add``) that still runs, while entered; ``signum`` is the first one received.

    Handlers are installed only in the main thread (elsewhere Python refuses them).
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.signum: int | None = None
        self._sent: set[int] = set()  # pids handed a signal
        self._previous: dict[int, object] = {}

    def _send(self, proc: subprocess.Popen, signum: int) -> None:
        if proc.returncode is None:  # not reaped: the pid is still that process's
            self._sent.add(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:  # the workers' own lines go to their logs
            acknowledge(signum)
        self.signum = self.signum or signum
        for proc in self.procs:
            self._send(proc, signum)

    def add(self, proc: subprocess.Popen) -> None:
        """Forward to ``proc`` too; a stop that came while it was starting reaches it now."""
        self.procs.append(proc)
        if self.signum is not None and proc.pid not in self._sent:
            self._send(proc, self.signum)

    def __enter__(self) -> ForwardStops:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
