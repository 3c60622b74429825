"""finalize: verify every shard, write a dataset card, load the folder with `datasets`."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from batchgen import run
from batchgen.errors import NotAnOutputDir
from batchgen.store import layout
from batchgen.store.records import write_worker_file
from batchgen.store.writer import output_schema, write_json_atomic, write_shard
from batchgen.tools import status
from batchgen.tools.finalize import main


def test_finalize_writes_a_card_that_datasets_loads(
    tiny_models, prompts_file, make_job, tmp_path, capsys
):
    out = tmp_path / "out"
    run(make_job(tiny_models["chat"], prompts_file, out, dataset__keep_columns=["topic"]))
    assert main([str(out)]) == 0
    card = (out / "_batchgen" / "README.md").read_text()
    assert 'path: "part-*.parquet"' in card and "| generated rows | 12 |" in card
    assert "| `topic` | string |" in card
    import datasets

    loaded = datasets.load_dataset(str(out), split="train")
    expected = [r for f in sorted(out.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert loaded.to_list() == expected


def test_finalize_refuses_missing_and_damaged_shards(
    tiny_models, prompts_file, make_job, tmp_path, capsys
):
    out = tmp_path / "out"
    run(make_job(tiny_models["chat"], prompts_file, out))
    (out / "part-00001.parquet").unlink()
    damaged = out / "part-00002.parquet"
    damaged.write_bytes(damaged.read_bytes()[:100])
    assert main([str(out)]) == 1
    err = capsys.readouterr().err
    assert "part-00001.parquet: missing" in err and "part-00002.parquet: corrupt" in err
    assert not (out / "_batchgen" / "README.md").exists()
    assert main([str(tmp_path / "nothing")]) == 2


def hand_built(out, rows, **config):
    """run.json without the sampling settings, one worker record without a summary, shard 0."""
    out.mkdir(parents=True)
    parts = {"data": {"rows": rows}, "layout": {"rows_per_shard": 5}}
    write_json_atomic(
        layout.run_file(out), {"fingerprint": "fp", "fingerprint_parts": parts, "config": config}
    )
    write_worker_file(out, {"fingerprint": "fp"}, 0, 1, "running")
    row = {
        "id": "r0",
        "sample_index": 0,
        "prompt": "p",
        "response": "r",
        "finish_reason": "stop",
        "prompt_tokens": 1,
        "completion_tokens": 1,
    }
    totals = {"rows": 1, "samples": 1, "skipped": 4, "completion_tokens": 1}
    meta = {"fingerprint": "fp", "shard": {"index": 0, "start": 0, "stop": 5, "totals": totals}}
    assert write_shard(out, layout.shard_name(0), [row], output_schema({}, meta))


def test_finalize_says_what_a_folder_lacks_where_status_copes(tmp_path, capsys):
    # No summary in the worker records, no sampling settings recorded, a stream's total
    # unknown: status copes, and finalize says what is missing (it used to raise KeyError).
    out = tmp_path / "out"
    hand_built(out, 10)
    assert status.collect(out)["shards"] == {
        "total": 2,
        "done": 1,
        "claimed": 0,
        "expired": 0,
        "pending": 1,
    }
    assert main([str(out)]) == 1
    assert "part-00001.parquet: missing" in capsys.readouterr().err
    stream = tmp_path / "stream"
    hand_built(stream, None, dataset={"streaming": True})
    with pytest.raises(NotAnOutputDir, match="streamed"):
        status.collect(stream)
    assert main([str(stream)]) == 1
    err = capsys.readouterr().err
    assert "is not finished or not intact" in err and "no worker has read it to its end" in err
    assert not layout.card_file(out).exists() and not layout.card_file(stream).exists()


def test_finalize_reads_the_folder_once_through_the_one_reader(tmp_path, folder_reads):
    hand_built(tmp_path / "out", 10)
    assert main([str(tmp_path / "out")]) == 1
    assert folder_reads == [tmp_path / "out"]
