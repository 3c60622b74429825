"""What a run has produced, read back from its shards' footers: totals, errors, the summary.

Invariant: every number and row here comes from the published shards' own footers
(``writer.read_footers``), where each shard's skipped and failed rows were recorded when it was
made. Each shard is published exactly once and counted once, so a resumed, restarted or
multi-worker run never counts a row twice or loses one, whoever reads it and whenever. A worker's
summary (``WorkerSummary``) is one typed record: the job builds it (``folder.summarize``), writes
it to its record and prints it (``format_summary``); readers get it back with ``from_dict``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from batchgen.store import layout
from batchgen.store.writer import Footer, write_text_atomic

ERROR_KINDS = ("skipped", "failed")


@dataclass
class Totals:
    """Counts for a set of shards; added up over the shards of a folder."""

    rows: int = 0
    samples: int = 0
    skipped: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    padded_tokens: int = 0  # pad slots in prompt batches (static engine)
    invalid: int = 0  # samples whose response breaks their JSON schema or regex
    finish_reasons: dict[str, int] = field(default_factory=dict)

    def add(self, other: Totals) -> None:
        """Accumulate ``other`` into this one."""
        self.rows += other.rows
        self.samples += other.samples
        self.skipped += other.skipped
        self.failed += other.failed
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.padded_tokens += other.padded_tokens
        self.invalid += other.invalid
        for k, v in other.finish_reasons.items():
            self.finish_reasons[k] = self.finish_reasons.get(k, 0) + v

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)


def add_totals(footers: dict[int, Footer]) -> Totals:
    """The totals of the readable shards among ``footers``, added up."""
    totals = Totals()
    for footer in footers.values():
        if footer.meta is not None:
            totals.add(Totals(**footer.shard["totals"]))
    return totals


def padding_waste(totals: Totals) -> float:
    """Pad slots over real prompt tokens."""
    return totals.padded_tokens / max(totals.prompt_tokens, 1)


def read_errors(footers: dict[int, Footer]) -> list[dict]:
    """Every skipped and failed row of the readable shards among ``footers``, in row order.

    Each is ``{"id", "reason", "kind", "shard", "rank"}``: ``kind`` is ``skipped`` or
    ``failed``, ``rank`` the worker that published the shard (None when its footer predates
    that field).
    """
    lines = []
    for index, footer in sorted(footers.items()):
        if footer.meta is None:
            continue
        rank = (footer.shard.get("worker") or {}).get("rank")
        for kind in ERROR_KINDS:
            for row in footer.shard.get(kind) or []:
                lines.append({**row, "kind": kind, "shard": index, "rank": rank})
    return lines


def _published_by(footer: Footer, rank: int, world_size: int) -> bool:
    if footer.meta is None:
        return False
    worker = footer.shard.get("worker") or {}
    return worker.get("rank") == rank and worker.get("world_size") == world_size


def write_worker_errors(
    out_dir: Path, footers: dict[int, Footer], rank: int, world_size: int
) -> Path:
    """Rewrite this worker's errors file: the errors of every shard its rank published.

    Chosen by the footers' ``worker`` record, not by this process's memory: a restarted rank
    lists the shards its earlier attempts published too, and a stolen shard is listed once, by
    the worker that published it.

    Returns:
        The file's path.

    Raises:
        OSError: it cannot be written (its name as ``filename``).
    """
    mine = {i: f for i, f in footers.items() if _published_by(f, rank, world_size)}
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in read_errors(mine))
    path = layout.worker_errors_file(out_dir, rank, world_size)
    write_text_atomic(path, text)
    return path


def is_complete(shards_done: int, shards_total: int | None) -> bool:
    """Whether a run is complete: its shard count is known and every shard is done."""
    return shards_total is not None and shards_done == shards_total


def _known(cls, d: Mapping[str, Any]) -> dict[str, Any]:
    """The items of ``d`` that are fields of dataclass ``cls``: a record written by another
    version may lack some (they keep their defaults) or carry more."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class ThisRun(Totals):
    """A worker's own numbers in its last run: its totals, and how fast it generated them."""

    generate_seconds: float = 0.0
    tokens_per_second: float = 0.0


