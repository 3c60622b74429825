"""The run's identity: config fingerprint, ``_batchgen/run.json``, and the resume check."""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from batchgen.config import JobConfig, ModelConfig, SamplingConfig
from batchgen.errors import ResumeError
from batchgen.inputs.dataset import is_local
from batchgen.inputs.models import adapter_digest
from batchgen.store import layout
from batchgen.store.records import read_run_file
from batchgen.store.rows import OutputSpec


def fingerprint_parts(
    cfg: JobConfig,
    chat: bool,
    dtype: str,
    num_rows: int | None,
    output: OutputSpec | None = None,
    engine: str | None = None,
    adapter: str | None = None,
    mixed: bool = False,
) -> dict:
    """Every setting that changes what is generated, grouped by where it comes from.

    The rows themselves are not hashed here: each shard records its own rows' digest
    (``batchgen.job.shard_inputs``), checked when that shard is resumed, so no worker reads the
    whole dataset to tell whether it changed. ``num_rows`` is None for a stream. ``output``
    (the optional columns) enters only when it writes any, so older folders still resume.
    ``engine`` (``choose_engine``'s answer) enters where it changes the outputs
    (``ENGINE_BOUND``). ``adapter`` is ``model.adapter``'s local folder (``ModelSource.adapter``):
    its content digest enters, not its path (``model_parts``).
    ``mixed``: rows without messages use their plain prompt
    (``inputs.sources.falls_back``), which the data decides, not a setting; it enters only when
    true, so a folder of messages alone still resumes.
    """
    m, d = cfg.model, cfg.dataset
    return {
        "model": {
            "name_or_path": m.name_or_path,
            "gguf_file": m.gguf_file,
            "revision": m.revision,
            "dtype": dtype,
            "pad_token": m.pad_token,
            "max_context": m.max_context,
            **model_parts(m, adapter),
        },
        "sampling": sampling_parts(cfg.sampling),
        "prompts": {
            "chat_template": chat,
            "system_prompt": d.system_prompt,
            "template": d.template,
            "prompt_column": d.prompt_column,
            "messages_column": d.messages_column,
            "id_column": d.id_column,
            "keep_columns": list(d.keep_columns),
            "on_long_prompt": cfg.runner.on_long_prompt,
            "on_bad_row": cfg.runner.on_bad_row,
            **_unless_default({k: getattr(d, k) for k in LATER_PROMPTS}, LATER_PROMPTS),
            **({"messages_else_plain": True} if mixed else {}),
        },
        "data": {
            "source": d.path,
            "name": d.name,
            "split": d.split,
            "rows": num_rows,
        },
        "layout": {
            # Batch size, token budget and engine are left out: each sample's randomness is its
            # own (batchgen.engine.sampling), so batching changes no output beyond
            # floating-point ties.
            "rows_per_shard": cfg.output.rows_per_shard,
            "seed": cfg.seed,
            **({"engine": engine} if engine_bound(cfg, engine, output) else {}),
        },
        **({"output": _output_parts(output)} if output and output.columns else {}),
    }


# Engines whose outputs differ from the transformers engines' in what they may: vLLM draws its
# samples with its own seeded generator (batchgen's engines add per-sample Gumbel noise) and
# computes log-probabilities in its own kernels. Its greedy tokens equal theirs (22 of 22
# prompts measured, docs/benchmarks.md), so a greedy folder may take rows of either.
ENGINE_BOUND = ("vllm",)


def engine_bound(cfg: JobConfig, engine: str | None, output: OutputSpec | None) -> bool:
    """Whether ``engine``'s rows could differ from another engine's for this job: it is in
    ``ENGINE_BOUND`` and the job samples (or its rows may) or records log-probabilities."""
    sampled = bool(cfg.sampling.do_sample) or bool(cfg.dataset.sampling_column)
    scored = bool(output and (output.logprobs or output.top_logprobs))
    return engine in ENGINE_BOUND and (sampled or scored)


# Settings added after batchgen 0.1.0 enter the fingerprint only when set away from their
# default, so a folder written before they existed still resumes under the new version.
LATER_SAMPLING = ("min_p", "ignore_eos", "json_schema", "regex")
LATER_PROMPTS = {
    "chat_template_kwargs": {},
    "chat_template_kwargs_column": None,
    "sampling_column": None,
}


