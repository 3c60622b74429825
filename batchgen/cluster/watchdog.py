"""The stall watchdog: a worker whose work stops moving gives its shards up and exits.

Invariant: while a worker holds a shard in hand (claimed, not yet published or released),
something moves at least every ``runner.stall_seconds``: a decoding step, a prefill chunk, a
finished batch. When nothing has for that long (a hung CUDA kernel, a dead collective, a stuck
mount), the main thread can no longer be trusted to act, so the watchdog's own thread does: it
runs the give-up steps (stop renewing claims, release them, record the stall), each bounded in
time, says which shard stalled and for how long, and ends the process with ``STALL_EXIT_CODE``.
Slurm, torchrun or the local launcher see a failure, and the other workers take the shard at once
(released) or after its lease (where a step could not finish). Loading the model is not watched
(``paused``), nor is a worker that waits for others' shards (it holds none in hand).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

# The exit status of a worker that gave up after a stall (documented in the README).
STALL_EXIT_CODE = 3
# Seconds each give-up step may take in a stalled process (a stuck mount may block it for good).
STEP_TIMEOUT = 10.0


def bounded(step: Callable[[], None], seconds: float) -> None:
    """Run ``step`` in a daemon thread and wait for it at most ``seconds``; its errors are
    printed, not raised: a stalled worker still exits."""

    def run() -> None:
        try:
            step()
        except Exception as e:  # noqa: BLE001 - each step is best effort
            print(f"batchgen: while giving up after a stall: {e}", file=sys.stderr, flush=True)

    thread = threading.Thread(target=run, name="batchgen-give-up", daemon=True)
    thread.start()
    thread.join(seconds)


class Watchdog:
    """Watches that a worker's work in hand moves; gives up and exits when it does not.

    Use ``with watchdog:`` around the shard loop, ``with watchdog.watch(name):`` around one
    shard's work, ``beat()`` whenever something moves, and ``with watchdog.paused():`` around
    what may legitimately take long without moving (loading the model).

    Args:
        stall_seconds: seconds without a beat that count as a stall; None: never.
        rank: the worker's rank, for the message.
        clock: a monotonic clock; a fake one in tests.
        exit: ends the process (``os._exit``: the main thread may be stuck for good).
    """

    def __init__(
        self,
        stall_seconds: float | None,
        rank: int = 0,
        clock: Callable[[], float] = time.monotonic,
        exit: Callable[[int], None] = os._exit,
    ):
        self.stall_seconds = stall_seconds
        self.rank = rank
        self.clock = clock
        self.exit = exit
        self.steps: list[Callable[[], None]] = []
        self._what: str | None = None  # the work in hand; None: nothing is watched
        self._last = clock()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def on_stall(self, step: Callable[[], None]) -> None:
        """Add a give-up step, run (bounded by ``STEP_TIMEOUT``) in the order added."""
        self.steps.append(step)

    def beat(self) -> None:
        """Something moved: a decoding step, a prefill chunk, a finished batch."""
        self._last = self.clock()

    @contextlib.contextmanager
    def watch(self, what: str) -> Iterator[None]:
        """Watch the work on ``what`` (a shard's file name) until the block ends."""
        with self._lock:
            self._what, self._last = what, self.clock()
        try:
            yield
        finally:
            with self._lock:
                self._what = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Do not count the block's time (it may be long without a beat)."""
        with self._lock:
            what, self._what = self._what, None
        try:
            yield
        finally:
            with self._lock:
                self._what, self._last = what, self.clock()

    def check(self) -> bool:
        """Give up if the work in hand has not moved for ``stall_seconds``; True if it did."""
        with self._lock:
            what, silent = self._what, self.clock() - self._last
        if what is None or self.stall_seconds is None or silent < self.stall_seconds:
            return False
        for step in self.steps:
            bounded(step, STEP_TIMEOUT)
        print(
            f"batchgen: error: worker {self.rank} stalled on {what}: no decoding step, prefill "
            f"chunk or batch finished for {silent:.0f} s (runner.stall_seconds="
            f"{self.stall_seconds:g}); its shards are released for the other workers. Exiting "
            f"with status {STALL_EXIT_CODE}.",
            file=sys.stderr,
            flush=True,
        )
        self.exit(STALL_EXIT_CODE)
        return True

    def _run(self) -> None:
        poll = min(1.0, self.stall_seconds / 4)
        while not self._done.wait(poll):
            if self.check():
                return

    def __enter__(self) -> Watchdog:
        if self.stall_seconds is not None and self._thread is None:
            self._done.clear()
            self._thread = threading.Thread(target=self._run, name="batchgen-watchdog")
            self._thread.daemon = True
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
