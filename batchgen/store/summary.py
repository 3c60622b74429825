"""What a run has produced, read back from its shards' footers: totals, errors, the summary.

Invariant: every number and row here comes from the published shards' own footers
(``writer.read_footers``), where each shard's skipped and failed rows were recorded when it was
made. Each shard is published exactly once and counted once, so a resumed, restarted or
multi-worker run never counts a row twice or loses one, whoever reads it and whenever.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from batchgen.store import layout
from batchgen.store.writer import Footer, read_footers, write_text_atomic

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


def summarize(
    out_dir: Path,
    rank: int,
    world_size: int,
    shards_total: int | None,
    rows_total: int | None,
    resumed: int,
    this_run: Totals,
    phases: dict[str, float],
    wall: float,
) -> dict:
    """This worker's summary: totals over every finished shard plus its own numbers; writes its
    errors file.

    ``shards_total`` and ``rows_total`` are None for a stream not yet read to its end.

    Raises:
        OSError: the errors file cannot be written.
    """
    footers = read_footers(out_dir)
    totals = add_totals(footers)
    errors_file = write_worker_errors(out_dir, footers, rank, world_size)
    generate = phases.get("generate", 0.0)
    return {
        "output_dir": str(out_dir),
        "shards_total": shards_total,
        "rows_total": rows_total,
        "shards_done": sum(f.meta is not None for f in footers.values()),
        "shards_resumed": resumed,
        "totals": totals.to_dict(),
        "padding_waste": padding_waste(totals),
        "errors_file": str(errors_file),
        "this_run": {
            **this_run.to_dict(),
            "generate_seconds": generate,
            "tokens_per_second": this_run.completion_tokens / generate if generate else 0.0,
        },
        "phases": phases,
        "wall_seconds": wall,
    }
