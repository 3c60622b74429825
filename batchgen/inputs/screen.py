"""Whole-dataset checks that Arrow answers in seconds, before the model loads.

Invariant: nothing here turns the table's rows into Python objects; every pass is Arrow compute
over blocks of a column (``inputs.block_rules`` judges a block), so a 10M-row dataset is
screened in seconds and in bounded memory.
What needs rendering or the tokenizer row by row happens per shard
(``batchgen.job.shard_inputs``), where the same policies apply again and are authoritative.
Checked here:

- rows without a usable prompt (null, blank as ``inputs.blank`` defines it, not a string,
  malformed messages, a malformed jsonl line's), refused up front under
  ``runner.on_bad_row=error``;
- duplicate ids in ``dataset.id_column``;
- prompts that may be too long. A prompt's token count is at most its UTF-8 byte count (each
  token of a byte-level or byte-fallback tokenizer covers at least one byte) plus the tokens
  that the template and special tokens add, so most rows are provably short without
  tokenizing; under ``runner.on_long_prompt=error`` the others are tokenized now, up to
  ``EXACT_LIMIT`` rows, and the rest are checked as their shard is reached.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchgen.config import DatasetConfig, JobConfig
from batchgen.errors import DataError
from batchgen.inputs import block_rules, jsontext, policies, prompts
from batchgen.inputs.dataset import Table
from batchgen.inputs.jsonl import PROBLEM_COLUMN
from batchgen.inputs.sources import falls_back, plain_fields, template_fields

# Rows per Arrow block: bounds the transient memory of one pass.
BLOCK_ROWS = 1 << 16
# Rows that may be too long and are tokenized up front under on_long_prompt=error.
EXACT_LIMIT = 20_000
# Tokens a tokenizer may add around a text beyond its bytes (a SentencePiece dummy prefix).
TOKEN_SLACK = 2


def _blocks(table: Table, name: str) -> Iterator[tuple[int, pa.Array]]:
    return table.scan(name, BLOCK_ROWS)


def _flags(table: Table, name: str, check) -> np.ndarray:
    """Per row, ``check``'s verdict on its value of column ``name``."""
    flags = np.zeros(len(table), dtype=bool)
    for offset, block in _blocks(table, name):
        flags[offset : offset + len(block)] = check(block)
    return flags


def _message_rows(table: Table, cfg: DatasetConfig) -> np.ndarray:
    """Per row, whether its prompt is its messages (``prompts.message_rows``, in Arrow)."""
    if not cfg.messages_column:
        return np.zeros(len(table), dtype=bool)
    if not falls_back(cfg, table.dataset.column_names):
        return np.ones(len(table), dtype=bool)
    return ~_flags(table, cfg.messages_column, block_rules.null)


def bad_row_indices(table: Table, cfg: DatasetConfig) -> np.ndarray:
    """Indices of the rows that have no usable prompt, in row order."""
    on_messages = _message_rows(table, cfg)
    bad = _broken(table)
    if on_messages.any():
        bad |= on_messages & _flags(table, cfg.messages_column, block_rules.bad_messages)
    if not on_messages.all():
        check = block_rules.null if cfg.template else block_rules.bad_text
        for name in plain_fields(cfg):
            bad |= ~on_messages & _flags(table, name, check)
    return np.flatnonzero(bad)


def _broken(table: Table) -> np.ndarray:
    """Rows of malformed jsonl lines (``inputs.jsonl``): bad whatever their prompt."""
    if PROBLEM_COLUMN not in table.dataset.column_names:
        return np.zeros(len(table), dtype=bool)
    return ~_flags(table, PROBLEM_COLUMN, block_rules.null)


def refuse_bad_rows(table: Table, cfg: DatasetConfig, tokenizer, chat: bool) -> None:
    """Refuse the job when any row has no usable prompt (``runner.on_bad_row=error``).

    Raises:
        DataError: listing the first rows with their ids and reasons.
    """
    bad = bad_row_indices(table, cfg)
    if len(bad) == 0:
        return
    listed = []
    for i in bad[:10].tolist():
        ids, texts, problems = prompts.render_texts(table.rows(i, i + 1), cfg, tokenizer, chat)
        listed.append(prompts.Skipped(i, ids[0], problems[0] or "no usable prompt"))
    raise policies.bad_rows_error(listed, len(bad), table.lines([b.index for b in listed]))


def check_encoding(table: Table) -> None:
    """Refuse text that is not valid UTF-8 (Arrow's JSON and CSV readers let it through, and
    it would fail only when its shard is reached).

    Raises:
        DataError: naming the column and the row (its line in a jsonl file).
    """
    for name in table.dataset.column_names:
        for offset, block in _blocks(table, name):
            try:
                block.validate(full=True)
            except pa.ArrowInvalid as e:
                row = offset + _first_invalid(block)
                lines = table.lines([row])
                line = f" (line {lines[row]})" if lines else ""
                raise DataError(
                    f"dataset.path={table.location!r}: column {name!r} of row {row}{line} is "
                    f"not valid UTF-8 text ({e}). Fix or drop that row."
                ) from e


def _first_invalid(block: pa.Array) -> int:
    for i in range(len(block)):
        try:
            block.slice(i, 1).validate(full=True)
        except pa.ArrowInvalid:
            return i
    return 0


