"""The shard loop: a worker reads, verifies and generates only the shards it touches."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen import run
from batchgen.engine import devices
from batchgen.errors import ResumeError
from batchgen.job import shard_loop
from batchgen.store import layout


def read(out):
    return [row for f in sorted(out.glob("*.parquet")) for row in pq.read_table(f).to_pylist()]


def rewrite_row(path, index, text):
    lines = path.read_text().splitlines()
    row = json.loads(lines[index])
    row["prompt"] = text
    lines[index] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def verified(monkeypatch):
    """The shard files the loop verifies (decodes whole), by name."""
    seen = []
    real = shard_loop.verify_shard

    def spy(path, *args):
        seen.append(path.name)
        return real(path, *args)

    monkeypatch.setattr(shard_loop, "verify_shard", spy)
    return seen


def no_model(monkeypatch):
    def refuse(*_args, **_kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(devices, "load_model", refuse)


def test_changed_row_in_a_finished_shard_is_refused(tiny_models, prompts_file, make_job, tmp_path):
    out = tmp_path / "out"
    run(make_job(tiny_models["chat"], prompts_file, out))
    before = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    rewrite_row(prompts_file, 6, "a different question")  # shard 1 holds rows 5-9
    with pytest.raises(ResumeError) as err:
        run(make_job(tiny_models["chat"], prompts_file, out))
    message = str(err.value)
    assert "part-00001.parquet" in message and "row 6 (id 'row-6') changed" in message
    assert "output.dir" in message
    assert {p.name: p.read_bytes() for p in out.glob("*.parquet")} == before


def test_changed_row_in_an_unfinished_shard_is_generated(
    tiny_models, prompts_file, make_job, tmp_path
):
    out = tmp_path / "out"
    run(make_job(tiny_models["chat"], prompts_file, out))
    (out / "part-00002.parquet").unlink()
    rewrite_row(prompts_file, 11, "a brand new question")
    summary = run(make_job(tiny_models["chat"], prompts_file, out))
    assert summary["shards_resumed"] == 2 and summary["this_run"]["rows"] == 2
    assert "a brand new question" in read(out)[11]["prompt"]


def test_finished_job_loads_no_model_and_verifies_its_own_shards(
    tiny_models, prompts_file, make_job, tmp_path, monkeypatch, verified
):
    out = tmp_path / "out"
    run(make_job(tiny_models["chat"], prompts_file, out))
    assert verified == []  # nothing was finished when it started
    no_model(monkeypatch)
    summary = run(make_job(tiny_models["chat"], prompts_file, out))
    assert summary["shards_resumed"] == 3 and summary["this_run"]["rows"] == 0
    assert sorted(verified) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]


def test_workers_never_decode_each_others_shards(
    tiny_models, prompts_file, make_job, tmp_path, monkeypatch, verified
):
    out = tmp_path / "out"
    run(make_job(tiny_models["chat"], prompts_file, out, output__rows_per_shard=2))
    no_model(monkeypatch)
    for rank in (0, 1, 2):
        verified.clear()
        summary = run(
            make_job(
                tiny_models["chat"],
                prompts_file,
                out,
                output__rows_per_shard=2,
                runner__rank=rank,
                runner__world_size=3,
            )
        )
        assert summary["shards_resumed"] == 2
        assert verified == [f"part-{i:05d}.parquet" for i in range(rank, 6, 3)]


def test_damaged_shard_of_another_share_is_left_to_its_owner(
    tiny_models, prompts_file, make_job, tmp_path, verified
):
    out = tmp_path / "out"
    run(make_job(tiny_models["chat"], prompts_file, out))
    (out / "part-00001.parquet").write_bytes(b"not parquet")
    over = {"runner__rank": 0, "runner__world_size": 2}
    run(make_job(tiny_models["chat"], prompts_file, out, **over))
    assert "part-00001.parquet" not in verified and not list(
        out.glob("_batchgen/quarantine/*.corrupt-*")
    )
    over["runner__rank"] = 1
    summary = run(make_job(tiny_models["chat"], prompts_file, out, **over))
    assert (
        summary["this_run"]["rows"] == 5
        and len(list(out.glob("_batchgen/quarantine/*.corrupt-*"))) == 1
    )
    assert pq.read_table(out / "part-00001.parquet").num_rows == 5


def parquet_folder(tmp_path, prompts_file):
    folder = tmp_path / "parquet"
    folder.mkdir()
    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    for k in range(3):  # files of 4 rows: shards of 5 rows span files
        pq.write_table(pa.Table.from_pylist(rows[4 * k : 4 * k + 4]), folder / f"train-{k}.parquet")
    return folder


def test_streaming_equals_random_access_and_resumes(tiny_models, prompts_file, make_job, tmp_path):
    folder = parquet_folder(tmp_path, prompts_file)
    table = tmp_path / "table"
    run(make_job(tiny_models["chat"], folder, table))
    out = tmp_path / "stream"
    summary = run(make_job(tiny_models["chat"], folder, out, dataset__streaming=True))
    assert summary["shards_total"] == 3 and summary["shards_done"] == 3
    assert read(out) == read(table)
    assert json.loads(layout.worker_file(out, 0, 1).read_text())["status"] == "complete"
    (out / "part-00001.parquet").unlink()
    summary = run(make_job(tiny_models["chat"], folder, out, dataset__streaming=True))
    assert summary["shards_resumed"] == 2 and summary["this_run"]["rows"] == 5
    assert read(out) == read(table)


def test_streaming_workers_take_every_nth_shard(tiny_models, prompts_file, make_job, tmp_path):
    folder = parquet_folder(tmp_path, prompts_file)
    out = tmp_path / "stream"
    over = {"dataset__streaming": True, "runner__world_size": 2}
    first = run(make_job(tiny_models["chat"], folder, out, runner__rank=1, **over))
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-00001.parquet"]
    assert first["shards_done"] == 1 and first["shards_total"] == 3
    run(make_job(tiny_models["chat"], folder, out, runner__rank=0, **over))
    assert len(read(out)) == 12


def test_a_local_source_is_its_rows_not_its_spelling(
    tiny_models, prompts_file, make_job, tmp_path, monkeypatch, capsys
):
    """Relative, then absolute (a Slurm task starts elsewhere), then a moved copy: one run. A
    changed row in a finished shard is still refused."""
    monkeypatch.chdir(prompts_file.parent)
    out = tmp_path / "out"
    run(make_job(tiny_models["chat"], prompts_file.name, out))
    before = read(out)
    recorded = json.loads(layout.run_file(out).read_text())

    (out / "part-00001.parquet").unlink()
    run(make_job(tiny_models["chat"], prompts_file.resolve(), out))
    assert "recorded as 'prompts.jsonl': resuming it" in capsys.readouterr().out
    moved = tmp_path / "elsewhere" / "copy.jsonl"
    moved.parent.mkdir()
    prompts_file.rename(moved)
    (out / "part-00002.parquet").unlink()
    summary = run(make_job(tiny_models["chat"], moved, out))
    assert summary["this_run"]["rows"] == 2 and read(out) == before
    assert json.loads(layout.run_file(out).read_text()) == recorded

    rewrite_row(moved, 3, "a row that changed")
    with pytest.raises(ResumeError, match=r"row 3 \(id 'row-3'\) changed"):
        run(make_job(tiny_models["chat"], moved, out))


def test_each_workers_bar_counts_its_own_share(
    tiny_models, prompts_file, make_job, tmp_path, capsys
):
    """12 rows in shards of 5, 5 and 2: rank 0 of 2 has shards 0 and 2 (7 rows), rank 1 shard 1
    (5 rows); with stealing, a shard taken over joins the taker's bar."""
    out = tmp_path / "out"
    common = {"runner__world_size": 2, "runner__progress": True}
    run(
        make_job(
            tiny_models["chat"], prompts_file, out, runner__rank=0, runner__steal=False, **common
        )
    )
    assert "7/7" in capsys.readouterr().err
    (out / "part-00000.parquet").unlink()
    run(make_job(tiny_models["chat"], prompts_file, out, runner__rank=1, **common))
    bar = capsys.readouterr().err
    # Its shard (5 rows, its share), then rank 0's, stolen: the bar grows to 10 as it takes it.
    assert "5/10" in bar and "10/10" in bar and "/12" not in bar
