"""A pool: one command, one worker process per device slot (``runner.devices``).

Invariant: to its user a pool is one job: one banner, one progress bar, one closing summary of
the folder (``read_folder``), one exit status. Each worker is an ordinary worker, rank i of N
over the folder's claims, pinned to its slot (``CUDA_VISIBLE_DEVICES``, its CPU threads) and
handed the config this process finished, pickled on its stdin, so nothing is converted twice
(``batchgen.job.pool_procs``, ``batchgen.job.pool_worker``). A worker's stderr goes to its log,
its counts come back on a pipe of their own, and only rank 0 prints its banner. Every stop
signal the command gets is acknowledged once and forwarded to each worker, which stops at its
next decoding step, finished rows kept, as any worker does. A worker that dies
is named at once (rank, devices, pid, signal or exit status, its last message) and the others
take its shards (its claims are judged gone at once on this host, ``cluster.liveness``); the
command still ends non-zero, naming it.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import sys
import time
from pathlib import Path

from batchgen.cluster.signals import ForwardStops
from batchgen.config import JobConfig, RunnerConfig
from batchgen.engine.placement import Placement
from batchgen.errors import BatchgenError, Stopped, WorkerDied
from batchgen.job.pool_procs import Worker, judge, start
from batchgen.progress import Progress
from batchgen.store import layout
from batchgen.store.folder import read_folder
from batchgen.store.summary import (
    ThisRun,
    WorkerSummary,
    format_summary,
    padding_waste,
    write_worker_errors,
)
from batchgen.store.writer import writable_dir

# Seconds between looks at the workers (ended?) and redraws of the bar.
POLL_SECONDS = 0.5


def _lines(w: Worker, fd: int, data: bytes) -> list[str]:
    """The whole lines of ``data`` read from ``fd``, the rest kept for the next read."""
    *lines, w.pending[fd] = (w.pending[fd] + data).split(b"\n")
    return [x.decode(errors="replace") for x in lines]


def _say(bar: Progress | None, line: str, file=sys.stderr) -> None:
    """Print ``line`` above the bar, if there is one yet."""
    if bar is not None:
        bar.write(line, file)
    else:
        print(line, file=file, flush=True)


def _takeover(workers: list[Worker], runner: RunnerConfig) -> str:
    """What becomes of a dead worker's shards, for the line that names it."""
    if not any(w.ended is None for w in workers):
        return ""
    if not runner.steal:
        return "; runner.steal=false: its shards wait for a rerun"
    return "; the other workers take its shards"


def _watch(workers: list[Worker], forward: ForwardStops, runner: RunnerConfig) -> None:
    """Until every worker has ended: pass on rank 0's banner and the workers' other lines,
    draw one bar over their counts, name a worker that dies at once."""
    bar: Progress | None = None
    sel = selectors.DefaultSelector()
    for w in workers:
        sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        for fd in w.pending:
            sel.register(fd, selectors.EVENT_READ, w)
        w.pending[w.proc.stdout.fileno()] = b""
    # Until every worker has ended, then until their pipes are drained (a process they started
    # may hold a pipe open longer: not waited for).
    while any(w.ended is None for w in workers) or sel.get_map():
        timeout = POLL_SECONDS if any(w.ended is None for w in workers) else 0
        events = sel.select(timeout)
        for key, _ in events:
            w, fd = key.data, key.fd
            data = os.read(fd, 65536)
            if not data:
                sel.unregister(key.fileobj)
                continue
            for line in _lines(w, fd, data):
                if fd != w.proc.stdout.fileno():
                    w.counts = json.loads(line)
                else:
                    _say(bar, line, sys.stdout)
        if not events and all(w.ended is not None for w in workers):
            break
        for w in workers:
            if w.ended is None and w.proc.poll() is not None:
                judge(w, forward.signum)
                if not w.ok:
                    _say(bar, f"batchgen: {w.name()} {w.ended}{_takeover(workers, runner)}")
        counted = [w.counts for w in workers if w.counts is not None]
        # Once every worker has reported its share (or ended), their shares are the total.
        if bar is None and counted and all(w.counts or w.ended for w in workers):
            shares = [c["share"] for c in counted]
            total = None if None in shares else sum(shares)
            bar = Progress(total, runner.progress and total != 0)
        if bar is not None:
            bar.show(counted)
    sel.close()
    for w in workers:
        for fd in w.pending:
            if fd != w.proc.stdout.fileno():
                os.close(fd)
        w.proc.stdout.close()
        w.proc.stdin.close()
    if bar is not None:
        bar.close()


