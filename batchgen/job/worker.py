"""One worker's job, in call order: prepare (every check before the weights load,
``batchgen.job.prepare``), generate, summarize.

Invariant: a worker runs the config as it was finished (``batchgen.job.run.finish_config``)
and converts nothing again, whether it is the job's one worker or one of a pool's
(``batchgen.job.pool_worker``); it takes its rank from the config or its launcher.
"""

from __future__ import annotations

import errno
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from batchgen.cluster import claims
from batchgen.cluster.ranks import assign_shards
from batchgen.cluster.signals import StopRequested
from batchgen.cluster.watchdog import Watchdog
from batchgen.config import JobConfig
from batchgen.engine import tensor_parallel, vllm_engine
from batchgen.errors import BatchgenError, Interrupted, Stopped
from batchgen.inputs.openai_batch import ID_COLUMN, SAMPLING_COLUMN
from batchgen.job.prepare import Prepared, prepare
from batchgen.job.shard_loop import LoopSettings, ShardLoop
from batchgen.progress import Progress, describe_row_sampling, describe_sampling
from batchgen.store import checkpoints, layout, manifest, writer
from batchgen.store.folder import summarize
from batchgen.store.records import write_worker_file
from batchgen.store.summary import WorkerSummary, format_summary
from batchgen.store.writer import finished_shards

# Errors writing the output folder that the user fixes outside batchgen (space, permissions).
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


@dataclass(frozen=True)
class Console:
    """What a worker shows of itself: all of it when it is the job's one worker. A pool's worker
    leaves the bar, the closing summary and (but rank 0) the banner to its pool, and reports its
    counts to it (``Progress``'s ``report``)."""

    banner: bool = True
    summary: bool = True
    report: Callable[[dict], None] | None = None


def _run_metadata(p: Prepared) -> dict:
    return {
        "fingerprint": manifest.fingerprint(p.parts),
        "fingerprint_parts": p.parts,
        "config": p.cfg.to_dict(),
        "versions": manifest.versions(),
        "device": p.session.model.device,
        "engine": p.plan.engine_kind,
    }


def _watchdog(p: Prepared, meta: dict) -> Watchdog:
    """The stall watchdog; giving up, the worker records the stall and drops its run lock."""
    w = p.worker
    watchdog = Watchdog(p.cfg.runner.stall_seconds, w.rank)
    watchdog.on_stall(lambda: write_worker_file(p.out_dir, meta, w.rank, w.world_size, "stalled"))
    watchdog.on_stall(p.lock.release)
    return watchdog


def _loop(p: Prepared, meta: dict, progress: Progress, published: set[int]) -> ShardLoop:
    r = p.cfg.runner
    settings = LoopSettings(
        kept_types=p.data.kept_types,
        compression=p.cfg.output.compression,
        lease_seconds=r.lease_seconds,
        # A stream has no random access: a stealer could not read another rank's shard.
        steal=r.steal and p.shards is not None,
    )
    return ShardLoop(
        p.out_dir,
        p.worker,
        p.inputs,
        p.session,
        p.plan,
        meta,
        settings,
        progress,
        published,
        _watchdog(p, meta),
    )


def _layout(p: Prepared, rows_seen: int | None) -> tuple[int | None, int | None]:
    """(shards, rows) of the whole job; a stream's are known once this worker read it all."""
    if p.shards is not None:
        return len(p.shards), len(p.data)
    if rows_seen is None:
        return None, None
    return math.ceil(rows_seen / p.cfg.output.rows_per_shard), rows_seen


def banner(p: Prepared, published: set[int]) -> str:
    """One line before the model loads: what runs where, on how much, into which folder."""
    m, w = p.cfg.model, p.worker
    if p.shards is None:
        size = f"a stream of {p.cfg.dataset.limit or 'unknown'} rows"
    else:
        n = len(p.shards)
        size = f"{len(p.data):,} rows in {n:,} shard{'s' * (n != 1)} ({len(published):,} finished)"
    where = f", worker {w.rank} of {w.world_size}" if w.world_size > 1 else ""
    engine = f"{p.plan.engine_kind} engine"
    if p.plan.engine_kind != vllm_engine.KIND and vllm_engine.installed():
        engine += " (vllm is installed here: runner.engine=vllm)"
    unmerged = "" if m.merge_adapter else " unmerged"
    weights = [
        m.quantization,
        f"adapter {m.adapter}{unmerged}" if m.adapter else None,
        f"device_map {m.device_map}" if m.device_map is not None else None,
        _tensor_parallel(p.session.model.parallel),
    ]
    extras = "".join(f", {w}" for w in weights if w)
    return (
        f"batchgen: {m.name_or_path}{f' ({m.gguf_file})' if m.gguf_file else ''} on "
        f"{p.session.model.device} in {p.session.model.dtype} ({p.dtype_why}){extras}, {engine}; "
        f"{size}{where}; output {p.out_dir}\n"
        f"batchgen: {_sampling_line(p.cfg)}"
    )


def _tensor_parallel(group: tensor_parallel.Spec | None) -> str | None:
    """The banner's words for a tensor-parallel group: ``tensor parallel over cpu x2``."""
    if group is None:
        return None
    same = len(set(group.devices)) == 1
    over = f"{group.devices[0]} x{group.size}" if same else ",".join(group.devices)
    return f"tensor parallel over {over}"


