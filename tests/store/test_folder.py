"""read_folder on hand-built output folders: each fact by its one rule and fallback; summarize."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchgen.errors import NotAnOutputDir
from batchgen.store import layout
from batchgen.store.folder import Throughput, read_folder, summarize
from batchgen.store.records import write_worker_file
from batchgen.store.summary import Totals, WorkerSummary
from batchgen.store.writer import output_schema, write_json_atomic, write_shard

ROWS, PER_SHARD = 12, 5  # three shards, the last of 2 rows


def run_json(out, rows=ROWS, fingerprint="fp1", **config):
    """run.json as a job writes it, less what no reader needs."""
    parts = {"data": {"rows": rows}, "layout": {"rows_per_shard": PER_SHARD}}
    payload = {"fingerprint": fingerprint, "fingerprint_parts": parts, "config": config}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(layout.run_file(out), payload)


def worker(out, rank, world_size, status, summary=None, fingerprint="fp1"):
    meta = {"fingerprint": fingerprint, "device": "cpu", "engine": "static"}
    typed = WorkerSummary.from_dict(summary) if summary is not None else None
    write_worker_file(out, meta, rank, world_size, status, typed)


def shard(out, index, fingerprint="fp1", skipped=0, rank=0):
    start, stop = index * PER_SHARD, min((index + 1) * PER_SHARD, ROWS)
    n = stop - start - skipped
    rows = [
        {
            "id": f"r{i}",
            "sample_index": 0,
            "prompt": "p",
            "response": "r",
            "finish_reason": "stop",
            "prompt_tokens": 2,
            "completion_tokens": 3,
        }
        for i in range(start, start + n)
    ]
    totals = {"rows": n, "samples": n, "skipped": skipped, "completion_tokens": 3 * n}
    record = {"index": index, "start": start, "stop": stop, "totals": totals}
    record["skipped"] = [{"id": f"r{stop - 1}", "reason": "empty"}] if skipped else []
    record["worker"] = {"rank": rank, "world_size": 1}
    meta = {"fingerprint": fingerprint, "shard": record}
    assert write_shard(out, layout.shard_name(index), rows, output_schema({}, meta))


def test_a_finished_run_read_once(tmp_path):
    out = tmp_path / "out"
    run_json(out, sampling={"num_return_sequences": 2})
    for i in range(3):
        shard(out, i, skipped=1 if i == 1 else 0)
    worker(out, 0, 1, "complete", {"shards_total": 3, "rows_total": ROWS})
    state = read_folder(out)
    assert state.require_run()["fingerprint"] == "fp1" and state.run_problem is None
    assert (state.rows_per_shard, state.rows_total, state.shards_total) == (PER_SHARD, ROWS, 3)
    assert list(state.done) == [0, 1, 2] and state.foreign == [] and state.complete
    assert state.rows_done == ROWS and state.samples_per_row == 2
    assert state.totals == Totals(rows=11, samples=11, skipped=1, completion_tokens=33)
    assert set(state.mtimes) == {0, 1, 2} and state.status == "complete"


def test_worker_records_come_before_run_json_and_the_count_follows_the_rows(tmp_path):
    out = tmp_path / "out"
    run_json(out, rows=None, dataset={"streaming": True})
    state = read_folder(out)
    assert state.rows_total is None and state.shards_total is None and not state.complete
    assert "streamed" in state.plan_problem and state.require_run()
    with pytest.raises(NotAnOutputDir, match="no worker has read it to its end"):
        state.require_plan()
    worker(out, 0, 2, "running")  # a record without a summary says nothing of the totals
    assert read_folder(out).rows_total is None
    worker(out, 1, 2, "complete", {"rows_total": 23})  # one worker read the stream to its end
    state = read_folder(out)
    assert (state.rows_total, state.shards_total, state.plan_problem) == (23, 5, None)
    worker(out, 1, 2, "complete", {"rows_total": 23, "shards_total": 6})
    assert read_folder(out).shards_total == 6  # as recorded, not recomputed


def test_shard_size_from_the_config_when_the_parts_lack_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    run = {"fingerprint": "fp1", "fingerprint_parts": {"data": {"rows": ROWS}}}
    write_json_atomic(layout.run_file(out), {**run, "config": {"output": {"rows_per_shard": 4}}})
    assert (read_folder(out).rows_per_shard, read_folder(out).shards_total) == (4, 3)
    write_json_atomic(layout.run_file(out), run)
    with pytest.raises(NotAnOutputDir, match="does not record the row count and rows per shard"):
        read_folder(out).require_plan()


def test_shards_not_of_this_run_are_foreign(tmp_path):
    out = tmp_path / "out"
    run_json(out)
    shard(out, 0)
    shard(out, 1, fingerprint="other")
    (out / layout.shard_name(2)).write_text("not parquet")
    shard(out, 3)  # past the plan's three shards
    state = read_folder(out)
    assert list(state.done) == [0] and list(state.footers) == [0, 1, 2, 3]
    assert state.foreign == ["part-00001.parquet", "part-00002.parquet", "part-00003.parquet"]
    assert not state.complete and state.totals.rows == 5


def test_without_run_json_every_readable_shard_counts_and_nothing_is_required(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shard(out, 0)
    shard(out, 1, fingerprint="other")
    state = read_folder(out)
    assert state.run == {} and state.records == [] and state.status is None
    assert list(state.done) == [0, 1] and state.shards_total is None
    for require in (state.require_run, state.require_plan):
        with pytest.raises(NotAnOutputDir, match="run.json"):
            require()
    assert read_folder(tmp_path / "missing").footers == {}


def test_worker_records_merge(tmp_path):
    out = tmp_path / "out"
    run_json(out)
    this_run = {"rows": 10, "skipped": 2, "completion_tokens": 40, "generate_seconds": 4.0}
    one = {"this_run": this_run, "phases": {"load": 1.0, "generate": 4.0}, "wall_seconds": 7.0}
    two = {"this_run": {**this_run, "rows": 6}, "phases": {"load": 0.5}, "wall_seconds": 9.0}
    worker(out, 1, 2, "interrupted", two)
    worker(out, 0, 2, "incomplete", one)
    worker(out, 0, 1, "complete", fingerprint="fp0")  # an earlier config's: not this run's
    state = read_folder(out)
    assert [(r.rank, r.world_size, r.status) for r in state.records] == [
        (0, 2, "incomplete"),
        (1, 2, "interrupted"),
    ]
    assert state.status == "interrupted"
    assert state.phases == {"load": 1.5, "generate": 4.0} and state.wall_seconds == 9.0
    assert state.throughput == Throughput(12 / 4 + 8 / 4, 20.0)
    worker(out, 2, 3, "running")
    assert read_folder(out).status == "running"
    bare = tmp_path / "bare"
    run_json(bare)
    worker(bare, 0, 1, "running")
    state = read_folder(bare)
    assert (state.phases, state.wall_seconds, state.throughput) == (None, None, None)


def test_summarize_reads_the_folder_once_and_writes_the_errors(tmp_path, folder_reads):
    out = tmp_path / "out"
    run_json(out)
    shard(out, 0)
    shard(out, 1, skipped=1)
    shard(out, 2, fingerprint="other")  # not this run's: not counted
    mine = Totals(rows=4, samples=4, completion_tokens=12)
    summary = summarize(out, 0, 1, 3, ROWS, 1, mine, {"generate": 2.0}, 3.0)
    assert folder_reads == [out]
    assert summary.shards_done == 2 and not summary.complete
    assert summary.totals == Totals(rows=9, samples=9, skipped=1, completion_tokens=27)
    assert summary.this_run.tokens_per_second == 6.0 and summary.this_run.rows == 4
    errors = [json.loads(line) for line in Path(summary.errors_file).read_text().splitlines()]
    assert [(e["id"], e["shard"]) for e in errors] == [("r9", 1)]
