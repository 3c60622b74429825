"""Blank text: the Arrow verdict and the Python one are ``str.strip()``'s on every character."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pytest

from batchgen.inputs import blank


@pytest.fixture(scope="module")
def texts():
    """Every character UTF-8 can carry (a lone surrogate is no text), alone and twice with a
    space between, and ``str.strip()``'s verdict on each: blank or not."""
    characters = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c < 0xE000]
    texts = ["", " \u3000\t", "a", None, *characters, *(f"{c} {c}" for c in characters)]
    return texts, np.array([s is None or not s.strip() for s in texts])


def test_blank_in_python_is_what_strip_leaves_empty(texts):
    texts, expected = texts
    python = np.array([s is None or blank.is_blank(s) for s in texts])
    assert np.flatnonzero(python != expected).tolist() == []
    assert 40 < expected.sum() < 100  # blank and usable strings both occur


@pytest.mark.parametrize("kind", [pa.string(), pa.large_string(), pa.string_view()])
def test_blank_in_arrow_is_what_strip_leaves_empty(texts, kind):
    texts, expected = texts
    column = blank.string_column(pa.array(texts, kind))
    assert np.flatnonzero(blank.blank_or_null(column) != expected).tolist() == []


def test_only_string_types_are_string_columns():
    for kind in [pa.string(), pa.large_string(), pa.string_view()]:
        column = blank.string_column(pa.array(["x", None], kind))
        assert column.to_pylist() == ["x", None]
        assert pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
    for values in [[1, None], [b"x"], [["x"]], [None], [{"a": "x"}]]:
        assert blank.string_column(pa.array(values)) is None
