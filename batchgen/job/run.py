"""The way into a job: finish its config once, place its workers, run them.

Invariant: ``run`` is the one way into a job (the command line and ``batchgen.run`` alike), and
it finishes the config once (``finish_config``): then either this process is the job's one
worker (``batchgen.job.worker``), or ``runner.devices`` asks for several and a pool
(``batchgen.job.pool``) runs one process per device slot, each handed the finished config.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

from batchgen.cluster.ranks import SINGLE, resolve_worker
from batchgen.config import JobConfig
from batchgen.config_checks import validate
from batchgen.conversion import convert
from batchgen.engine.placement import plan_workers
from batchgen.inputs import dataset
from batchgen.job import pool
from batchgen.job.worker import run_worker
from batchgen.store.naming import default_output_dir
from batchgen.store.summary import WorkerSummary


def finish_config(cfg: JobConfig) -> JobConfig:
    """The config as the job runs it: the default output folder named when ``output.dir`` is
    unset (``naming.default_output_dir``, as the command line names it), then converted once
    (``conversion.convert``), whichever way it came: the command line, ``compose`` or built
    by hand.

    Raises:
        ConfigError: a value the conversion refuses.
    """
    if cfg.output.dir is None:
        named = default_output_dir(cfg.model, cfg.dataset, cfg.sampling)
        cfg = replace(cfg, output=replace(cfg.output, dir=named))
    return convert(cfg)


def _shard_count(cfg: JobConfig) -> int | None:
    """The job's shards, from its data opened as its workers open it; None for a stream.

    Raises:
        DataError: as ``dataset.open_dataset`` does.
    """
    data = dataset.open_dataset(cfg.dataset, skip_bad_lines=cfg.runner.on_bad_row == "skip")
    if isinstance(data, dataset.Stream):
        return None
    return math.ceil(len(data) / cfg.output.rows_per_shard)


def run(cfg: JobConfig) -> WorkerSummary:
    """Run a whole job and return its summary: in this process, or with ``runner.devices`` in
    one worker process per device slot (``batchgen.job.pool``), never more than it has shards.

    Raises:
        BatchgenError: a bad setting, path, column, row or resume conflict, with the culprit
            named; ``Stopped`` on a signal; ``WorkerDied`` when a worker of the pool died.
    """
    started = time.perf_counter()
    cfg = finish_config(cfg)
    validate(cfg)
    r = cfg.runner
    # A device map spreads one model over every device: one worker, owning them all.
    launched = resolve_worker(r.rank, r.world_size).source != SINGLE or bool(cfg.model.device_map)
    tp = cfg.model.tp_size
    placement = plan_workers(r.devices, cfg.model.device, r.threads, launched, group=tp)
    if len(placement.slots) > 1:
        most = _shard_count(cfg)
        placement = plan_workers(r.devices, cfg.model.device, r.threads, launched, most, group=tp)
    if len(placement.slots) > 1:
        return pool.run_pool(cfg, placement, started)
    slot = placement.slots[0]
    if slot.group > 1:  # this process leads its tensor-parallel group, on the slot's devices
        devices = list(slot.indices) or slot.group
        cfg = replace(cfg, runner=replace(r, devices=devices, threads=slot.threads))
    elif slot.indices:  # runner.devices=[3]: this process, on that device
        cfg = replace(cfg, model=replace(cfg.model, device=f"cuda:{slot.indices[0]}"))
    return run_worker(cfg, started)
