"""Check a config: value ranges and combinations a type cannot express.

Invariant: ``validate`` refuses what no run could use, naming the key, before anything loads;
``check_sampling`` applies the same ranges to a job's sampling, a row's own, and the values a
model's generation config fills in (``resolve_sampling``). Conversion is ``batchgen.conversion``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from batchgen.config import MODEL_DEFAULTS, JobConfig, ModelConfig, RunnerConfig, SamplingConfig
from batchgen.conversion import greedy_if_zero
from batchgen.errors import ConfigError

PROMPT_POLICIES = ("error", "truncate_left", "skip")
BAD_ROW_POLICIES = ("error", "skip")
DTYPES = ("auto", "float32", "float16", "bfloat16")
CHAT_TEMPLATE_MODES = ("auto", "on", "off")
ENGINES = ("auto", "static", "continuous", "vllm")
REASONING_MODES = ("auto", "off")
MAX_TOP_LOGPROBS = 20
# Shortest lease the claims' heartbeat can honour: it renews every third of the lease, and a
# claim is trusted for publishing only while a quarter of it is left.
MIN_LEASE_SECONDS = 1.0
# Shortest stall the watchdog can tell from a slow step: it looks once a second at most.
MIN_STALL_SECONDS = 1.0
# Parquet codecs every pyarrow build writes.
COMPRESSIONS = ("zstd", "snappy", "gzip", "brotli", "lz4", "none")
# accelerate's named splits of the weights over the devices it sees.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# model.quantization -> the optional library that does it (the `quant` extra holds both).
QUANTIZATIONS = {"bnb-4bit": "bitsandbytes", "bnb-8bit": "bitsandbytes", "int8": "torchao"}
# A size as accelerate reads one in max_memory (its units; lowercase b: bits).
_SIZE = re.compile(r"\d+(\.\d+)?\s*[KMG]i?B", re.IGNORECASE)
# max_memory's devices as accelerate names them: a GPU's index, cpu, disk, mps; cuda:N is N.
_MEMORY_DEVICE = re.compile(r"(cuda:)?\d+|cpu|disk|mps")


def _device_ok(device: str) -> bool:
    if device == "auto":
        return True
    import torch

    try:
        torch.device(device)
    except RuntimeError:
        return False
    return True


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _devices_ok(devices: Any) -> bool:
    """``runner.devices``: auto, a count of at least 1, or distinct non-negative device ids."""
    if devices == "auto" or (_is_int(devices) and devices >= 1):
        return True
    return (
        isinstance(devices, list)
        and bool(devices)
        and all(_is_int(x) and x >= 0 for x in devices)
        and len(set(devices)) == len(devices)
    )


def _count(devices: int | list) -> int:
    """How many processes ``runner.devices`` asks for: its number, or its devices."""
    return len(devices) if isinstance(devices, list) else devices


def _placement_ok(device: Any) -> bool:
    """A device an explicit ``model.device_map`` may name: a GPU index, a torch device, disk."""
    if isinstance(device, int) and not isinstance(device, bool):
        return device >= 0
    return isinstance(device, str) and (device == "disk" or _device_ok(device))


def installed(module: str) -> bool:
    """Whether ``module`` is importable here (without importing it)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def check_model(m: ModelConfig) -> None:
    """The ``model.*`` settings that place, quantize and adapt the weights, and the optional
    libraries they need (the ``quant`` and ``lora`` extras).

    Raises:
        ConfigError: naming the key and the fix.
    """
    dm, mm = m.device_map, m.max_memory
    _check(
        dm is None
        or dm in DEVICE_MAPS
        or (isinstance(dm, Mapping) and all(_placement_ok(v) for v in dm.values())),
        "model.device_map",
        f"must be one of {DEVICE_MAPS} or a {{module: device}} mapping (devices: a GPU index, "
        f"cpu, cuda:N, mps or disk), got {dm!r}",
    )
    _check(
        dm is None or m.device in ("auto", "cpu", "cuda"),
        "model.device_map",
        f"places the weights on its own devices, which model.device={m.device!r} contradicts: "
        "leave model.device=auto (or cpu/cuda, which picks the dtype)",
    )
    _check(mm is None or dm is not None, "model.max_memory", "applies to model.device_map only")
    _check(
        mm is None
        or (
            isinstance(mm, Mapping)
            and all(_MEMORY_DEVICE.fullmatch(str(k)) for k in mm)
            and all(
                (isinstance(v, int) and v > 0) or (isinstance(v, str) and _SIZE.fullmatch(v))
                for v in mm.values()
            )
        ),
        "model.max_memory",
        "must map devices (a GPU index, cpu, disk, mps) to bytes or sizes like 20GiB or 500MB, "
        f"e.g. {{0: 20GiB, cpu: 60GiB}}; got {mm!r}",
    )
    q = m.quantization
    _check(
        q is None or q in QUANTIZATIONS,
        "model.quantization",
        f"must be one of {tuple(QUANTIZATIONS)} (or null), got {q!r}",
    )
    _check(
        q is None or installed(QUANTIZATIONS[q]),
        "model.quantization",
        f"{q} needs {QUANTIZATIONS.get(q)}, which is not installed here: "
        "pip install 'batchgen[quant]'",
    )
    _check(m.adapter is None or bool(m.adapter), "model.adapter", "must not be empty (null: none)")
    _check(
        m.adapter is None or installed("peft"),
        "model.adapter",
        "a LoRA adapter needs peft, which is not installed here: pip install 'batchgen[lora]'",
    )


