"""finalize: verify every shard, write a dataset card, load the folder with `datasets`."""

from __future__ import annotations

import pyarrow.parquet as pq

from batchgen import run
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
