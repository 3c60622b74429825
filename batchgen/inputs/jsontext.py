"""Verdicts on a column that ``datasets`` stores as JSON text, read off that text in Arrow.

A jsonl column whose values mix types (a string in one row, the number 42 in another) loads
as the ``Json`` feature: Arrow type ``extension<arrow.json>``, each value stored as its JSON text
(``"hello"`` with its quotes, ``42``) and decoded when a row is read into Python.
Invariant: each verdict here is the one that ``batchgen.inputs.prompts`` gives the decoded
value, taken from the text by Arrow compute over a block. Decoded in Python are only a message
list that no pattern here settles (one with keys beyond role and content, say) and the
repeated ids that an error names.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchgen.inputs import prompts
from batchgen.inputs.blank import WHITESPACE, string_column

# The longest ``str`` of a float ('-2.2250738585072014e-308').
FLOAT_CHARS = 24
# The most bytes of a list or object's repr per byte of its JSON: a float as short as ``1e5``
# reprs as ``100000.0`` (at most FLOAT_CHARS for 3 bytes); text, keys and commas grow less.
REPR_FACTOR = 8

_SPACE = r"[ \t\n\r]*"  # JSON's own whitespace, allowed around a value
_STRING = r'"(?:[^"\\]|\\.)*"'
_BLANK_CHAR = "|".join(
    [
        "[" + "".join(rf"\x{{{ord(c):x}}}" for c in WHITESPACE) + "]",
        r"\\[tnfr]",  # \b and \/ escape no whitespace
        # (All whitespace is in the Basic Multilingual Plane: one \uXXXX escape spells each.)
        r"\\u(?i:" + "|".join(f"{ord(c):04x}" for c in WHITESPACE) + ")",
    ]
)
_MESSAGE = (
    rf'\{{{_SPACE}(?:"role"{_SPACE}:{_SPACE}{_STRING}{_SPACE},{_SPACE}"content"{_SPACE}:'
    rf'{_SPACE}{_STRING}|"content"{_SPACE}:{_SPACE}{_STRING}{_SPACE},{_SPACE}"role"{_SPACE}:'
    rf"{_SPACE}{_STRING}){_SPACE}\}}"
)
IS_STRING = f'^{_SPACE}"'
IS_NULL = f"^{_SPACE}null{_SPACE}$"
IS_BLANK = f'^{_SPACE}"(?:{_BLANK_CHAR})*"{_SPACE}$'
IS_NESTED = rf"^{_SPACE}[\[{{]"
IS_LIST = rf"^{_SPACE}\["
IS_EMPTY_LIST = rf"^{_SPACE}\[{_SPACE}\]{_SPACE}$"
IS_OBJECT = rf"^{_SPACE}\{{"
ONE_MESSAGE = f"^{_SPACE}{_MESSAGE}{_SPACE}$"
MESSAGES = rf"^{_SPACE}\[{_SPACE}{_MESSAGE}(?:{_SPACE},{_SPACE}{_MESSAGE})*{_SPACE}\]{_SPACE}$"


def is_json(t: pa.DataType) -> bool:
    """Whether a column of this type holds JSON text (``datasets``' ``Json`` feature)."""
    return isinstance(t, pa.BaseExtensionType) and t.extension_name == "arrow.json"


def texts(block: pa.Array) -> pa.Array:
    """Each value's JSON text, as an Arrow string column (null where the value is absent)."""
    return string_column(block.storage)


def _matches(block: pa.Array, pattern: str) -> np.ndarray:
    """Where the JSON text matches ``pattern``; False where the value is absent."""
    found = pc.match_substring_regex(texts(block), pattern)
    return pc.fill_null(found, False).to_numpy(zero_copy_only=False)


def nulls(block: pa.Array) -> np.ndarray:
    """Values that decode to None: absent ones, and the JSON text ``null``."""
    return pc.is_null(block).to_numpy(zero_copy_only=False) | _matches(block, IS_NULL)


def strings(block: pa.Array) -> np.ndarray:
    """Values that decode to a ``str``."""
    return _matches(block, IS_STRING)


def bad_text(block: pa.Array) -> np.ndarray:
    """The prompt column's rule: a value is usable iff it is a ``str`` that is not blank
    (``inputs.blank``); JSON escapes of whitespace (``"\\n"``, ``"\\u3000"``) count as
    whitespace."""
    return ~strings(block) | _matches(block, IS_BLANK)


def _decoded_bad(text: pa.Array, unsettled: np.ndarray, wrap: bool) -> np.ndarray:
    """The Python rule on the rows no pattern settled (``wrap``: each is one message)."""
    bad = np.zeros(len(text), dtype=bool)
    for i in np.flatnonzero(unsettled).tolist():
        value = json.loads(text[i].as_py())
        bad[i] = prompts.messages_problem([value] if wrap else value) is not None
    return bad


def bad_messages(block: pa.Array) -> np.ndarray:
    """The messages column's rule per row: a non-empty list of {role, content} strings."""
    good = _matches(block, MESSAGES)
    certain = good | ~_matches(block, IS_LIST) | _matches(block, IS_EMPTY_LIST)
    return ~good & (certain | _decoded_bad(texts(block), ~certain, wrap=False))


def bad_message_items(block: pa.Array) -> np.ndarray:
    """Per message of a list of JSON values: whether it is no {role, content} pair of strings."""
    good = _matches(block, ONE_MESSAGE)
    certain = good | ~_matches(block, IS_OBJECT)
    return ~good & (certain | _decoded_bad(texts(block), ~certain, wrap=True))


def byte_lengths(block: pa.Array) -> np.ndarray:
    """Per value, its JSON text's bytes (0 where absent).

    The JSON of a string is never shorter than the string's UTF-8 bytes, and a message's JSON
    (``{"role":"","content":""}`` and more) is longer than its role and content bytes by more
    than ``block_rules.MESSAGE_SLACK``: a bound for a prompt string or a message list.
    """
    return pc.fill_null(pc.binary_length(texts(block)), 0).to_numpy(zero_copy_only=False)


def format_bytes(block: pa.Array) -> np.ndarray:
    """Per value, a bound on the UTF-8 bytes of ``str`` of the decoded value (a template field).

    A string's JSON bounds it; a number's ``str`` is at most as long as its JSON or
    ``FLOAT_CHARS``; a list or object renders as its repr (spaces after ``,`` and ``:``,
    escapes of its own, floats in full), at most ``REPR_FACTOR`` times its JSON.
    """
    size = byte_lengths(block).astype(np.int64)
    nested = _matches(block, IS_NESTED)
    size[~strings(block) & ~nested] += FLOAT_CHARS
    size[nested] *= REPR_FACTOR
    return size


def decoded_strs(values: list[str | None]) -> list[str]:
    """``str`` of each decoded value, as ``prompts`` writes an id."""
    return [str(None if v is None else json.loads(v)) for v in values]
