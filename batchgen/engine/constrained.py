"""Constrained decoding: a row under a JSON schema or a regex only ever emits tokens that keep its
text inside that grammar, and ends (EOS only) once the grammar is complete.

Invariant: a row's mask is a pure function of its own constraint and its own tokens so far, and
the mask is applied before temperature, top-k, top-p and the sampling noise (the processor sits
ahead of them), so a constrained sample is an exact draw from the model's distribution restricted
to the grammar, the same whatever other rows (constrained or not) share its batch.

The grammar library is llguidance: JSON schemas and regexes compile in milliseconds (its parser
computes masks lazily, no up-front automaton over the vocabulary) and it fills per-row bitmasks
straight into a torch CPU tensor (in parallel when decoding on a GPU). A matcher never raises on
a bad token: it enters an error state, which this module treats as "stopped" (EOS only).

Shapes: R rows (B prompts x n samples), V vocabulary, W = ceil(V / 32) mask words.
"""

from __future__ import annotations

import functools
import json
import re
import weakref
from collections import OrderedDict
from typing import NamedTuple

import llguidance
import llguidance.hf
import torch
from transformers import LogitsProcessor

from batchgen.config import SamplingConfig
from batchgen.errors import ConfigError
from batchgen.inputs.prompts import PromptRecord

# Compact JSON: with flexible whitespace a small model can emit spaces and newlines until
# max_new_tokens runs out. A schema's own "x-guidance" options (e.g. whitespace_flexible) win.
JSON_OPTIONS = {"whitespace_flexible": False}
# Distinct constraints kept compiled per tokenizer: per-row schemas may be many.
MAX_GRAMMARS = 1024


class Constraint(NamedTuple):
    """What a row's text must match: ``kind`` is ``json_schema`` (canonical schema text, as
    ``conversion.read_json_schema`` leaves it) or ``regex`` (matched whole)."""

    kind: str
    text: str


def constraint_of(sampling: SamplingConfig) -> Constraint | None:
    """The constraint a sampling config sets, or None."""
    if sampling.json_schema is not None:
        return Constraint("json_schema", sampling.json_schema)
    if sampling.regex is not None:
        return Constraint("regex", sampling.regex)
    return None


def row_constraint(record: PromptRecord, sampling: SamplingConfig) -> Constraint | None:
    """A row's constraint: its own sampling's (``record.sampling``) when it has one, else the
    job's ``sampling``."""
    return constraint_of(record.sampling or sampling)


def check_constraint(sampling: SamplingConfig) -> None:
    """Refuse, before any model loads, a JSON schema or regex the grammar library cannot enforce.

    Raises:
        ConfigError: naming ``sampling.json_schema`` or ``sampling.regex``.
    """
    constraint = constraint_of(sampling)
    if constraint is not None:
        grammar(constraint)


def grammar(constraint: Constraint) -> str:
    """The llguidance grammar of a constraint, checked without a tokenizer.

    Raises:
        ConfigError: naming ``sampling.<kind>``: a schema keyword or regex syntax (look-around,
            back-references) the grammar library cannot enforce, or an unparsable text.
    """
    key = f"sampling.{constraint.kind}={constraint.text[:60]!r}"
    if constraint.kind == "json_schema":
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(
                constraint.text, defaults=JSON_OPTIONS
            )
        except ValueError as e:
            raise ConfigError(f"{key}: not a JSON object ({e}).") from e
    else:
        text = llguidance.LLMatcher.grammar_from_regex(constraint.text)
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text)
    if failed:
        raise ConfigError(f"{key}: constrained decoding cannot enforce it: {messages[0].strip()}")
    return text


