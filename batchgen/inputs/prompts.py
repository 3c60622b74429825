"""Turn dataset rows into prompt records: the exact text and token ids the model will see.

Invariant: a row is rendered here and nowhere else, so a prompt is the same text in a job, a
resume's digest and ``Generator``; a row without a usable prompt comes back as a ``Skipped``
naming why, for the row policies (``batchgen.inputs.policies``) to refuse or pass on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from batchgen.config import DatasetConfig, SamplingConfig
from batchgen.errors import ConfigError, DataError
from batchgen.inputs.blank import is_blank
from batchgen.inputs.dataset import Rows
from batchgen.inputs.jsonl import PROBLEM_COLUMN
from batchgen.inputs.row_settings import row_samplings, template_kwargs
from batchgen.inputs.sources import falls_back, plain_fields


@dataclass
class PromptRecord:
    """One input row, rendered and tokenized."""

    index: int  # row position in the dataset: fixes shard membership and output order
    id: str
    text: str
    token_ids: list[int]
    kept: dict[str, Any] = field(default_factory=dict)
    # The row's own sampling and seed (dataset.sampling_column); None: the job's.
    sampling: SamplingConfig | None = None
    seed: int | None = None


@dataclass
class Skipped:
    """A row left out (bad prompt, too long) or failed: in its shard's footer, the worker's
    errors file and the summary."""

    index: int
    id: str
    reason: str


def uses_chat_template(cfg: DatasetConfig, tokenizer) -> bool:
    """Whether prompts go through the tokenizer's chat template (``auto``: when it has one).

    Raises:
        ConfigError: ``dataset.chat_template=on`` for a tokenizer without a template, or a
            messages column without one.
    """
    has = bool(getattr(tokenizer, "chat_template", None))
    if cfg.chat_template == "on" and not has:
        raise ConfigError(
            "dataset.chat_template=on: the tokenizer has no chat template (a base model?); "
            "use dataset.chat_template=auto or off."
        )
    if cfg.messages_column and not has:
        raise ConfigError(
            f"dataset.messages_column={cfg.messages_column!r}: the tokenizer has no chat template "
            "to render messages with; use dataset.prompt_column for a base model."
        )
    return has if cfg.chat_template == "auto" else cfg.chat_template == "on"


def duplicate_ids_error(id_column: str, repeated: list[str]) -> DataError:
    """The error for a ``dataset.id_column`` whose values repeat."""
    return DataError(
        f"dataset.id_column={id_column!r} is not unique: e.g. {sorted(set(repeated))[:5]} "
        "repeat; ids must identify rows for resume and joins."
    )


def _row_ids(rows: Rows, cfg: DatasetConfig, broken: list[str | None]) -> list[str]:
    """Each row's id; a malformed jsonl line's (``broken``), whose own cannot be read, is its
    row index, as when ``dataset.id_column`` is unset."""
    if not cfg.id_column:
        return [str(rows.start + i) for i in range(len(rows))]
    ids = [
        str(rows.start + i) if broken[i] else str(v)
        for i, v in enumerate(rows.columns[cfg.id_column])
    ]
    seen: set[str] = set()
    dupes = [
        row_id
        for i, row_id in enumerate(ids)
        if not broken[i] and (row_id in seen or seen.add(row_id))
    ]
    if dupes:
        raise duplicate_ids_error(cfg.id_column, dupes)
    return ids


def messages_problem(value: Any) -> str | None:
    """Why ``value`` is no usable ``dataset.messages_column`` value, or None when it is."""
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )
    if ok:
        return None
    return (
        "expected a non-empty list of {role, content} string pairs (OpenAI chat format), "
        f"got {str(value)[:80]!r}"
    )


def _text_problem(value: Any) -> str | None:
    if value is None:
        return "missing (null)"
    if not isinstance(value, str):
        return f"not a string: {type(value).__name__} {str(value)[:40]!r}"
    return "empty" if is_blank(value) else None


def _user_turns(
    rows: Rows, cfg: DatasetConfig, which: list[int]
) -> tuple[list[str | None], list[str]]:
    """The plain prompt of each row of ``which``, or None with a reason for a row that has
    none."""
    texts: list[str | None] = []
    problems: list[str] = []
    fields = plain_fields(cfg)
    for i in which:
        values = {k: rows.columns[k][i] for k in fields}
        if cfg.template:  # any value formats; only a missing one leaves a hole in the prompt
            bad = {k: "missing (null)" for k, v in values.items() if v is None}
        else:
            bad = {k: why for k, v in values.items() if (why := _text_problem(v))}
        if bad:
            key = "dataset.template field" if cfg.template else "dataset.prompt_column"
            problems.append("; ".join(f"{key} {k!r}: {why}" for k, why in bad.items()))
            texts.append(None)
            continue
        problems.append("")
        texts.append(cfg.template.format_map(values) if cfg.template else values[fields[0]])
    return texts, problems


def message_rows(rows: Rows, cfg: DatasetConfig) -> list[bool]:
    """Whether each row's prompt is its messages, else its plain prompt (``inputs.sources``)."""
    if not cfg.messages_column:
        return [False] * len(rows)
    column = rows.columns[cfg.messages_column]
    if not falls_back(cfg, rows.columns):
        return [True] * len(column)
    return [v is not None for v in column]


