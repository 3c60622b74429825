"""Verdicts read off JSON text in Arrow: each agrees with the Python rule on the decoded value."""

from __future__ import annotations

import json
import sys

import numpy as np
import pyarrow as pa
import pytest

from batchgen.inputs import jsontext
from batchgen.inputs.prompts import messages_problem


def column(texts):
    return pa.ExtensionArray.from_storage(pa.json_(), pa.array(texts, pa.string()))


def unusable_prompt(text):
    value = None if text is None else json.loads(text)
    return not isinstance(value, str) or not value.strip()


def test_blank_strings_in_every_spelling_match_the_python_rule():
    # Beyond the Basic Multilingual Plane no character is whitespace (so one \uXXXX escape
    # spells each whitespace character, as the patterns assume).
    assert not [c for c in range(0x10000, sys.maxunicode + 1) if chr(c).isspace()]
    texts = []
    for c in range(0x10000):
        if 0xD800 <= c < 0xE000:
            continue  # a lone surrogate is no text
        ch = chr(c)
        texts += [json.dumps(ch), json.dumps(" " + ch, ensure_ascii=False), f'"\\u{c:04X}"']
    texts += [json.dumps(s) for s in ["", "\t\n\f\r", "\b", "/", "\\", '"', " x "]]
    texts += ['"\\/"', ' "  " ', '"\\ud83d\\ude42"']
    found = jsontext.bad_text(column(texts))
    expected = np.array([unusable_prompt(t) for t in texts])
    assert np.flatnonzero(found != expected).tolist() == []
    assert 25 < expected.sum() < 100  # blanks and good strings both occur


def test_values_other_than_strings_are_bad_prompts_and_only_null_is_missing():
    texts = [' "x" ', "42", "null", " null ", "[1]", '{"a":"b"}', "true", '"null"', None]
    assert jsontext.bad_text(column(texts)).tolist() == [unusable_prompt(t) for t in texts]
    assert jsontext.nulls(column(texts)).tolist() == [False] * 2 + [True] * 2 + [False] * 4 + [True]


MESSAGE = {"role": "user", "content": 'hi "there" \\ é'}
MESSAGE_LISTS = [
    [MESSAGE],
    [{"content": "x", "role": "system"}, MESSAGE],
    [],
    "a string",
    42,
    None,
    [MESSAGE, "x"],
    [MESSAGE, {"role": "user"}],
    [{"role": "user", "content": 5}],
    [{"role": "user", "content": "x", "name": "ann"}],
    [{"role": "user", "content": None}],
    [["user", "x"]],
]


@pytest.mark.parametrize("ascii", [True, False])
def test_message_lists_match_the_python_rule(monkeypatch, ascii):
    texts = [None if v is None else json.dumps(v, ensure_ascii=ascii) for v in MESSAGE_LISTS]
    texts.append(' [ {"role" : "user" , "content" : "spaced"} ] ')
    expected = [t is None or messages_problem(json.loads(t)) is not None for t in texts]
    decoded, loads = [], json.loads
    monkeypatch.setattr(jsontext.json, "loads", lambda t: decoded.append(t) or loads(t))
    assert jsontext.bad_messages(column(texts)).tolist() == expected
    # Only lists holding a message of another shape are decoded: good lists, empty ones and
    # values other than lists are settled in Arrow.
    assert decoded == texts[6:12]


def test_messages_one_by_one_match_the_python_rule():
    values = [MESSAGE, {"content": "x", "role": "y"}, "x", 1, None, {"role": "user"}]
    values += [{"role": "u", "content": "x", "name": "n"}, {"role": 1, "content": "x"}]
    texts = [json.dumps(v) for v in values]
    expected = [messages_problem([v]) is not None for v in values]
    assert jsontext.bad_message_items(column(texts)).tolist() == expected


def test_format_bytes_bound_the_str_of_every_value():
    texts = [r'"\u00e9\u6f22\ud83d\ude42"', r'"say \"hi\""', "12", "-7", "1e15", "1e5"]
    texts += ["0.30000000000000004", "1e-7", "true", "false", '{"a":1,"b":[1e5,2]}', "[1e5]"]
    texts += ['["\x7f\x85", "it\'s \\"q\\""]', "[true,null,{}]"]  # raw: repr escapes
    bounds = jsontext.format_bytes(column(texts))
    rendered = [len(str(json.loads(t)).encode()) for t in texts]
    assert [n <= b for n, b in zip(rendered, bounds, strict=True)] == [True] * len(texts)
    assert bounds[0] == len(texts[0]) and bounds[2] == 2 + jsontext.FLOAT_CHARS


def test_decoded_strs_read_like_row_ids():
    assert jsontext.decoded_strs(['"a\\/b"', "12", "true", None]) == ["a/b", "12", "True", "None"]
