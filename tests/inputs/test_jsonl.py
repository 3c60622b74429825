"""A jsonl file line by line: blank and malformed lines, the clean copy, rows' line numbers."""

from __future__ import annotations

import json

import pytest

from batchgen.inputs import jsonl

LINES = [
    '{"p": "a"}\n',
    "\n",  # blank: no row
    '{"p": 5}\n',
    "  \t\r\n",  # blank too
    '{"p": oops\n',  # not JSON
    "[1, 2]\n",  # not an object
    '{"p": "last"}',  # no newline at the end
]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHGEN_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def mixed(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(LINES))
    return path


def test_scan_finds_blank_and_malformed_lines(mixed):
    found = jsonl.scan(mixed)
    assert (found.blank, found.first_blank, found.bad) == (2, 2, 2)
    assert [n for n, _ in found.first_bad] == [5, 6]
    assert found.first_bad[0][1].startswith("is not valid JSON (")
    assert found.first_bad[1][1] == "is a JSON list, not an object"
    assert jsonl.bad_lines_message(found).startswith("line 5 is not valid JSON (")


def test_message_names_the_first_lines_and_counts_the_rest(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(f"nope {i}\n" for i in range(5)))
    message = jsonl.bad_lines_message(jsonl.scan(path))
    assert message.count("line ") == 3 and message.endswith("(and 2 more)")
    assert message.startswith("line 1 is not valid JSON (Expecting value at column 1); line 2")


def test_clean_copy_keeps_a_row_per_non_blank_line(mixed, tmp_path):
    copy = jsonl.clean_copy(mixed, jsonl.scan(mixed))
    rows = [json.loads(line) for line in copy.read_text().splitlines()]
    assert rows[0] == {"p": "a"} and rows[1] == {"p": 5} and rows[4] == {"p": "last"}
    assert rows[2][jsonl.PROBLEM_COLUMN].startswith("line 5 is not valid JSON")
    assert rows[3] == {jsonl.PROBLEM_COLUMN: "line 6 is a JSON list, not an object"}
    assert copy.parent == tmp_path / "cache" / "jsonl"
    # Cached by content: the same bytes reuse the copy, other bytes get their own.
    mtime = copy.stat().st_mtime_ns
    assert jsonl.clean_copy(mixed, jsonl.scan(mixed)) == copy
    assert copy.stat().st_mtime_ns == mtime
    mixed.write_text("".join(LINES[:2]))
    assert jsonl.clean_copy(mixed, jsonl.scan(mixed)) != copy


def test_line_numbers_skip_blank_lines(mixed):
    assert jsonl.line_numbers(mixed, [0, 1, 4]) == {0: 1, 1: 3, 4: 7}
    assert jsonl.line_numbers(mixed, [2]) == {2: 5}
