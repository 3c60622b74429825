"""The static engine: pad a planned batch, call transformers' ``generate``, slice off the prompt.

Invariant: the caller's model is never modified: the engine works on a shallow copy whose
generation config is its own, one per distinct setting (``batchgen.engine.interface`` has the
contract it keeps; ``batchgen.engine.decode`` turns its rows into samples).

Shapes: B prompts, T padded prompt length, n samples per prompt, N new tokens.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from batchgen.config import SamplingConfig
from batchgen.engine.batch_plan import row_limit
from batchgen.engine.constrained import constraint_processor
from batchgen.engine.decode import Decoder, eos_token_ids
from batchgen.engine.devices import input_device
from batchgen.engine.interface import Engine, Sample
from batchgen.engine.logprobs import LogprobRecorder
from batchgen.engine.prefill import prefill, supports_prefill
from batchgen.engine.sampling import sample_keys, sampling_processors
from batchgen.errors import Interrupted
from batchgen.inputs.prompts import PromptRecord

# With runner.compile, KV-cache lengths are rounded up to a multiple of this, so batches of
# similar prompt lengths reuse one compiled decoding step.
COMPILE_CACHE_BUCKET = 256


class StepCounter(BaseStreamer):
    """A ``generate`` streamer that reports how many rows produced a token at each step.

    ``generate`` hands it the prompt first (skipped), then each step's new tokens, one per row
    (R,); a row that has produced an end-of-sequence id, or its own ``limits`` of tokens, only
    pads from then on.
    """

    def __init__(self, limits: list[int], eos_ids: set[int], on_step: Callable[[int], None]):
        self.left = list(limits)
        self.eos_ids = eos_ids
        self.on_step = on_step
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        tokens = 0
        for i, token in enumerate(value.reshape(-1).tolist()):
            if self.left[i] > 0:
                tokens += 1
                self.left[i] = 0 if token in self.eos_ids else self.left[i] - 1
        self.on_step(tokens)

    def end(self) -> None:
        """Nothing to flush: counts are reported as they come."""


class StopOnEvent(StoppingCriteria):
    """Ends ``generate`` at the next decoding step once ``event`` is set (a stop request)."""

    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        stop = self.event.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class RowLimits(StoppingCriteria):
    """Ends each row at its own token limit (rows of one batch may ask for different
    ``max_new_tokens``); ``generate`` pads a row it ended, and the batch ends with its last row.

    Args:
        limits: each row's new tokens, (R,).
        width: the prompt width ``generate``'s ids start with.
    """

    def __init__(self, limits: list[int], width: int):
        self.limits = torch.tensor(limits)
        self.width = width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        self.limits = self.limits.to(input_ids.device)
        return self.limits <= input_ids.shape[1] - self.width


def generation_config(model, sampling: SamplingConfig, pad_id: int, eos_ids: set[int]):
    """The model's generation config with every sampling setting overridden by ours.

    Model repos ship their own defaults (Qwen's turn sampling on, for instance); the job's
    config is the whole truth, so unused knobs are cleared rather than inherited.
    """
    gc = copy.deepcopy(model.generation_config)
    gc.max_new_tokens = sampling.max_new_tokens
    gc.max_length = None
    gc.min_new_tokens = None
    gc.num_beams = 1
    # Sampling runs as greedy decoding over per-sample noised scores (batchgen.engine.sampling), so
    # generate's own warpers and shared RNG stay off; samples are expanded as separate rows.
    gc.do_sample = False
    gc.temperature = None
    gc.top_p = None
    gc.top_k = None
    gc.repetition_penalty = (
        sampling.repetition_penalty if sampling.repetition_penalty != 1 else None
    )
    gc.num_return_sequences = 1
    # Decoding from the prefilled cache needs it; repos saved with gradient checkpointing say
    # use_cache=false, and some name a cache of their own, which generate() refuses with ours.
    gc.use_cache = True
    gc.cache_implementation = None
    gc.pad_token_id = pad_id
    gc.eos_token_id = sorted(eos_ids) or None
    gc.stop_strings = list(sampling.stop) or None
    return gc


def _key(sampling: SamplingConfig) -> str:
    return json.dumps(asdict(sampling), sort_keys=True)


def decode_bucket(rows: int) -> int:
    """The compiled batch size ``rows`` runs at: the smallest power of two, or 1.5 times one,
    that holds it (1, 2, 3, 4, 6, 8, 12, 16, 24, ...), so filler rows cost at most a third."""
    size = 1
    while True:
        for candidate in (size, size * 3 // 2):
            if candidate >= rows:
                return candidate
        size *= 2


class StaticEngine(Engine):
    """Static batching over ``model.generate``, one call per planned batch of prompt records.

    Args:
        model: the loaded model (not modified: see the module docstring).
        tokenizer: its tokenizer, left-padding, with a pad token.
        compile: ``runner.compile``: torch.compile'd decoding over a static cache.
        prefill_tokens: ``runner.prefill_tokens``: padded prompt tokens per prefill pass.
        logprobs: record the chosen tokens' log-probabilities (``output.logprobs``).
        top_logprobs: record the K most likely tokens at each position (``output.top_logprobs``).
    """

    kind = "static"

    def __init__(
        self,
        model,
        tokenizer,
        compile: bool = False,
        prefill_tokens: int = 2048,
        logprobs: bool = False,
        top_logprobs: int = 0,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.encoder_decoder = bool(model.config.is_encoder_decoder)
        eos_ids = eos_token_ids(model.generation_config, tokenizer)
        self.decoder = Decoder(tokenizer, eos_ids, tokenizer.pad_token_id)
        # A shallow copy shares the weights but not the attributes: the generation config is set
        # on it, not on the caller's model. Passing it to each generate() call instead would not
        # do: generate() fills the unset (None) fields from the model's own config, which would
        # bring back the repo's defaults this config clears.
        self.model = copy.copy(model)
        self.source_model = model
        self.compile = compile
        self.prefill_tokens = prefill_tokens
        self.chunked_prefill = supports_prefill(model)
        self.cache_len = 0  # with compile: the longest cache so far, which later batches reuse
        self.device = input_device(model)
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs
        self.configs: dict[str, object] = {}  # one generation config per distinct setting

    def use(self, sampling: SamplingConfig) -> None:
        """Set the model copy's generation config to ``sampling``'s (built once per setting)."""
        key = _key(sampling)
        if key not in self.configs:
            eos = self.decoder.eos_ids(sampling)
            gc = generation_config(self.source_model, sampling, self.decoder.pad_id, eos)
            # generate() compiles the forward whenever it decodes from a static cache on a GPU;
            # a fresh shape is a recompile, so only when asked for, with cache lengths in buckets.
            gc.disable_compile = not self.compile
            self.configs[key] = gc
        self.model.generation_config = self.configs[key]

    def generate(
        self, records: list[PromptRecord], seed: int, sampling: SamplingConfig
    ) -> list[list[Sample]]:
        """Generate ``num_return_sequences`` samples for each record, in record order.

        Each sample draws its randomness from its own key (``seed``, or the row's own
        ``record.seed``, row id, sample index), so the result does not depend on which records
        share the batch. ``sampling`` is the batch's (rows with their own settings are batched
        with those that decode alike; a row's own constraint is read from its record).
        """
        self.use(sampling)
        eos_ids = self.decoder.eos_ids(sampling)
        real = len(records)
        if self.compile:
            # A few batch shapes to compile, not one per batch size: copies of the last record
            # fill the batch up to its bucket (their samples are dropped; no row's sample
            # depends on its neighbours).
            records = records + [records[-1]] * (decode_bucket(real) - real)
        n = sampling.num_return_sequences
        rows = [r.token_ids for r in records for _ in range(n)]  # R = B*n rows
        limits = [row_limit(r, sampling) for r in records for _ in range(n)]  # (R,)
        padded = self.tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
        input_ids = padded["input_ids"].to(self.device)  # (R, T)
        attention_mask = padded["attention_mask"].to(self.device)  # (R, T), 0 on pads
        # Processors see the decoder's ids: the prompt for decoder-only models, only the
        # decoder start token for encoder-decoder ones.
        width = 1 if self.encoder_decoder else input_ids.shape[1]
        keys = sample_keys(seed, [r.id for r in records], n, [r.seed for r in records])
        procs = sampling_processors(sampling, keys, width, self.device)
        grammar = constraint_processor(records, sampling, n, self.tokenizer, eos_ids, width)
        if grammar is not None:
            # Ahead of the warpers and the noise: they see only allowed tokens, so a sample
            # stays an exact, batch-invariant draw from the model restricted to the grammar.
            procs.insert(0, grammar)
        recorder = None
        if self.logprobs or self.top_logprobs:
            # First, so it records the model's distribution, before any processor reshapes it.
            recorder = LogprobRecorder(self.top_logprobs)
            procs.insert(0, recorder)
        extra = {"tokenizer": self.tokenizer} if sampling.stop else {}
        if self.on_step is not None:
            extra["streamer"] = StepCounter(limits, eos_ids, self.on_step)
        criteria = [StopOnEvent(self.stop)] if self.stop is not None else []
        if min(limits) < sampling.max_new_tokens:
            criteria.append(RowLimits(limits, width))
        if criteria:
            extra["stopping_criteria"] = StoppingCriteriaList(criteria)
        with torch.inference_mode():
            extra.update(self._cache(records, attention_mask, sampling))
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, logits_processor=procs, **extra
            )  # (R, width + N)
        new_tokens = out[:, width:]  # (R, N)
        self.cache_pad_slots += int((attention_mask == 0).sum())
        recorded = recorder.finish(new_tokens) if recorder else [None] * len(rows)
        # A row ended at its own limit is pads after it: cut there, it ended by "length".
        samples = [
            self.decoder.sample(row[:limit], sampling, scores, self.logprobs)
            for row, scores, limit in zip(new_tokens.tolist(), recorded, limits, strict=True)
        ]
        per_record = [samples[i * n : (i + 1) * n] for i in range(real)]
        if self.stop is not None and self.stop.is_set():
            raise Interrupted(_finished(records[:real], per_record, sampling))
        return per_record

    def _prefilled(self) -> None:
        """After each prefill pass: a stop request ends the batch here, nothing finished."""
        if self.stop is not None and self.stop.is_set():
            raise Interrupted
        if self.on_prefill is not None:
            self.on_prefill()

    def _cache(
        self, records: list[PromptRecord], attention_mask: torch.Tensor, sampling: SamplingConfig
    ) -> dict:
        """generate() arguments for the KV cache: prefilled in chunks where the model allows.

        Otherwise generate() prefills the padded batch itself, pads included.
        """
        filled = None
        if self.chunked_prefill:
            prompts = [r.token_ids for r in records]
            n = sampling.num_return_sequences
            length = attention_mask.shape[1] - 1 + sampling.max_new_tokens
            if self.compile:  # one shape for as many batches as possible
                length = max(
                    self.cache_len, -(-length // COMPILE_CACHE_BUCKET) * COMPILE_CACHE_BUCKET
                )
                self.cache_len = length
            filled = prefill(
                self.model,
                prompts,
                n,
                self.decoder.pad_id,
                length,
                self.prefill_tokens,
                self._prefilled,
            )
        if filled is None:
            # Pad slots per prompt, as the chunks count them: each of its samples repeats them.
            width = attention_mask.shape[1]
            self.padded_tokens += sum(width - len(r.token_ids) for r in records)
            return {"cache_implementation": "static"} if self.compile else {}
        self.padded_tokens += filled.pad_slots
        return {"cache": filled.cache}


def _finished(records, per_record, sampling: SamplingConfig) -> list:
    """The records of a batch a stop ended whose samples were all complete: each ended by
    itself (an end-of-sequence id or a stop string) or ran to its row's ``max_new_tokens``."""
    return [
        (record, samples)
        for record, samples in zip(records, per_record, strict=True)
        if all(
            s.finish_reason == "stop" or s.completion_tokens >= row_limit(record, sampling)
            for s in samples
        )
    ]
