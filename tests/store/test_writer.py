"""Shard files: schema, atomic publication, metadata."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.store.writer import (
    finished_shards,
    output_schema,
    remove_abandoned,
    shard_metadata,
    temp_path,
    write_json_atomic,
    write_shard,
)

ROW = {
    "id": "a",
    "sample_index": 0,
    "prompt": "p",
    "response": "r",
    "finish_reason": "stop",
    "prompt_tokens": 3,
    "completion_tokens": 2,
    "topic": "x",
}


def test_schema_and_metadata_round_trip(tmp_path):
    schema = output_schema({"topic": pa.string()}, {"fingerprint": "abc", "n": 1})
    assert write_shard(tmp_path, "part-00000.parquet", [ROW], schema)
    path = tmp_path / "part-00000.parquet"
    table = pq.read_table(path)
    assert table.column_names == [
        "id",
        "sample_index",
        "prompt",
        "response",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "topic",
    ]
    assert table.schema.field("sample_index").type == pa.int32()
    assert table.to_pylist() == [ROW]
    assert shard_metadata(path) == {"fingerprint": "abc", "n": 1}
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"


def test_empty_shard_keeps_full_schema(tmp_path):
    schema = output_schema({"topic": pa.string()}, {})
    write_shard(tmp_path, "part-00001.parquet", [], schema)
    path = tmp_path / "part-00001.parquet"
    assert pq.read_table(path).schema.names[-1] == "topic"


def test_no_temp_files_left_and_only_final_names_count(tmp_path):
    schema = output_schema({}, {})
    row = {k: v for k, v in ROW.items() if k != "topic"}
    write_shard(tmp_path, "part-00002.parquet", [row], schema)
    (tmp_path / ".part-00003.parquet.tmp-h-1-ab").write_bytes(b"half a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".part-00003.parquet.tmp-h-1-ab",
        "part-00002.parquet",
    ]
    assert list(finished_shards(tmp_path)) == [2]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def disk_full(table, f, **kwargs):
        f.write(b"PAR1 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", disk_full)
    row = {k: v for k, v in ROW.items() if k != "topic"}
    with pytest.raises(OSError, match="No space"):
        write_shard(tmp_path, "part-00000.parquet", [row], output_schema({}, {}))
    assert os.listdir(tmp_path) == []


def test_json_atomic(tmp_path):
    path = tmp_path / "_batchgen" / "run.json"
    write_json_atomic(path, {"a": "写"})
    write_json_atomic(path, {"a": 2})
    assert path.read_text().strip().startswith("{") and os.listdir(path.parent) == ["run.json"]


def test_second_publisher_of_a_shard_loses(tmp_path):
    schema = output_schema({}, {"who": "first"})
    row = {k: v for k, v in ROW.items() if k != "topic"}
    assert write_shard(tmp_path, "part-00004.parquet", [row], schema) is True
    other = output_schema({}, {"who": "second"})
    assert write_shard(tmp_path, "part-00004.parquet", [row, row], other) is False
    assert shard_metadata(tmp_path / "part-00004.parquet") == {"who": "first"}
    assert os.listdir(tmp_path) == ["part-00004.parquet"]


def test_temp_names_are_hidden_and_unique_per_writer(tmp_path, monkeypatch):
    target = tmp_path / "part-00001.parquet"
    names = {temp_path(target).name for _ in range(100)}
    assert len(names) == 100 and all(n.startswith(".part-00001.parquet.tmp-") for n in names)
    monkeypatch.setattr(os, "getpid", lambda: 1)  # every container's worker is pid 1
    assert temp_path(target) != temp_path(target)


def test_failed_write_names_the_file(tmp_path, monkeypatch):
    def disk_full(table, f, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", disk_full)
    row = {k: v for k, v in ROW.items() if k != "topic"}
    with pytest.raises(OSError) as err:
        write_shard(tmp_path, "part-00000.parquet", [row], output_schema({}, {}))
    assert err.value.errno == 28 and ".part-00000.parquet.tmp-" in err.value.filename


def test_abandoned_temp_files_go_by_age_or_once_their_shard_is_published(tmp_path):
    schema = output_schema({}, {})
    row = {k: v for k, v in ROW.items() if k != "topic"}
    write_shard(tmp_path, "part-00002.parquet", [row], schema)
    fresh = tmp_path / ".part-00003.parquet.tmp-hostb-1-abc"  # a live writer's, unpublished
    moot = tmp_path / ".part-00002.parquet.tmp-hosta-1-abc"  # a loser's copy of a published one
    old = tmp_path / ".run.json.tmp-hostc-1-abc"
    legacy = tmp_path / "part-00005.parquet.tmp-4242"  # an older batchgen's name
    for path in (fresh, moot, old, legacy):
        path.write_bytes(b"x")
    for path in (old, legacy):
        os.utime(path, (1, 1))
    assert remove_abandoned(tmp_path, older_than=60) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [fresh.name, "part-00002.parquet"]


def test_a_missing_folder_is_an_error_not_a_dropped_copy(tmp_path):
    row = {k: v for k, v in ROW.items() if k != "topic"}
    with pytest.raises(FileNotFoundError) as err:
        write_shard(tmp_path / "missing", "part-00000.parquet", [row], output_schema({}, {}))
    assert "missing" in err.value.filename


def test_a_temp_file_removed_as_abandoned_drops_the_copy(tmp_path, monkeypatch):
    real = os.link

    def cleaner_first(src, dst):
        os.unlink(src)  # another worker judged it abandoned (this writer was frozen)
        return real(src, dst)

    monkeypatch.setattr(os, "link", cleaner_first)
    row = {k: v for k, v in ROW.items() if k != "topic"}
    assert write_shard(tmp_path, "part-00000.parquet", [row], output_schema({}, {})) is False
    assert os.listdir(tmp_path) == []
