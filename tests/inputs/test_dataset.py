"""Opening datasets: local formats and folders, column checks, limits, streams, clear errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.config import DatasetConfig
from batchgen.errors import DataError
from batchgen.inputs.dataset import Stream, Table, open_dataset
from batchgen.inputs.jsonl import PROBLEM_COLUMN

ROWS = [{"q": f"question {i}", "n": i} for i in range(5)]


def load_rows(cfg):
    table = open_dataset(cfg)
    assert isinstance(table, Table)
    return table.rows(0, len(table))


def write(path, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "csv":
        path.write_text("q,n\n" + "".join(f"{r['q']},{r['n']}\n" for r in ROWS))
    else:
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_local_formats(tmp_path, fmt):
    path = write(tmp_path / f"data.{fmt}", fmt)
    rows = load_rows(DatasetConfig(path=str(path), prompt_column="q", keep_columns=["n"]))
    assert rows.columns["q"] == [r["q"] for r in ROWS]
    assert rows.columns["n"] == list(range(5))
    assert pa.types.is_integer(rows.kept_types["n"])


def test_folder_with_split(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write(folder / "train.jsonl", "jsonl")
    write(folder / "test.jsonl", "jsonl")
    rows = load_rows(DatasetConfig(path=str(folder), split="test", prompt_column="q"))
    assert len(rows) == 5
    with pytest.raises(DataError, match="dataset.split='validation'"):
        load_rows(DatasetConfig(path=str(folder), split="validation", prompt_column="q"))


def test_limit_and_only_needed_columns(tmp_path):
    path = write(tmp_path / "d.jsonl", "jsonl")
    rows = load_rows(DatasetConfig(path=str(path), prompt_column="q", limit=2))
    assert rows.columns == {"q": ["question 0", "question 1"]}


def test_bundled_sample():
    rows = load_rows(
        DatasetConfig(path="pkg:batchgen/conf/dataset/sample_prompts.jsonl", id_column="id")
    )
    assert 30 <= len(rows) <= 40
    assert "写一段描写春天的散文" in rows.columns["prompt"]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="dataset.path=.*no such file"):
        load_rows(DatasetConfig(path=str(tmp_path / "missing.jsonl")))


def test_missing_column_names_key_and_lists_columns(tmp_path):
    path = write(tmp_path / "d.jsonl", "jsonl")
    with pytest.raises(
        DataError, match=r"dataset.prompt_column: column\(s\) \['prompt'\].*'q', 'n'"
    ):
        load_rows(DatasetConfig(path=str(path)))
    with pytest.raises(DataError, match=r"dataset.template: column\(s\) \['lang'\]"):
        load_rows(DatasetConfig(path=str(path), prompt_column=None, template="{q} in {lang}"))
    with pytest.raises(DataError, match=r"dataset.keep_columns"):
        load_rows(DatasetConfig(path=str(path), prompt_column="q", keep_columns=["zzz"]))


def test_empty_dataset(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("q,n\n")
    with pytest.raises(DataError, match="has no rows"):
        load_rows(DatasetConfig(path=str(path), prompt_column="q"))


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_rows(DatasetConfig(path=str(path)))


def test_unreachable_hub_dataset(monkeypatch):
    import datasets
    import huggingface_hub

    # The libraries read these at import time; the environment alone is too late here.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="dataset.path='nobody/no-such-dataset'"):
        load_rows(DatasetConfig(path="nobody/no-such-dataset"))


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="has no rows"):
        load_rows(DatasetConfig(path=str(path)))


def test_rows_are_read_a_slice_at_a_time(tmp_path):
    path = write(tmp_path / "d.parquet", "parquet")
    table = open_dataset(DatasetConfig(path=str(path), prompt_column="q", limit=4))
    assert len(table) == 4
    rows = table.rows(2, 4)
    assert rows.start == 2 and rows.columns == {"q": ["question 2", "question 3"]}
    blocks = list(table.scan("q", 3))  # the cache file, read in blocks, up to the limit
    assert blocks[0][0] == 0 and all(len(b) >= 3 for _, b in blocks[:-1])
    assert [q for _, b in blocks for q in b.to_pylist()] == [f"question {i}" for i in range(4)]


def test_stream_reads_blocks_in_order_up_to_the_limit(tmp_path):
    folder = tmp_path / "parquet"
    folder.mkdir()
    for k in range(3):  # three files of 4 rows: blocks of 5 cross file boundaries
        rows = [{"q": f"q{4 * k + i}", "n": 4 * k + i} for i in range(4)]
        pq.write_table(pa.Table.from_pylist(rows), folder / f"train-{k}.parquet")
    cfg = DatasetConfig(path=str(folder), prompt_column="q", keep_columns=["n"], streaming=True)
    stream = open_dataset(cfg)
    assert isinstance(stream, Stream) and pa.types.is_integer(stream.kept_types["n"])
    blocks = [(start, b.column("q").to_pylist()) for start, b in stream.blocks(5)]
    assert [start for start, _ in blocks] == [0, 5, 10]
    assert [q for _, qs in blocks for q in qs] == [f"q{i}" for i in range(12)]
    limited = open_dataset(DatasetConfig(**{**cfg.__dict__, "limit": 7}))
    start, block = list(limited.blocks(5))[-1]
    assert (start, block.num_rows) == (5, 2)
    assert limited.rows(start, block).columns["n"] == [5, 6]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHGEN_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("second", ['"b"', "5"], ids=["strings", "mixed-types"])
def test_a_blank_line_is_no_row_and_never_breaks_loading(tmp_path, cache, second):
    # Among values of mixed types, datasets' reader failed on a blank line with "Expected
    # object or value" and no line number.
    path = tmp_path / "d.jsonl"
    path.write_text(f'{{"q": "a"}}\n\n   \n{{"q": {second}}}\n\n')
    table = open_dataset(DatasetConfig(path=str(path), prompt_column="q"))
    assert table.rows(0, len(table)).columns["q"] == ["a", json.loads(second)]
    assert table.lines([0, 1]) == {0: 1, 1: 4}


def test_a_malformed_line_is_refused_naming_file_and_line(tmp_path, cache):
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "a"}\n\n{"q": "b\n{"q": "c"}\n')
    with pytest.raises(DataError) as e:
        open_dataset(DatasetConfig(path=str(path), prompt_column="q"))
    message = str(e.value)
    assert message.startswith(f"dataset.path={str(path)!r}: line 3 is not valid JSON (")
    assert "runner.on_bad_row=skip" in message and "\n" not in message
    assert not (tmp_path / "cache").exists()  # refused before anything is written


def test_under_skip_a_malformed_line_keeps_its_row(tmp_path, cache):
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "a", "n": 1}\n\n[1]\n{"q": "c", "n": 3}\n')
    table = open_dataset(DatasetConfig(path=str(path), prompt_column="q"), skip_bad_lines=True)
    rows = table.rows(0, len(table)).columns
    assert rows["q"] == ["a", None, "c"]
    assert rows[PROBLEM_COLUMN] == [None, "line 3 is a JSON list, not an object", None]
    assert table.location == str(path)  # named as given, though read from the copy
