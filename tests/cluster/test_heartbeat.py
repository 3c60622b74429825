"""The heartbeat: it keeps claims alive until stopped, and outlives filesystem errors."""

from __future__ import annotations

import time

from batchgen.cluster.claims import ClaimStore
from batchgen.cluster.heartbeat import Heartbeat


def test_heartbeat_keeps_claims_alive_until_stopped(tmp_path):
    a, b = (ClaimStore(tmp_path, owner, lease_seconds=0.5) for owner in ("a", "b"))
    a.try_claim(0)
    beat = Heartbeat(a).start()
    time.sleep(0.9)
    assert a.owns(0) and not b.try_claim(0)
    beat.stop()
    assert beat._thread is None
    time.sleep(0.6)
    assert b.try_claim(0) and not a.owns(0)


def test_heartbeat_survives_filesystem_errors():
    class Flaky:
        lease_seconds = 0.03
        calls = 0

        def renew(self):
            self.calls += 1
            if self.calls == 1:
                raise OSError("stale NFS file handle")

    store = Flaky()
    with Heartbeat(store):
        time.sleep(0.2)
    assert store.calls >= 3
