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
from pathlib import Path

from batchgen.config import MODEL_DEFAULTS, DatasetConfig, JobConfig, SamplingConfig
from batchgen.config_checks import resolve_sampling
from batchgen.engine import devices
from batchgen.engine.batching import Batcher
from batchgen.engine.choice import build_engine, choose_engine
from batchgen.engine.constrained import check_constraint
from batchgen.engine.devices import Model
from batchgen.engine.interface import Sample
from batchgen.inputs import models, policies, prompts
from batchgen.inputs.prompts import PromptRecord, Skipped
from batchgen.store.rows import OutputSpec, output_spec


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
        log_file: where an engine's own messages go (vLLM's), if it has any.
    """

    def __init__(
        self,
        cfg: JobConfig,
        model: Model,
        stop: threading.Event | None = None,
        log_file: Path | None = None,
    ):
        self.cfg = cfg
        self.model = model
        self.stop = stop
        self.log_file = log_file
        self.load_seconds = 0.0  # building the engine: the weights loaded, vLLM started
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
            policies.check_room(room)
        output = output_spec(replace(self.cfg, dataset=dataset, sampling=sampling), tokenizer, chat)
        engine_kind = choose_engine(
            self.cfg.runner,
            sampling,
            bool(getattr(self.model.config, "is_encoder_decoder", False)),
            self.model.device,
            logprobs=bool(output.logprobs or output.top_logprobs),
            per_row=bool(dataset.sampling_column),
            model=self.model.settings,
        )
        return Plan(dataset, sampling, chat, room, output, engine_kind)

    def runner(self, plan: Plan) -> Batcher:
        """The batch runner, built at the first call: the engine is built (the weights load)
        for that plan's engine choice; every later call reuses both, and what they tuned."""
        if self.batcher is None:
            devices.set_threads(self.cfg.runner.threads)
            o = self.cfg.output
            started = time.perf_counter()
            engine = build_engine(
                plan.engine_kind,
                self.model,
                self.cfg.runner,
                o.logprobs,
                o.top_logprobs,
                self.context,
                self.log_file,
            )
            self.load_seconds = time.perf_counter() - started
            self.batcher = Batcher(
                engine, self.cfg.runner, self.cfg.seed, self.stop, plan.engine_kind
            )
        return self.batcher

    def close(self) -> None:
        """Let go of what outlives a call: a tensor-parallel group's processes."""
        self.model.close()
        self.batcher = None

    def generate(
        self,
        records: list[PromptRecord],
        plan: Plan,
        on_rows: Callable[[int, int], None],
        on_batch: Callable[[list[tuple[int, list[Sample]]]], None] | None = None,
    ) -> tuple[dict[int, list[Sample]], list[Skipped]]:
        """Every record's samples under ``plan`` (``Batcher.run``)."""
        return self.runner(plan).run(records, plan.sampling, on_rows, on_batch)
