"""Output rows: one per sample, in the columns of the shard schema (``writer.output_schema``).

Invariant: the shard loop and the Python API build their rows here and nowhere else, so a prompt
gives the same row in a job's Parquet shard as from ``Generator``: row order, then sample order,
a failed record leaving no row, kept input columns under their output names (``kept_name``),
and the optional columns ``OutputSpec`` turns on, the same for every row of a job.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from batchgen.config import JobConfig, OutputConfig, SamplingConfig
from batchgen.inputs.prompts import PromptRecord
from batchgen.store.summary import Totals
from batchgen.store.writer import kept_name

# output.reasoning=auto splits at these tags when the chat template uses them.
THINK_TAGS = ("<think>", "</think>")


@dataclass(frozen=True)
class OutputSpec:
    """The optional output columns of a job, fixed before its first shard.

    Args:
        reasoning: the (open, close) tags whose text goes to ``reasoning``; None: no split.
        constrained: whether rows are decoded under a JSON schema or regex (a ``valid`` column).
        logprobs: the chosen tokens' log-probabilities (``token_logprobs``, ``logprob_sum``).
        top_logprobs: K alternatives per position (``top_logprobs``); 0: none.
        sampling: the job's sampling (a row's own, ``record.sampling``, wins), for ``valid``.
        token_text: id -> token string, for ``top_logprobs``.
    """

    reasoning: tuple[str, str] | None = None
    constrained: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    token_text: Callable[[int], str] | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        """The optional columns this spec writes (``writer.OPTIONAL_FIELDS`` names)."""
        names = []
        if self.reasoning:
            names += ["reasoning", "reasoning_truncated"]
        if self.constrained:
            names.append("valid")
        if self.logprobs or self.top_logprobs:
            names += ["token_logprobs", "logprob_sum"]
        if self.top_logprobs:
            names.append("top_logprobs")
        return tuple(names)


def output_spec(cfg: JobConfig, tokenizer, chat: bool) -> OutputSpec:
    """The job's optional columns, resolved for its model: fixed before the first shard."""
    s, o, d = cfg.sampling, cfg.output, cfg.dataset
    templated = chat or bool(d.messages_column)
    return OutputSpec(
        reasoning=reasoning_tags(
            o, getattr(tokenizer, "chat_template", None) if templated else None
        ),
        constrained=bool(s.json_schema or s.regex or d.sampling_column),
        logprobs=o.logprobs,
        top_logprobs=o.top_logprobs,
        sampling=s,
        # Every alternative at every position is a token id: decode each distinct one once.
        token_text=functools.lru_cache(maxsize=65536)(lambda token: tokenizer.decode([token])),
    )


def reasoning_tags(output: OutputConfig, chat_template: str | None) -> tuple[str, str] | None:
    """The tags ``output.reasoning`` means for this model: ``auto`` splits at ``<think>`` when
    the chat template uses it, ``off`` never, ``"OPEN CLOSE"`` at those tags."""
    if output.reasoning == "off":
        return None
    if output.reasoning == "auto":
        return THINK_TAGS if chat_template and THINK_TAGS[0] in chat_template else None
    opening, closing = output.reasoning.split()
    return opening, closing


def split_reasoning(prompt: str, text: str, tags: tuple[str, str]) -> tuple[str | None, str, bool]:
    """(reasoning, response, truncated) of one sample.

    Thinking opens with the open tag at the start of the output, or in the prompt when the
    template puts it there (DeepSeek-R1 distills); a close tag alone also ends thinking. Open
    but never closed (cut off by ``max_new_tokens``, or EOS inside it): all of it is reasoning,
    the response is empty, truncated is true. The parts are exact substrings:
    ``text == [open tag] + reasoning + close tag + response``, up to whitespace before the
    open tag. No thinking: (None, text, False).
    """
    opening, closing = tags
    start = 0
    head = text.lstrip()
    if head.startswith(opening):
        start = len(text) - len(head) + len(opening)
    elif not prompt.rstrip().endswith(opening) and closing not in text:
        return None, text, False
    end = text.find(closing, start)
    if end < 0:
        return text[start:], "", True
    return text[start:end], text[end + len(closing) :], False


def shard_rows(
    records: list[PromptRecord], results: dict, spec: OutputSpec | None = None
) -> tuple[list[dict], Totals]:
    """Output rows of one shard (row order, then sample order) and their totals."""
    spec = spec or OutputSpec()
    totals = Totals()
    out = []
    for record in records:
        outs = results.get(record.index)
        if outs is None:
            continue  # failed; recorded with its reason
        totals.rows += 1
        totals.prompt_tokens += len(record.token_ids)
        for k, s in enumerate(outs):
            totals.samples += 1
            totals.completion_tokens += s.completion_tokens
            totals.finish_reasons[s.finish_reason] = (
                totals.finish_reasons.get(s.finish_reason, 0) + 1
            )
            row = {
                "id": record.id,
                "sample_index": k,
                "prompt": record.text,
                "response": s.text,
                "finish_reason": s.finish_reason,
                "prompt_tokens": len(record.token_ids),
                "completion_tokens": s.completion_tokens,
            }
            row.update(_optional(spec, record, s))
            if row.get("valid") is False:
                totals.invalid += 1
            row.update({kept_name(c): v for c, v in record.kept.items()})
            out.append(row)
    return out, totals


def _optional(spec: OutputSpec, record: PromptRecord, sample) -> dict:
    """The optional columns of one sample, as ``spec`` turns them on."""
    row: dict = {}
    response = sample.text
    if spec.reasoning:
        reasoning, response, truncated = split_reasoning(record.text, sample.text, spec.reasoning)
        row.update(reasoning=reasoning, response=response, reasoning_truncated=truncated)
    if spec.constrained:
        from batchgen.engine.constrained import is_valid  # the grammar library: only when used

        row["valid"] = is_valid(response, record.sampling or spec.sampling)
    if spec.logprobs or spec.top_logprobs:
        values = sample.logprobs or []
        row.update(token_logprobs=values, logprob_sum=float(sum(values)))
    if spec.top_logprobs:
        text = spec.token_text or str
        row["top_logprobs"] = [
            [{"token_id": t, "token": text(t), "logprob": lp} for t, lp in position]
            for position in sample.top_logprobs or []
        ]
    return row