def _with_broken(
    texts: list[str | None], problems: list[str], broken: list[str | None]
) -> tuple[list[str | None], list[str]]:
    """(texts, problems) with a malformed line's row bad for its own reason (its prompt would
    read as missing)."""
    return (
        [None if b else t for b, t in zip(broken, texts, strict=True)],
        [b or p for b, p in zip(broken, problems, strict=True)],
    )


def render_texts(
    rows: Rows, cfg: DatasetConfig, tokenizer, chat: bool
) -> tuple[list[str], list[str | None], list[str]]:
    """Render every row to the text the model sees (no tokenizing): its messages through the
    chat template, or its plain prompt (through the template with ``chat``, else raw).

    Returns:
        (ids, texts, problems): per row of ``rows``, in order, its id, its prompt string (None
        for a bad row) and why it is bad ("" for a good row).
    """
    # A malformed jsonl line's row holds only what is wrong with it (``inputs.jsonl``).
    broken = rows.columns.get(PROBLEM_COLUMN) or [None] * len(rows)
    ids = _row_ids(rows, cfg, broken)
    on_messages = message_rows(rows, cfg)
    problems = [""] * len(ids)
    # Per row: the conversation the chat template renders, or the raw text of a plain prompt.
    turns: list[list[dict] | str | None] = [None] * len(ids)
    for i in (i for i, m in enumerate(on_messages) if m):
        value = rows.columns[cfg.messages_column][i]
        why = messages_problem(value)
        if why:
            problems[i] = f"dataset.messages_column {cfg.messages_column!r}: {why}"
        else:
            turns[i] = [{"role": m["role"], "content": m["content"]} for m in value]
    plain = [i for i, m in enumerate(on_messages) if not m]
    null = f"dataset.messages_column {cfg.messages_column!r}: missing (null), and "
    for i, text, why in zip(plain, *_user_turns(rows, cfg, plain), strict=True):
        problems[i] = why and (null + why if cfg.messages_column else why)
        turns[i] = None if why else [{"role": "user", "content": text}] if chat else text
    if cfg.system_prompt:
        system = {"role": "system", "content": cfg.system_prompt}
        turns = [
            t if not isinstance(t, list) or t[0]["role"] == "system" else [system, *t]
            for t in turns
        ]
    templated = [isinstance(t, list) for t in turns]
    kwargs: list[dict] = [{}] * len(ids)
    if any(templated):  # a row's template arguments matter only where the template renders it
        checked = list(problems)
        kwargs = template_kwargs(rows, cfg, checked)
        problems = [c if t else p for c, p, t in zip(checked, problems, templated, strict=True)]
    texts = [
        None
        if t is None or problems[i]
        else tokenizer.apply_chat_template(
            t, tokenize=False, add_generation_prompt=True, **kwargs[i]
        )
        if templated[i]
        else t
        for i, t in enumerate(turns)
    ]
    return ids, *_with_broken(texts, problems, broken)


def build_records(
    rows: Rows,
    cfg: DatasetConfig,
    tokenizer,
    chat: bool,
    rendered: tuple[list[str], list[str | None], list[str]] | None = None,
    sampling: SamplingConfig | None = None,
) -> tuple[list[PromptRecord], list[Skipped]]:
    """Render and tokenize every row; rows without a usable prompt come back as bad rows.

    Text rendered by a chat template already carries the model's BOS and markers, so it is
    tokenized without adding special tokens again; raw text gets the tokenizer's usual ones.

    Args:
        rendered: ``render_texts``'s result for these rows, when the caller has it already.
        sampling: the job's sampling, over which ``dataset.sampling_column`` sets a row's own
            (a row whose overrides are bad is a bad row).

    Returns:
        (records, bad rows), both in row order; ``index`` counts from ``rows.start``.
    """
    ids, texts, problems = rendered or render_texts(rows, cfg, tokenizer, chat)
    texts, problems = list(texts), list(problems)  # the caller's digest reads ``rendered``
    own = row_samplings(rows, cfg, sampling, texts, problems)
    at = rows.start
    good = [i for i, t in enumerate(texts) if t is not None]
    on_messages = message_rows(rows, cfg)
    tokens: dict[int, list[int]] = {}
    for by_template in (True, False):
        which = [i for i in good if (chat or on_messages[i]) == by_template]
        if which:  # (a fast tokenizer fails on an empty list)
            found = tokenizer([texts[i] for i in which], add_special_tokens=not by_template)
            tokens.update(zip(which, found["input_ids"], strict=True))
    kept = {c: rows.columns[c] for c in cfg.keep_columns}
    records = [
        PromptRecord(
            at + i,
            ids[i],
            texts[i],
            list(tokens[i]),
            {c: v[i] for c, v in kept.items()},
            own[i].sampling if own[i] else None,
            own[i].seed if own[i] else None,
        )
        for i in good
    ]
    bad = [Skipped(at + i, ids[i], problems[i]) for i, t in enumerate(texts) if t is None]
    return records, bad
