"""The session: one model's generation set-up, which the job loop and ``Generator`` both use.

Invariant: what a session resolves is resolved nowhere else. Built once from a converted job
config and a model (its config and tokenizer; the weights load at the first generation), it
resolves a job's or a call's settings into a ``Plan``: the sampling with the model's generation
defaults filled in, whether prompts go through the chat template, the prompt room, the optional
output columns and the engine choice. Its batch runner (the weights, the engine, the tuned batch
size) is built once and kept, so however many calls generate through a session, the model loads
and the batch size is measured once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from batchgen.config import MODEL_DEFAULTS, DatasetConfig, JobConfig, ModelConfig, SamplingConfig
from batchgen.config_checks import resolve_sampling
from batchgen.engine import devices
from batchgen.engine.batching import Batcher
from batchgen.engine.choice import build_engine, choose_engine
from batchgen.engine.constrained import check_constraint
from batchgen.engine.interface import Sample
from batchgen.inputs import models, prompts
from batchgen.inputs.prompts import PromptRecord, Skipped
from batchgen.store.rows import OutputSpec, output_spec


@dataclass
class Model:
    """A model as a session needs it: config and tokenizer at once, the weights on first use.

    Attributes:
        config: the model's config.
        tokenizer: its tokenizer, padding side and pad token set for batching.
        device: where the weights go (``cuda:LOCAL_RANK`` under a launcher).
        dtype: the dtype they load in.
        settings: the ``model.*`` settings.
        source: where the weights are (None for a model loaded by the caller).
        weights: the loaded model, once loaded.
        load_seconds: how long loading the weights took.
    """

    config: Any
    tokenizer: Any
    device: str
    dtype: str
    settings: ModelConfig
    source: models.ModelSource | None = None
    weights: Any = None
    load_seconds: float = 0.0

    @classmethod
    def open(cls, settings: ModelConfig, source: models.ModelSource, device: str, dtype: str):
        """Config and tokenizer of ``source`` (a GGUF converted once), no weights yet.

        Raises:
            ModelError: the model cannot be found, converted or tokenized for batching.
        """
        source = models.convert_gguf(source)
        config, tokenizer = models.load_config_and_tokenizer(source, settings)
        return cls(config, tokenizer, device, dtype, settings, source)

    @classmethod
    def loaded(cls, weights, tokenizer) -> Model:
        """A model the caller loaded (and keeps: it is never moved or modified)."""
        parameter = next(weights.parameters())
        dtype = str(parameter.dtype).removeprefix("torch.")
        return cls(
            weights.config, tokenizer, str(parameter.device), dtype, ModelConfig(), None, weights
        )

    def load(self):
        """The weights, loaded at the first call."""
        if self.weights is None:
            started = time.perf_counter()
            self.weights = devices.load_model(
                self.source, self.config, self.settings, self.device, self.dtype
            )
            self.load_seconds = time.perf_counter() - started
        return self.weights

    def generation_defaults(self) -> dict[str, Any]:
        """What ``model.generate()`` with no arguments samples with (``sampling=model``): from
        the loaded weights, else from the model's ``generation_config.json``."""
        if self.weights is not None:
            return models.generation_defaults(self.weights.generation_config)
        return models.generation_defaults(models.load_generation_config(self.source, self.settings))


@dataclass(frozen=True)
class Plan:
    """A job's (or one ``Generator`` call's) settings, resolved for the session's model.

    Attributes:
        dataset: how its prompts are rendered.
        sampling: how they decode, the model's defaults filled in where settings are null.
        chat: whether prompts go through the chat template.
        room: tokens left for a prompt (context minus ``max_new_tokens``); None: unbounded.
        output: the optional output columns.
        engine_kind: ``choose_engine``'s answer.
    """

    dataset: DatasetConfig
    sampling: SamplingConfig
    chat: bool
    room: int | None
    output: OutputSpec
    engine_kind: str

    @property
    def row_tokens(self) -> int:
        """The most tokens one row can produce: what a row weighs on the progress bar."""
        return self.sampling.max_new_tokens * self.sampling.num_return_sequences


class Session:
    """One model's generation set-up (see the module docstring).

    Args:
        cfg: the job's settings, converted (``conversion.convert``); a ``Generator``'s
            calls bring their own dataset and sampling settings.
        model: the model.
        stop: set by a signal; generation stops between batches.
    """

    def __init__(self, cfg: JobConfig, model: Model, stop: threading.Event | None = None):
        self.cfg = cfg
        self.model = model
        self.stop = stop
        self.context = models.context_length(model.config, model.tokenizer, model.settings)
        self.batcher: Batcher | None = None

    def resolve_sampling(self, sampling: SamplingConfig) -> SamplingConfig:
        """``sampling`` with its null settings (``sampling=model``) taken from the model's
        generation defaults, which are read only when one is null.

        Raises:
            ConfigError: a value the model's defaults give is out of range.
        """
        if all(getattr(sampling, k) is not None for k in MODEL_DEFAULTS):
            return sampling
        return resolve_sampling(sampling, self.model.generation_defaults())

    def plan(
        self, dataset: DatasetConfig | None = None, sampling: SamplingConfig | None = None
    ) -> Plan:
        """The job's settings, or a call's ``dataset`` and converted ``sampling``, resolved.

        Raises:
            ConfigError: the sampling cannot be served (a constraint, the engine setting), or
                leaves no room for a prompt.
        """
        dataset = dataset or self.cfg.dataset
        sampling = self.resolve_sampling(sampling or self.cfg.sampling)
        check_constraint(sampling)
        tokenizer = self.model.tokenizer
        chat = prompts.uses_chat_template(dataset, tokenizer)
        room = self.context - sampling.max_new_tokens if self.context else None
        if not dataset.sampling_column:  # a row with its own max_new_tokens has its own room
            prompts.check_room(room)
        output = output_spec(replace(self.cfg, dataset=dataset, sampling=sampling), tokenizer, chat)
        engine_kind = choose_engine(
            self.cfg.runner,
            sampling,
            bool(getattr(self.model.config, "is_encoder_decoder", False)),
            self.model.device,
            logprobs=bool(output.logprobs or output.top_logprobs),
            per_row=bool(dataset.sampling_column),
        )
        return Plan(dataset, sampling, chat, room, output, engine_kind)

    def runner(self, plan: Plan) -> Batcher:
        """The batch runner, built at the first call: the weights load and the engine is built
        for that plan's engine choice; every later call reuses both, and what they tuned."""
        if self.batcher is None:
            devices.set_threads(self.cfg.runner.threads)
            weights = self.model.load()
            o = self.cfg.output
            engine = build_engine(
                plan.engine_kind,
                weights,
                self.model.tokenizer,
                self.cfg.runner,
                o.logprobs,
                o.top_logprobs,
            )
            self.batcher = Batcher(
                engine, self.cfg.runner, self.cfg.seed, self.stop, plan.engine_kind
            )
        return self.batcher

    def generate(
        self,
        records: list[PromptRecord],
        plan: Plan,
        on_rows: Callable[[int, int], None],
        on_batch: Callable[[list[tuple[int, list[Sample]]]], None] | None = None,
    ) -> tuple[dict[int, list[Sample]], list[Skipped]]:
        """Every record's samples under ``plan`` (``Batcher.run``)."""
        return self.runner(plan).run(records, plan.sampling, on_rows, on_batch)
