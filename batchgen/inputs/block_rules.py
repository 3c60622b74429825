"""Per-block verdicts on a prompt source's column in Arrow: the Python rules' twins.

Invariant: each function gives, for every value of one block of a column, the verdict that
``batchgen.inputs.prompts`` gives the value in Python (usable prompt string, usable messages,
null), or a bound on the bytes it renders into a prompt, by Arrow compute alone; a column of
mixed types, stored as JSON text, is judged from that text (``inputs.jsontext``). The table-wide
passes that use them are ``inputs.screen``'s.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchgen.inputs import blank, jsontext

# Template tokens per chat message beyond its role and content bytes (ChatML uses 5).
MESSAGE_SLACK = 16


def as_text(values: pa.Array) -> pa.Array:
    """``values`` as an Arrow string column: strings as ``blank.string_column`` gives them,
    other values cast to their text.

    Raises:
        pa.ArrowNotImplementedError: values of a nested type, which have no cast to text.
    """
    text = blank.string_column(values)
    return pc.cast(values, pa.string()) if text is None else text


def bad_text(block: pa.Array) -> np.ndarray:
    """Null or blank strings; every row when the column holds no strings."""
    if jsontext.is_json(block.type):
        return jsontext.bad_text(block)
    text = blank.string_column(block)
    if text is None:
        return np.ones(len(block), dtype=bool)
    return blank.blank_or_null(text)


def null(block: pa.Array) -> np.ndarray:
    """Values that Python reads as None (a template field's only bad value)."""
    if jsontext.is_json(block.type):
        return jsontext.nulls(block)
    return pc.is_null(block).to_numpy(zero_copy_only=False)


def message_items(items: pa.Array) -> tuple[np.ndarray, np.ndarray] | None:
    """Per message: (unusable, a bound on its role and content bytes plus ``MESSAGE_SLACK``),
    or None when the type holds no {role, content} pair of strings."""
    if jsontext.is_json(items.type):
        return jsontext.bad_message_items(items), jsontext.byte_lengths(items)
    if not pa.types.is_struct(items.type):
        return None
    broken = pc.is_null(items).to_numpy(zero_copy_only=False).copy()
    size = np.full(len(items), MESSAGE_SLACK, dtype=np.int64)
    for key in ("role", "content"):
        if items.type.get_field_index(key) < 0:
            return None
        value = pc.struct_field(items, key)
        if jsontext.is_json(value.type):
            broken |= ~jsontext.strings(value)
            size += jsontext.byte_lengths(value)
            continue
        text = blank.string_column(value)
        if text is None:
            return None
        broken |= pc.is_null(text).to_numpy(zero_copy_only=False)
        size += pc.fill_null(pc.binary_length(text), 0).to_numpy(zero_copy_only=False)
    return broken, size


def messages(block: pa.Array) -> tuple[np.ndarray, np.ndarray] | None:
    """Per row: (no usable messages, a bound on their bytes as ``message_items`` counts them),
    or None when no row can hold usable messages."""
    if jsontext.is_json(block.type):
        return jsontext.bad_messages(block), jsontext.byte_lengths(block)
    if not (pa.types.is_list(block.type) or pa.types.is_large_list(block.type)):
        return None
    items = message_items(pc.list_flatten(block))
    if items is None:
        return None
    broken, size = items
    parents = pc.list_parent_indices(block).to_numpy(zero_copy_only=False)
    lengths = pc.list_value_length(block)
    bad = pc.fill_null(pc.equal(lengths, 0), True).to_numpy(zero_copy_only=False).copy()
    bad[parents[broken]] = True
    total = np.bincount(parents, weights=size, minlength=len(block)).astype(np.int64)
    return bad, total


def bad_messages(block: pa.Array) -> np.ndarray:
    """Rows without usable messages; every row when the type can hold none."""
    found = messages(block)
    return np.ones(len(block), dtype=bool) if found is None else found[0]


def text_bytes(block: pa.Array, formatted: bool) -> np.ndarray:
    """Per row, a bound on the UTF-8 bytes of the value's text in the prompt (``formatted``:
    ``str`` of a template field's value; else a prompt string, the only usable value)."""
    if jsontext.is_json(block.type):
        return jsontext.format_bytes(block) if formatted else jsontext.byte_lengths(block)
    return pc.fill_null(pc.binary_length(as_text(block)), 0).to_numpy(zero_copy_only=False)