@dataclass
class WorkerSummary(Mapping[str, Any]):
    """A worker's closing summary: the folder's totals when it ended, plus its own run.

    Written to the worker's record (``to_dict``) and read back by ``from_dict``, which gives
    the defaults below to what a record lacks. It is also a read-only mapping of ``to_dict``
    (``summary["totals"]["rows"]``), as ``batchgen.run`` returned a dict before.
    """

    output_dir: str = ""
    shards_total: int | None = None  # None: a stream not yet read to its end
    rows_total: int | None = None
    shards_done: int = 0
    shards_resumed: int = 0
    totals: Totals = field(default_factory=Totals)
    padding_waste: float = 0.0
    errors_file: str = ""
    this_run: ThisRun = field(default_factory=ThisRun)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase
    wall_seconds: float | None = None
    already_complete: bool = False  # every shard was done before this run started
    tuning: dict[str, Any] | None = None  # batch size, token budget, engine, and why
    # A runner.devices pool's summary: each worker's rank, devices, pid, how it ended and the
    # rows it made (batchgen.job.pool); None for a worker's own.
    workers: list[dict[str, Any]] | None = None

    @property
    def complete(self) -> bool:
        """Whether every shard of the run was done when this worker ended."""
        return is_complete(self.shards_done, self.shards_total)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON (the record's ``summary``); ``tuning`` and ``workers`` only
        when set."""
        d = asdict(self)
        for key in ("tuning", "workers"):
            if d[key] is None:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WorkerSummary:
        """The summary a worker record holds (``to_dict``, of this or an earlier version)."""
        known = _known(cls, d)
        known["totals"] = Totals(**_known(Totals, d.get("totals") or {}))
        known["this_run"] = ThisRun(**_known(ThisRun, d.get("this_run") or {}))
        known["phases"] = dict(d.get("phases") or {})
        return cls(**known)

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def format_summary(summary: WorkerSummary) -> str:
    """The closing summary as aligned lines for the terminal."""
    t, this = summary.totals, summary.this_run
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in summary.phases.items()) or "-"
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(t.finish_reasons.items())) or "-"
    lines = [
        "batchgen summary",
        f"  rows        {t.rows:,} generated, {t.skipped:,} skipped, {t.failed:,} failed "
        f"({summary.shards_done}/{summary.shards_total or '?'} shards complete)",
        f"  samples     {t.samples:,} (finish: {reasons})"
        + (f"; {t.invalid:,} invalid (column valid)" if t.invalid else ""),
        f"  tokens      {t.prompt_tokens:,} prompt, {t.completion_tokens:,} completion, "
        f"padding waste {summary.padding_waste:.1%}",
        f"  this run    {this.rows:,} rows, {this.completion_tokens:,} tokens in "
        f"{this.generate_seconds:.1f} s = {this.tokens_per_second:,.1f} tokens/s "
        f"(wall {summary.wall_seconds or 0.0:.1f} s, {summary.shards_resumed} shards resumed)",
        f"  phases      {phases}",
        f"  outputs     {summary.output_dir}/part-*.parquet",
    ]
    for i, w in enumerate(summary.workers or []):
        made = f", {w['rows']:,} rows this run" if w.get("rows") is not None else ""
        lines.insert(
            -1,
            f"  {'workers' if i == 0 else '':<11} rank {w['rank']} on {w['devices']}, "
            f"pid {w['pid']}: {w['ended']}{made}",
        )
    tuning = summary.tuning
    if tuning:
        why = tuning["why"]
        budget = tuning["max_batch_tokens"]
        lines[-1:-1] = [
            f"  batch size  {tuning['batch_size'] or 'auto'} ({why['batch_size']})",
            f"  batch slots {f'{budget:,}' if budget else 'no bound'} ({why['max_batch_tokens']})",
            f"  engine      {tuning['engine']} ({why['engine']})",
        ]
    if summary.already_complete:
        lines.insert(1, "  status      already complete: every shard was finished before this run")
    if t.skipped or t.failed:
        lines.append(f"  errors      {summary.errors_file} (ids and reasons)")
    return "\n".join(lines)
