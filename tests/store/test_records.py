"""Per-worker records: two ranks of one job, run one after the other into one folder."""

from __future__ import annotations

import json

from batchgen import run
from batchgen.store import layout
from batchgen.store.folder import read_folder
from batchgen.store.records import read_run_file, read_workers
from batchgen.store.summary import read_errors
from batchgen.store.writer import read_footers

BAD = {1: "", 7: None, 11: "   "}  # one bad row in each shard of 5: shards 0 and 2 are rank 0's


def bad_rows_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    with path.open("w") as f:
        for i in range(12):
            prompt = BAD.get(i, f"prompt number {i}")
            f.write(json.dumps({"uid": f"row-{i}", "prompt": prompt}) + "\n")
    return path


def rank(make_job, model, data, out, r):
    cfg = make_job(model, data, out, runner__on_bad_row="skip", runner__steal=False)
    cfg.runner.rank, cfg.runner.world_size = r, 2
    return run(cfg)


def errors_of(out, r):
    text = layout.worker_errors_file(out, r, 2).read_text()
    return [(e["shard"], e["id"]) for e in map(json.loads, text.splitlines())]


def test_two_workers_keep_their_own_records_and_readers_merge_them(tiny_models, make_job, tmp_path):
    data, out = bad_rows_file(tmp_path), tmp_path / "out"
    first = rank(make_job, tiny_models["chat"], data, out, 0)
    second = rank(make_job, tiny_models["chat"], data, out, 1)
    assert first["shards_done"] == 2 and second["shards_done"] == 3
    assert second["totals"]["skipped"] == 3
    assert errors_of(out, 0) == [(0, "row-1"), (2, "row-11")]
    assert errors_of(out, 1) == [(1, "row-7")]
    assert second["errors_file"] == str(layout.worker_errors_file(out, 1, 2))

    run_record = read_run_file(out)
    assert "status" not in run_record and "summary" not in run_record
    records = read_workers(out, run_record)
    assert [(r.rank, r.status) for r in records] == [
        (0, "incomplete"),  # shard 1 was not done yet when rank 0 finished
        (1, "complete"),
    ]
    # The record holds the summary the job returned, typed again.
    assert records[1].summary.totals == second.totals
    assert records[1].summary.this_run == second.this_run
    state = read_folder(out)
    assert state.status == "complete" and state.shards_total == 3
    assert state.phases["load"] == sum(r.summary.phases["load"] for r in records)
    errors = read_errors(read_footers(out))
    assert [(e["id"], e["kind"], e["shard"], e["rank"]) for e in errors] == [
        ("row-1", "skipped", 0, 0),
        ("row-7", "skipped", 1, 1),
        ("row-11", "skipped", 2, 0),
    ]


def test_a_rerun_of_one_rank_replaces_only_its_own_record(tiny_models, make_job, tmp_path):
    data, out = bad_rows_file(tmp_path), tmp_path / "out"
    rank(make_job, tiny_models["chat"], data, out, 0)
    rank(make_job, tiny_models["chat"], data, out, 1)
    other = layout.worker_file(out, 1, 2).read_bytes()
    before = json.loads(layout.worker_file(out, 0, 2).read_text())
    (out / "part-00002.parquet").unlink()  # rank 0 redoes shard 2, not shard 0
    again = rank(make_job, tiny_models["chat"], data, out, 0)
    after = json.loads(layout.worker_file(out, 0, 2).read_text())
    assert after["status"] == "complete" and after["updated_at"] > before["updated_at"]
    assert again["shards_resumed"] == 1 and again["this_run"]["rows"] == 1
    assert layout.worker_file(out, 1, 2).read_bytes() == other
    # Shard 0's bad row was recorded by the first attempt; the rerun lists it still.
    assert errors_of(out, 0) == [(0, "row-1"), (2, "row-11")]
    assert sorted(p.name for p in layout.workers_dir(out).iterdir()) == [
        "rank-00000-of-00002.errors",
        "rank-00000-of-00002.record",
        "rank-00001-of-00002.errors",
        "rank-00001-of-00002.record",
    ]
