"""The job, in call order: check, load data, render prompts, resume check, generate, summarize."""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from batchgen import data, manifest, models, prompts
from batchgen.batching import BatchRunner, Interrupted, choose_engine
from batchgen.config import JobConfig, validate
from batchgen.continuous import ContinuousEngine
from batchgen.engine import Engine
from batchgen.errors import BatchgenError, ConfigError
from batchgen.lock import RunLock
from batchgen.progress import Progress, Totals, format_summary
from batchgen.sharding import Shard, plan_shards
from batchgen.signals import StopRequested
from batchgen.summary import summarize, write_run_file
from batchgen.verify import OTHER_CONFIG, quarantine, reason_kind, verify_shard
from batchgen.worker import ShardLoop, ShardWork
from batchgen.workers import WorkerInfo, resolve_worker
from batchgen.writer import finished_shards, shard_metadata

# Errors writing the output folder that the user fixes outside batchgen (space, permissions).
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


class Stopped(BatchgenError):
    """The run stopped on a signal after leaving its folder clean; exit with ``exit_code``."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Prepared:
    """Everything known before the model weights load."""

    cfg: JobConfig
    worker: WorkerInfo
    out_dir: Path
    lock: RunLock
    source: models.ModelSource
    model_config: object
    tokenizer: object
    device: str
    dtype: str
    records: list[prompts.PromptRecord]
    skipped: list[prompts.Skipped]
    shards: list[Shard]
    done: set[int]
    parts: dict
    engine: str
    kept_types: dict = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)


def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output.dir={str(path)!r} cannot be created: {e.strerror}.") from e
    probe = path / f".write-test-{os.getpid()}"
    try:  # os.access says yes to root on a read-only mount; a real write tells the truth
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output.dir={str(path)!r} is not writable: {e.strerror}.") from e
    return path


def _verify_finished(out_dir: Path, parts: dict, samples: int) -> set[int]:
    """Finished shards that can be trusted; damaged ones are moved aside to be generated again.

    Raises:
        ResumeError: a readable shard of another config.
    """
    fp = manifest.fingerprint(parts)
    done = set()
    for index, path in sorted(finished_shards(out_dir).items()):
        reason = verify_shard(path, fp, None, samples)
        if reason is None:
            done.add(index)
        elif reason_kind(reason) == OTHER_CONFIG:
            recorded = shard_metadata(path).get("fingerprint_parts", {})
            raise manifest.refuse(out_dir, path.name, recorded, parts)
        else:
            moved = quarantine(path)
            print(
                f"batchgen: {path.name} is damaged ({reason}); moved to {moved.name}, "
                "generating it again",
                flush=True,
            )
    return done


def prepare(cfg: JobConfig) -> Prepared:
    """Run every check that does not need the model weights, cheapest first; take the lock.

    Raises:
        BatchgenError: a bad setting, path, column, row or resume conflict, with the culprit named.
    """
    started = time.perf_counter()
    validate(cfg)
    worker = resolve_worker(cfg.runner.rank, cfg.runner.world_size)
    source = models.resolve_source(cfg.model)
    rows = data.load_rows(cfg.dataset)
    out_dir = _writable_dir(Path(cfg.output.dir))
    lock = RunLock(out_dir, f"run-rank{worker.rank}-of{worker.world_size}")
    lock.acquire()
    try:
        source = models.convert_gguf(source)
        model_config, tokenizer = models.load_config_and_tokenizer(source, cfg.model)
        chat = prompts.uses_chat_template(cfg.dataset, tokenizer)
        records, bad = prompts.build_records(rows, cfg.dataset, tokenizer, chat)
        bad = prompts.apply_bad_row_policy(bad, cfg.runner.on_bad_row)
        device, dtype = models.resolve_device_dtype(cfg.model)
        if device == "cuda" and worker.local_rank is not None:
            device = f"cuda:{worker.local_rank}"  # torchrun/srun: one GPU per local rank
        digest = manifest.data_digest(records)
        parts = manifest.fingerprint_parts(cfg, chat, dtype, digest, len(rows))
        manifest.check_run_file(out_dir, parts)
        context = models.context_length(model_config, tokenizer, cfg.model)
        room = context - cfg.sampling.max_new_tokens if context else None
        records, too_long = prompts.apply_length_policy(
            records, room, cfg.runner.on_long_prompt, tokenizer
        )
        done = _verify_finished(out_dir, parts, cfg.sampling.num_return_sequences)
        encoder_decoder = bool(getattr(model_config, "is_encoder_decoder", False))
        return Prepared(
            cfg=cfg,
            worker=worker,
            out_dir=out_dir,
            lock=lock,
            source=source,
            model_config=model_config,
            tokenizer=tokenizer,
            device=device,
            dtype=dtype,
            records=records,
            skipped=sorted(bad + too_long, key=lambda s: s.index),
            shards=plan_shards(len(rows), cfg.output.rows_per_shard),
            done=done,
            parts=parts,
            engine=choose_engine(cfg.runner, cfg.sampling, encoder_decoder, device),
            kept_types=rows.kept_types,
            phases={"tokenize": time.perf_counter() - started},
        )
    except BaseException:
        lock.release()
        raise


def _run_metadata(p: Prepared) -> dict:
    return {
        "fingerprint": manifest.fingerprint(p.parts),
        "fingerprint_parts": p.parts,
        "config": p.cfg.to_dict(),
        "versions": manifest.versions(),
        "device": p.device,
        "engine": p.engine,
    }


def _work(p: Prepared) -> dict[int, ShardWork]:
    """The unfinished shards with their records and skipped rows."""
    per = p.cfg.output.rows_per_shard
    work = {s.index: ShardWork(s, [], []) for s in p.shards if s.index not in p.done}
    for r in p.records:
        if r.index // per in work:
            work[r.index // per].records.append(r)
    for s in p.skipped:
        if s.index // per in work:
            work[s.index // per].skipped.append(s)
    return work


def _set_threads(threads: int | None) -> None:
    # Several workers on one node each taking every core's worth of OpenMP threads spin against
    # each other: seen at 0.4 tokens/s for two Slurm tasks on two cores, 150x slower.
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    threads = threads or (int(slurm) if slurm.isdigit() else None)
    if threads:
        import torch

        torch.set_num_threads(threads)


def _engine(p: Prepared):
    _set_threads(p.cfg.runner.threads)
    started = time.perf_counter()
    model = models.load_model(p.source, p.model_config, p.cfg.model, p.device, p.dtype)
    p.phases["load"] = time.perf_counter() - started
    cls = ContinuousEngine if p.engine == "continuous" else Engine
    runner = p.cfg.runner
    return cls(
        model,
        p.tokenizer,
        p.cfg.sampling,
        compile=runner.compile,
        prefill_tokens=runner.prefill_tokens,
    )


def generate(p: Prepared) -> dict:
    """Load the model, generate this worker's shards (and stolen ones), return the summary."""
    started = time.perf_counter()
    meta = _run_metadata(p)
    write_run_file(p.out_dir, meta, "running")
    work = _work(p)
    this_run, stop_signal = None, None
    if work:
        engine = _engine(p)
        r = p.cfg.runner
        progress = Progress(sum(w.shard.stop - w.shard.start for w in work.values()), r.progress)
        with StopRequested() as stop:
            batcher = BatchRunner(engine, r, p.cfg.sampling, p.cfg.seed, stop=stop.event)
            loop = ShardLoop(
                p.out_dir,
                p.worker,
                batcher,
                meta,
                p.kept_types,
                p.cfg.output.compression,
                r.lease_seconds,
                r.steal,
                progress,
            )
            try:
                loop.run(work)
            except Interrupted:
                stop_signal = stop
            finally:
                progress.close()
                this_run = loop.result
        p.phases["generate"] = this_run.generate_seconds
        p.phases["write"] = this_run.write_seconds
    summary = summarize(
        p.out_dir,
        len(p.shards),
        len(p.done),
        this_run.totals if this_run else Totals(),
        p.phases,
        time.perf_counter() - started,
    )
    complete = summary["shards_done"] == len(p.shards)
    status = "complete" if complete else "interrupted" if stop_signal else "incomplete"
    write_run_file(p.out_dir, meta, status, summary)
    if stop_signal is not None:
        print(format_summary(summary), flush=True)
        stop_signal.chain()
        raise Stopped(
            f"stopped by {stop_signal.name}: {summary['shards_done']}/{len(p.shards)} shards "
            f"are complete and intact. Rerun the same command to resume.",
            stop_signal.exit_code,
        )
    return summary


def _write_error(out_dir: Path, e: OSError) -> BatchgenError:
    why = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
    return BatchgenError(
        f"writing to output.dir={str(out_dir)!r} failed: {why} ({e.filename or ''}). Every "
        "finished shard is intact; fix that and rerun the same command to resume."
    )


def run(cfg: JobConfig) -> dict:
    """Run a whole job: prepare (all checks), generate, print and return the summary."""
    started = time.perf_counter()
    prepared = prepare(cfg)
    try:
        summary = generate(prepared)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise _write_error(prepared.out_dir, e) from e
    finally:
        prepared.lock.release()
    summary["wall_seconds"] = time.perf_counter() - started
    print(format_summary(summary), flush=True)
    return summary
