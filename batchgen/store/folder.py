"""An output folder as its readers see it: one read of it, and every fact derived from that read.

Invariant: ``read_folder`` is the one reader of a folder's state. It reads ``run.json``, the
worker records and each published shard's footer once, and every fact about the run (its row
and shard counts, which shards are done, totals, merged status, phases, throughput, whether it
is complete) is derived here by one rule, with one fallback: ``batchgen status``, ``report``,
``finalize``, ``export``, the sweep launcher and the job's closing summary (``summarize``) all
read it through ``read_folder`` and derive none of it themselves. A missing or damaged piece
never makes the read fail: ``run_problem`` and ``plan_problem`` say what cannot be known, and
each reader decides whether it can do without (``require_run``, ``require_plan``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchgen.errors import NotAnOutputDir
from batchgen.store import layout
from batchgen.store.records import WorkerRecord, read_run_file, read_workers
from batchgen.store.summary import (
    ThisRun,
    Totals,
    WorkerSummary,
    add_totals,
    is_complete,
    padding_waste,
    write_worker_errors,
)
from batchgen.store.writer import Footer, read_footers

# Merged status: the first of these that any worker records. A live worker makes the run
# running; one worker that saw every shard done makes it complete, whatever the others saw
# when they stopped earlier.
STATUS_ORDER = ("running", "complete", "interrupted", "incomplete")


def covered_rows(footer: Footer) -> int:
    """Input rows a shard covers: generated, skipped or failed."""
    return footer.shard["stop"] - footer.shard["start"]


@dataclass(frozen=True)
class Throughput:
    """Input rows (generated or skipped) and completion tokens per second."""

    rows_per_second: float
    completion_tokens_per_second: float


@dataclass
class FolderState:
    """What an output folder holds, read once (``read_folder``).

    Attributes:
        out_dir: the folder.
        run: its ``run.json`` (fingerprint, its parts, config, versions); ``{}`` when it
            cannot be read (``run_problem`` says why).
        records: this run's worker records, by world size and rank.
        footers: every published shard file (``part-*.parquet``), by index, its footer
            parsed once (``Footer.open`` reuses it).
        done: the shards of this run among them: a readable footer, the run's fingerprint
            (any, without ``run.json``), inside the plan (when its size is known), and still
            there when read.
        mtimes: when each done shard was published (its file's mtime).
        rows_per_shard: as the run recorded it; None when it did not.
        rows_total: input rows of the run, as any worker recorded them, else as ``run.json``
            did; None for a stream no worker has read to its end.
        shards_total: shards of the run, as any worker recorded them, else from
            ``rows_total`` and ``rows_per_shard``; None when neither is known.
        run_problem: why ``run.json`` cannot be read, or None.
        plan_problem: why the row count or shard size is unknown (``run_problem`` when that
            is why), or None.
    """

    out_dir: Path
    run: dict[str, Any]
    records: list[WorkerRecord]
    footers: dict[int, Footer]
    done: dict[int, Footer]
    mtimes: dict[int, float]
    rows_per_shard: int | None
    rows_total: int | None
    shards_total: int | None
    run_problem: str | None
    plan_problem: str | None

    def require_run(self) -> dict[str, Any]:
        """The run record.

        Raises:
            NotAnOutputDir: the folder has no readable ``run.json``; the message says why.
        """
        if self.run_problem is not None:
            raise NotAnOutputDir(self.run_problem)
        return self.run

    def require_plan(self) -> None:
        """Check that the run's rows and shards are known.

        Raises:
            NotAnOutputDir: no readable ``run.json``, or a run whose row count or shard size
                is unknown (a stream no worker has read to its end); the message says which.
        """
        if self.plan_problem is not None:
            raise NotAnOutputDir(self.plan_problem)

    @property
    def complete(self) -> bool:
        """Whether the run's shard count is known and every shard of it is done."""
        return is_complete(len(self.done), self.shards_total)

    @property
    def foreign(self) -> list[str]:
        """File names of the published shards that are not done ones of this run."""
        return [f.path.name for i, f in self.footers.items() if i not in self.done]

    @property
    def totals(self) -> Totals:
        """The done shards' totals, added up."""
        return add_totals(self.done)

    @property
    def rows_done(self) -> int:
        """Input rows the done shards cover (generated, skipped or failed)."""
        return sum(covered_rows(f) for f in self.done.values())

    @property
    def samples_per_row(self) -> int | None:
        """Samples generated per input row (``sampling.num_return_sequences``; 1 unrecorded);
        None where rows may set their own (``dataset.sampling_column``)."""
        config = self.run.get("config") or {}
        if (config.get("dataset") or {}).get("sampling_column"):
            return None
        return (config.get("sampling") or {}).get("num_return_sequences") or 1

    @property
    def status(self) -> str | None:
        """The workers' merged status (``STATUS_ORDER``); None without records."""
        statuses = {r.status for r in self.records}
        return next((s for s in STATUS_ORDER if s in statuses), None)

    @property
    def phases(self) -> dict[str, float] | None:
        """Seconds per phase summed over the workers (worker-seconds); None when none ended."""
        phases: dict[str, float] = {}
        for s in self._summaries():
            for name, seconds in s.phases.items():
                phases[name] = phases.get(name, 0.0) + seconds
        return phases or None

    @property
    def wall_seconds(self) -> float | None:
        """The longest worker's wall time; None when none recorded one."""
        walls = [s.wall_seconds for s in self._summaries() if s.wall_seconds is not None]
        return max(walls, default=None)

    @property
    def throughput(self) -> Throughput | None:
        """Rates of the workers' last runs added up (they ran side by side); None when none
        generated."""
        rows = tokens = 0.0
        for this in (s.this_run for s in self._summaries()):
            if this.generate_seconds > 0:
                rows += (this.rows + this.skipped) / this.generate_seconds
                tokens += this.completion_tokens / this.generate_seconds
        if not rows and not tokens:
            return None
        return Throughput(rows, tokens)

    def _summaries(self) -> list[WorkerSummary]:
        return [r.summary for r in self.records if r.summary is not None]


def _plan(
    run: dict[str, Any], records: list[WorkerRecord], path: Path
) -> tuple[int | None, int | None, int | None, str | None]:
    """(rows per shard, rows, shards, why the plan is unknown or None) of the run."""
    parts, config = run.get("fingerprint_parts") or {}, run.get("config") or {}
    per_shard = (parts.get("layout") or {}).get("rows_per_shard") or (
        config.get("output") or {}
    ).get("rows_per_shard")
    summaries = [r.summary for r in records if r.summary is not None]
    rows = next((s.rows_total for s in summaries if s.rows_total is not None), None)
    if rows is None:
        rows = (parts.get("data") or {}).get("rows")
    shards = next((s.shards_total for s in summaries if s.shards_total is not None), None)
    if shards is None and rows is not None and per_shard:
        shards = math.ceil(rows / per_shard)
    problem = None
    if rows is None and (config.get("dataset") or {}).get("streaming"):
        problem = (
            f"{path}: the dataset is streamed and no worker has read it to its end yet, so its "
            "row count is unknown; ask again when one has."
        )
    elif rows is None or not per_shard:
        problem = f"{path} does not record the row count and rows per shard."
    return per_shard, rows, shards, problem


def read_folder(out_dir: Path) -> FolderState:
    """Read an output folder once: ``run.json``, the worker records, every shard's footer.

    Never raises for what the folder lacks (see ``FolderState.run_problem`` and
    ``plan_problem``); a path that is no folder reads as an empty one without ``run.json``.
    """
    out_dir = Path(out_dir)
    try:
        run, run_problem = read_run_file(out_dir), None
    except NotAnOutputDir as e:
        run, run_problem = {}, str(e)
    records = read_workers(out_dir, run)
    per_shard, rows, shards, plan_problem = _plan(run, records, layout.run_file(out_dir))
    footers = read_footers(out_dir)
    done, mtimes = {}, {}
    for index, footer in footers.items():
        if footer.meta is None or (shards is not None and index >= shards):
            continue
        if run and footer.meta.get("fingerprint") != run["fingerprint"]:
            continue
        try:
            mtimes[index] = footer.path.stat().st_mtime
        except OSError:
            continue  # quarantined since it was listed
        done[index] = footer
    return FolderState(
        out_dir=out_dir,
        run=run,
        records=records,
        footers=footers,
        done=done,
        mtimes=mtimes,
        rows_per_shard=per_shard,
        rows_total=rows,
        shards_total=shards,
        run_problem=run_problem,
        plan_problem=run_problem or plan_problem,
    )


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
) -> WorkerSummary:
    """This worker's summary: the folder's totals (``read_folder``) plus its own numbers; writes
    its errors file.

    ``shards_total`` and ``rows_total`` are this worker's own (None for a stream not yet read
    to its end): it knows its data even before any record says so.

    Raises:
        OSError: the errors file cannot be written.
    """
    state = read_folder(out_dir)
    totals = state.totals
    generate = phases.get("generate", 0.0)
    return WorkerSummary(
        output_dir=str(out_dir),
        shards_total=shards_total,
        rows_total=rows_total,
        shards_done=len(state.done),
        shards_resumed=resumed,
        totals=totals,
        padding_waste=padding_waste(totals),
        errors_file=str(write_worker_errors(out_dir, state.done, rank, world_size)),
        this_run=ThisRun(
            **this_run.to_dict(),
            generate_seconds=generate,
            tokens_per_second=this_run.completion_tokens / generate if generate else 0.0,
        ),
        phases=phases,
        wall_seconds=wall,
    )
