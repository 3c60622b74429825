"""Everything a worker checks and sets up before the model weights load (``prepare``).

Invariant: every check that does not need the weights runs here, cheapest first, before anything
is written to the output folder but the run lock; a refused job leaves the folder as it was
(admission last), and the lock is released whenever ``prepare`` raises.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from batchgen.cluster.lock import RunLock, describe_holder
from batchgen.cluster.ranks import WorkerInfo, resolve_worker
from batchgen.config import JobConfig
from batchgen.config_checks import validate
from batchgen.engine import devices, tensor_parallel
from batchgen.engine.devices import Model
from batchgen.inputs import dataset, models, screen
from batchgen.inputs.sources import falls_back
from batchgen.job.admission import admit
from batchgen.job.session import Plan, Session
from batchgen.job.shard_inputs import ShardInputs
from batchgen.store import layout, manifest, writer
from batchgen.store.shards import Shard, plan_shards


@dataclass
class Prepared:
    """Everything known before the model weights load."""

    cfg: JobConfig  # converted, its sampling resolved for the model
    worker: WorkerInfo
    out_dir: Path
    lock: RunLock
    session: Session
    plan: Plan
    data: dataset.Table | dataset.Stream
    inputs: ShardInputs
    shards: list[Shard] | None  # None for a stream: its length is known at its end
    parts: dict
    dtype_why: str  # for the banner
    phases: dict[str, float] = field(default_factory=dict)


def prepare(cfg: JobConfig) -> Prepared:
    """Run every check that does not need the model weights, cheapest first; take the lock.

    Reads no rows into Python beyond what the whole-table checks need (``batchgen.inputs.screen``
    works in Arrow): shards are read, rendered and tokenized as the loop reaches them.

    Args:
        cfg: the config as ``finish_config`` finished it.

    Raises:
        BatchgenError: a bad setting, path, column, row or resume conflict, with the culprit named.
    """
    started = time.perf_counter()
    validate(cfg)
    writer.check_kept_columns(cfg.dataset.keep_columns)
    worker = resolve_worker(cfg.runner.rank, cfg.runner.world_size)
    device, dtype = devices.resolve_device_dtype(cfg.model, worker.local_rank)
    source = models.resolve_source(cfg.model)
    table = dataset.open_dataset(cfg.dataset, skip_bad_lines=cfg.runner.on_bad_row == "skip")
    streaming = isinstance(table, dataset.Stream)
    out_dir = writer.writable_dir(Path(cfg.output.dir))
    lock = RunLock(
        out_dir, layout.worker_lock_name(worker.rank, worker.world_size), cfg.runner.lease_seconds
    )
    earlier = lock.acquire()
    if earlier is not None:  # a killed or frozen run leaves no other trace the user would see
        print(
            f"batchgen: took over the run lock of an earlier run on this folder that died or "
            f"went silent past runner.lease_seconds ({describe_holder(earlier)})",
            flush=True,
        )
    try:
        log = layout.worker_engine_log(out_dir, worker.rank, worker.world_size)
        parallel = tensor_parallel.spec(cfg.model, cfg.runner, device)
        model = Model.open(cfg.model, source, device, dtype, parallel)
        session = Session(cfg, model, log_file=log)
        plan = session.plan()
        cfg = replace(cfg, sampling=plan.sampling)
        num_rows = cfg.dataset.limit if streaming else len(table)
        mixed = falls_back(cfg.dataset, table.dataset.column_names or [])
        parts = manifest.fingerprint_parts(
            cfg,
            plan.chat,
            dtype,
            num_rows,
            plan.output,
            plan.engine_kind,
            session.model.source.adapter,
            mixed,
        )
        if not streaming:
            screen.screen_table(cfg, table, session.model.tokenizer, plan.chat, plan.room)
        parts = admit(cfg, out_dir, lock, parts)  # last: a refused job writes nothing
        why = devices.dtype_reason(cfg.model, device, dtype)
        if parts["model"]["dtype"] != dtype:  # auto: the folder's run keeps its own dtype
            session.model.dtype = parts["model"]["dtype"]
            why = "auto: the dtype this folder's run was begun in"
        inputs = ShardInputs(
            None if streaming else table, plan, cfg.runner, session.model.tokenizer
        )
        return Prepared(
            cfg=cfg,
            worker=worker,
            out_dir=out_dir,
            lock=lock,
            session=session,
            plan=plan,
            data=table,
            inputs=inputs,
            shards=None if streaming else plan_shards(len(table), cfg.output.rows_per_shard),
            parts=parts,
            dtype_why=why,
            phases={"prepare": time.perf_counter() - started},
        )
    except BaseException:
        lock.release()
        raise
