"""Shard verification on resume: damaged files are caught and quarantined, never trusted."""

from __future__ import annotations

from datetime import datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.store import manifest, verify
from batchgen.store.verify import (
    CORRUPT,
    OTHER_CONFIG,
    WRONG_ROWS,
    quarantine,
    reason_kind,
    verify_shard,
)
from batchgen.store.writer import finished_shards, output_schema, write_shard

PARTS = {"model": {"name_or_path": "tiny-model"}, "layout": {"seed": 0}}
FP = manifest.fingerprint(PARTS)
IDS = [f"row-{i}" for i in range(30)]


def rows(ids, n):
    return [
        {
            "id": i,
            "sample_index": k,
            "prompt": f"<|im_start|>user\nprompt {i} " + "words " * (j % 7),
            "response": f"response {i}/{k} " + "tokens " * (3 + j % 11),
            "finish_reason": "length" if j % 4 == 0 else "stop",
            "prompt_tokens": 10 + j,
            "completion_tokens": 3 + j % 11,
        }
        for j, i in enumerate(ids)
        for k in range(n)
    ]


def shard(out, ids=IDS, n=2, parts=PARTS, name="part-00000.parquet"):
    meta = {"fingerprint": manifest.fingerprint(parts), "fingerprint_parts": parts}
    schema = output_schema({}, {**meta, "shard": {"index": 0}})
    assert write_shard(out, name, rows(ids, n), schema)
    return out / name


def copy_with(path, data: bytes):
    bad = path.with_name("part-00009.parquet")
    bad.write_bytes(data)
    return bad


def test_valid_shard_passes_every_check(tmp_path):
    path = shard(tmp_path)
    assert verify_shard(path, FP, IDS, 2) is None
    assert verify_shard(path, FP, IDS, None) is None
    assert verify_shard(path, FP, None, 2) is None
    assert verify_shard(path, FP, None, None) is None


def test_empty_shard_with_no_rows_is_valid(tmp_path):
    assert verify_shard(shard(tmp_path, ids=[]), FP, [], 1) is None


def test_zero_byte_file(tmp_path):
    path = tmp_path / "part-00000.parquet"
    path.touch()
    assert verify_shard(path, FP, IDS, 2) == "corrupt: empty file (0 bytes)"


@pytest.mark.parametrize("keep", [1, 4, 100, 0.25, 0.5, 0.9, -9, -8, -4, -1])
def test_copy_cut_short_is_corrupt(tmp_path, keep):
    data = shard(tmp_path).read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    reason = verify_shard(copy_with(tmp_path / "x", data[:cut]), FP, IDS, 2)
    assert reason.startswith("corrupt: footer unreadable (")
    assert reason_kind(reason) == CORRUPT


def column_middles(path):
    """The middle byte offset of each column chunk's data pages."""
    meta = pq.ParquetFile(path).metadata.row_group(0)
    out = {}
    for c in range(meta.num_columns):
        col = meta.column(c)
        start = col.dictionary_page_offset or col.data_page_offset
        out[col.path_in_schema] = start + col.total_compressed_size // 2
    return out


@pytest.mark.parametrize("column", ["prompt", "response", "id", "completion_tokens"])
def test_bytes_flipped_in_the_data_pages_are_caught(tmp_path, column):
    path = shard(tmp_path)
    data = bytearray(path.read_bytes())
    middle = column_middles(path)[column]
    for i in range(middle - 4, middle + 4):
        data[i] ^= 0xFF
    bad = copy_with(path, bytes(data))
    # The footer is intact: only decoding the pages shows the damage.
    assert pq.ParquetFile(bad).metadata.num_rows == 60
    reason = verify_shard(bad, FP, IDS, 2)
    assert reason.startswith("corrupt: data unreadable (")


def test_other_fingerprint_is_told_apart_from_damage(tmp_path):
    other = {**PARTS, "layout": {"seed": 1}}
    reason = verify_shard(shard(tmp_path, parts=other), FP, IDS, 2)
    assert reason == (
        f"other config: shard records fingerprint {manifest.fingerprint(other)!r}, "
        f"this run is {FP!r}"
    )
    assert reason_kind(reason) == OTHER_CONFIG


def test_damaged_settings_in_the_footer_are_not_another_config(tmp_path):
    # What a flipped bit inside the recorded settings leaves: they no longer hash to the
    # fingerprint beside them.
    damaged = {"fingerprint": FP, "fingerprint_parts": {**PARTS, "layout": {"seed": 1}}}
    assert write_shard(tmp_path, "part-00000.parquet", rows(IDS, 2), output_schema({}, damaged))
    assert verify_shard(tmp_path / "part-00000.parquet", FP, IDS, 2) == (
        "corrupt: batchgen metadata damaged (fingerprint does not match its settings)"
    )


