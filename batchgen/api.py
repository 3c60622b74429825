"""The Python API: the command line's engine, batching and sampling, in memory or file to file.

Invariant: nothing here generates, batches or renders by itself. ``Generator`` holds one
``Session`` (``batchgen.job.session``) for all its calls, as the job loop does for a job: its
records come from the shard loop's own ``ShardInputs``, its samples from the session's batch
runner (OOM split, batch-invariant per-sample sampling, the engine ``runner.engine`` picks),
its rows from the shard loop's row builder, so a prompt gives the same completion here as in a
job, and the model loads and the batch size is measured once however many calls it serves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from batchgen.cluster.ranks import resolve_worker
from batchgen.composition import compose_job
from batchgen.config import (
    MODEL_DEFAULTS,
    DatasetConfig,
    JobConfig,
    ModelConfig,
    OutputConfig,
    RunnerConfig,
    SamplingConfig,
)
from batchgen.config_checks import validate
from batchgen.conversion import convert_sampling
from batchgen.engine import devices, tensor_parallel, vllm_engine
from batchgen.engine.devices import Model
from batchgen.errors import ConfigError, ModelError
from batchgen.inputs import models
from batchgen.inputs.dataset import Rows
from batchgen.inputs.row_settings import row_sampling
from batchgen.job.session import Session
from batchgen.job.shard_inputs import ShardInputs
from batchgen.progress import Progress
from batchgen.store.rows import shard_rows
from batchgen.store.shards import Shard
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
            local_rank = resolve_worker(None, None).local_rank
            device, dtype = devices.resolve_device_dtype(cfg, local_rank)
            parallel = tensor_parallel.spec(cfg, self.runner, device)
            handle = Model.open(cfg, models.resolve_source(cfg), device, dtype, parallel)
        else:
            if tokenizer is None:
                raise ModelError("Generator(model=<a loaded model>) needs its tokenizer=.")
            if model_options:
                raise ConfigError(
                    f"{', '.join(sorted(model_options))}: model settings apply to a model "
                    "loaded by name, not to a loaded model."
                )
            handle = Model.loaded(model, tokenizer)
        job = JobConfig(model=handle.settings, runner=self.runner, output=self.output, seed=seed)
        # One session for every call: the model loads once, the batch size is measured once.
        self.session = Session(job, handle)
        devices.set_threads(self.runner.threads)
        # transformers' engines run on these weights; vLLM loads its own at the first call.
        self.model = handle.load() if self.runner.engine != vllm_engine.KIND else None
        self.tokenizer = handle.tokenizer
        self.device = handle.device
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
        seed: int | None = None,
    ) -> list[Completion]:
        """Complete raw text prompts (no chat template), as a base model's job does.

        Sampling is reproducible: a prompt's samples come from (seed, its id, sample index), so
        two calls with the same prompts, ids and seed return the same samples. Give another
        ``seed`` (or other ids) for other samples.

        Args:
            prompts: one prompt or a list.
            sampling: ``sampling.*`` settings (``max_new_tokens``, ``temperature``, ``stop``...),
                or a list of them, one per prompt (each over the defaults; ``seed`` and its own
                ``num_return_sequences`` too), or ``"model"``: the model's generation config (a
                null setting is the model's too).
            ids: one id per prompt (default: the position), which seeds its samples.
            seed: this call's base seed (default: the Generator's); a per-prompt ``seed`` in
                ``sampling`` still wins for its prompt.

        Returns:
            One ``Completion`` per prompt and sample, in input order, then sample order.

        Raises:
            ConfigError: a bad setting; in a per-prompt list, named by its place
                (``sampling[3]: ...``). DataError: a bad or too long prompt, named by id,
                under ``runner.on_bad_row`` / ``runner.on_long_prompt`` = ``error``.
        """
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        dataset = DatasetConfig(prompt_column=_TEXT, chat_template="off")
        return self._run({_TEXT: texts}, dataset, sampling, ids, seed)

    def close(self) -> None:
        """End the processes a tensor-parallel model (``tp_size``) runs in, now rather than
        when this process exits; a later call starts them and loads the model again."""
        self.session.close()
        self.model = None

    def chat(
        self,
        conversations: Sequence[Sequence[Mapping[str, str]]],
        sampling: SamplingConfig | Mapping[str, Any] | None = None,
        *,
        system_prompt: str | None = None,
        ids: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> list[Completion]:
        """Complete conversations (OpenAI-style ``{"role", "content"}`` lists) through the
        model's chat template, as an instruct model's job does (reproducible as ``generate``).

        Args:
            conversations: a list of conversations, each a list of messages.
            sampling: ``sampling.*`` settings, or a list of them, one per conversation.
            system_prompt: prepended to conversations that do not start with a system turn.
            ids: one id per conversation (default: the position).
            seed: this call's base seed (default: the Generator's).

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
        return self._run({_MESSAGES: list(conversations)}, cfg, sampling, ids, seed)

    def _run(self, columns, dataset: DatasetConfig, sampling, ids, seed) -> list[Completion]:
        if isinstance(sampling, Sequence) and not isinstance(sampling, str):
            # One mapping per prompt: the job's rows with their own settings, over the defaults.
            own = [dataclasses.asdict(x) if isinstance(x, SamplingConfig) else x for x in sampling]
            _check_own_sampling(own)
            columns = {**columns, _SAMPLING: own}
            dataset = dataclasses.replace(dataset, sampling_column=_SAMPLING)
            sampling = None
        if sampling == "model":  # null settings are the model's: model.generate()'s own
            sampling = dict.fromkeys(MODEL_DEFAULTS)
        s = convert_sampling(_settings(SamplingConfig, sampling, "sampling"))
        if ids is not None:
            columns = {**columns, "id": [str(i) for i in ids]}
            dataset = dataclasses.replace(dataset, id_column="id")
        validate(dataclasses.replace(self.session.cfg, sampling=s, dataset=dataset))
        if len({len(v) for v in columns.values()}) > 1:
            raise ConfigError(
                f"{', '.join(f'{k}: {len(v)}' for k, v in columns.items())}: one value per prompt."
            )
        plan = self.session.plan(dataset, s)
        rows = Rows(columns=columns, kept_types={})
        inputs = ShardInputs(None, plan, self.runner, self.tokenizer)
        records = inputs.build(Shard(0, 0, len(rows)), rows).records
        if seed is not None:  # the call's base seed, under each row's own
            records = [
                r if r.seed is not None else dataclasses.replace(r, seed=seed) for r in records
            ]
        if not records:
            return []
        engine = self.session.runner(plan).engine
        counted = engine.padded_tokens, engine.cache_pad_slots
        bar = Progress(len(records), self.progress, plan.row_tokens)
        engine.on_step = bar.step
        try:
            results, _ = self.session.generate(records, plan, bar.update)
        finally:
            engine.on_step = None
            bar.close()
        out, _ = shard_rows(records, results, plan.output)
        tuning = self.session.batcher.choices()
        self.stats = {
            "engine": tuning["engine"],
            "tuning": tuning,
            "padded_tokens": engine.padded_tokens - counted[0],
            "cache_pad_slots": engine.cache_pad_slots - counted[1],
        }
        return [Completion(**row) for row in out]


def _check_own_sampling(own: list) -> None:
    """Check each prompt's own settings here, so that a bad one is named as the argument it is
    (``sampling[3]``), not as the job's column and bad-row policy it becomes below.

    Raises:
        ConfigError: naming ``sampling[i]`` and the key.
    """
    defaults = convert_sampling(SamplingConfig())
    for i, value in enumerate(own):
        try:
            row_sampling(defaults, value, f"sampling[{i}]")
        except ValueError as e:
            raise ConfigError(
                f"{e}. Fix that entry of sampling=: one mapping of sampling settings per prompt, "
                "over the defaults (None: the defaults)."
            ) from None


def _model_config(name: str | None, options: Mapping[str, Any]) -> ModelConfig:
    """``model.*`` settings for a name; None: the command line's default model preset."""
    if name is None:
        return dataclasses.replace(compose_job([]).model, **options)
    return _settings(ModelConfig, {"name_or_path": name, **options}, "model")


def compose(overrides: Sequence[str] = ()) -> JobConfig:
    """The job ``batchgen OVERRIDES...`` would run, composed from the packaged configs.

    Raises:
        ConfigError: an override that does not parse or names no setting.
    """
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
