"""Turn dataset rows into prompt records: the exact text and token ids the model will see."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from batchgen.config import DatasetConfig, SamplingConfig
from batchgen.errors import ConfigError, DataError
from batchgen.inputs.blank import is_blank
from batchgen.inputs.dataset import Rows, template_fields
from batchgen.inputs.row_settings import row_samplings, template_kwargs


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


def _row_ids(rows: Rows, cfg: DatasetConfig) -> list[str]:
    if not cfg.id_column:
        return [str(rows.start + i) for i in range(len(rows))]
    ids = [str(v) for v in rows.columns[cfg.id_column]]
    seen: set[str] = set()
    dupes = [i for i in ids if i in seen or seen.add(i)]
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


def _user_turns(rows: Rows, cfg: DatasetConfig, n: int) -> tuple[list[str | None], list[str]]:
    """Each row's user text, or None with a reason for a row that has none."""
    texts: list[str | None] = []
    problems: list[str] = []
    fields = template_fields(cfg.template) if cfg.template else [cfg.prompt_column]
    for i in range(n):
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


def render_texts(
    rows: Rows, cfg: DatasetConfig, tokenizer, chat: bool
) -> tuple[list[str], list[str | None], list[str]]:
    """Render every row to the text the model sees (no tokenizing).

    Returns:
        (ids, texts, problems): per row of ``rows``, in order, its id, its prompt string (None
        for a bad row) and why it is bad ("" for a good row).
    """
    ids = _row_ids(rows, cfg)
    n = len(ids)
    if cfg.messages_column:
        column = rows.columns[cfg.messages_column]
        problems = [
            f"dataset.messages_column {cfg.messages_column!r}: {why}"
            if (why := messages_problem(v))
            else ""
            for v in column
        ]
        conversations = [
            None if problems[i] else [{"role": m["role"], "content": m["content"]} for m in v]
            for i, v in enumerate(column)
        ]
    else:
        user, problems = _user_turns(rows, cfg, n)
        if not chat:
            return ids, user, problems
        conversations = [None if t is None else [{"role": "user", "content": t}] for t in user]
    if cfg.system_prompt:
        system = {"role": "system", "content": cfg.system_prompt}
        conversations = [
            c if c is None or c[0]["role"] == "system" else [system, *c] for c in conversations
        ]
    kwargs = template_kwargs(rows, cfg, problems)
    texts = [
        None
        if c is None or problems[i]
        else tokenizer.apply_chat_template(
            c, tokenize=False, add_generation_prompt=True, **kwargs[i]
        )
        for i, c in enumerate(conversations)
    ]
    return ids, texts, problems


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
    rendered_by_template = chat or bool(cfg.messages_column)
    # (A fast tokenizer fails on an empty list: every row may be bad.)
    encoded = (
        tokenizer([texts[i] for i in good], add_special_tokens=not rendered_by_template)
        if good
        else {"input_ids": []}
    )
    kept = {c: rows.columns[c] for c in cfg.keep_columns}
    records = [
        PromptRecord(
            at + i,
            ids[i],
            texts[i],
            list(tokens),
            {c: v[i] for c, v in kept.items()},
            own[i].sampling if own[i] else None,
            own[i].seed if own[i] else None,
        )
        for i, tokens in zip(good, encoded["input_ids"], strict=True)
    ]
    bad = [Skipped(at + i, ids[i], problems[i]) for i, t in enumerate(texts) if t is None]
    return records, bad


def bad_rows_error(listed: list[Skipped], total: int, lines: bool = False) -> DataError:
    """The error that refuses a job over rows without a usable prompt, naming the first of
    ``total``.

    Args:
        lines: the rows are a jsonl file's lines, one each: name the line too.
    """

    def where(row: int) -> str:
        return f"row {row}, line {row + 1}" if lines else f"row {row}"

    named = "; ".join(f"id {b.id!r} ({where(b.index)}): {b.reason}" for b in listed[:10])
    more = f" (and {total - 10} more)" if total > 10 else ""
    return DataError(
        f"{total} row(s) have no usable prompt: {named}{more}. Fix the data, or set "
        "runner.on_bad_row=skip to leave them out (they are listed in _batchgen/workers/*.errors)."
    )


def apply_bad_row_policy(bad: list[Skipped], policy: str) -> list[Skipped]:
    """``error``: refuse the job, listing the rows; ``skip``: pass them on.

    Raises:
        DataError: with ``error`` when there are bad rows.
    """
    if bad and policy != "skip":
        raise bad_rows_error(bad, len(bad))
    return bad


def check_room(max_prompt_tokens: int | None) -> None:
    """Refuse a job whose ``max_new_tokens`` leaves no room for a prompt in the context.

    Raises:
        ConfigError: naming ``sampling.max_new_tokens``.
    """
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ConfigError(
            f"sampling.max_new_tokens leaves no room for a prompt in the model's context "
            f"({max_prompt_tokens} tokens left); lower it or raise model.max_context."
        )


def apply_length_policy(
    records: list[PromptRecord],
    max_prompt_tokens: int | None,
    policy: str,
    tokenizer,
    job_new_tokens: int = 0,
) -> tuple[list[PromptRecord], list[Skipped]]:
    """Enforce the context limit on a shard's prompts before they are generated.

    Args:
        records: rendered prompts.
        max_prompt_tokens: context length minus the job's ``max_new_tokens``; None when
            unbounded. A row with its own ``max_new_tokens`` (``record.sampling``) gets the
            room its own setting leaves.
        policy: ``error`` (refuse the job), ``truncate_left`` (keep the prompt's end, where the
            generation prompt is) or ``skip`` (leave the row out and report it).
        job_new_tokens: the job's ``max_new_tokens``, which ``max_prompt_tokens`` subtracted.

    Returns:
        (records to generate, skipped rows)

    Raises:
        DataError: with ``error``, listing the offending ids.
    """
    if max_prompt_tokens is None:
        return records, []

    def room(r: PromptRecord) -> int:
        own = r.sampling.max_new_tokens if r.sampling else job_new_tokens
        return max_prompt_tokens + job_new_tokens - own

    long = [r for r in records if len(r.token_ids) > room(r)]
    if not long:
        return records, []
    if policy == "error":
        worst = max(len(r.token_ids) for r in long)
        raise DataError(
            f"{len(long)} prompt(s) exceed the {max_prompt_tokens} tokens left for a prompt "
            f"(context minus sampling.max_new_tokens; longest {worst}), ids "
            f"{[r.id for r in long[:10]]}{' ...' if len(long) > 10 else ''}. Set "
            "runner.on_long_prompt=truncate_left or skip, or lower sampling.max_new_tokens."
        )
    if policy == "skip":
        skipped = [Skipped(r.index, r.id, f"prompt longer than {room(r)} tokens") for r in long]
        long_ids = {r.index for r in long}
        return [r for r in records if r.index not in long_ids], skipped
    for r in long:
        if room(r) < 1:
            raise DataError(
                f"row {r.id!r}: its max_new_tokens leaves no room for a prompt in the context."
            )
        r.token_ids = r.token_ids[-room(r) :]
        r.text = tokenizer.decode(r.token_ids, skip_special_tokens=False)
    return records, []
