"""The Python API: the command line's engine, batching and sampling, in memory or file to file.

Invariant: nothing here generates, batches or renders by itself. ``Generator`` turns prompts into
the same records the shard loop builds, runs them through the same ``BatchRunner`` (OOM split,
batch-invariant per-sample sampling, the engine ``runner.engine`` picks) and builds its results
with the shard loop's own row builder, so a prompt gives the same completion here as in a job.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from batchgen.config import (
    MODEL_DEFAULTS,
    DatasetConfig,
    JobConfig,
    ModelConfig,
    OutputConfig,
    RunnerConfig,
    SamplingConfig,
)
from batchgen.config_checks import (
    normalize_sampling,
    read_json_schema,
    resolve_sampling,
    validate,
)
from batchgen.engine import devices
from batchgen.engine.batching import BatchRunner, build_engine, choose_engine
from batchgen.engine.constrained import check_constraint
from batchgen.errors import ConfigError, ModelError
from batchgen.inputs import models, prompts
from batchgen.inputs.dataset import Rows
from batchgen.progress import Progress
from batchgen.store.rows import output_spec, shard_rows
from batchgen.store.summary import WorkerSummary

# The in-memory rows' column names: the prompt text, or an OpenAI-style conversation.
_TEXT, _MESSAGES, _SAMPLING = "prompt", "messages", "sampling"


@dataclasses.dataclass(frozen=True)
class Completion:
    """One completion of one prompt: a row of the output Parquet files.

    ``id`` is the prompt's position in the input list (as a string) unless ids were given.
    """

    id: str
    sample_index: int
    prompt: str  # the text the model saw, chat template applied
    response: str
    finish_reason: str  # "stop": EOS or a stop string; "length": max_new_tokens reached
    prompt_tokens: int
    completion_tokens: int
    # The optional columns, None unless the Generator's output settings turn them on.
    reasoning: str | None = None
    reasoning_truncated: bool | None = None
    valid: bool | None = None
    token_logprobs: list[float] | None = None
    logprob_sum: float | None = None
    top_logprobs: list[list[dict]] | None = None


def _settings(cls, value, section: str):
    """A settings dataclass from an instance, a mapping of its fields, or None (defaults).

    Raises:
        ConfigError: a key the dataclass lacks, named as ``section.key``.
    """
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(
            f"{', '.join(f'{section}.{k}' for k in unknown)}: not a batchgen setting "
            f"(the {section} settings are {', '.join(sorted(known))})."
        )
    return cls(**value)


class Generator:
    """A model loaded once that generates in memory, like ``vllm.LLM``.

    ``Generator()`` loads the command line's default model (the embedded SmolLM2-135M-Instruct);
    ``Generator("Qwen/Qwen2.5-0.5B-Instruct", dtype="bfloat16")`` any other, with the
    ``model.*`` settings as keywords. An already loaded transformers model works too, given its
    tokenizer (left padding and a pad token are set on a copy of neither: the tokenizer is used
    as configured, so give it ``padding_side="left"`` for a decoder-only model).

    Args:
        model: a ``model.name_or_path`` (hub id, folder, ``pkg:``), or a loaded model.
        tokenizer: the tokenizer of a loaded model; ignored for a name.
        runner: ``runner.*`` settings (``batch_size``, ``max_batch_tokens``, ``engine``, ...).
        output: ``output.*`` settings of the optional columns (``reasoning``, ``logprobs``,
            ``top_logprobs``).
        seed: the base seed of sampling, as ``seed`` in a job.
        progress: draw a progress bar with tokens/s while generating.
        **model_options: ``model.*`` settings for a name (``gguf_file``, ``dtype``, ``device``...).

    Raises:
        ConfigError: an unknown or out-of-range setting.
        ModelError: the model or tokenizer cannot be found or loaded.
    """

    def __init__(
        self,
        model: Any = None,
        *,
        tokenizer: Any = None,
        runner: RunnerConfig | Mapping[str, Any] | None = None,
        output: OutputConfig | Mapping[str, Any] | None = None,
        seed: int = 0,
        progress: bool = True,
        **model_options: Any,
    ):
        self.runner = _settings(RunnerConfig, runner, "runner")
        self.output = _settings(OutputConfig, output, "output")
        self.seed = seed
        self.progress = progress
        if model is None or isinstance(model, str):
            cfg = _model_config(model, model_options)
            validate(JobConfig(model=cfg, runner=self.runner, seed=seed))
            devices.set_threads(self.runner.threads)
            source = models.convert_gguf(models.resolve_source(cfg))
            config, self.tokenizer = models.load_config_and_tokenizer(source, cfg)
            device, dtype = devices.resolve_device_dtype(cfg)
            self.model = devices.load_model(source, config, cfg, device, dtype)
            self.context = models.context_length(config, self.tokenizer, cfg)
        else:
            if tokenizer is None:
                raise ModelError("Generator(model=<a loaded model>) needs its tokenizer=.")
            if model_options:
                raise ConfigError(
                    f"{', '.join(sorted(model_options))}: model settings apply to a model "
                    "loaded by name, not to a loaded model."
                )
            self.model, self.tokenizer = model, tokenizer
            self.context = models.context_length(model.config, tokenizer, ModelConfig())
        self.device = str(next(self.model.parameters()).device)
        # Of the last call: the engine used, the batch size, token budget and engine it ran
        # with and why (tuning), and the pad slots computed in prompt prefill and held in KV
        # caches (the padding-waste figures of scripts/bench.py).
        self.stats: dict[str, Any] = {}

    def generate(
        self,
        prompts: str | Sequence[str],
        sampling: SamplingConfig | Mapping[str, Any] | None = None,
        *,
        ids: Sequence[str] | None = None,
    ) -> list[Completion]:
        """Complete raw text prompts (no chat template), as a base model's job does.

        Args:
            prompts: one prompt or a list.
            sampling: ``sampling.*`` settings (``max_new_tokens``, ``temperature``, ``stop``...),
                or a list of them, one per prompt (each over the defaults; ``seed`` too), or
                ``"model"``: the model's generation config (a null setting is the model's too).
            ids: one id per prompt (default: the position), which seeds its samples.

        Returns:
            One ``Completion`` per prompt and sample, in input order, then sample order.

        Raises:
            ConfigError: a bad setting. DataError: a bad or too long prompt, named by id,
                under ``runner.on_bad_row`` / ``runner.on_long_prompt`` = ``error``.
        """
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self._run({_TEXT: texts}, DatasetConfig(prompt_column=_TEXT), False, sampling, ids)

    def chat(
        self,
        conversations: Sequence[Sequence[Mapping[str, str]]],
        sampling: SamplingConfig | Mapping[str, Any] | None = None,
        *,
        system_prompt: str | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[Completion]:
        """Complete conversations (OpenAI-style ``{"role", "content"}`` lists) through the
        model's chat template, as an instruct model's job does.

        Args:
            conversations: a list of conversations, each a list of messages.
            sampling: ``sampling.*`` settings, or a list of them, one per conversation.
            system_prompt: prepended to conversations that do not start with a system turn.
            ids: one id per conversation (default: the position).

        Returns:
            One ``Completion`` per conversation and sample, in input order, then sample order.

        Raises:
            ConfigError: the tokenizer has no chat template, or a bad setting.
            DataError: a malformed conversation or too long prompt, named by id.
        """
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ConfigError(
                "Generator.chat: the tokenizer has no chat template (a base model?); use "
                "Generator.generate with raw text."
            )
        cfg = DatasetConfig(
            prompt_column=None, messages_column=_MESSAGES, system_prompt=system_prompt
        )
        return self._run({_MESSAGES: list(conversations)}, cfg, True, sampling, ids)

    def _run(self, columns, dataset: DatasetConfig, chat, sampling, ids) -> list[Completion]:
        if isinstance(sampling, Sequence) and not isinstance(sampling, str):
            # One mapping per prompt: the job's rows with their own settings, over the defaults.
            own = [dataclasses.asdict(x) if isinstance(x, SamplingConfig) else x for x in sampling]
            columns = {**columns, _SAMPLING: own}
            dataset = dataclasses.replace(dataset, sampling_column=_SAMPLING)
            sampling = None
        if sampling == "model":
            sampling = dict.fromkeys(MODEL_DEFAULTS)
        s = read_json_schema(normalize_sampling(_settings(SamplingConfig, sampling, "sampling")))
        check_constraint(s)
        # Null settings are the model's: what model.generate() with no arguments would use.
        s = resolve_sampling(s, models.generation_defaults(self.model.generation_config))
        if ids is not None:
            columns = {**columns, "id": [str(i) for i in ids]}
            dataset = dataclasses.replace(dataset, id_column="id")
        job = JobConfig(
            sampling=s, dataset=dataset, runner=self.runner, output=self.output, seed=self.seed
        )
        validate(job)
        rows = Rows(columns=columns, kept_types={})
        if len({len(v) for v in columns.values()}) > 1:
            raise ConfigError(
                f"{', '.join(f'{k}: {len(v)}' for k, v in columns.items())}: one value per prompt."
            )
        records, bad = prompts.build_records(rows, dataset, self.tokenizer, chat, sampling=s)
        prompts.apply_bad_row_policy(bad, self.runner.on_bad_row)
        room = self.context - s.max_new_tokens if self.context else None
        if not dataset.sampling_column:
            prompts.check_room(room)
        records, _ = prompts.apply_length_policy(
            records, room, self.runner.on_long_prompt, self.tokenizer, s.max_new_tokens
        )
        if not records:
            return []
        encoder_decoder = bool(self.model.config.is_encoder_decoder)
        spec = output_spec(job, self.tokenizer, chat)
        logprobs = bool(spec.logprobs or spec.top_logprobs)
        per_row = bool(dataset.sampling_column)
        kind = choose_engine(self.runner, s, encoder_decoder, self.device, logprobs, per_row)
        engine = build_engine(
            kind, self.model, self.tokenizer, s, self.runner, spec.logprobs, spec.top_logprobs
        )
        bar = Progress(len(records), self.progress, s.max_new_tokens * s.num_return_sequences)
        engine.on_step = bar.step
        batcher = BatchRunner(engine, self.runner, s, self.seed, engine_kind=kind)
        try:
            results, _ = batcher.run(records, bar.update)
        finally:
            bar.close()
        out, _ = shard_rows(records, results, spec)
        tuning = batcher.choices()
        self.stats = {
            "engine": tuning["engine"],
            "tuning": tuning,
            "padded_tokens": engine.padded_tokens,
            "cache_pad_slots": engine.cache_pad_slots,
        }
        return [Completion(**row) for row in out]


def _model_config(name: str | None, options: Mapping[str, Any]) -> ModelConfig:
    """``model.*`` settings for a name; None: the command line's default model preset."""
    if name is None:
        from batchgen.cli import compose_job

        return dataclasses.replace(compose_job([]).model, **options)
    return _settings(ModelConfig, {"name_or_path": name, **options}, "model")


def compose(overrides: Sequence[str] = ()) -> JobConfig:
    """The job ``batchgen OVERRIDES...`` would run, composed from the packaged configs.

    Raises:
        ConfigError: an override that does not parse or names no setting.
    """
    from batchgen.cli import compose_job

    return compose_job(list(overrides))


def run(job: JobConfig | Sequence[str] = ()) -> WorkerSummary:
    """Run a file-to-file job, as the ``batchgen`` command does, and return its summary.

    The summary is typed (``summary.totals.rows``) and reads as the dict it was before
    (``summary["totals"]["rows"]``); ``summary.to_dict()`` is that dict.

    Args:
        job: a ``JobConfig`` (from ``compose`` or built by hand), or command-line overrides
            such as ``["dataset.path=prompts.jsonl", "output.dir=out"]``.

    Raises:
        BatchgenError: a bad setting, path, column, row or resume conflict, with the culprit
            named; ``Stopped`` when a signal stopped the run (its folder is clean).
    """
    from batchgen.job.run import run as run_job

    cfg = job if isinstance(job, JobConfig) else compose(job)
    return run_job(cfg)
