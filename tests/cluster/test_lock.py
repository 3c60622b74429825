"""The output-folder run lock: refusal naming the holder, stale takeover, and its races."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest

from batchgen.cluster import liveness
from batchgen.cluster import lock as lock_mod
from batchgen.cluster.lock import RunLock
from batchgen.errors import ConfigError, ResumeError


def write_lock(out, pid, host=None, **extra) -> dict:
    record = {
        "pid": pid,
        "host": host or socket.gethostname(),
        "started_at": "2025-01-02T03:04:05+00:00",
        "argv": ["batchgen", "output.dir=out"],
        **extra,
    }
    path = out / "_batchgen" / "locks" / "run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return record


def test_lock_file_records_the_holder_and_is_removed_on_exit(tmp_path):
    with RunLock(tmp_path) as held:
        record = json.loads((tmp_path / "_batchgen" / "locks" / "run.lock").read_text())
        assert held.path == tmp_path / "_batchgen" / "locks" / "run.lock"
        assert record["pid"] == os.getpid()
        assert record["host"] == socket.gethostname()
        assert record["started_at"].endswith("+00:00")
        assert isinstance(record["argv"], list)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_second_acquire_refused_naming_the_live_holder(tmp_path, sleeper):
    write_lock(tmp_path, sleeper.pid)
    with pytest.raises(ResumeError) as err:
        RunLock(tmp_path).acquire()
    msg = str(err.value)
    assert f"pid {sleeper.pid} on host {socket.gethostname()}" in msg
    assert "started 2025-01-02T03:04:05+00:00" in msg
    assert "`batchgen output.dir=out`" in msg
    assert f"kill {sleeper.pid}" in msg
    assert "another output.dir" in msg
    assert (
        json.loads((tmp_path / "_batchgen" / "locks" / "run.lock").read_text())["pid"]
        == sleeper.pid
    )


def test_two_lock_objects_in_one_folder_exclude_each_other(tmp_path):
    first = RunLock(tmp_path, "run-rank0")
    first.acquire()
    with pytest.raises(ResumeError, match=f"pid {os.getpid()} on host"):
        RunLock(tmp_path, "run-rank0").acquire()
    # Another worker's name is another lock.
    with RunLock(tmp_path, "run-rank1"):
        assert (tmp_path / "_batchgen" / "locks" / "run-rank1.lock").is_file()
    assert first.release() is True
    assert not any(p.name.endswith(".parquet") for p in tmp_path.iterdir())


def test_stale_lock_of_dead_pid_is_taken_over(tmp_path, dead_pid):
    stale = write_lock(tmp_path, dead_pid)
    lock = RunLock(tmp_path)
    assert lock.acquire() == stale
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert lock.release() is True
    assert not lock.path.exists()


def test_reused_pid_with_other_start_time_is_stale(tmp_path, sleeper):
    stale = write_lock(tmp_path, sleeper.pid, proc_start=1)
    assert RunLock(tmp_path).acquire() == stale


def age(path, seconds):
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_lock_from_another_host_is_refused_until_its_heartbeat_is_older_than_the_lease(
    tmp_path, dead_pid
):
    write_lock(tmp_path, dead_pid, host="node-elsewhere")
    with pytest.raises(ResumeError) as err:
        RunLock(tmp_path, lease_seconds=60).acquire()
    msg = str(err.value)
    assert f"pid {dead_pid} on host node-elsewhere" in msg
    assert "taken over once that passes runner.lease_seconds (60 s)" in msg
    assert (
        json.loads((tmp_path / "_batchgen" / "locks" / "run.lock").read_text())["host"]
        == "node-elsewhere"
    )
    age(tmp_path / "_batchgen" / "locks" / "run.lock", 61)
    taken = RunLock(tmp_path, lease_seconds=60)
    assert taken.acquire()["host"] == "node-elsewhere"
    taken.release()


def test_lock_from_another_pid_namespace_is_judged_by_its_heartbeat(tmp_path):
    # pid 1 is alive here too, but in that namespace it is another process: only age counts.
    write_lock(tmp_path, 1, pid_ns="pid:[4026500000]")
    with pytest.raises(ResumeError, match="another host or container"):
        RunLock(tmp_path, lease_seconds=30).acquire()
    age(tmp_path / "_batchgen" / "locks" / "run.lock", 31)
    assert RunLock(tmp_path, lease_seconds=30).acquire()["pid_ns"] == "pid:[4026500000]"


def test_heartbeat_keeps_a_held_lock_fresh(tmp_path):
    lock = RunLock(tmp_path, lease_seconds=0.6)
    lock.acquire()
    try:
        age(lock.path, 10)
        time.sleep(0.5)  # more than a third of the lease: a beat has touched it
        assert time.time() - lock.path.stat().st_mtime < 0.6
        with pytest.raises(ResumeError, match="in use by another batchgen run"):
            RunLock(tmp_path, lease_seconds=0.6).acquire()
    finally:
        assert lock.release()
    assert not lock.path.exists()


def test_attached_fingerprint_is_seen_by_other_workers_while_the_lock_lives(tmp_path, caplog):
    first = RunLock(tmp_path, "run-rank0-of2", lease_seconds=0.6)
    second = RunLock(tmp_path, "run-rank1-of2", lease_seconds=0.6)
    first.acquire()
    second.acquire()
    try:
        assert lock_mod.live_fingerprints(tmp_path, 0.6, second.path) == {}  # not admitted yet
        first.attach("fp-a")
        assert json.loads(first.path.read_text())["fingerprint"] == "fp-a"
        time.sleep(0.5)  # beats after the rewrite: the heartbeat still knows its own lock
        assert time.time() - first.path.stat().st_mtime < 0.6
        assert "taken over" not in caplog.text
        seen = lock_mod.live_fingerprints(tmp_path, 0.6, second.path)
        assert list(seen) == ["fp-a"] and seen["fp-a"]["pid"] == os.getpid()
        assert lock_mod.live_fingerprints(tmp_path, 0.6, first.path) == {}  # its own is no other
    finally:
        assert first.release() and second.release()
    assert lock_mod.live_fingerprints(tmp_path, 0.6, second.path) == {}


def test_frozen_holder_in_another_pid_namespace_is_taken_over(tmp_path, unavailable):
    """A real holder in its own pid namespace (a container), alive, then frozen past the lease."""
    if os.geteuid() != 0:
        unavailable("unshare --pid needs root")
    script = (
        "import sys, time; from pathlib import Path; from batchgen.cluster.lock import RunLock; "
        "RunLock(Path(sys.argv[1]), lease_seconds=1.5).acquire(); print('held', flush=True); "
        "time.sleep(120)"
    )
    holder = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", script, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = holder.stdout.readline()
        if line.strip() != "held":
            unavailable(f"cannot run a process in a new pid namespace: {holder.stderr.read()}")
        record = json.loads((tmp_path / "_batchgen" / "locks" / "run.lock").read_text())
        assert record["pid"] == 1 and record["pid_ns"] != liveness.this_process()["pid_ns"]
        time.sleep(2.0)  # past the lease, but the live holder's heartbeat keeps it fresh
        with pytest.raises(ResumeError, match="another host or container"):
            RunLock(tmp_path, lease_seconds=1.5).acquire()
        subprocess.run(["pkill", "-STOP", "-f", "batchgen.cluster.lock import RunLock"], check=True)
        time.sleep(2.0)
        taker = RunLock(tmp_path, lease_seconds=1.5)
        assert taker.acquire()["pid"] == 1
        taker.release()
    finally:
        subprocess.run(["pkill", "-KILL", "-f", "batchgen.cluster.lock import RunLock"])
        holder.kill()
        holder.wait()


def test_unreadable_lock_is_refused(tmp_path):
    path = tmp_path / "_batchgen" / "locks" / "run.lock"
    path.parent.mkdir(parents=True)
    path.write_text("")
    with pytest.raises(ResumeError, match="not a valid batchgen lock.*remove it with `rm "):
        RunLock(tmp_path).acquire()


def test_release_removes_only_its_own_lock(tmp_path, sleeper):
    lock = RunLock(tmp_path)
    assert lock.release() is False  # never acquired
    lock.acquire()
    # Someone removed our lock by hand and another runner took the folder.
    lock.path.unlink()
    other = write_lock(tmp_path, sleeper.pid)
    assert lock.release() is False
    assert json.loads(lock.path.read_text()) == other


def test_acquire_twice_on_one_object_is_a_bug(tmp_path):
    with RunLock(tmp_path) as lock, pytest.raises(RuntimeError, match="already held"):
        lock.acquire()


def test_bad_names_rejected(tmp_path):
    with pytest.raises(ValueError):
        RunLock(tmp_path, "a/b")
    with pytest.raises(ValueError):
        RunLock(tmp_path, "")


def _race(out, k, start, done, results):
    # Every racer judges the stale lock before any of them acts on it, then they act one after
    # another: a late taker must not remove the fresh lock an early one has just created.
    judged = liveness.gone
    waited = []

    def slow_gone(holder):
        gone = judged(holder)
        if not waited:
            waited.append(start.wait())
            time.sleep(0.03 * k)
        return gone

    liveness.gone = slow_gone
    lock = RunLock(out)
    try:
        lock.acquire()
    except ResumeError as e:
        results.put(("refused", str(e)))
        return
    results.put(("won", os.getpid()))
    done.wait()  # hold the lock until every racer has tried
    lock.release()


@pytest.mark.parametrize("round_", range(3))
def test_racing_takers_of_a_stale_lock_exactly_one_wins(tmp_path, dead_pid, round_):
    racers = 5
    write_lock(tmp_path, dead_pid)
    ctx = multiprocessing.get_context("fork")
    start, done, results = ctx.Barrier(racers), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_race, args=(tmp_path, k, start, done, results)) for k in range(racers)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=20) for _ in range(racers)]
    done.set()
    for p in procs:
        p.join(timeout=20)
        assert p.exitcode == 0
    winners = [v for kind, v in outcomes if kind == "won"]
    assert len(winners) == 1
    refusals = [v for kind, v in outcomes if kind == "refused"]
    assert len(refusals) == racers - 1
    assert all(f"pid {winners[0]} on host" in msg for msg in refusals)
    assert not (tmp_path / "_batchgen" / "locks" / "run.lock").exists()


def test_unwritable_folder_is_a_clear_error(tmp_path):
    with pytest.raises(
        ConfigError, match=r"cannot create the run lock .*No such file or directory"
    ):
        RunLock(tmp_path / "missing").acquire()
