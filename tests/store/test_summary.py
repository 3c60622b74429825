"""The typed worker summary: its record round trip, its dict face, and the closing summary text."""

from __future__ import annotations

import json

from batchgen.store.summary import ThisRun, Totals, WorkerSummary, format_summary

TUNING = {
    "batch_size": 32,
    "max_batch_tokens": 430569,
    "engine": "static",
    "why": {"batch_size": "auto: x", "max_batch_tokens": "auto: y", "engine": "auto: z"},
}


def full() -> WorkerSummary:
    return WorkerSummary(
        output_dir="out/run",
        shards_total=3,
        rows_total=12,
        shards_done=2,
        shards_resumed=1,
        totals=Totals(
            rows=1234,
            samples=2468,
            skipped=2,
            failed=1,
            prompt_tokens=45678,
            completion_tokens=98765,
            padded_tokens=1000,
            invalid=3,
            finish_reasons={"stop": 2000, "length": 468},
        ),
        padding_waste=0.0219,
        errors_file="out/run/_batchgen/workers/rank-00000-of-00001.errors",
        this_run=ThisRun(
            rows=800,
            samples=1600,
            completion_tokens=5000,
            generate_seconds=12.34,
            tokens_per_second=405.19,
        ),
        phases={"prepare": 1.25, "load": 0.3, "generate": 12.34},
        wall_seconds=15.67,
        already_complete=True,
        tuning=TUNING,
    )


def test_closing_summary_text():
    # The text printed before the summary was typed, from the same numbers.
    assert format_summary(full()).splitlines() == [
        "batchgen summary",
        "  status      already complete: every shard was finished before this run",
        "  rows        1,234 generated, 2 skipped, 1 failed (2/3 shards complete)",
        "  samples     2,468 (finish: length 468, stop 2000); 3 invalid (column valid)",
        "  tokens      45,678 prompt, 98,765 completion, padding waste 2.2%",
        "  this run    800 rows, 5,000 tokens in 12.3 s = 405.2 tokens/s (wall 15.7 s, 1 shards "
        "resumed)",
        "  phases      prepare 1.2 s, load 0.3 s, generate 12.3 s",
        "  batch size  32 (auto: x)",
        "  batch slots 430,569 (auto: y)",
        "  engine      static (auto: z)",
        "  outputs     out/run/part-*.parquet",
        "  errors      out/run/_batchgen/workers/rank-00000-of-00001.errors (ids and reasons)",
    ]
    s = full()
    s.shards_total, s.phases, s.already_complete = None, {}, False
    s.totals.skipped = s.totals.failed = s.totals.invalid = 0
    s.totals.finish_reasons = {}
    s.tuning = {**TUNING, "max_batch_tokens": None}
    assert format_summary(s).splitlines() == [
        "batchgen summary",
        "  rows        1,234 generated, 0 skipped, 0 failed (2/? shards complete)",
        "  samples     2,468 (finish: -)",
        "  tokens      45,678 prompt, 98,765 completion, padding waste 2.2%",
        "  this run    800 rows, 5,000 tokens in 12.3 s = 405.2 tokens/s (wall 15.7 s, 1 shards "
        "resumed)",
        "  phases      -",
        "  batch size  32 (auto: x)",
        "  batch slots no bound (auto: y)",
        "  engine      static (auto: z)",
        "  outputs     out/run/part-*.parquet",
    ]


def test_record_round_trip_and_dict_face():
    s = full()
    record = json.loads(json.dumps(s.to_dict()))
    assert WorkerSummary.from_dict(record) == s
    assert list(record) == [
        "output_dir",
        "shards_total",
        "rows_total",
        "shards_done",
        "shards_resumed",
        "totals",
        "padding_waste",
        "errors_file",
        "this_run",
        "phases",
        "wall_seconds",
        "already_complete",
        "tuning",
    ]
    assert record["this_run"]["generate_seconds"] == 12.34 and record["this_run"]["rows"] == 800
    # Read as the dict batchgen.run returned before it was typed.
    assert s["totals"]["rows"] == 1234 and s["this_run"]["rows"] == 800
    assert dict(s) == s.to_dict() and s.get("tuning") == TUNING and "shards_done" in s
    assert "tuning" not in WorkerSummary().to_dict()


def test_a_partial_or_newer_record_reads_with_defaults():
    s = WorkerSummary.from_dict(
        {"shards_total": 5, "this_run": {"rows": 4, "generate_seconds": 2.0}, "later": 1}
    )
    assert s.shards_total == 5 and s.rows_total is None and s.wall_seconds is None
    assert s.this_run == ThisRun(rows=4, generate_seconds=2.0) and s.totals == Totals()
    assert s.phases == {} and not s.complete
    assert WorkerSummary(shards_total=2, shards_done=2).complete


def test_a_pool_summary_says_how_each_worker_ended():
    s = full()
    s.already_complete, s.tuning = False, None
    s.workers = [
        {"rank": 0, "devices": "cuda:0", "pid": 41, "ended": "finished", "rows": 1200},
        {"rank": 1, "devices": "cuda:1", "pid": 42, "ended": "killed by SIGKILL", "rows": None},
    ]
    lines = format_summary(s).splitlines()
    assert lines[5:8] == [
        "  phases      prepare 1.2 s, load 0.3 s, generate 12.3 s",
        "  workers     rank 0 on cuda:0, pid 41: finished, 1,200 rows this run",
        "              rank 1 on cuda:1, pid 42: killed by SIGKILL",
    ]
    assert lines[8] == "  outputs     out/run/part-*.parquet"
    record = json.loads(json.dumps(s.to_dict()))
    assert record["workers"] == s.workers and WorkerSummary.from_dict(record) == s
    assert "workers" not in WorkerSummary().to_dict()