def _sampling_line(cfg: JobConfig) -> str:
    """The banner's sampling line: the run's settings, or the rows' own over them."""
    d = cfg.dataset
    if not d.sampling_column:
        return describe_sampling(cfg.sampling)
    # The openai_batch preset's columns: each row's settings are a request body's.
    requests = (d.id_column, d.sampling_column) == (ID_COLUMN, SAMPLING_COLUMN)
    return describe_row_sampling(cfg.sampling, d.sampling_column, requests)


def _tidy(p: Prepared, complete: bool) -> None:
    """Remove what dead or frozen writers left (by age, as leases judge: never by pid, which
    means nothing across containers); once every shard is published, the claims too."""
    lease = p.cfg.runner.lease_seconds
    writer.remove_abandoned(p.out_dir, lease)
    writer.remove_abandoned(layout.meta_dir(p.out_dir), lease)
    writer.remove_abandoned(layout.claims_dir(p.out_dir), lease)
    writer.remove_abandoned(layout.workers_dir(p.out_dir), lease)
    if complete:
        claims.clear(p.out_dir)
        checkpoints.clear(p.out_dir)


def generate(p: Prepared, console: Console) -> WorkerSummary:
    """Generate this worker's shards (and stolen ones), return the summary.

    The model loads when the first shard needs generating.
    """
    started = time.perf_counter()
    meta = _run_metadata(p)
    w = p.worker
    write_worker_file(p.out_dir, meta, w.rank, w.world_size, "running")
    _tidy(p, complete=False)
    published = set(finished_shards(p.out_dir))
    if console.banner:
        print(banner(p, published), flush=True)
    todo = None
    if p.shards is not None:  # this worker's share: it steals others' shards only when idle
        mine = set(assign_shards([s.index for s in p.shards], w.rank, w.world_size))
        todo = sum(s.stop - s.start for s in p.shards if s.index in mine - published)
    enabled = p.cfg.runner.progress and todo != 0
    progress = Progress(todo, enabled, p.plan.row_tokens, report=console.report)
    stop_signal = None
    with StopRequested() as stop:
        p.session.stop = stop.event
        loop = _loop(p, meta, progress, published)
        try:
            if p.shards is None:
                loop.run_stream(p.data, p.cfg.output.rows_per_shard)
            else:
                loop.run(p.shards)
        except Interrupted:
            stop_signal = stop
        finally:
            progress.close()
    this_run = loop.result
    batcher = p.session.batcher
    if batcher is not None:
        p.phases["load"] = p.session.load_seconds
    p.phases.update(
        tokenize=this_run.tokenize_seconds,
        generate=this_run.generate_seconds,
        write=this_run.write_seconds,
    )
    total, rows = _layout(p, None if stop_signal else this_run.rows_seen)
    elapsed = time.perf_counter() - started
    summary = summarize(
        p.out_dir,
        w.rank,
        w.world_size,
        total,
        rows,
        this_run.resumed,
        this_run.totals,
        p.phases,
        elapsed,
    )
    complete = summary.complete
    summary.already_complete = complete and len(published) == total and batcher is None
    status = "complete" if complete else "interrupted" if stop_signal else "incomplete"
    if batcher is not None and batcher.tuner is not None:  # what it ran with, and why
        summary.tuning = batcher.choices()
        meta["engine"] = summary.tuning["engine"]
    write_worker_file(p.out_dir, meta, w.rank, w.world_size, status, summary)
    _tidy(p, complete)
    if stop_signal is not None:
        if console.summary:
            print(format_summary(summary), flush=True)
        stop_signal.chain()
        done = summary.shards_done
        of = f"/{len(p.shards)}" if p.shards is not None else ""
        kept = this_run.kept_rows
        raise Stopped(
            f"stopped by {stop_signal.name}: {done}{of} shards are complete and intact, and "
            f"{kept} finished row{'' if kept == 1 else 's'} of the shard in progress kept. "
            "Rerun the same command to resume.",
            stop_signal.exit_code,
        )
    return summary


def _write_error(out_dir: Path, e: OSError) -> BatchgenError:
    why = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
    return BatchgenError(
        f"writing to output.dir={str(out_dir)!r} failed: {why} ({e.filename or ''}). Every "
        "finished shard is intact; fix that and rerun the same command to resume."
    )


def run_worker(cfg: JobConfig, started: float, console: Console = Console()) -> WorkerSummary:
    """Run the job as one of its workers: prepare (all checks), generate, print (as ``console``
    says) and return the summary.

    Args:
        cfg: the config as ``finish_config`` finished it.
        started: when the job started (``time.perf_counter``), for its wall time.
        console: what this worker prints and reports.

    Raises:
        BatchgenError: as ``prepare`` and ``generate`` do; ``Stopped`` on a signal.
    """
    prepared = prepare(cfg)
    try:
        summary = generate(prepared, console)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise _write_error(prepared.out_dir, e) from e
    finally:
        prepared.session.close()
        prepared.lock.release()
    summary.wall_seconds = time.perf_counter() - started
    if console.summary:
        print(format_summary(summary), flush=True)
    return summary
