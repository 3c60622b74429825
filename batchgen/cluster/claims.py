"""Work stealing through claim files with leases on a shared filesystem.

Shard ``k`` is claimed by creating ``OUT/_batchgen/claims/part-0000k.claim`` with
``O_CREAT|O_EXCL``, which exactly one creator wins, also on NFS. It holds JSON ``{owner, host, pid,
pid_ns, proc_start, rank, claimed_at, expires_at}``; a heartbeat pushes ``expires_at`` forward
while the worker lives, and a holder provably gone (``liveness``) loses its claim at once.

An expired claim is taken over by creating the next generation (``part-0000k.1.claim``,
``part-0000k.2.claim``, ...) with ``O_EXCL`` again; the highest generation is the shard's claim.
Nothing is ever renamed or deleted, so exactly one of several racing stealers wins and there is no
instant at which the shard looks free. (Renaming the stale file aside and recreating it has such an
instant: a late stealer can move a fresh claim away while a newcomer claims the empty name, and both
win.) Claims never end in ``.parquet``. Leases assume that the hosts' clocks agree to well within a
quarter of the lease.

The files' names and content, and how a reader judges one, are ``claim_files``; the thread that
renews a worker's claims is ``heartbeat``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchgen.cluster.claim_files import (
    CLAIM_RE,
    FIELDS,
    Seen,
    claim_path,
    encode,
    expired,
    look,
    top_generation,
)
from batchgen.config import DEFAULT_LEASE_SECONDS
from batchgen.store import layout
from batchgen.store.writer import temp_path

# A claim is rewritten in place, and trusted for publishing, only while this share of its lease
# is left: a stealer that read it just before must not find it expired after the rewrite.
RENEW_MARGIN = 0.25


class ClaimStore:
    """This worker's claims on shards of one output folder.

    Thread-safe: a ``Heartbeat`` thread may ``renew`` while the main thread claims and releases.
    The files are the truth; ``held()`` is this worker's view, corrected by ``renew`` and
    ``owns``. Typical use: ``try_claim(k)``; check that shard ``k`` is not published yet;
    generate; ``owns(k)`` right before publishing; publish; ``release(k)``.

    Args:
        out_dir: the run's output folder (claims go to ``out_dir/_batchgen/claims/``).
        owner: this worker's id, unique among all workers; see ``claim_files.default_owner``.
        lease_seconds: how long a claim lives without renewal.
        clock: seconds since the epoch; a fake one in tests.
    """

    def __init__(
        self,
        out_dir: Path,
        owner: str,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        clock: Callable[[], float] = time.time,
    ):
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
        self.out_dir = Path(out_dir)
        self.owner = owner
        self.lease_seconds = float(lease_seconds)
        self.clock = clock
        self._held: dict[int, int] = {}  # shard index -> generation of our claim file
        self._lock = threading.Lock()
        layout.claims_dir(self.out_dir).mkdir(parents=True, exist_ok=True)

    def _create(self, index: int, generation: int, claimed_at: float | None = None) -> bool:
        path = claim_path(self.out_dir, index, generation)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(path, flags, 0o644)
        except FileExistsError:
            return False
        except FileNotFoundError:  # claims/ removed by a worker that saw the run complete
            path.parent.mkdir(parents=True, exist_ok=True)
            return self._create(index, generation, claimed_at)
        now = self.clock()
        claimed_at = now if claimed_at is None else claimed_at
        # No fsync: exclusion comes from O_EXCL, and a claim cut short by a host crash is
        # unreadable, which expires by its mtime.
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(encode(self.owner, claimed_at, now + self.lease_seconds))
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from e
        self._held[index] = generation
        return True

    def _rewrite(self, path: Path, payload: bytes) -> None:
        tmp = temp_path(path)
        try:
            tmp.write_bytes(payload)
            os.replace(tmp, path)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from e
        finally:
            tmp.unlink(missing_ok=True)

    def _ours(self, index: int, generation: int) -> Seen | None:
        """Our claim file if it is still the shard's claim (no later generation), else None."""
        if claim_path(self.out_dir, index, generation + 1).exists():
            return None
        seen = look(claim_path(self.out_dir, index, generation))
        if seen is None or seen.info is None or seen.info["owner"] != self.owner:
            return None
        return seen

    def _safe_until(self, seen: Seen) -> float:
        return seen.info["expires_at"] - RENEW_MARGIN * self.lease_seconds

    def try_claim(self, index: int) -> bool:
        """Claim shard ``index`` if nobody holds a live claim on it.

        Creates the claim atomically; if the shard's claim has expired (an unreadable claim
        file: once its mtime is older than the lease), creates the next generation, which
        exactly one of several racing workers wins. Claiming a shard this worker already holds
        live is a no-op that returns True.

        Returns:
            True when this worker now holds the claim.
        """
        with self._lock:
            top = top_generation(self.out_dir, index, self._held.get(index, 0))
            if top is None:
                return self._create(index, 0)
            seen = look(claim_path(self.out_dir, index, top))
            if seen is None:  # removed behind our back (a cleanup of claims/): stay away
                return False
            now = self.clock()
            if not expired(seen, now, self.lease_seconds):
                if seen.info is not None and seen.info["owner"] == self.owner:
                    self._held[index] = top
                    return True
                return False
            return self._create(index, top + 1)

    def _renew_one(self, index: int, generation: int) -> bool:
        seen = self._ours(index, generation)
        if seen is None:
            return False
        now = self.clock()
        if now < self._safe_until(seen):
            payload = encode(self.owner, seen.info["claimed_at"], now + self.lease_seconds)
            self._rewrite(claim_path(self.out_dir, index, generation), payload)
            return True
        # Late (a stalled heartbeat): a stealer may be judging the old expiry right now, so
        # extend by a new generation, which a racing stealer cannot also create.
        return self._create(index, generation + 1, seen.info["claimed_at"])

    def renew(self) -> set[int]:
        """Extend the lease of every claim this worker still owns.

        Claims taken over by another worker (or otherwise no longer ours) are dropped from
        ``held()``.

        Returns:
            The shards held after renewal.
        """
        with self._lock:
            for index, generation in sorted(self._held.items()):
                if not self._renew_one(index, generation):
                    del self._held[index]
            return set(self._held)

    def owns(self, index: int) -> bool:
        """Whether this worker may publish shard ``index`` now.

        Re-reads the claim: True when it is ours, no later generation exists, and at least a
        quarter of the lease is left (so no other worker can take it over while the shard is
        renamed into place). A claim found taken over is dropped from ``held()``; one that is
        merely close to expiry stays held and becomes publishable after ``renew()``.
        """
        with self._lock:
            generation = self._held.get(index)
            if generation is None:
                return False
            seen = self._ours(index, generation)
            if seen is None:
                del self._held[index]
                return False
            return self.clock() < self._safe_until(seen)

    def _release(self, index: int) -> None:
        generation = self._held.pop(index, None)
        seen = None if generation is None else self._ours(index, generation)
        if seen is not None:
            # Expire it rather than delete it: generations must stay contiguous.
            payload = encode(self.owner, seen.info["claimed_at"], self.clock(), released=True)
            self._rewrite(claim_path(self.out_dir, index, generation), payload)

    def release(self, index: int) -> None:
        """Give up the claim on ``index`` (marked released, free to claim at once).

        A claim that is no longer ours is left alone.
        """
        with self._lock:
            self._release(index)

    def release_all(self) -> None:
        """Give up every claim this worker holds (on exit or preemption)."""
        with self._lock:
            for index in sorted(self._held):
                self._release(index)

    def held(self) -> set[int]:
        """The shards this worker believes it holds (no file access)."""
        with self._lock:
            return set(self._held)

    @staticmethod
    def describe(
        out_dir: Path,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> list[dict[str, Any]]:
        """The current claim (highest generation) of every claimed shard, for status reports.

        Args:
            out_dir: the run's output folder.
            lease_seconds: the lease assumed for unreadable claim files (judged by mtime).
            clock: seconds since the epoch.

        Returns:
            One dict per shard, sorted by index: ``index``, ``generation``, ``owner``, ``host``,
            ``pid``, ``rank``, ``claimed_at``, ``expires_at`` (None for an unreadable file),
            ``released``, and ``expired`` (True for released claims too).
        """
        folder = layout.claims_dir(out_dir)
        if not folder.is_dir():
            return []
        tops: dict[int, int] = {}
        for entry in folder.iterdir():
            m = CLAIM_RE.match(entry.name)
            if m:
                index, generation = int(m.group(1)), int(m.group(2) or 0)
                tops[index] = max(generation, tops.get(index, 0))
        found = []
        now = clock()
        for index, generation in sorted(tops.items()):
            seen = look(claim_path(out_dir, index, generation))
            if seen is None:
                continue
            info = seen.info or {}
            found.append(
                {
                    "index": index,
                    "generation": generation,
                    **{k: info.get(k) for k in FIELDS},
                    "released": bool(info.get("released")),
                    "expired": expired(seen, now, lease_seconds),
                }
            )
        return found


def clear(out_dir: Path) -> None:
    """Remove every claim file and the claims folder, once every shard is published.

    Another worker finishing at the same time may remove the same files; a worker that claims
    after this recreates the folder (``ClaimStore`` does).
    """
    folder = layout.claims_dir(out_dir)
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    for entry in entries:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
    with contextlib.suppress(FileNotFoundError, OSError):
        folder.rmdir()  # not empty: a late claim; its worker clears it when it finishes


def live_indices(out_dir: Path, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> list[int]:
    """Shards whose claim is neither released nor expired: a worker may be writing them
    (``lease_seconds`` judges the claim files that do not parse, by their age)."""
    return [c["index"] for c in ClaimStore.describe(out_dir, lease_seconds) if not c["expired"]]