def check_unique_ids(table: Table, id_column: str | None) -> None:
    """Refuse a ``dataset.id_column`` whose values repeat.

    Raises:
        DataError: naming the column and a few repeated ids.
    """
    if not id_column:
        return
    blocks = [block for _, block in _blocks(table, id_column)]
    mixed = jsontext.is_json(blocks[0].type)
    # Equal JSON texts are equal ids: ``datasets`` writes a value as one text (the string "12"
    # and the number 12 alike as ``12``, which ``prompts`` reads back as the same id).
    column = pa.chunked_array([jsontext.texts(b) for b in blocks] if mixed else blocks)
    broken = _broken(table)
    if broken.any():  # a malformed line's id is its row index (prompts._row_ids), not the column's
        column = pc.filter(column, pa.array(~broken))
    try:
        column = block_rules.as_text(column)
    except pa.ArrowNotImplementedError:
        return  # ids of a nested type: each shard checks its own (prompts.row_ids)
    distinct = pc.count_distinct(column, mode="all").as_py()
    pa.default_memory_pool().release_unused()  # the hash table: as large as the ids
    if distinct == len(column):
        return
    counts = pc.value_counts(column)
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1)).to_pylist()
    shown = jsontext.decoded_strs(repeated) if mixed else [str(v) for v in repeated]
    raise prompts.duplicate_ids_error(id_column, shown)


def _byte_lengths(table: Table, cfg: DatasetConfig, on_messages: np.ndarray) -> np.ndarray:
    """Per row, the UTF-8 bytes of what is rendered into the prompt, beyond the template: its
    messages where ``on_messages``, else its plain prompt."""
    total = np.zeros(len(table), dtype=np.int64)
    if on_messages.any():
        for offset, block in _blocks(table, cfg.messages_column):
            found = block_rules.messages(block)
            if found is not None:  # None: no usable messages, rows that are refused or skipped
                rows = slice(offset, offset + len(block))
                total[rows] += np.where(on_messages[rows], found[1], 0)
    if not on_messages.all():
        for name in plain_fields(cfg):
            for offset, block in _blocks(table, name):
                rows = slice(offset, offset + len(block))
                size = block_rules.text_bytes(block, bool(cfg.template))
                total[rows] += np.where(on_messages[rows], 0, size)
    return total


def _template_tokens(cfg: DatasetConfig, tokenizer, chat: bool, messages: bool, plain: bool) -> int:
    """Tokens of a prompt whose rendered fields are all empty: the template's own share, the
    most of what ``messages`` rows and ``plain`` rows (whichever occur) add."""
    literal = 0
    if cfg.template and plain:
        empty = dict.fromkeys(template_fields(cfg.template), "")
        literal = len(cfg.template.format_map(empty).encode())
    wrapper = 0
    if chat or messages:
        turns = [{"role": "user", "content": ""}]
        if cfg.system_prompt:
            turns.insert(0, {"role": "system", "content": cfg.system_prompt})
        text = tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=True, **cfg.chat_template_kwargs
        )
        wrapper = len(tokenizer(text, add_special_tokens=False).input_ids)
    if plain and not chat:
        wrapper = max(wrapper, len(tokenizer("").input_ids))
    return wrapper + literal + TOKEN_SLACK


def maybe_long(table: Table, cfg: DatasetConfig, tokenizer, chat: bool, room: int) -> np.ndarray:
    """Indices of rows whose prompt is not provably within ``room`` tokens."""
    if cfg.chat_template_kwargs_column:  # each row may render the template its own way
        return np.arange(len(table))
    on_messages = _message_rows(table, cfg)
    try:
        overhead = _template_tokens(
            cfg, tokenizer, chat, bool(on_messages.any()), not on_messages.all()
        )
    except Exception:  # noqa: BLE001 - a template that refuses empty turns: prove nothing
        return np.arange(len(table))
    return np.flatnonzero(_byte_lengths(table, cfg, on_messages) + overhead > room)


def refuse_long_prompts(table: Table, cfg: DatasetConfig, tokenizer, chat: bool, room: int) -> int:
    """Refuse the job now when a prompt is longer than ``room`` tokens, where that is cheap.

    Returns:
        How many rows could not be checked now (more than ``EXACT_LIMIT`` may be long); their
        shards check them when reached.

    Raises:
        DataError: a prompt is too long (``policies.apply_length_policy`` words it).
    """
    candidates = maybe_long(table, cfg, tokenizer, chat, room)
    if len(candidates) > EXACT_LIMIT:
        return len(candidates)
    records = []
    for i in candidates.tolist():
        found, _ = prompts.build_records(table.rows(i, i + 1), cfg, tokenizer, chat)
        records += found
    policies.apply_length_policy(records, room, "error", tokenizer)
    return 0


def screen_table(cfg: JobConfig, table: Table, tokenizer, chat: bool, room: int | None) -> None:
    """The whole-table checks that the job's policies make refusals, before the model loads.

    Raises:
        DataError: naming the column and rows, as each check does.
    """
    d, r = cfg.dataset, cfg.runner
    check_encoding(table)
    check_unique_ids(table, d.id_column)
    if r.on_bad_row == "error":
        refuse_bad_rows(table, d, tokenizer, chat)
    # A row with its own max_new_tokens (dataset.sampling_column) has its own room: its shard
    # checks it (policies.apply_length_policy).
    if room is not None and r.on_long_prompt == "error" and not d.sampling_column:
        unchecked = refuse_long_prompts(table, d, tokenizer, chat, room)
        if unchecked:
            print(
                f"batchgen: {unchecked:,} prompts may be longer than the {room} tokens left for "
                "a prompt; each is checked when its shard is reached "
                "(runner.on_long_prompt=error then stops the job there).",
                flush=True,
            )
