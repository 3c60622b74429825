"""The row policies: what happens to a row without a usable prompt (``runner.on_bad_row``)
and to a prompt too long for the context (``runner.on_long_prompt``).

Invariant: a row is refused, skipped or truncated here and nowhere else, before it is
generated; a skipped row is a ``Skipped`` (its reason named), never silently dropped.
"""

from __future__ import annotations

from batchgen.errors import ConfigError, DataError
from batchgen.inputs.prompts import PromptRecord, Skipped


def bad_rows_error(
    listed: list[Skipped], total: int, lines: dict[int, int] | None = None
) -> DataError:
    """The error that refuses a job over rows without a usable prompt, naming the first of
    ``total``.

    Args:
        lines: the line of each listed row in its jsonl file (``Table.lines``), to name too.
    """

    def where(row: int) -> str:
        return f"row {row}, line {lines[row]}" if lines and row in lines else f"row {row}"

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
