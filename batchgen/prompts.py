"""Turn dataset rows into prompt records: the exact text and token ids the model will see."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from batchgen.config import DatasetConfig
from batchgen.data import Rows
from batchgen.errors import ConfigError, DataError


@dataclass
class PromptRecord:
    """One input row, rendered and tokenized."""

    index: int  # row position in the dataset: fixes shard membership and output order
    id: str
    text: str
    token_ids: list[int]
    kept: dict[str, Any] = field(default_factory=dict)


@dataclass
class Skipped:
    """A row left out by the long-prompt policy, reported in the summary."""

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


def _row_ids(rows: Rows, cfg: DatasetConfig) -> list[str]:
    n = len(rows)
    if not cfg.id_column:
        return [str(i) for i in range(n)]
    ids = [str(v) for v in rows.columns[cfg.id_column]]
    seen: set[str] = set()
    dupes = [i for i in ids if i in seen or seen.add(i)]
    if dupes:
        raise DataError(
            f"dataset.id_column={cfg.id_column!r} is not unique: e.g. {sorted(set(dupes))[:5]} "
            "repeat; ids must identify rows for resume and joins."
        )
    return ids


def _check_messages(value: Any, row_id: str, column: str) -> list[dict[str, str]]:
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
    if not ok:
        raise DataError(
            f"dataset.messages_column={column!r}, row id {row_id!r}: expected a non-empty list of "
            f"{{role, content}} string pairs (OpenAI chat format), got {str(value)[:120]!r}."
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _user_texts(rows: Rows, cfg: DatasetConfig, ids: list[str]) -> list[str]:
    if cfg.template:
        keys = list(rows.columns)
        return [
            cfg.template.format_map({k: rows.columns[k][i] for k in keys}) for i in range(len(ids))
        ]
    column = rows.columns[cfg.prompt_column]
    for i, value in enumerate(column):
        if not isinstance(value, str) or not value.strip():
            raise DataError(
                f"dataset.prompt_column={cfg.prompt_column!r}, row id {ids[i]!r}: expected a "
                f"non-empty string, got {value!r}."
            )
    return list(column)


def render_texts(
    rows: Rows, cfg: DatasetConfig, tokenizer, chat: bool
) -> tuple[list[str], list[str]]:
    """Render every row to the text the model sees.

    Returns:
        (ids, texts): one id and one prompt string per row, in row order.
    """
    ids = _row_ids(rows, cfg)
    if cfg.messages_column:
        column = rows.columns[cfg.messages_column]
        conversations = [
            _check_messages(v, ids[i], cfg.messages_column) for i, v in enumerate(column)
        ]
    else:
        user = _user_texts(rows, cfg, ids)
        if not chat:
            return ids, user
        conversations = [[{"role": "user", "content": text}] for text in user]
    if cfg.system_prompt:
        system = {"role": "system", "content": cfg.system_prompt}
        conversations = [c if c[0]["role"] == "system" else [system, *c] for c in conversations]
    texts = [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        for c in conversations
    ]
    return ids, texts


def build_records(rows: Rows, cfg: DatasetConfig, tokenizer, chat: bool) -> list[PromptRecord]:
    """Render and tokenize every row.

    Text rendered by a chat template already carries the model's BOS and markers, so it is
    tokenized without adding special tokens again; raw text gets the tokenizer's usual ones.
    """
    ids, texts = render_texts(rows, cfg, tokenizer, chat)
    rendered_by_template = chat or bool(cfg.messages_column)
    encoded = tokenizer(texts, add_special_tokens=not rendered_by_template)["input_ids"]
    kept = {c: rows.columns[c] for c in cfg.keep_columns}
    return [
        PromptRecord(i, ids[i], texts[i], list(encoded[i]), {c: v[i] for c, v in kept.items()})
        for i in range(len(ids))
    ]


def apply_length_policy(
    records: list[PromptRecord], max_prompt_tokens: int | None, policy: str, tokenizer
) -> tuple[list[PromptRecord], list[Skipped]]:
    """Enforce the context limit on prompts before any generation starts.

    Args:
        records: rendered prompts.
        max_prompt_tokens: context length minus ``max_new_tokens``; None when unbounded.
        policy: ``error`` (refuse the job), ``truncate_left`` (keep the prompt's end, where the
            generation prompt is) or ``skip`` (leave the row out and report it).

    Returns:
        (records to generate, skipped rows)

    Raises:
        DataError: with ``error``, listing the offending ids.
    """
    if max_prompt_tokens is None:
        return records, []
    if max_prompt_tokens < 1:
        raise ConfigError(
            f"sampling.max_new_tokens leaves no room for a prompt in the model's context "
            f"({max_prompt_tokens} tokens left); lower it or raise model.max_context."
        )
    long = [r for r in records if len(r.token_ids) > max_prompt_tokens]
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
        reason = f"prompt longer than {max_prompt_tokens} tokens"
        skipped = [Skipped(r.index, r.id, reason) for r in long]
        long_ids = {r.index for r in long}
        return [r for r in records if r.index not in long_ids], skipped
    for r in long:
        r.token_ids = r.token_ids[-max_prompt_tokens:]
        r.text = tokenizer.decode(r.token_ids, skip_special_tokens=False)
    return records, []
