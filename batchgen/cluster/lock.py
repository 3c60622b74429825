"""A run lock in the output folder, so two runners pointed at one folder cannot both write it.

The lock is ``OUT/_batchgen/locks/{name}.lock``, a small JSON record of its holder (pid, host, pid
namespace, start time, command line). It is published with ``os.link`` from a fully written temp
file, which fails atomically when the lock exists, so a reader never sees a half-written lock and a
crash between creating and writing it cannot leave an empty one behind.

While held, a heartbeat thread touches the lock's mtime every third of the lease. A lock is stale
when its holder is provably gone (``liveness.gone``: its pid, in this host's pid namespace, ended,
is a zombie or was reused; taken over at once), or, wherever the holder ran (another host or
container, whose pid means nothing here), when its heartbeat is older than the lease (taken over
then); ``acquire`` returns the stale record it took over, so the job can say so. Taking over is
serialized by an ``flock`` on ``{name}.lock.guard`` beside it: renaming the stale file aside is
not enough on its own, because a slow taker could rename away the fresh lock a faster taker has
just created; under the guard, a taker re-reads the lock and removes it only if it is still the
stale one it judged. The kernel drops an ``flock`` when its process dies, so the guard itself never
goes stale; the empty guard file stays in the folder after a takeover.

Once its worker has been admitted to the run (``batchgen.store.manifest.check_run_file``), the
lock also records the fingerprint it generates under (``attach``), so the run record is never
replaced under a live worker of another config (``live_fingerprints``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import shlex
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from batchgen.cluster import liveness
from batchgen.config import DEFAULT_LEASE_SECONDS
from batchgen.errors import ConfigError, ResumeError
from batchgen.store import layout
from batchgen.store.writer import temp_path

log = logging.getLogger(__name__)

# Several stale takeovers in a row (each racing a new runner) are possible but not endless.
_ATTEMPTS = 5


def _read(path: Path) -> dict[str, Any] | None:
    """The lock record at ``path``; None when it is gone; {} when it is not a valid record."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else {}


def live_fingerprints(out_dir: Path, lease_seconds: float, own: Path) -> dict[str, dict[str, Any]]:
    """The fingerprints that live workers other than ``own`` (a lock file) were admitted under,
    each with one of its holders' records (``pid``, ``host``, ``argv``...)."""
    found: dict[str, dict[str, Any]] = {}
    now = time.time()
    for path in sorted(layout.locks_dir(out_dir).glob("*.lock")):
        holder = _read(path)
        if path == own or not holder or not is_live(path, lease_seconds, now):
            continue
        if isinstance(holder.get("fingerprint"), str):
            found.setdefault(holder["fingerprint"], holder)
    return found


def is_live(path: Path, lease_seconds: float, now: float) -> bool:
    """Whether the lock at ``path`` has a live holder: a heartbeat within the lease, and, for a
    holder in this host's pid namespace, a running process (a kill is seen at once)."""
    try:
        silent = now - path.stat().st_mtime
    except FileNotFoundError:
        return False
    holder = _read(path)
    if holder and liveness.gone(holder):
        return False
    return silent <= lease_seconds


def describe_holder(holder: dict[str, Any]) -> str:
    """A lock holder as the user knows it: ``pid 123 on host node1, started 2025-...``."""
    when = holder.get("started_at", "at an unknown time")
    return f"pid {holder['pid']} on host {holder.get('host', '?')}, started {when}"