def test_wrong_ids(tmp_path):
    path = shard(tmp_path, ids=IDS[:3] + ["row-x"] + IDS[4:])
    assert verify_shard(path, FP, IDS, 2) == (
        "wrong rows: row 6 is id 'row-x' sample 0, expected id 'row-3' sample 0"
    )
    assert verify_shard(path, FP, IDS, None) == (
        "wrong rows: id number 3 is 'row-x', expected 'row-3'"
    )


def test_wrong_row_count(tmp_path):
    path = shard(tmp_path, ids=IDS[:-1])
    reason = verify_shard(path, FP, IDS, 2)
    assert reason == "wrong rows: 58 rows, expected 60 (30 ids x 2 samples)"
    assert reason_kind(reason) == WRONG_ROWS
    assert verify_shard(path, FP, IDS, None) == "wrong rows: 29 ids, expected 30"


def test_wrong_samples_per_row(tmp_path):
    path = shard(tmp_path, ids=IDS[:3], n=2)
    assert verify_shard(path, FP, None, 3) == (
        "wrong rows: row 2 is id 'row-1' sample 0, expected id 'row-0' sample 2"
    )
    path = shard(tmp_path, ids=IDS[:3], n=1, name="part-00001.parquet")
    assert (
        verify_shard(path, FP, None, 2) == "wrong rows: 3 rows, not a multiple of 2 samples per row"
    )


def test_missing_file_is_not_a_verdict(tmp_path):
    with pytest.raises(FileNotFoundError):
        verify_shard(tmp_path / "part-00000.parquet", FP, IDS, 2)


class FrozenClock(datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime(2025, 1, 2, 3, 4, 5, tzinfo=tz)


def test_quarantine_moves_the_shard_out_of_the_outputs(tmp_path, monkeypatch):
    monkeypatch.setattr(verify, "datetime", FrozenClock)
    path = shard(tmp_path)
    first = quarantine(path)
    second = quarantine(shard(tmp_path))
    third = quarantine(shard(tmp_path))
    assert [first.name, second.name, third.name] == [
        "part-00000.corrupt-20250102T030405Z",
        "part-00000.corrupt-20250102T030405Z-1",
        "part-00000.corrupt-20250102T030405Z-2",
    ]
    assert finished_shards(tmp_path) == {}
    assert sorted(tmp_path.glob("*.parquet")) == []
    assert verify_shard(first, FP, IDS, 2) is None  # kept intact for inspection


def test_parquet_without_batchgen_metadata_or_columns_is_corrupt(tmp_path):
    table = pa.Table.from_pylist(rows(IDS, 1), schema=output_schema({}, {}).remove_metadata())
    pq.write_table(table, tmp_path / "part-00000.parquet")
    assert verify_shard(tmp_path / "part-00000.parquet", FP, IDS, 1) == (
        "corrupt: batchgen metadata unreadable (KeyError: b'batchgen')"
    )
    pq.write_table(table.drop_columns(["response"]), tmp_path / "part-00001.parquet")
    assert verify_shard(tmp_path / "part-00001.parquet", FP, IDS, 1) == (
        "corrupt: column 'response' missing"
    )


def test_one_flipped_byte_is_caught_where_pages_carry_checksums(tmp_path):
    schema = output_schema({}, {"fingerprint": FP})
    path = tmp_path / "part-00000.parquet"
    table = pa.Table.from_pylist(rows(IDS, 2), schema=schema)
    pq.write_table(table, path, compression="zstd", write_page_checksum=True)
    data = bytearray(path.read_bytes())
    data[column_middles(path)["response"]] ^= 0x01
    reason = verify_shard(copy_with(path, bytes(data)), FP, IDS, 2)
    assert reason.startswith("corrupt: data unreadable (")
    assert "CRC" in reason


def test_rows_with_their_own_sample_counts(tmp_path):
    """Without one count for all (``dataset.sampling_column``), each id's rows are numbered
    from 0 and add up to the samples the footer counts."""
    counts = {"a": 1, "b": 3, "c": 2}
    good = [r for i, n in counts.items() for r in rows([i], n)]

    def write(table, name, samples=6):
        meta = {"fingerprint": FP, "fingerprint_parts": PARTS}
        meta["shard"] = {"index": 0, "totals": {"rows": 3, "samples": samples}}
        assert write_shard(tmp_path, name, table, output_schema({}, meta))
        return tmp_path / name

    assert verify_shard(write(good, "part-00000.parquet"), FP, list(counts), None) is None
    gap = good[:1] + good[2:]  # b's sample 0 lost
    assert verify_shard(write(gap, "part-00001.parquet", 5), FP, list(counts), None) == (
        "wrong rows: row 1 is id 'b' sample 1, expected sample 0"
    )
    short = write(good[:-1], "part-00002.parquet")  # c's sample 1 lost, the footer says 6
    assert verify_shard(short, FP, None, None) == (
        "wrong rows: 5 rows, the footer counts 6 samples"
    )
