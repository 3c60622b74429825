"""Claim files: names and generations, the JSON they hold, and how a reader judges one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from batchgen.cluster import liveness
from batchgen.cluster.claim_files import (
    CLAIM_RE,
    Seen,
    claim_path,
    encode,
    expired,
    look,
    top_generation,
)


def test_names_match_the_pattern_and_never_end_in_parquet(tmp_path):
    first, third = claim_path(tmp_path, 3), claim_path(tmp_path, 3, 2)
    assert (first.name, third.name) == ("part-00003.claim", "part-00003.2.claim")
    assert first.parent == tmp_path / "_batchgen" / "claims"
    assert CLAIM_RE.match(third.name).groups() == ("00003", "2")
    assert CLAIM_RE.match(first.name).groups() == ("00003", None)
    assert not CLAIM_RE.match("part-00003.claim.tmp-x")


def test_top_generation_probes_up_from_a_known_one(tmp_path):
    assert top_generation(tmp_path, 0) is None
    claim_path(tmp_path, 0).parent.mkdir(parents=True)
    for g in range(3):
        claim_path(tmp_path, 0, g).write_text("{}")
    assert top_generation(tmp_path, 0) == 2 == top_generation(tmp_path, 0, 1)


def test_encoded_claims_read_back(tmp_path):
    path = tmp_path / "c.claim"
    path.write_bytes(encode("h:7:4", 10.0, 70.0))
    info = look(path).info
    assert info == {
        "owner": "h:7:4",
        **liveness.this_process(),  # the holder fields of the run lock
        "rank": 4,
        "claimed_at": 10.0,
        "expires_at": 70.0,
    }
    assert set(liveness.this_process()) == {"host", "pid", "pid_ns", "proc_start"}
    path.write_bytes(encode("no-rank", 10.0, 70.0, released=True))
    assert look(path).info["rank"] is None and look(path).info["released"] is True
    path.write_bytes(b'{"owner": "a", "expi')  # a creator that died mid-write
    assert look(path).info is None
    assert look(tmp_path / "none.claim") is None


def test_expiry_by_time_by_a_dead_holder_and_by_mtime():
    here = {"owner": "a", "host": socket.gethostname(), "pid": os.getpid(), "expires_at": 100.0}
    assert not expired(Seen(0.0, here), 99.0, 60.0) and expired(Seen(0.0, here), 100.0, 60.0)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead = {**here, "pid": int(gone.stdout)}
    assert expired(Seen(0.0, dead), 0.0, 60.0)  # exited: no need to sit out the lease
    elsewhere = {**dead, "host": "another-host"}
    assert not expired(Seen(0.0, elsewhere), 0.0, 60.0)
    # Unreadable: judged by its age alone.
    assert not expired(Seen(40.0, None), 100.0, 60.0) and expired(Seen(39.0, None), 100.0, 60.0)


def claim_of(pid: int, **extra) -> dict:
    """A claim of ``pid`` on this host, in this pid namespace, expiring at 100."""
    return {"owner": "a", **liveness.this_process(), "pid": pid, "expires_at": 100.0, **extra}


def test_claim_of_another_pid_namespace_on_this_host_lives_out_its_lease(dead_pid):
    # A container sharing this host name (--net=host, hostNetwork): its pid is no process here.
    beside = Seen(0.0, claim_of(dead_pid, pid_ns="pid:[4026500000]"))
    assert not expired(beside, 99.0, 60.0) and expired(beside, 100.0, 60.0)


def test_claim_of_a_zombie_or_a_reused_pid_expires_at_once(zombie, sleeper):
    assert expired(Seen(0.0, claim_of(zombie)), 0.0, 60.0)
    reused = claim_of(sleeper.pid, proc_start=1)  # that pid is another process now
    assert expired(Seen(0.0, reused), 0.0, 60.0)
    assert not expired(Seen(0.0, claim_of(sleeper.pid, proc_start=None)), 0.0, 60.0)


def test_claim_written_before_pid_ns_was_recorded_is_judged_by_host_and_pid(dead_pid):
    old = {"owner": "a", "host": socket.gethostname(), "pid": dead_pid, "expires_at": 100.0}
    assert expired(Seen(0.0, old), 0.0, 60.0)
