"""Holder records and the one liveness rule: a holder is gone only when this host can prove it."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from batchgen.cluster import liveness

OTHER_NS = "pid:[4026500000]"  # a pid namespace that is not this one (a container beside us)


def start_time(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def here(pid: int, **extra) -> dict:
    """A holder record of ``pid`` on this host, in this pid namespace."""
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "pid_ns": os.readlink("/proc/self/ns/pid"),
        **extra,
    }


def test_this_process_names_this_process_which_is_alive():
    me = liveness.this_process()
    assert me == here(os.getpid(), proc_start=start_time(os.getpid()))
    assert liveness.same_place(me) and not liveness.gone(me)


def test_an_ended_pid_here_is_gone(dead_pid):
    assert liveness.gone(here(dead_pid))


def test_a_zombie_here_is_gone(zombie):
    assert liveness.gone(here(zombie, proc_start=start_time(zombie)))


def test_a_reused_pid_is_gone_and_the_same_process_is_not(sleeper):
    started = start_time(sleeper.pid)
    assert liveness.gone(here(sleeper.pid, proc_start=started + 1))
    assert not liveness.gone(here(sleeper.pid, proc_start=started))


def test_a_pid_of_another_pid_namespace_or_host_is_left_to_the_lease(dead_pid, sleeper):
    # A container sharing this host name: its pid names no process here, or another one.
    for pid in (dead_pid, sleeper.pid):
        for holder in (here(pid, pid_ns=OTHER_NS), here(pid, host="node-elsewhere")):
            assert not liveness.same_place(holder) and not liveness.gone(holder)


def test_records_without_pid_ns_or_proc_start_are_judged_as_before(dead_pid, sleeper):
    assert liveness.gone({"host": socket.gethostname(), "pid": dead_pid})
    assert not liveness.gone({"host": socket.gethostname(), "pid": sleeper.pid})


@pytest.mark.parametrize("pid", [None, "123", -99999])
def test_a_record_without_a_usable_pid_is_left_to_the_lease(pid):
    # A negative pid would name a process group to kill(), one that need not exist.
    assert not liveness.gone(here(pid))
