"""Claims: create, refuse, expire, steal, renew, release, describe, and a real race."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

import pytest

from batchgen.cluster import liveness
from batchgen.cluster.claim_files import claim_path, default_owner
from batchgen.cluster.claims import ClaimStore
from batchgen.cluster.lock import RunLock
from batchgen.config import RunnerConfig


class Clock:
    """A clock that moves only when told; starts at the real time so file mtimes compare."""

    def __init__(self):
        self.t = time.time()

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock():
    return Clock()


def stores(out, clock, *owners, lease=60.0):
    return [ClaimStore(out, o, lease_seconds=lease, clock=clock) for o in owners]


def read_claim(out, index, generation=0):
    return json.loads(claim_path(out, index, generation).read_text())


def claim_files(out):
    return sorted(p.name for p in (out / "_batchgen" / "claims").iterdir())


def test_claim_writes_owner_and_lease(tmp_path, clock):
    owner = default_owner(2)
    (a,) = stores(tmp_path, clock, owner)
    assert a.try_claim(3)
    info = read_claim(tmp_path, 3)
    host, pid, rank = owner.split(":")
    assert info == {
        "owner": owner,
        "host": host,
        "pid": int(pid),
        "pid_ns": liveness.this_process()["pid_ns"],
        "proc_start": liveness.this_process()["proc_start"],
        "rank": 2,
        "claimed_at": clock.t,
        "expires_at": clock.t + 60.0,
    }
    assert claim_path(tmp_path, 3).name == "part-00003.claim"
    assert a.held() == {3}
    assert not list(tmp_path.rglob("*.parquet"))


def test_double_claim_is_refused_and_own_claim_is_idempotent(tmp_path, clock):
    a, b = stores(tmp_path, clock, "a", "b")
    assert a.try_claim(0)
    clock.advance(40)
    assert not b.try_claim(0)
    assert a.try_claim(0)
    assert b.held() == set() and a.owns(0) and not b.owns(0)
    clock.advance(19)  # still a's, but too close to expiry to publish without a renewal
    assert not b.try_claim(0) and not a.owns(0)


def test_expired_claim_is_stolen_and_the_old_owner_notices(tmp_path, clock):
    a, b = stores(tmp_path, clock, "a", "b")
    a.try_claim(0)
    clock.advance(60)
    assert not a.owns(0)  # expired: a must not publish any more
    assert b.try_claim(0)
    assert claim_files(tmp_path) == ["part-00000.1.claim", "part-00000.claim"]
    assert read_claim(tmp_path, 0, 1)["owner"] == "b"
    assert read_claim(tmp_path, 0, 1)["claimed_at"] == clock.t
    assert a.renew() == set() and a.held() == set()
    a.release(0)  # no longer a's: left alone
    assert b.owns(0) and not a.try_claim(0)
    clock.advance(61)
    assert a.try_claim(0) and read_claim(tmp_path, 0, 2)["owner"] == "a"


def test_renew_extends_the_lease_and_keeps_claimed_at(tmp_path, clock):
    a, b = stores(tmp_path, clock, "a", "b")
    start = clock.t
    a.try_claim(1)
    clock.advance(30)
    assert a.renew() == {1}
    clock.advance(40)  # past the first lease, within the renewed one
    assert not b.try_claim(1)
    assert a.owns(1)
    info = read_claim(tmp_path, 1)
    assert info["claimed_at"] == start and info["expires_at"] == start + 90


def test_late_renewal_extends_by_a_new_generation(tmp_path, clock):
    a, b = stores(tmp_path, clock, "a", "b")
    start = clock.t
    a.try_claim(1)
    clock.advance(50)  # 10 s left < a quarter of the lease: not safe to publish any more
    assert not a.owns(1) and a.held() == {1}
    assert a.renew() == {1}
    assert read_claim(tmp_path, 1)["expires_at"] == start + 60  # never rewritten this late
    assert read_claim(tmp_path, 1, 1)["expires_at"] == clock.t + 60
    assert read_claim(tmp_path, 1, 1)["claimed_at"] == start
    assert a.owns(1)
    clock.advance(30)
    assert not b.try_claim(1)
    clock.advance(30)  # the renewal was lost to a stealer: a drops the shard
    assert b.try_claim(1) and a.renew() == set()


def test_release_frees_the_shard(tmp_path, clock):
    a, b = stores(tmp_path, clock, "a", "b")
    assert all(a.try_claim(i) for i in (0, 1, 2))
    a.release(1)
    assert a.held() == {0, 2} and not a.owns(1)
    assert read_claim(tmp_path, 1)["released"] is True
    assert b.try_claim(1)  # at once, without waiting for the lease
    a.release_all()
    assert a.held() == set()
    assert b.try_claim(0) and b.try_claim(2) and b.held() == {0, 1, 2}
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_unreadable_claim_expires_by_its_mtime(tmp_path, clock):
    (b,) = stores(tmp_path, clock, "b")
    path = claim_path(tmp_path, 4)
    path.write_bytes(b'{"owner": "a", "expi')  # a creator that died mid-write
    os.utime(path, (clock.t - 30, clock.t - 30))
    assert not b.try_claim(4)
    os.utime(path, (clock.t - 61, clock.t - 61))
    assert b.try_claim(4)
    assert read_claim(tmp_path, 4, 1)["owner"] == "b"


def test_a_late_stealer_loses_to_the_first(tmp_path, clock):
    a, b, c = stores(tmp_path, clock, "a", "b", "c")
    a.try_claim(0)
    clock.advance(61)
    assert c.try_claim(0)
    assert not b.try_claim(0) and not a.try_claim(0)
    assert c.owns(0) and claim_files(tmp_path) == ["part-00000.1.claim", "part-00000.claim"]


def test_describe_lists_claims_with_expiry(tmp_path, clock):
    a, b = stores(tmp_path, clock, "h1:10:0", "h2:20:1")
    a.try_claim(0)
    a.try_claim(3)
    a.release(3)
    clock.advance(30)
    b.try_claim(7)
    clock.advance(40)
    b.try_claim(0)
    junk = claim_path(tmp_path, 9)
    junk.write_text("")
    os.utime(junk, (clock.t - 100, clock.t - 100))
    (tmp_path / "_batchgen" / "claims" / "part-00007.claim.tmp-x").write_text("{}")
    found = ClaimStore.describe(tmp_path, 60.0, clock=clock)
    got = [(c["index"], c["generation"], c["owner"], c["rank"], c["expired"]) for c in found]
    assert got == [
        (0, 1, "h2:20:1", 1, False),
        (3, 0, "h1:10:0", 0, True),
        (7, 0, "h2:20:1", 1, False),
        (9, 0, None, None, True),
    ]
    assert [c["released"] for c in found] == [False, True, False, False]
    assert found[2]["expires_at"] == clock.t + 20 and found[2]["pid"] == os.getpid()
    assert ClaimStore.describe(tmp_path / "nowhere") == []


def _race(out: str, owner: str, barrier, done, results) -> None:
    store = ClaimStore(out, owner, lease_seconds=60)
    barrier.wait()
    results.put((owner, store.try_claim(0)))
    done.wait()  # live until every racer has tried: a winner that exited would be gone at once


@pytest.mark.parametrize("existing", ["none", "expired", "expired", "expired", "garbage"])
def test_eight_processes_racing_for_one_shard_one_wins(tmp_path, existing):
    path = claim_path(tmp_path, 0)
    path.parent.mkdir(parents=True)
    if existing == "expired":
        path.write_text(json.dumps({"owner": "dead", "expires_at": time.time() - 1}))
    elif existing == "garbage":
        path.write_text("not json")
        os.utime(path, (time.time() - 120, time.time() - 120))
    ctx = mp.get_context("fork")
    barrier, done, results = ctx.Barrier(8), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_race, args=(str(tmp_path), f"w{i}", barrier, done, results))
        for i in range(8)
    ]
    for p in procs:
        p.start()
    outcome = dict(results.get(timeout=20) for _ in procs)
    done.set()
    for p in procs:
        p.join(timeout=20)
    winners = [owner for owner, won in outcome.items() if won]
    assert len(winners) == 1, outcome
    generation = 0 if existing == "none" else 1
    assert read_claim(tmp_path, 0, generation)["owner"] == winners[0]
    assert len(claim_files(tmp_path)) == generation + 1


def test_claim_of_a_dead_process_on_this_host_is_taken_at_once(tmp_path):
    import subprocess
    import sys

    from batchgen.cluster.claims import ClaimStore

    code = (
        "import sys; from pathlib import Path; from batchgen.cluster.claims import ClaimStore;"
        "assert ClaimStore(Path(sys.argv[1]), 'dead:1:0', lease_seconds=3600).try_claim(3)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    live = ClaimStore(tmp_path, "live:2:0", lease_seconds=3600)
    assert live.try_claim(3)  # the holder exited: its hour-long lease does not block a restart
    other = ClaimStore(tmp_path, "other:3:0", lease_seconds=3600)
    assert not other.try_claim(3)  # a live holder's claim stands


def test_a_live_claim_of_a_container_beside_us_is_not_taken(tmp_path, dead_pid):
    """Same host name, another pid namespace: the holder's pid is no process here, yet it may
    live; only its lease ends its claim."""
    beside = {**liveness.this_process(), "pid": dead_pid, "pid_ns": "pid:[4026500000]"}
    path = claim_path(tmp_path, 0)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"owner": "beside:1:0", **beside, "expires_at": time.time() + 60}))
    assert not ClaimStore(tmp_path, "here:2:0").try_claim(0)
    assert claim_files(tmp_path) == ["part-00000.claim"]


def test_claims_lock_and_config_share_one_default_lease(tmp_path):
    lease = RunnerConfig().lease_seconds
    assert ClaimStore(tmp_path, "a").lease_seconds == RunLock(tmp_path).lease_seconds == lease
    # describe's default judges an unreadable claim by the same lease.
    path = claim_path(tmp_path, 0)
    path.write_text("")
    for age, gone in ((lease - 5, False), (lease + 5, True)):
        os.utime(path, (time.time() - age, time.time() - age))
        assert [c["expired"] for c in ClaimStore.describe(tmp_path)] == [gone]