class GrammarCache:
    """One tokenizer's vocabulary as llguidance sees it (built once, about half a second) and a
    pristine matcher per distinct constraint, copied for each row (microseconds).

    Raises:
        ConfigError: the tokenizer is not a fast (Rust ``tokenizers``) one.
    """

    def __init__(self, tokenizer, stop_ids: list[int]):
        try:
            self.vocab = llguidance.hf.from_tokenizer(tokenizer, eos_token=stop_ids)
        except ValueError as e:
            raise ConfigError(
                f"sampling.json_schema / sampling.regex: constrained decoding needs a fast "
                f"tokenizer ({e})."
            ) from e
        self.templates: OrderedDict[Constraint, llguidance.LLMatcher] = OrderedDict()

    def matcher(self, constraint: Constraint) -> llguidance.LLMatcher:
        """A fresh matcher at the start of ``constraint``'s grammar.

        Raises:
            ConfigError: see ``grammar``.
        """
        template = self.templates.get(constraint)
        if template is None:
            template = llguidance.LLMatcher(self.vocab, grammar(constraint), log_level=0)
            if template.is_error():  # a grammar that only fails against this vocabulary
                raise ConfigError(
                    f"sampling.{constraint.kind}={constraint.text[:60]!r}: "
                    f"{template.get_error().strip()}"
                )
            self.templates[constraint] = template
            if len(self.templates) > MAX_GRAMMARS:
                self.templates.popitem(last=False)
        else:
            self.templates.move_to_end(constraint)
        return template.deep_copy()


# Keyed weakly by the transformers tokenizer, then by its stop ids (llguidance's EOS set is part
# of its vocabulary): a tokenizer garbage-collected takes its caches with it.
_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def grammar_cache(tokenizer, stop_ids: list[int]) -> GrammarCache:
    """The cache of ``tokenizer`` with these stop ids, built on first use.

    Raises:
        ConfigError: see ``GrammarCache``.
    """
    by_stop = _CACHES.setdefault(tokenizer, {})
    key = tuple(stop_ids)
    if key not in by_stop:
        by_stop[key] = GrammarCache(tokenizer, stop_ids)
    return by_stop[key]


@functools.lru_cache(maxsize=1)
def _executor() -> llguidance.LLExecutor:
    """The thread pool that fills the rows' masks in parallel while the GPU is busy."""
    return llguidance.LLExecutor()


_BITS = torch.arange(32, dtype=torch.int32)


def _words(ids: list[int], words: int) -> torch.Tensor:
    """(W,) int32 bitmask allowing ``ids`` only (bit k of word w is token 32w + k)."""
    bits = [0] * words
    for i in ids:
        bits[i // 32] |= 1 << (i % 32)
    # int32 holds bit 31 as the sign: the same 32 bits, read as a signed number.
    return torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits], dtype=torch.int32)


def _unpack(bitmask: torch.Tensor, vocab: int, beyond: torch.Tensor) -> torch.Tensor:
    """(R, W) int32 bitmask -> (R, vocab) bool; ids past its 32W bits (a model's vocabulary
    padded beyond the tokenizer's) take ``beyond`` (R,), their row's answer."""
    allowed = ((bitmask[:, :, None] >> _BITS.to(bitmask.device)) & 1).bool()  # (R, W, 32)
    allowed = allowed.view(bitmask.shape[0], -1)  # (R, 32W)
    if allowed.shape[1] < vocab:
        pad = beyond[:, None].expand(-1, vocab - allowed.shape[1])  # (R, V - 32W)
        allowed = torch.cat([allowed, pad], dim=1)
    return allowed[:, :vocab]


