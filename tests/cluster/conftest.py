"""Processes that stand in for a holder of a run lock or a shard claim: live, ended, zombie."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest


@pytest.fixture
def sleeper():
    """A live process that is not this one, to stand in for another runner."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has ended and been reaped (so it is not even a zombie)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()[0]


@pytest.fixture
def zombie(unavailable):
    """The pid of a child that has exited but is not reaped until the test ends: a zombie."""
    proc = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    try:
        while _state(proc.pid) != "Z":
            if time.monotonic() > deadline:
                unavailable(f"pid {proc.pid} did not become a zombie: {_state(proc.pid)}")
            time.sleep(0.01)
    except OSError as e:
        unavailable(f"/proc does not show process states: {e}")
    yield proc.pid
    proc.wait()
