"""Whether the process that wrote a holder record (a run lock, a shard claim) still runs.

A holder record names its process as ``{host, pid, pid_ns, proc_start}`` (``this_process``). A
pid means that process only on the same host and in the same pid namespace: two containers that
share a host name (``--net=host``, ``hostNetwork`` pods) each have their own pids, and one's pid
may be another process, or none, in the other. Invariant: a holder is judged gone at once only
when this host can prove it (``gone``): same host, same pid namespace, and its pid has no
process, a zombie, or a process with another start time (the pid was reused). Anywhere else this
host cannot tell, and only the holder's lease (its heartbeat) decides; the default lease is
``batchgen.config.DEFAULT_LEASE_SECONDS`` for the lock and the claims alike.

Records written before ``pid_ns`` and ``proc_start`` were recorded are judged as then: a missing
``pid_ns`` counts as this pid namespace, a missing ``proc_start`` skips the reuse check.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of ``pid`` from /proc; None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may contain spaces; the fields after the last ')' do not.
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def _pid_namespace() -> str | None:
    """This process's pid namespace (``pid:[4026531836]``); None where /proc does not say."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def this_process() -> dict[str, Any]:
    """The holder fields naming this process: ``host``, ``pid``, ``pid_ns``, ``proc_start``.

    Read anew on each call: a forked child is another process with its own pid and start time.
    """
    pid = os.getpid()
    stat = _proc_stat(pid)
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "pid_ns": _pid_namespace(),
        "proc_start": stat[1] if stat else None,
    }


def same_place(holder: dict[str, Any]) -> bool:
    """Whether the holder's pid means the same process here: same host and pid namespace."""
    return holder.get("host") == socket.gethostname() and holder.get("pid_ns") in (
        None,
        _pid_namespace(),
    )


def _running(holder: dict[str, Any]) -> bool:
    """Whether the holder's pid, on this host and pid namespace, is still the holder's process."""
    pid = holder["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists but belongs to another user
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, start = stat
    # A zombie has finished; a different start time means the pid was reused by another process.
    return state != "Z" and holder.get("proc_start") in (None, start)


def gone(holder: dict[str, Any]) -> bool:
    """Whether the holder is provably no longer running, so its lease need not be sat out.

    False when this host cannot tell (another host or pid namespace, no pid recorded): then the
    holder's lease decides.
    """
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False  # kill(0) or kill(-n) would address a process group, not the holder
    return same_place(holder) and not _running(holder)