def _summary(out: Path, workers: list[Worker], world: int, wall: float) -> WorkerSummary:
    """The job's closing summary: the folder's totals, the workers' own numbers added up (the
    slowest one's phases and generating time), and how each worker ended."""
    state = read_folder(out)
    by_pid = {r.pid: r for r in state.records if r.world_size == world and r.summary is not None}
    ran = {w.rank: by_pid[w.proc.pid].summary for w in workers if w.proc.pid in by_pid}
    this, phases = ThisRun(), {}
    for s in ran.values():
        this.add(s.this_run)
        this.generate_seconds = max(this.generate_seconds, s.this_run.generate_seconds)
        for name, seconds in s.phases.items():
            phases[name] = max(phases.get(name, 0.0), seconds)
    if this.generate_seconds:
        this.tokens_per_second = this.completion_tokens / this.generate_seconds
    for w in workers:
        if w.rank not in ran and state.run_problem is None:  # it died before writing its own
            write_worker_errors(out, state.done, w.rank, world)
    totals = state.totals
    return WorkerSummary(
        output_dir=str(out),
        shards_total=state.shards_total,
        rows_total=state.rows_total,
        shards_done=len(state.done),
        shards_resumed=sum(s.shards_resumed for s in ran.values()),
        totals=totals,
        padding_waste=padding_waste(totals),
        errors_file=layout.pool_files(out, world, ".errors"),
        this_run=this,
        phases=phases,
        wall_seconds=wall,
        already_complete=len(ran) == len(workers) and all(s.already_complete for s in ran.values()),
        tuning=ran[0].tuning if 0 in ran else None,
        workers=[
            {
                "rank": w.rank,
                "devices": w.where,
                "pid": w.proc.pid,
                "ended": w.ended,
                "rows": ran[w.rank].this_run.rows if w.rank in ran else None,
            }
            for w in workers
        ],
    )


def _heading(p: Placement, out: Path) -> str:
    n = len(p.slots)
    each, group = p.slots[0].threads, p.slots[0].group
    tp = f", each a tensor-parallel group of {group} processes" if group > 1 else ""
    on = (
        f"on the CPU{tp}, {each} thread{'s' * (each != 1)} each of {p.cores} cores"
        if p.kind == "cpu"
        else f"one per {'group of ' * (group > 1)}CUDA device{'s' * (group > 1)} "
        f"({'; '.join(s.describe(p.kind) for s in p.slots)})"
    )
    cut = f" (of {p.asked} asked: the job has {n} shards)" if p.asked else ""
    return (
        f"batchgen: {n} workers{cut} {on}, ranks 0-{n - 1} of {n}; "
        f"their logs: {layout.pool_files(out, n, '.log')}"
    )


def run_pool(cfg: JobConfig, placement: Placement, started: float) -> WorkerSummary:
    """Run the job as one worker process per slot of ``placement``; print one summary.

    Args:
        cfg: the finished config (``batchgen.job.run.finish_config``).
        placement: two or more slots.
        started: when the job started (``time.perf_counter``).

    Raises:
        ConfigError: ``output.dir`` cannot be written.
        BatchgenError: every worker refused the job with the same message (a bad row, model,
            resume conflict): that message, once.
        Stopped: a signal stopped the workers (exit 128 + its number); the folder is clean.
        WorkerDied: a worker died; the message names each, the others took its shards.
    """
    out = writable_dir(Path(cfg.output.dir))
    world = len(placement.slots)
    layout.workers_dir(out).mkdir(parents=True, exist_ok=True)
    print(_heading(placement, out), flush=True)
    workers: list[Worker] = []
    # Workers run in sessions of their own, so a terminal's Ctrl-C reaches them only through
    # the pool, and only once (a second one interrupts a worker at once).
    with ForwardStops() as forward:
        for rank, slot in enumerate(placement.slots):
            if forward.signum is None:  # a stop before every worker started: start no more
                workers.append(start(cfg, slot, placement.kind, rank, world, out))
                forward.add(workers[-1].proc)
        _watch(workers, forward, cfg.runner)
    died = [w for w in workers if not w.ok]
    said = {w.said for w in died}
    if len(died) == world and len(said) == 1 and all(w.proc.returncode == 2 for w in died):
        raise BatchgenError(said.pop())  # each refused the job alike: say it once
    summary = _summary(out, workers, world, time.perf_counter() - started)
    print(format_summary(summary), flush=True)
    lost = "; ".join(f"{w.name()} {w.ended}" for w in died)
    if forward.signum is not None:
        done = f"{summary.shards_done}/{summary.shards_total or '?'}"
        raise Stopped(
            f"stopped by {signal.Signals(forward.signum).name}: {done} shards are complete and "
            "intact, and the finished rows of the shards in progress kept. Rerun the same "
            "command to resume." + (f" Before that, {lost}." if lost else ""),
            128 + forward.signum,
        )
    if died:
        whose = "its" if len(died) == 1 else "their"
        fate = (
            f"the other workers finished {whose} shards: the output is complete"
            if summary.complete
            else "rerun the same command to finish the output"
        )
        logs = layout.pool_files(out, world, ".log")
        raise WorkerDied(f"{lost}; {fate} ({out}). What the workers printed: {logs}", summary)
    return summary
