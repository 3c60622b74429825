"""Whole-table checks in Arrow: they agree with the per-row Python rules they stand in for."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.config import DatasetConfig
from batchgen.errors import DataError
from batchgen.inputs import blank, screen
from batchgen.inputs.dataset import Table, open_dataset
from batchgen.inputs.prompts import build_records, render_texts


def table_of(tmp_path, rows, **cfg):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = DatasetConfig(path=str(path), **cfg)
    return open_dataset(cfg), cfg


def jsonl_of(tmp_path, rows, **cfg):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = DatasetConfig(path=str(path), **cfg)
    return open_dataset(cfg), cfg


def memory_of(columns, **cfg):
    """An in-memory ``datasets.Dataset`` (no cache file) of Arrow ``columns``."""
    return Table(datasets.Dataset(pa.table(columns)), {}, "memory"), DatasetConfig(**cfg)


def python_bad(table, cfg, tokenizer, chat):
    _, _, problems = render_texts(table.rows(0, len(table)), cfg, tokenizer, chat)
    return [i for i, p in enumerate(problems) if p]


def test_bad_prompts_match_the_python_rules(tmp_path, smol_tokenizer, monkeypatch):
    monkeypatch.setattr(screen, "BLOCK_ROWS", 3)  # rows cross block boundaries
    prompts = ["fine", None, "", "   ", "\n\t", "also fine", None, " x "]
    table, cfg = table_of(tmp_path, [{"p": p} for p in prompts], prompt_column="p")
    found = screen.bad_row_indices(table, cfg).tolist()
    assert found == [1, 2, 3, 4, 6] == python_bad(table, cfg, smol_tokenizer, False)


# Unicode's White_Space (what Arrow's utf8proc calls space), the separators that str.isspace adds
# (U+001C..U+001F), characters often taken for space that are not (U+180E was until Unicode 6.3;
# the zero-width ones, the BOM) and plain text.
SPACELIKE = [*range(0x09, 0x0E), *range(0x1C, 0x21), 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B)]
SPACELIKE += [0x2028, 0x2029, 0x202F, 0x205F, 0x3000, 0x180E, 0x200B, 0x200C, 0x200D, 0x2060]
SPACELIKE += [0xFEFF]
SPACES = sorted({chr(c) for c in SPACELIKE} | set(blank.WHITESPACE))
LETTERS = ["a", "é", "漢", "🙂", "\x00"]


def random_prompts(rng, n, strings_only):
    """Mixes of SPACES (and LETTERS), about half of them blank, with nulls; unless
    ``strings_only``, numbers, booleans and empty lists too."""
    values = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.04:
            values.append(None)
        elif roll < 0.1 and not strings_only:
            values.append(rng.choice([0, 7, -1.5, True, []]))
        else:
            pool = SPACES if rng.random() < 0.5 else SPACES + LETTERS
            values.append("".join(rng.choice(pool) for _ in range(rng.randint(0, 6))))
    return values


@pytest.mark.parametrize(
    "layout",
    ["jsonl", "jsonl strings", "parquet", "parquet string_view", "memory", "memory string_view"],
)
def test_bad_prompts_match_the_python_rules_on_random_rows(tmp_path, monkeypatch, layout):
    monkeypatch.setattr(screen, "BLOCK_ROWS", 1000)  # rows cross block boundaries
    rng = random.Random(layout)
    values = random_prompts(rng, 3000, strings_only=layout != "jsonl")
    kind = pa.string_view() if layout.endswith("string_view") else pa.large_string()
    if layout.startswith("jsonl"):  # a mixed column is JSON text; raw or escaped characters
        path = tmp_path / "rows.jsonl"
        lines = [json.dumps({"p": v}, ensure_ascii=rng.random() < 0.5) for v in values]
        path.write_text("".join(line + "\n" for line in lines))
        cfg = DatasetConfig(path=str(path), prompt_column="p")
        table = open_dataset(cfg)
    elif layout.startswith("parquet"):
        path = tmp_path / "rows.parquet"
        pq.write_table(pa.table({"p": pa.array(values, kind)}), path)
        cfg = DatasetConfig(path=str(path), prompt_column="p")
        table = open_dataset(cfg)
    else:
        table, cfg = memory_of({"p": pa.array(values, kind)}, prompt_column="p")
    assert len(table) == len(values)
    found = screen.bad_row_indices(table, cfg).tolist()
    assert found == python_bad(table, cfg, None, False)
    assert 0.3 < len(found) / len(values) < 0.7  # blank and usable rows both occur


def test_a_column_of_numbers_is_all_bad(tmp_path, smol_tokenizer):
    table, cfg = table_of(tmp_path, [{"p": i} for i in range(4)], prompt_column="p")
    assert screen.bad_row_indices(table, cfg).tolist() == [0, 1, 2, 3]
    assert python_bad(table, cfg, smol_tokenizer, False) == [0, 1, 2, 3]


def test_bad_messages_match_the_python_rules(tmp_path, smol_tokenizer):
    user = {"role": "user", "content": "hi"}
    rows = [
        {"m": [user]},
        {"m": None},
        {"m": []},
        {"m": [user, {"role": "assistant", "content": None}]},
        {"m": [{"role": None, "content": "x"}]},
        {"m": [{"role": "system", "content": "be brief"}, user]},
    ]
    table, cfg = table_of(tmp_path, rows, prompt_column=None, messages_column="m")
    found = screen.bad_row_indices(table, cfg).tolist()
    assert found == [1, 2, 3, 4] == python_bad(table, cfg, smol_tokenizer, True)


def test_messages_of_string_views_match_the_python_rules(smol_tokenizer):
    pair = pa.struct([("role", pa.string_view()), ("content", pa.string_view())])
    user = {"role": "user", "content": "hi"}
    rows = [[user], [], None, [user, {"role": "user", "content": None}], [user, user]]
    table, cfg = memory_of(
        {"m": pa.array(rows, pa.list_(pair))}, prompt_column=None, messages_column="m"
    )
    found = screen.bad_row_indices(table, cfg).tolist()
    assert found == [1, 2, 3] == python_bad(table, cfg, smol_tokenizer, True)


def test_template_fields_may_not_be_null(tmp_path, smol_tokenizer):
    rows = [{"a": "x", "b": 1}, {"a": None, "b": 2}, {"a": "y", "b": None}]
    table, cfg = table_of(tmp_path, rows, prompt_column=None, template="{a}: {b}")
    found = screen.bad_row_indices(table, cfg).tolist()
    assert found == [1, 2] == python_bad(table, cfg, smol_tokenizer, False)


def test_refusal_names_rows_ids_and_reasons(tmp_path, smol_tokenizer):
    rows = [{"uid": f"u{i}", "p": None if i % 4 == 1 else f"text {i}"} for i in range(50)]
    table, cfg = table_of(tmp_path, rows, prompt_column="p", id_column="uid")
    with pytest.raises(DataError) as err:
        screen.refuse_bad_rows(table, cfg, smol_tokenizer, True)
    message = str(err.value)
    assert message.startswith("13 row(s) have no usable prompt: id 'u1' (row 1):")
    assert "missing (null)" in message and "(and 3 more)" in message
    assert "runner.on_bad_row=skip" in message


def test_one_number_among_string_prompts_is_the_one_bad_row(tmp_path, smol_tokenizer):
    rows = [{"uid": f"u{i}", "prompt": 42 if i == 75 else f"hello {i}"} for i in range(148)]
    table, cfg = jsonl_of(tmp_path, rows, prompt_column="prompt", id_column="uid")
    assert screen.bad_row_indices(table, cfg).tolist() == [75]
    with pytest.raises(DataError) as err:
        screen.refuse_bad_rows(table, cfg, smol_tokenizer, True)
    assert str(err.value).startswith(
        "1 row(s) have no usable prompt: id 'u75' (row 75, line 76): "
        "dataset.prompt_column 'prompt': not a string: int '42'. Fix the data"
    )


def test_mixed_prompts_match_the_python_rules(tmp_path, smol_tokenizer, monkeypatch):
    monkeypatch.setattr(screen, "BLOCK_ROWS", 3)  # rows cross block boundaries
    prompts = ["fine", 7, None, "", " \n\t\u3000", "\u00e9", [1], {"a": "b"}, True, "42", "x"]
    table, cfg = jsonl_of(tmp_path, [{"p": p} for p in prompts], prompt_column="p")
    found = screen.bad_row_indices(table, cfg).tolist()
    # "42" is a string in the file, but datasets keeps text that parses as JSON as that JSON.
    assert found == [1, 2, 3, 4, 6, 7, 8, 9] == python_bad(table, cfg, smol_tokenizer, False)


def test_mixed_messages_match_the_python_rules(tmp_path, smol_tokenizer):
    user = {"role": "user", "content": "hi"}
    layouts = {  # each mix of types makes datasets store a different part as JSON
        "row": [[user], "oops", None, [], [user, user]],
        "item": [[user], [user, "x"], [user, {"role": "user"}]],
        "content": [[user], [{"role": "user", "content": 5}], [{"role": "u", "content": None}]],
        "role": [[user], [{"role": 1, "content": "x"}]],
    }
    for name, values in layouts.items():
        folder = tmp_path / name
        folder.mkdir()
        rows = [{"m": m} for m in values]
        table, cfg = jsonl_of(folder, rows, prompt_column=None, messages_column="m")
        found = screen.bad_row_indices(table, cfg).tolist()
        assert found == python_bad(table, cfg, smol_tokenizer, True), name
        assert found == [i for i in range(1, len(values)) if name != "row" or i != 4], name


def test_mixed_template_fields_may_not_be_null(tmp_path, smol_tokenizer):
    rows = [{"a": "x", "b": 1}, {"a": 2, "b": "y"}, {"a": None, "b": [1]}, {"a": "null", "b": 3}]
    table, cfg = jsonl_of(tmp_path, rows, prompt_column=None, template="{a}: {b}")
    found = screen.bad_row_indices(table, cfg).tolist()
    assert found == [2, 3] == python_bad(table, cfg, smol_tokenizer, False)


def test_length_bound_for_mixed_columns(tmp_path, smol_tokenizer):
    rows = [{"a": v, "b": "é" * 40} for v in ["word " * 30, 10**15, 1e15, [1.5e15] * 9, True]]
    table, cfg = jsonl_of(tmp_path, rows, prompt_column=None, template="{a} and {b}")
    records, _ = build_records(table.rows(0, len(table)), cfg, smol_tokenizer, True)
    for room in range(20, 200, 10):
        flagged = set(screen.maybe_long(table, cfg, smol_tokenizer, True, room).tolist())
        assert {i for i, r in enumerate(records) if len(r.token_ids) > room} <= flagged
    rows = [{"p": p} for p in ["漢字 " * 20, 5, "\u3000x"]]
    table, cfg = jsonl_of(tmp_path, rows, prompt_column="p")
    records, _ = build_records(table.rows(0, len(table)), cfg, smol_tokenizer, True)
    for room in range(20, 100, 5):
        flagged = set(screen.maybe_long(table, cfg, smol_tokenizer, True, room).tolist())
        assert {r.index for r in records if len(r.token_ids) > room} <= flagged


def test_mixed_ids_are_compared_as_the_rows_read_them(tmp_path):
    rows = [{"uid": u, "p": "x"} for u in ["12", 12, "a/b", 3, "a/b", True]]
    table, cfg = jsonl_of(tmp_path, rows, prompt_column="p", id_column="uid")
    with pytest.raises(DataError, match=r"e.g. \['12', 'a/b'\] repeat"):
        screen.check_unique_ids(table, "uid")
    rows = [{"uid": u, "p": "x"} for u in ["12", 13, "a/b", "True", "é"]]
    table, cfg = jsonl_of(tmp_path, rows, prompt_column="p", id_column="uid")
    screen.check_unique_ids(table, "uid")


def test_duplicate_ids_are_refused(tmp_path):
    rows = [{"uid": u, "p": "x"} for u in ["a", "b", "a", "c", "b"]]
    table, cfg = table_of(tmp_path, rows, prompt_column="p", id_column="uid")
    with pytest.raises(
        DataError, match=r"dataset.id_column='uid' is not unique: e.g. \['a', 'b'\]"
    ):
        screen.check_unique_ids(table, "uid")
    rows = [{"n": i, "p": "x"} for i in range(5)]
    numbers, _ = table_of(tmp_path, rows, prompt_column="p", id_column="n")
    screen.check_unique_ids(numbers, "n")  # integer ids, all distinct


@pytest.mark.parametrize("chat", [True, False])
def test_length_bound_is_never_below_the_token_count(tmp_path, smol_tokenizer, chat):
    rng = random.Random(0)
    alphabet = "abc xyz ÉéΩ漢字🙂 \n,.!0123456789"
    prompts = [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200))) for _ in range(300)
    ]
    table, cfg = table_of(tmp_path, [{"p": p} for p in prompts], prompt_column="p")
    records, _ = build_records(table.rows(0, len(table)), cfg, smol_tokenizer, chat)
    tokens = np.array([len(r.token_ids) for r in records])
    for room in (20, 60, 120, 400):
        flagged = set(screen.maybe_long(table, cfg, smol_tokenizer, chat, room).tolist())
        assert {i for i, n in enumerate(tokens) if n > room} <= flagged
    # Most rows are provably short against a roomy context: the bound is useful, not vacuous.
    assert len(screen.maybe_long(table, cfg, smol_tokenizer, chat, 400)) < len(prompts) // 10


def test_length_bound_for_messages_and_templates(tmp_path, smol_tokenizer):
    convo = [{"role": "system", "content": "brief"}, {"role": "user", "content": "é" * 30}]
    table, cfg = table_of(tmp_path, [{"m": convo}], prompt_column=None, messages_column="m")
    records, _ = build_records(table.rows(0, 1), cfg, smol_tokenizer, True)
    assert screen.maybe_long(table, cfg, smol_tokenizer, True, len(records[0].token_ids) - 1).size
    rows = [{"a": "word " * 20, "b": 12345}]
    table, cfg = table_of(tmp_path, rows, prompt_column=None, template="Say {a} then {b}.")
    records, _ = build_records(table.rows(0, 1), cfg, smol_tokenizer, True)
    assert screen.maybe_long(table, cfg, smol_tokenizer, True, len(records[0].token_ids) - 1).size


def test_long_prompts_refused_early_or_left_to_their_shard(tmp_path, smol_tokenizer, monkeypatch):
    rows = [{"uid": f"u{i}", "p": "word " * (5 if i != 7 else 300)} for i in range(20)]
    table, cfg = table_of(tmp_path, rows, prompt_column="p", id_column="uid")
    with pytest.raises(DataError, match=r"1 prompt\(s\) exceed the 100 tokens.*\['u7'\]"):
        screen.refuse_long_prompts(table, cfg, smol_tokenizer, True, 100)
    assert screen.refuse_long_prompts(table, cfg, smol_tokenizer, True, 1000) == 0
    monkeypatch.setattr(screen, "EXACT_LIMIT", 0)
    assert screen.refuse_long_prompts(table, cfg, smol_tokenizer, True, 100) == 1


def test_screening_a_wide_table_reads_no_rows_into_python(tmp_path, monkeypatch):
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"p": f"prompt {i}"}) + "\n" for i in range(20_000)))
    table = open_dataset(DatasetConfig(path=str(path), prompt_column="p"))

    def no_python(*_):
        raise AssertionError("rows were read into Python")

    monkeypatch.setattr(type(table), "rows", no_python)
    cfg = DatasetConfig(path=str(path), prompt_column="p")
    assert screen.bad_row_indices(table, cfg).size == 0
    screen.check_unique_ids(table, "p")


def test_bad_rows_are_named_by_their_line_past_blank_lines(tmp_path, smol_tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"p": "fine"}\n\n\n{"p": ""}\n')
    cfg = DatasetConfig(path=str(path), prompt_column="p")
    with pytest.raises(DataError, match=r"id '1' \(row 1, line 4\): dataset.prompt_column 'p'"):
        screen.refuse_bad_rows(open_dataset(cfg), cfg, smol_tokenizer, False)


def test_malformed_lines_are_bad_rows_with_their_line(tmp_path, smol_tokenizer, monkeypatch):
    monkeypatch.setenv("BATCHGEN_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "rows.jsonl"
    path.write_text('{"p": "fine", "u": "a"}\n{oops\n\n"text"\n{"p": "ok", "u": "b"}\n')
    cfg = DatasetConfig(path=str(path), prompt_column="p", id_column="u")
    table = open_dataset(cfg, skip_bad_lines=True)
    assert screen.bad_row_indices(table, cfg).tolist() == [1, 2]
    assert python_bad(table, cfg, smol_tokenizer, False) == [1, 2]
    screen.check_unique_ids(table, "u")  # the two malformed rows' own ids cannot be read
    ids, _, problems = render_texts(table.rows(0, len(table)), cfg, smol_tokenizer, False)
    assert ids == ["a", "1", "2", "b"]
    assert problems[1].startswith("line 2 is not valid JSON (")
    assert problems[2] == "line 4 is a JSON str, not an object"
    with pytest.raises(DataError, match=r"id '2' \(row 2, line 4\): line 4 is a JSON str"):
        screen.refuse_bad_rows(table, cfg, smol_tokenizer, False)


def random_messages(rng, n):
    """Message lists, usable or not, about a third null (those rows use their prompt)."""
    user = {"role": "user", "content": "hi"}
    pool = [None, None, [user], [user, {"role": "assistant", "content": "yo"}], [], [{"role": "u"}]]
    return [rng.choice(pool) for _ in range(n)]


@pytest.mark.parametrize("layout", ["jsonl", "parquet", "memory"])
def test_mixed_messages_and_prompt_rows_match_the_python_rules(
    tmp_path, monkeypatch, smol_tokenizer, layout
):
    monkeypatch.setattr(screen, "BLOCK_ROWS", 700)  # rows cross block boundaries
    rng = random.Random(f"mixed {layout}")
    messages = random_messages(rng, 2000)
    prompts = random_prompts(rng, 2000, strings_only=layout != "jsonl")
    rows = [{"m": m, "p": p} for m, p in zip(messages, prompts, strict=True)]
    spec = {"prompt_column": "p", "messages_column": "m"}
    if layout == "jsonl":
        table, cfg = jsonl_of(tmp_path, rows, **spec)
    elif layout == "parquet":
        table, cfg = table_of(tmp_path, rows, **spec)
    else:
        table, cfg = memory_of({"m": pa.array(messages), "p": pa.array(prompts)}, **spec)
    found = screen.bad_row_indices(table, cfg).tolist()
    assert found == python_bad(table, cfg, smol_tokenizer, False)
    plain = {i for i, m in enumerate(messages) if m is None}
    assert plain - set(found) and set(found) - plain  # both kinds of row are judged
    # Without the prompt column in the data, a null message list is a bad row, as before.
    assert set(plain) <= set(screen.bad_row_indices(table, replace(cfg, prompt_column="q")))


def test_length_bound_for_mixed_messages_and_prompt_rows(tmp_path, smol_tokenizer):
    user = [{"role": "user", "content": "word " * 40}]
    rows = [{"m": user, "p": None}, {"m": None, "p": "漢字 " * 30}, {"m": None, "p": "hi"}]
    for chat in (True, False):
        table, cfg = jsonl_of(
            tmp_path, rows, messages_column="m", prompt_column="p", chat_template="auto"
        )
        records, _ = build_records(table.rows(0, len(table)), cfg, smol_tokenizer, chat)
        for room in range(10, 120, 5):
            flagged = set(screen.maybe_long(table, cfg, smol_tokenizer, chat, room).tolist())
            assert {r.index for r in records if len(r.token_ids) > room} <= flagged
