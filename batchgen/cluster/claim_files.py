"""Claim files on disk: their names, their JSON content, and how a reader judges one.

Shard ``k``'s claim is ``OUT/_batchgen/claims/part-0000k.claim``, then ``part-0000k.1.claim``,
``part-0000k.2.claim``, ... as it is taken over; the highest generation is the shard's claim.
Each holds JSON ``{owner, host, pid, pid_ns, proc_start, rank, claimed_at, expires_at}`` (plus
``released`` once given up); its holder fields are the run lock's (``liveness.this_process``).
Invariant: a reader never trusts more than the file says. A file that does not parse (a creator
between ``O_EXCL`` and its write, or one that died there) is judged by its mtime alone, and a claim
whose holder is provably gone (``liveness.gone``) is expired whatever its lease says; a holder this
host cannot judge (another host or pid namespace) keeps its claim until its lease ends.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchgen.cluster import liveness
from batchgen.store import layout

CLAIM_RE = re.compile(r"^part-(\d{5,})(?:\.(\d+))?\.claim$")

FIELDS = ("owner", "host", "pid", "rank", "claimed_at", "expires_at")


def claim_path(out_dir: Path, index: int, generation: int = 0) -> Path:
    """The claim file of shard ``index``: ``claims/part-{index:05d}[.{generation}].claim``."""
    tag = f".{generation}" if generation else ""
    return layout.claims_dir(out_dir) / f"part-{index:05d}{tag}.claim"


def default_owner(rank: int) -> str:
    """An owner id unique to this process: ``host:pid:rank``."""
    return f"{socket.gethostname()}:{os.getpid()}:{rank}"


def encode(owner: str, claimed_at: float, expires_at: float, released: bool = False) -> bytes:
    """The content of a claim file written by this process for ``owner``."""
    rank = owner.rpartition(":")[2]
    info = {
        "owner": owner,
        **liveness.this_process(),
        "rank": int(rank) if rank.isdigit() else None,
        "claimed_at": claimed_at,
        "expires_at": expires_at,
    }
    if released:
        info["released"] = True
    return json.dumps(info).encode()


@dataclass(frozen=True)
class Seen:
    """One read of a claim file: its mtime and, when it parses, its content."""

    mtime: float
    info: dict[str, Any] | None


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        info = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    ok = (
        isinstance(info, dict)
        and isinstance(info.get("owner"), str)
        and isinstance(info.get("expires_at"), (int, float))
    )
    return info if ok else None


def look(path: Path) -> Seen | None:
    """Read a claim file; None when there is none.

    Raises:
        OSError: the file exists but cannot be read.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        mtime = os.fstat(f.fileno()).st_mtime
        return Seen(mtime, _parse(f.read()))


def expired(seen: Seen, now: float, lease: float) -> bool:
    """Whether a claim read at ``now`` no longer holds: past its expiry, its holder gone, or
    (unreadable) older than ``lease``."""
    if seen.info is not None:
        return now >= seen.info["expires_at"] or liveness.gone(seen.info)
    # Unreadable: a creator between O_EXCL and its write, or one that died there. Only its age
    # tells the two apart.
    return now - seen.mtime > lease


def top_generation(out_dir: Path, index: int, start: int = 0) -> int | None:
    """The highest generation of a shard's claim, probing up from ``start`` (known to exist)."""
    if not claim_path(out_dir, index, start).exists():
        return None
    g = start
    while claim_path(out_dir, index, g + 1).exists():
        g += 1
    return g
