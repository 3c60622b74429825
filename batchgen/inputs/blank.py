"""Which prompt strings are blank: the one definition that the Python and Arrow rules share.

Invariant: a string is blank iff ``str.strip()`` leaves nothing of it (users write Python).
``WHITESPACE``, the characters it strips, is read off Python itself and is the only whitespace
either side knows: ``is_blank`` judges a ``str`` (``inputs.prompts``, per shard) and
``blank_or_null`` a block of an Arrow string column (``inputs.screen``, the whole table; the
JSON-text patterns of ``inputs.jsontext`` are built from it too), so every string gets the same
verdict on both sides, whatever Unicode tables Arrow's own ``utf8_is_space`` was built with.
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# What ``str.strip()`` removes: the characters that ``str.isspace`` accepts.
WHITESPACE = "".join(filter(str.isspace, map(chr, range(sys.maxunicode + 1))))


def is_blank(text: str) -> bool:
    """Whether ``text`` is empty or only whitespace."""
    return not text.strip(WHITESPACE)


def string_column(block: pa.Array) -> pa.Array | None:
    """``block`` as a column that Arrow's string kernels take, or None when Python reads its
    values as something other than ``str``.

    A string view reads as ``str`` too, but few kernels take one: it is cast to a large string.
    """
    t = block.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return block
    if pa.types.is_string_view(t):
        return pc.cast(block, pa.large_string())
    return None


def blank_or_null(block: pa.Array) -> np.ndarray:
    """Per value of a ``string_column``: whether it is null or ``is_blank``."""
    trimmed = pc.utf8_trim(block, characters=WHITESPACE)
    blank = pc.equal(pc.binary_length(trimmed), 0)
    return pc.fill_null(blank, True).to_numpy(zero_copy_only=False)
