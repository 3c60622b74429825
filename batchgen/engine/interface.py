"""The engine interface: what every engine receives, returns and guarantees.

An engine turns prompt records into samples. batchgen keeps everything around it: rendering and
tokenizing (``batchgen.inputs.prompts``), length checks, batching and the out-of-memory split
(``batchgen.engine.batching``), decoding the token ids an engine produces
(``batchgen.engine.decode``) and writing rows. Implementations: ``static.StaticEngine``
(transformers' ``generate`` over planned batches) and ``continuous.ContinuousEngine``
(transformers' continuous batching of a whole shard, with the static path for the rest).

What an engine receives:

- ``records``: prompt records, each with its token ids (``PromptRecord.token_ids``), its row id,
  and optionally its own seed and sampling (``dataset.sampling_column``);
- ``seed``: the job's base seed;
- ``sampling``: the settings the batch decodes with (every record of a call shares them, but a
  record's own JSON schema or regex).

What it returns: one list per record, in record order, of ``num_return_sequences`` ``Sample``s.

What it must guarantee:

- Per-sample randomness: sample ``k`` of row ``id`` draws from a key derived from (seed, or the
  row's own seed; row id; k) (``batchgen.engine.sampling``), never from batch position or a
  shared generator, so a row's samples do not depend on which rows share its batch.
- Finish reasons: ``stop`` when an end-of-sequence id (unless ``ignore_eos``) or a stop string
  ended the sample, ``length`` when ``max_new_tokens`` did.
- Token counts: ``completion_tokens`` counts the tokens generated, the end-of-sequence id
  included when it ended the sample; the text never ends in a character the limit cut in two.
- Log-probabilities (``logprobs`` / ``top_logprobs`` set): the model's own, one per counted
  token, before temperature, top-k/top-p and any constraint mask.
- Checkpoints: none of its own; a finished call's samples are final, so the caller may persist
  them (``batchgen.store.checkpoints``) and a resume reuses them as they are.
- Out of memory: raise the device's error and keep no state from the failed call; the caller
  splits the batch and calls again (outputs do not depend on batch composition).
- Stop: once ``stop`` is set, stop at the next decoding step (or prefill pass) and raise
  ``Interrupted`` with the rows that had finished (``Interrupted.partial``); the rest are
  generated again on resume, as they would have been (per-sample seeds).
- Progress: ``on_step(tokens)`` after each decoding step with the tokens it produced, and
  ``on_prefill()`` after each prefill pass, where the engine has such steps. An engine whose rows
  finish on their own schedule reports each step as ``on_step(0)`` (work moving) and its tokens
  with the rows that finish (``generate_all``'s ``on_finished``).

An engine that schedules requests itself (continuous batching, vLLM) also serves a whole shard's
records at once (``generate_all``, where ``serves`` says it can): it hands over rows as they
finish, so the caller can checkpoint them, and stops at its next step when asked to.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from batchgen.config import SamplingConfig
from batchgen.inputs.prompts import PromptRecord


@dataclass
class Sample:
    """One completion of one prompt."""

    text: str
    finish_reason: str  # "stop": EOS or a stop string; "length": max_new_tokens reached
    completion_tokens: int
    # With output.logprobs: the model's log-probability of each of the completion_tokens
    # (batchgen.engine.logprobs says which distribution); None when not asked for.
    logprobs: list[float] | None = None
    # With output.top_logprobs=K: per completion token, the K most likely (token id, log-prob)
    # pairs, most likely first; None when not asked for.
    top_logprobs: list[list[tuple[int, float]]] | None = None


class Engine(ABC):
    """An engine over one loaded model (the contract is the module docstring).

    Attributes every engine sets: ``kind`` (its ``runner.engine`` name), ``model``,
    ``tokenizer``, ``device``, ``encoder_decoder``, ``chunked_prefill`` (prompts are prefilled
    apart from decoding, so the memory plan reserves one prefill pass), ``logprobs`` and
    ``top_logprobs`` (what it records), and the counters ``padded_tokens`` (pad slots computed
    in prefill) and ``cache_pad_slots`` (pad slots held in decode KV caches).
    """

    kind: str

    def __init__(self) -> None:
        self.on_step: Callable[[int], None] | None = None
        self.on_prefill: Callable[[], None] | None = None
        # Set by a stop request: the engine stops at its next step (see the module docstring).
        self.stop: threading.Event | None = None
        self.padded_tokens = 0
        self.cache_pad_slots = 0

    @abstractmethod
    def generate(
        self, records: list[PromptRecord], seed: int, sampling: SamplingConfig
    ) -> list[list[Sample]]:
        """The samples of every record, in record order (a planned batch)."""

    def serves(self, sampling: SamplingConfig, per_row: bool) -> bool:
        """Whether ``generate_all`` serves a shard of records decoding with ``sampling``
        (``per_row``: some rows carry their own settings)."""
        return False

    def generate_all(
        self,
        records: list[PromptRecord],
        seed: int,
        sampling: SamplingConfig,
        on_finished: Callable[[list[tuple[PromptRecord, list[Sample]]]], None] | None = None,
        stop: threading.Event | None = None,
    ) -> list[list[Sample]]:
        """The samples of a whole shard's records, the engine scheduling them itself (where
        ``serves`` says so); ``on_finished`` receives rows as they finish.

        Raises:
            Interrupted: ``stop`` was set; the rows ``on_finished`` received are final.
            NotImplementedError: the engine takes planned batches only.
        """
        raise NotImplementedError(f"the {self.kind} engine takes planned batches only")