class GrammarConstraint(LogitsProcessor):
    """Sets the scores of tokens a row's grammar disallows to -inf, row by row.

    Goes first in the processor list, ahead of the warpers and ``GumbelSampler``. Each call
    first feeds every constrained row the token chosen at the previous step (``input_ids[:, -1]``;
    none at the first step), then masks. A row whose grammar is complete, or that has ended
    (a stop id emitted, pads after it), is allowed its stop ids only.

    Args:
        constraints: (R,) one per row; None leaves that row unconstrained.
        tokenizer: the (fast) transformers tokenizer the model decodes with.
        stop_ids: the ids that end a row (the engine's EOS ids), at least one.
        prompt_width: the width of the decoder ids before the first new token.

    Raises:
        ConfigError: a constraint the grammar library cannot enforce, or a slow tokenizer.
    """

    def __init__(
        self,
        constraints: list[Constraint | None],
        tokenizer,
        stop_ids: list[int],
        prompt_width: int,
    ):
        cache = grammar_cache(tokenizer, stop_ids)
        self.rows = [i for i, c in enumerate(constraints) if c is not None]
        self.matchers = {i: cache.matcher(constraints[i]) for i in self.rows}
        self.stop_ids = stop_ids
        self.ended: set[int] = set()
        self.prompt_width = prompt_width
        self.words = (cache.vocab.vocab_size + 31) // 32
        # One mask per row, all applied in one pass: unconstrained rows keep -1 (every bit set).
        self.bitmask = torch.full((len(constraints), self.words), -1, dtype=torch.int32)  # (R, W)
        self.only_stop = _words(stop_ids, self.words)  # (W,)
        self.free = torch.tensor([c is None for c in constraints])  # (R,)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """(R, L) ids so far, (R, V) scores -> (R, V) scores, disallowed tokens at -inf."""
        if input_ids.shape[1] > self.prompt_width:
            self._consume(input_ids[:, -1].tolist())
        live, done = [], []
        for i in self.rows:
            (done if i in self.ended or self.matchers[i].is_stopped() else live).append(i)
        if live:
            self._fill(live, on_cpu=scores.device.type == "cpu")
        if done:
            self.bitmask[done] = self.only_stop
        device = scores.device
        allowed = _unpack(self.bitmask.to(device), scores.shape[-1], self.free.to(device))
        return torch.where(allowed, scores, float("-inf"))  # (R, V)

    def _fill(self, live: list[int], on_cpu: bool) -> None:
        """Write the masks of rows ``live`` into their rows of ``self.bitmask``."""
        if on_cpu:
            # The forward pass owns every core: a pool's threads spinning after each fill made
            # the (R, V) tensor ops that follow several times slower on 2 cores (measured), so
            # the rows are filled on this thread, at tens of microseconds each.
            for i in live:
                self.matchers[i].unsafe_compute_mask_ptr(self.bitmask[i].data_ptr(), self.words * 4)
            return
        _executor().unsafe_compute_mask_ptr(
            [(self.matchers[i], i) for i in live],
            self.bitmask.data_ptr(),
            self.words * 4,
            self.bitmask.shape[0],
        )

    def _consume(self, tokens: list[int]) -> None:
        for i in self.rows:
            if i in self.ended:
                continue  # generate pads an ended row; its matcher has nothing to learn
            if tokens[i] in self.stop_ids:
                self.ended.add(i)
            else:
                # A token the mask forbade (a pad after a stop string ended the row) puts the
                # matcher in its error state, which is_stopped reports: no exception.
                self.matchers[i].consume_token(tokens[i])


def constraint_processor(
    records: list[PromptRecord],
    sampling: SamplingConfig,
    n: int,
    tokenizer,
    eos_ids: set[int],
    prompt_width: int,
) -> GrammarConstraint | None:
    """The processor for a batch of ``records`` x ``n`` samples, or None when no row is
    constrained.

    Without EOS ids (``sampling.ignore_eos``) a complete row emits the tokenizer's EOS, which
    decodes to nothing, until max_new_tokens.

    Raises:
        ConfigError: see ``GrammarConstraint``; also no end-of-sequence token at all.
    """
    constraints = [row_constraint(r, sampling) for r in records for _ in range(n)]  # (R,)
    if not any(constraints):
        return None
    stop_ids = sorted(eos_ids) or [tokenizer.eos_token_id]
    if stop_ids == [None]:
        raise ConfigError(
            "sampling.json_schema / sampling.regex: the tokenizer has no end-of-sequence token "
            "to end a row whose grammar is complete."
        )
    return GrammarConstraint(constraints, tokenizer, stop_ids, prompt_width)


@functools.lru_cache(maxsize=64)
def _schema_validator(schema_text: str):
    import jsonschema  # only where responses are checked, not on every engine import

    schema = json.loads(schema_text)
    return jsonschema.validators.validator_for(schema)(schema)


def is_valid(text: str, sampling: SamplingConfig) -> bool | None:
    """Whether a response satisfies its constraint: None when ``sampling`` sets none.

    A JSON schema: the text parses as JSON and validates (``format`` is an annotation, as the
    JSON Schema default has it). A regex: it matches the whole text. A sample cut by
    max_new_tokens is usually invalid.
    """
    constraint = constraint_of(sampling)
    if constraint is None:
        return None
    if constraint.kind == "regex":
        return re.fullmatch(constraint.text, text) is not None
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return _schema_validator(constraint.text).is_valid(value)
