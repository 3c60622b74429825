"""The heartbeat: a daemon thread that keeps a worker's shard claims alive.

Invariant: while the heartbeat runs, a live worker's claims are renewed every third of the lease,
and a failed renewal never ends it: it is retried at the next beat, which still comes before the
lease runs out.
"""

from __future__ import annotations

import logging
import threading

from batchgen.cluster.claims import ClaimStore

log = logging.getLogger(__name__)


class Heartbeat:
    """A daemon thread that renews a store's claims every third of the lease.

    Use as ``with Heartbeat(store): ...`` or ``start()`` / ``stop()``. A failed renewal is logged
    and retried at the next beat: a brief NFS hiccup must not end the heartbeat.

    Args:
        store: the claims to keep alive.
        interval: seconds between renewals; a third of the store's lease by default.
    """

    def __init__(self, store: ClaimStore, interval: float | None = None):
        self.store = store
        self.interval = store.lease_seconds / 3 if interval is None else interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.renew()
            except OSError as e:
                log.warning("batchgen: renewing shard claims failed (%s); retrying", e)

    def start(self) -> Heartbeat:
        """Start beating; returns self."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="batchgen-heartbeat")
            self._thread.daemon = True
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and wait for the thread to end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
