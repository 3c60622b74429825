"""A jsonl file read line by line: its blank and malformed lines, and the line of each row.

Invariant: a jsonl file's rows are its non-blank lines, in order, whichever way it is loaded:
``datasets``' json reader (the fast path) drops blank lines, and where that reader fails (a
blank line among values of mixed types, a malformed line), ``clean_copy`` writes the same rows
itself. A malformed line (not UTF-8, not JSON, not an object) stays a row in the copy, holding
only ``PROBLEM_COLUMN`` (``line N ...``), so it keeps its row index and the rows after it keep
their ids when the line is fixed later; such a row is a bad row (``runner.on_bad_row``). The
copy is cached by the file's content (SHA-256) and appears whole under its final name (rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from batchgen.inputs.models import cache_root

# The column of a malformed line's row in a clean copy: what is wrong with it, naming the line.
PROBLEM_COLUMN = "_batchgen_bad_line"
# Part of the cache key: bump it when the copy's content changes for the same file.
FORMAT = "1"
# Malformed lines an error names, of however many.
NAMED = 3


@dataclass
class Scan:
    """What one pass over a jsonl file found."""

    blank: int = 0  # blank lines (no rows)
    bad: int = 0  # malformed lines
    first_bad: list[tuple[int, str]] = field(default_factory=list)  # (line, why), up to NAMED
    first_blank: int | None = None  # the first blank line's number
    digest: str = ""  # of the file's bytes and FORMAT: the clean copy's cache key


def line_problem(raw: bytes) -> str | None:
    """Why a non-blank line is no row of its own (not UTF-8, not JSON, not an object)."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return f"is not valid UTF-8 (byte {raw[e.start]:#04x} at {e.start})"
    except json.JSONDecodeError as e:  # its own "line 1" would contradict the file's line
        return f"is not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(value, dict):
        return f"is a JSON {type(value).__name__}, not an object"
    return None


def scan(path: Path) -> Scan:
    """One pass over ``path``: its blank and malformed lines, and its digest."""
    found = Scan()
    h = hashlib.sha256(FORMAT.encode())
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            h.update(raw)
            if not raw.strip():
                found.blank += 1
                found.first_blank = found.first_blank or number
                continue
            why = line_problem(raw)
            if why is not None:
                found.bad += 1
                if len(found.first_bad) < NAMED:
                    found.first_bad.append((number, why))
    found.digest = h.hexdigest()[:16]
    return found


def clean_copy(path: Path, found: Scan) -> Path:
    """The rows of ``path`` as a jsonl file without blank lines, a malformed line replaced by a
    row holding only its ``PROBLEM_COLUMN``; written once per content, then reused."""
    target = cache_root() / "jsonl" / f"{path.stem}-{found.digest}.jsonl"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with open(fd, "wb") as sink, path.open("rb") as source:
            for number, raw in enumerate(source, start=1):
                if not raw.strip():
                    continue
                why = line_problem(raw)
                if why is not None:
                    raw = json.dumps({PROBLEM_COLUMN: f"line {number} {why}"}).encode()
                sink.write(raw.rstrip(b"\r\n") + b"\n")
        os.replace(name, target)  # a concurrent worker writes the same bytes: either wins
    finally:
        Path(name).unlink(missing_ok=True)
    return target


def bad_lines_message(found: Scan) -> str:
    """The malformed lines of a scan, the first few named, as the middle of an error."""
    named = "; ".join(f"line {n} {why}" for n, why in found.first_bad)
    more = f" (and {found.bad - len(found.first_bad)} more)" if found.bad > NAMED else ""
    return f"{named}{more}"


def line_numbers(path: Path, rows: list[int]) -> dict[int, int]:
    """The line number of each row index in ``rows`` (rows are the non-blank lines)."""
    wanted = set(rows)
    found: dict[int, int] = {}
    row = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if len(found) == len(wanted):
                break
            if not raw.strip():
                continue
            if row in wanted:
                found[row] = number
            row += 1
    return found