class RunLock:
    """An exclusive lock on an output folder for one worker, held from ``acquire`` to ``release``.

    Use one name per worker (for example ``f"run-rank{rank}"``) so that the workers of one
    data-parallel job do not exclude each other. Also a context manager::

        with RunLock(out_dir, "run"):
            ...
    """

    def __init__(
        self, out_dir: Path, name: str = "run", lease_seconds: float = DEFAULT_LEASE_SECONDS
    ):
        """Describe the lock ``{name}.lock`` of ``out_dir``; nothing is created until ``acquire``.

        Args:
            out_dir: the output folder; it must exist.
            name: lock name, a plain file-name part without ``/``.
            lease_seconds: a lock whose heartbeat is older than this is stale wherever its
                holder ran (``runner.lease_seconds``).

        Raises:
            ValueError: ``name`` is empty or contains a path separator.
        """
        if not name or "/" in name or (os.altsep and os.altsep in name):
            raise ValueError(f"lock name {name!r} must be a plain, non-empty file-name part")
        self.out_dir = Path(out_dir)
        self.path = layout.lock_file(self.out_dir, name)
        self._guard = self.path.with_name(f"{self.path.name}.guard")
        self._record: dict[str, Any] | None = None
        self.lease_seconds = lease_seconds
        self._beating = threading.Event()
        self._thread: threading.Thread | None = None
        # The heartbeat compares the file with ``_record``; ``attach`` rewrites both at once.
        self._state = threading.Lock()

    def _new_record(self) -> dict[str, Any]:
        return {
            **liveness.this_process(),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "argv": list(sys.argv),
            "token": secrets.token_hex(8),
        }

    def _publish(self, record: dict[str, Any]) -> bool:
        """Create the lock with ``record`` as its whole content; False when a lock exists."""
        tmp = temp_path(self.path)
        try:
            self.path.parent.parent.mkdir(exist_ok=True)  # OUT itself must exist
            self.path.parent.mkdir(exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError as e:
            raise ConfigError(
                f"output.dir={str(self.out_dir)!r}: cannot create the run lock {self.path} "
                f"({e.strerror}). The folder must exist and be writable, with space left."
            ) from e
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _silent_for(self) -> float:
        """Seconds since the holder's last heartbeat (0 when the lock is gone)."""
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _is_stale(self, holder: dict[str, Any]) -> bool:
        return liveness.gone(holder) or self._silent_for() > self.lease_seconds

    def _remove_if_unchanged(self, stale: dict[str, Any]) -> bool:
        """Under the guard, remove the lock if it still holds ``stale``, still stale."""
        with self._guard.open("a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            if _read(self.path) != stale or not self._is_stale(stale):
                return False  # another taker got there first, or the holder woke up
            self.path.unlink()
            return True

    def _beat(self) -> None:
        while not self._beating.wait(self.lease_seconds / 3):
            try:
                with self._state:
                    if self._record is None:
                        return  # released
                    if _read(self.path) != self._record:
                        raise FileNotFoundError(self.path)
                    os.utime(self.path)
            except FileNotFoundError:
                log.warning(
                    "batchgen: the run lock %s was taken over after this process went silent "
                    "for longer than the lease; shard claims still keep the work apart",
                    self.path,
                )
                return
            except OSError as e:  # a brief hiccup of a shared filesystem: try at the next beat
                log.warning("batchgen: renewing the run lock failed (%s); retrying", e)

    def acquire(self) -> dict[str, Any] | None:
        """Take the lock, taking over a stale one (its holder gone, or silent past the lease).

        Returns:
            The record of the stale lock that was taken over (to tell the user about the
            earlier run that died), or None when the folder was not locked.

        Raises:
            ResumeError: the lock is held by a live process, by a process on another host, or
                cannot be read; the message names the holder and what to do.
            ConfigError: the lock cannot be created (folder missing, unwritable or full).
            RuntimeError: this object already holds the lock.
        """
        if self._record is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        record = self._new_record()
        taken_over = None
        for _ in range(_ATTEMPTS):
            if self._publish(record):
                self._record = record
                self._beating.clear()
                self._thread = threading.Thread(
                    target=self._beat, name="batchgen-lock", daemon=True
                )
                self._thread.start()
                return taken_over
            holder = _read(self.path)
            if holder is None:
                continue  # released between our attempt and the read
            if not holder or not self._is_stale(holder):
                raise self._refusal(holder)
            if self._remove_if_unchanged(holder):
                taken_over = holder
        raise self._refusal(_read(self.path) or {})

    def attach(self, fingerprint: str) -> None:
        """Record in the held lock the run fingerprint this worker was admitted under.

        Raises:
            RuntimeError: the lock is not held.
            OSError: the lock cannot be rewritten (its name as ``filename``).
        """
        with self._state:
            if self._record is None:
                raise RuntimeError(f"{self.path} is not held by this RunLock")
            record = {**self._record, "fingerprint": fingerprint}
            tmp = temp_path(self.path)
            try:
                tmp.write_text(json.dumps(record) + "\n")
                os.replace(tmp, self.path)
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(self.path)) from e
            finally:
                tmp.unlink(missing_ok=True)
            self._record = record

    def release(self) -> bool:
        """Remove the lock if it is still this object's and this process's; True if removed."""
        with self._state:
            record, self._record = self._record, None
        self._beating.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        if record is None or record["pid"] != os.getpid():
            return False  # never held, or a forked child that inherited the object
        if _read(self.path) != record:
            return False
        self.path.unlink(missing_ok=True)
        return True

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _refusal(self, holder: dict[str, Any]) -> ResumeError:
        where = f"output.dir={str(self.out_dir)!r}"
        rm = f"rm {shlex.quote(str(self.path))}"
        if not holder:
            return ResumeError(
                f"{where} has a lock file {self.path} that is not a valid batchgen lock, so its "
                f"holder is unknown. If no other batchgen run uses this folder, remove it with "
                f"`{rm}` and rerun."
            )
        pid, argv = holder["pid"], holder.get("argv")
        who = describe_holder(holder) + (
            f", command `{shlex.join(map(str, argv))}`" if argv else ""
        )
        if liveness.same_place(holder):
            return ResumeError(
                f"{where} is in use by another batchgen run ({who}); lock file {self.path}. Two "
                f"runs in one folder would duplicate work and race on its shards. Wait for it to "
                f"finish, stop it (kill {pid}), or give this run another output.dir."
            )
        return ResumeError(
            f"{where} is locked by a batchgen run elsewhere ({who}; lock file {self.path}), "
            f"another host or container, whose last heartbeat was {self._silent_for():.0f} s "
            f"ago. It is taken over once that passes runner.lease_seconds "
            f"({self.lease_seconds:.0f} s): rerun then, or give this run another output.dir."
        )