# Where the weights sit (model.device_map, model.max_memory) is left out: a split over CPU and
# disk generated exactly the plain load's greedy tokens (tests/engine/test_devices.py), and on
# GPUs the same kernels run on each layer wherever it sits.


def model_parts(m: ModelConfig, adapter: str | None) -> dict[str, Any]:
    """The later model settings that change the weights or their sums, each only when set: the
    quantization, the tensor-parallel size (``model.tp_size``: the split sums round apart, and
    in bf16 greedy tokens differ), and the adapter's content digest (``models.adapter_digest``
    of its folder ``adapter``) with whether it is merged: merged weights round once, in the
    model's dtype, and in bfloat16 their greedy tokens differed from the unmerged adapter's
    in 24 of 24 measured prompts."""
    parts: dict[str, Any] = {"quantization": m.quantization} if m.quantization else {}
    if m.tp_size > 1:
        parts["tp_size"] = m.tp_size
    if m.adapter is not None:
        parts.update(adapter=adapter_digest(adapter), merge_adapter=m.merge_adapter)
    return parts


def _unless_default(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``values`` less the keys of ``defaults`` whose value is their default."""
    return {k: v for k, v in values.items() if k not in defaults or v != defaults[k]}


def sampling_parts(s: SamplingConfig) -> dict[str, Any]:
    """The sampling settings as fingerprinted: all, less later additions left at their default."""
    defaults = asdict(SamplingConfig())
    return _unless_default(asdict(s), {k: defaults[k] for k in LATER_SAMPLING})


def _output_parts(output: OutputSpec) -> dict[str, Any]:
    return {
        "reasoning": list(output.reasoning) if output.reasoning else None,
        "logprobs": output.logprobs,
        "top_logprobs": output.top_logprobs,
    }


def fingerprint(parts: dict) -> str:
    """Short stable hash of the fingerprint parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        flat.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return flat


def describe_difference(old: dict, new: dict) -> str:
    """``key: old -> new`` for each differing setting, one per line."""
    a, b = _flatten(old), _flatten(new)
    lines = [
        f"  {k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]
    return "\n".join(lines) or "  (settings recorded without details)"


def refuse(out_dir: Path, where: str, old_parts: dict, new_parts: dict) -> ResumeError:
    """The error for a folder that holds another config's run, listing what differs."""
    return ResumeError(
        f"output.dir={str(out_dir)!r} holds a run with a different config fingerprint ({where}); "
        f"resuming would mix outputs of two configs. What differs (recorded -> now):\n"
        f"{describe_difference(old_parts, new_parts)}\n"
        f"Start a new folder with output.dir=SOMEWHERE_ELSE, or rerun with the recorded settings. "
        f"Finished shards were not touched."
    )


def same_run(old: dict, new: dict, dtype_auto: bool = False) -> list[str] | None:
    """How recorded parts ``old`` describe the run of ``new`` although they differ, or None when
    they describe another run (or do not differ). Two differences leave one run:

    - the spelling of a local data source: one file named relative, then absolute (as a Slurm
      task started elsewhere needs), or moved. A local source's identity is its rows (their
      count here, their digest per shard, checked when a finished shard is resumed), not the
      string that named it;
    - the dtype ``model.dtype=auto`` resolved to (``dtype_auto``), which a new batchgen or
      another machine may resolve otherwise: the folder's dtype is kept.

    Returns:
        One line per difference let through, saying what is kept.
    """
    a, b = old.get("data"), new.get("data")
    ma, mb = old.get("model"), new.get("model")
    if not all(isinstance(x, dict) for x in (a, b, ma, mb)):
        return None
    candidate, said = dict(old), []
    before, now = a.get("source"), b.get("source")
    local = all(isinstance(x, str) and is_local(x) for x in (before, now))
    if before != now and local:
        candidate["data"] = {**a, "source": now}
        said.append(
            f"dataset.path={now!r} names the data this folder's run recorded as {before!r}: "
            "resuming it (each finished shard's rows are checked when reached)"
        )
    if dtype_auto and ma.get("dtype") != mb.get("dtype"):
        candidate["model"] = {**ma, "dtype": mb.get("dtype")}
        said.append(
            f"model.dtype=auto: this folder's run was begun in {ma.get('dtype')}; resuming it in "
            f"{ma.get('dtype')} (model.dtype={mb.get('dtype')} starts another folder)"
        )
    if not said or fingerprint(candidate) != fingerprint(new):
        return None
    return said


def _only_rows_per_shard_differs(old: dict, new: dict) -> bool:
    """Whether the recorded parts equal the new ones once ``layout.rows_per_shard`` is set equal."""
    if not isinstance(old.get("layout"), dict) or not isinstance(new.get("layout"), dict):
        return False
    rows = new["layout"].get("rows_per_shard")
    return fingerprint({**old, "layout": {**old["layout"], "rows_per_shard": rows}}) == fingerprint(
        new
    )


def check_run_file(
    out_dir: Path,
    parts: dict,
    live_claims: Callable[[], list[int]],
    live_fingerprints: Callable[[], dict[str, dict]],
    dtype_auto: bool = False,
) -> tuple[dict, bool, list[str]]:
    """Admit a worker with these fingerprint parts to the run in ``out_dir``, or refuse it.

    Call it under ``records.run_file_guard``, and record the answer (write ``run.json`` when
    told to, then attach the fingerprint to the worker's lock) before leaving the guard: the
    first worker to record the run's identity wins, and every later one is judged against it,
    however close their starts.

    One difference is let through: ``output.rows_per_shard`` alone, while the folder holds no
    published shard, no live claim, and no live worker admitted under another fingerprint (an
    interrupted first attempt). Shard boundaries then exist nowhere, so nothing of the old
    layout can mix with the new one; the run record is replaced. Any other difference could
    change the outputs and is refused even then.

    Finished shards carry the fingerprint too and are checked one by one on resume
    (``batchgen.store.verify``), which also covers a folder whose ``run.json`` was lost.

    Args:
        out_dir: the output folder.
        parts: this run's fingerprint parts.
        live_claims: the shards a worker may be writing now (``claims.live_indices``); called
            only when the rows-per-shard exception is in question, since it reads every claim.
        live_fingerprints: fingerprint -> a holder's lock record, of the other live workers
            admitted to this folder (``lock.live_fingerprints``); called only then, too.
        dtype_auto: ``model.dtype`` is ``auto`` (``same_run``).

    Returns:
        (the fingerprint parts this worker generates under, whether ``run.json`` is to be written
        with them, what ``same_run`` let through): the recorded parts when they differ from
        ``parts`` only as ``same_run`` allows, so the folder stays one run; else ``parts``, to be
        written when there is no record yet or it is replaced.

    Raises:
        ResumeError: naming what differs.
        NotAnOutputDir: ``run.json`` is not JSON or has no fingerprint, naming the file.
    """
    from batchgen.store.writer import finished_shards

    run_file = layout.run_file(out_dir)
    if not run_file.is_file():
        return parts, True, []
    recorded = read_run_file(out_dir)
    ours = fingerprint(parts)
    if recorded.get("fingerprint") == ours:
        return parts, False, []
    old = recorded.get("fingerprint_parts", {})
    said = same_run(old, parts, dtype_auto)
    if said:
        return old, False, said
    error = refuse(out_dir, str(run_file.relative_to(out_dir)), old, parts)
    if not _only_rows_per_shard_differs(old, parts) or finished_shards(out_dir):
        raise error
    live = live_claims()
    if live:
        raise ResumeError(
            f"{error} No shard is published yet, but a worker holds a live claim on "
            f"shard(s) {live}: output.rows_per_shard can change once every worker of "
            "the earlier attempt has stopped."
        )
    others = {fp: who for fp, who in live_fingerprints().items() if fp != ours}
    if others:
        who = next(iter(others.values()))
        raise ResumeError(
            f"{error} No shard is published yet, but a worker of that run is live (pid "
            f"{who.get('pid')} on host {who.get('host')}): output.rows_per_shard can change "
            "once it has stopped."
        )
    return parts, True, []


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape the outputs."""
    import datasets
    import pyarrow
    import torch
    import transformers

    from batchgen.version import __version__

    return {
        "batchgen": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "pyarrow": pyarrow.__version__,
    }
