"""The job, in call order: check, load data, render prompts, resume check, generate, write."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from batchgen import data, manifest, models, prompts
from batchgen.batching import BatchRunner, choose_engine
from batchgen.config import JobConfig, validate
from batchgen.continuous import ContinuousEngine
from batchgen.engine import Engine
from batchgen.errors import ConfigError
from batchgen.progress import Progress, Totals, format_summary
from batchgen.sharding import Shard, plan_shards
from batchgen.writer import output_schema, shard_metadata, write_json_atomic, write_shard


@dataclass
class Prepared:
    """Everything known before the model weights load."""

    cfg: JobConfig
    out_dir: Path
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


def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output.dir={str(path)!r} cannot be created: {e.strerror}.") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"output.dir={str(path)!r} is not writable by this user.")
    return path


def prepare(cfg: JobConfig) -> Prepared:
    """Run every check that does not need the model weights, cheapest first.

    Raises:
        BatchgenError: a bad setting, path, column, row or resume conflict, with the culprit named.
    """
    validate(cfg)
    source = models.resolve_source(cfg.model)
    rows = data.load_rows(cfg.dataset)
    out_dir = _writable_dir(Path(cfg.output.dir))
    source = models.convert_gguf(source)
    model_config, tokenizer = models.load_config_and_tokenizer(source, cfg.model)
    chat = prompts.uses_chat_template(cfg.dataset, tokenizer)
    records, bad = prompts.build_records(rows, cfg.dataset, tokenizer, chat)
    bad = prompts.apply_bad_row_policy(bad, cfg.runner.on_bad_row)
    device, dtype = models.resolve_device_dtype(cfg.model)
    digest = manifest.data_digest(records)
    parts = manifest.fingerprint_parts(cfg, chat, dtype, digest, len(records))
    done = manifest.check_resume(out_dir, parts)
    context = models.context_length(model_config, tokenizer, cfg.model)
    room = context - cfg.sampling.max_new_tokens if context else None
    records, too_long = prompts.apply_length_policy(
        records, room, cfg.runner.on_long_prompt, tokenizer
    )
    skipped = sorted(bad + too_long, key=lambda s: s.index)
    encoder_decoder = bool(getattr(model_config, "is_encoder_decoder", False))
    return Prepared(
        cfg=cfg,
        out_dir=out_dir,
        source=source,
        model_config=model_config,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        records=records,
        skipped=skipped,
        shards=plan_shards(len(rows), cfg.output.rows_per_shard),
        done=done,
        parts=parts,
        engine=choose_engine(cfg.runner, cfg.sampling, encoder_decoder, device),
        kept_types=rows.kept_types,
    )


def _shard_rows(batcher: BatchRunner, records, progress: Progress):
    """Generate one shard; returns its output rows (row order, then sample order) and totals."""
    results, failed = batcher.run(records, progress.update)
    totals = Totals(failed=len(failed))
    by_index = {r.index: r for r in records}
    out = []
    for index in sorted(results):
        record, outs = by_index[index], results[index]
        totals.rows += 1
        totals.prompt_tokens += len(record.token_ids)
        for k, s in enumerate(outs):
            totals.samples += 1
            totals.completion_tokens += s.completion_tokens
            totals.finish_reasons[s.finish_reason] = (
                totals.finish_reasons.get(s.finish_reason, 0) + 1
            )
            out.append(
                {
                    "id": record.id,
                    "sample_index": k,
                    "prompt": record.text,
                    "response": s.text,
                    "finish_reason": s.finish_reason,
                    "prompt_tokens": len(record.token_ids),
                    "completion_tokens": s.completion_tokens,
                    **record.kept,
                }
            )
    return out, totals, failed


def _run_metadata(p: Prepared) -> dict:
    return {
        "fingerprint": manifest.fingerprint(p.parts),
        "fingerprint_parts": p.parts,
        "config": p.cfg.to_dict(),
        "versions": manifest.versions(),
        "device": p.device,
    }


def generate(p: Prepared) -> dict:
    """Load the model, generate every unfinished shard, and return the run summary."""
    t0 = time.perf_counter()
    meta = _run_metadata(p)
    pending = [s for s in p.shards if s.index not in p.done]
    write_json_atomic(p.out_dir / manifest.RUN_FILE, {**meta, "status": "running"})
    by_shard: dict[int, list] = {s.index: [] for s in pending}
    rows_per_shard = p.cfg.output.rows_per_shard
    for r in p.records:
        by_shard.get(r.index // rows_per_shard, []).append(r)
    skipped_by_shard: dict[int, list] = {}
    for s in p.skipped:
        skipped_by_shard.setdefault(s.index // rows_per_shard, []).append(s)
    this_run = Totals()
    gen_seconds = 0.0
    if pending:
        model = models.load_model(p.source, p.model_config, p.cfg.model, p.device, p.dtype)
        if p.engine == "continuous":
            engine = ContinuousEngine(model, p.tokenizer, p.cfg.sampling)
        else:
            engine = Engine(model, p.tokenizer, p.cfg.sampling, compile=p.cfg.runner.compile)
        batcher = BatchRunner(engine, p.cfg.runner, p.cfg.sampling, p.cfg.seed)
        progress = Progress(sum(s.stop - s.start for s in pending), p.cfg.runner.progress)
        for shard in pending:
            started = time.perf_counter()
            rows, totals, failed = _shard_rows(batcher, by_shard[shard.index], progress)
            gen_seconds += time.perf_counter() - started
            skipped = skipped_by_shard.get(shard.index, [])
            totals.skipped = len(skipped)
            progress.update(len(skipped), 0)
            shard_meta = {
                **meta,
                "shard": {
                    "index": shard.index,
                    "start": shard.start,
                    "stop": shard.stop,
                    "totals": totals.to_dict(),
                    "skipped": [{"id": s.id, "reason": s.reason} for s in skipped],
                    "failed": [{"id": s.id, "reason": s.reason} for s in failed],
                },
            }
            schema = output_schema(p.kept_types, shard_meta)
            write_shard(p.out_dir, shard.name, rows, schema, p.cfg.output.compression)
            this_run.add(totals)
        progress.close()
    return _summarize(p, meta, this_run, gen_seconds, time.perf_counter() - t0, len(pending))


def _summarize(
    p: Prepared,
    meta: dict,
    this_run: Totals,
    gen_seconds: float,
    wall: float,
    generated_shards: int,
) -> dict:
    from batchgen.writer import finished_shards

    all_totals = Totals()
    finished = finished_shards(p.out_dir)
    for path in finished.values():
        all_totals.add(Totals(**shard_metadata(path)["shard"]["totals"]))
    complete = len(finished) == len(p.shards)
    summary = {
        "output_dir": str(p.out_dir),
        "shards_total": len(p.shards),
        "shards_done": len(finished),
        "shards_resumed": len(p.done),
        "totals": all_totals.to_dict(),
        "this_run": {
            **this_run.to_dict(),
            "shards": generated_shards,
            "generate_seconds": gen_seconds,
            "tokens_per_second": this_run.completion_tokens / gen_seconds if gen_seconds else 0.0,
        },
        "wall_seconds": wall,
    }
    status = "complete" if complete else "incomplete"
    write_json_atomic(p.out_dir / manifest.RUN_FILE, {**meta, "status": status, "summary": summary})
    return summary


def run(cfg: JobConfig) -> dict:
    """Run a whole job: prepare (all checks), generate, print and return the summary."""
    t0 = time.perf_counter()
    prepared = prepare(cfg)
    summary = generate(prepared)
    summary["wall_seconds"] = time.perf_counter() - t0
    print(format_summary(summary), flush=True)
    return summary