def _check_tensor_parallel(m: ModelConfig, r: RunnerConfig) -> None:
    """``model.tp_size`` and what it cannot combine with: each of these places, changes or
    compiles the weights its own way, which a tensor-parallel load (transformers' plan over a
    process group) does not take. Refused before any process starts."""
    k = m.tp_size
    _check(_is_int(k) and k >= 1, "model.tp_size", f"must be 1 or more, got {k!r}")
    clashes = [
        key
        for key, clash in (
            (f"model.device={m.device}", m.device not in ("auto", "cpu", "cuda")),
            ("model.device_map", m.device_map is not None),
            ("model.quantization", m.quantization is not None),
            ("model.adapter", m.adapter is not None),
            (f"runner.engine={r.engine}", r.engine not in ("auto", "static")),
            ("runner.compile", r.compile),
        )
        if clash
    ]
    _check(
        k == 1 or not clashes,
        "model.tp_size",
        f"{k} splits the model with transformers' tensor parallel, which batchgen does not "
        f"combine with {', '.join(clashes)}: drop one of them (model.device: auto or cuda)",
    )
    _check(
        k == 1 or r.devices == "auto" or _count(r.devices) % k == 0,
        "runner.devices",
        f"{r.devices!r} must be a multiple of model.tp_size={k} (each worker is a group of {k} "
        "processes), or auto",
    )


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def check_sampling(s: SamplingConfig, key: str = "sampling") -> None:
    """The ranges of the sampling settings: the job's, or one row's overrides (``key`` names
    where they come from, e.g. a column).

    Raises:
        ConfigError: naming ``key.setting``.
    """

    # A null setting is the model's, checked once resolved (resolve_sampling).
    def check(ok: bool, name: str, message: str) -> None:
        _check(ok, f"{key}.{name}", message)

    n = s.num_return_sequences
    check(n >= 1, "num_return_sequences", "must be at least 1")
    check(
        s.do_sample is not False or n == 1,
        "num_return_sequences",
        "more than one sample per prompt needs sampling.do_sample=true and a temperature "
        "above 0 (greedy decoding would return the same text n times)",
    )
    check(s.max_new_tokens is None or s.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
    check(s.temperature is None or s.temperature >= 0, "temperature", "must be >= 0 (0: greedy)")
    check(s.top_p is None or 0 < s.top_p <= 1, "top_p", "must be in (0, 1]")
    check(s.top_k is None or s.top_k >= 0, "top_k", "must be >= 0 (0 disables top-k)")
    check(
        s.repetition_penalty is None or s.repetition_penalty > 0,
        "repetition_penalty",
        "must be > 0",
    )
    check(s.min_p is None or 0 <= s.min_p < 1, "min_p", "must be in [0, 1) (0 disables it)")
    check(all(isinstance(x, str) and x for x in s.stop), "stop", "must be non-empty strings")
    check(
        not (s.json_schema and s.regex),
        "regex",
        "and json_schema are both set: a sample follows one constraint",
    )
    if s.regex is not None:
        try:
            re.compile(s.regex)
        except re.error as e:
            raise ConfigError(f"{key}.regex={s.regex!r}: not a regular expression ({e}).") from e


def resolve_sampling(s: SamplingConfig, model_values: dict[str, Any]) -> SamplingConfig:
    """``s`` with every null setting of ``MODEL_DEFAULTS`` taken from ``model_values`` (the
    model's generation config, as ``models.generation_defaults`` reads it).

    Raises:
        ConfigError: a resolved value is out of range (the model's config is named).
    """
    filled = {k: model_values[k] for k in MODEL_DEFAULTS if getattr(s, k) is None}
    if not filled:
        return s
    s = replace(s, **filled)
    s = greedy_if_zero(s)
    check_sampling(s, "sampling (from the model's generation config)")
    return s


def validate(cfg: JobConfig) -> None:
    """Check value ranges and combinations that a type alone cannot express.

    Raises:
        ConfigError: naming the offending key.
    """
    d, r, o, m = cfg.dataset, cfg.runner, cfg.output, cfg.model
    _check(m.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {m.dtype!r}")
    check_sampling(cfg.sampling)
    _check(
        o.reasoning in REASONING_MODES or len(o.reasoning.split()) == 2,
        "output.reasoning",
        f"must be auto, off, or the two tags 'OPEN CLOSE' (e.g. '<think> </think>'), got "
        f"{o.reasoning!r}",
    )
    _check(o.top_logprobs >= 0, "output.top_logprobs", "must be >= 0 (0: none)")
    _check(
        o.top_logprobs <= MAX_TOP_LOGPROBS,
        "output.top_logprobs",
        f"must be at most {MAX_TOP_LOGPROBS}, as in the OpenAI API",
    )
    _check(
        bool(d.messages_column or d.template or d.prompt_column),
        "dataset",
        "no prompt source: set dataset.prompt_column, dataset.messages_column, dataset.template "
        "or dataset.template_file",
    )
    _check(
        d.chat_template in CHAT_TEMPLATE_MODES,
        "dataset.chat_template",
        f"must be one of {CHAT_TEMPLATE_MODES}, got {d.chat_template!r}",
    )
    _check(d.limit is None or d.limit >= 1, "dataset.limit", "must be at least 1 when set")
    b = r.batch_size
    _check(
        b == "auto" or _is_int(b),
        "runner.batch_size",
        f"must be a number of rows or auto, got {b!r}",
    )
    _check(b == "auto" or b >= 1, "runner.batch_size", "must be at least 1 (or auto)")
    _check(r.prefill_tokens >= 1, "runner.prefill_tokens", "must be at least 1")
    _check(
        r.max_padding is None or r.max_padding >= 0,
        "runner.max_padding",
        "must be >= 0 when set",
    )
    _check(r.engine in ENGINES, "runner.engine", f"must be one of {ENGINES}, got {r.engine!r}")
    _check(
        r.max_batch_tokens is None or r.max_batch_tokens >= 1,
        "runner.max_batch_tokens",
        "must be at least 1 when set",
    )
    _check(
        r.on_long_prompt in PROMPT_POLICIES,
        "runner.on_long_prompt",
        f"must be one of {PROMPT_POLICIES}, got {r.on_long_prompt!r}",
    )
    _check(
        r.on_bad_row in BAD_ROW_POLICIES,
        "runner.on_bad_row",
        f"must be one of {BAD_ROW_POLICIES}, got {r.on_bad_row!r}",
    )
    _check(
        r.lease_seconds >= MIN_LEASE_SECONDS,
        "runner.lease_seconds",
        f"{r.lease_seconds:g} is below the floor of {MIN_LEASE_SECONDS:g} s: the heartbeat renews "
        "claims every third of the lease, and a shorter one expires before a renewal lands "
        "(use 60 or more on shared storage)",
    )
    _check(
        r.stall_seconds is None or r.stall_seconds >= MIN_STALL_SECONDS,
        "runner.stall_seconds",
        f"{r.stall_seconds} is below the floor of {MIN_STALL_SECONDS:g} s: the watchdog looks "
        "once a second, and a healthy decoding step can take that long (null turns it off)",
    )
    _check(r.threads is None or r.threads >= 1, "runner.threads", "must be at least 1 when set")
    _check(
        _devices_ok(r.devices),
        "runner.devices",
        f"must be auto, a number of workers (1 or more) or a list of distinct CUDA device ids "
        f"such as [0,1], got {r.devices!r}",
    )
    _check(
        m.device_map is None or r.devices in ("auto", 1),
        "runner.devices",
        f"{r.devices!r} starts one worker per device, but model.device_map spreads one model "
        "over the devices: leave runner.devices at auto (one worker) or drop model.device_map",
    )
    _check_tensor_parallel(m, r)
    _check(o.rows_per_shard >= 1, "output.rows_per_shard", "must be at least 1")
    _check(
        o.compression in COMPRESSIONS,
        "output.compression",
        f"must be one of {COMPRESSIONS}, got {o.compression!r}",
    )
    _check(
        _device_ok(m.device),
        "model.device",
        f"{m.device!r} is no device: use auto, cpu, cuda, cuda:N or mps",
    )
    check_model(m)
    _check(
        o.dir is None or bool(o.dir),
        "output.dir",
        "must not be empty (null: named after the settings)",
    )
