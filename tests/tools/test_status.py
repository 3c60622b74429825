"""The status command on hand-built output folders: shards, claims, totals, rate, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from batchgen.cluster.claim_files import claim_path
from batchgen.cluster.claims import ClaimStore
from batchgen.config import RunnerConfig
from batchgen.errors import NotAnOutputDir
from batchgen.store import layout
from batchgen.store.records import write_worker_file
from batchgen.store.summary import WorkerSummary
from batchgen.store.writer import output_schema, write_json_atomic, write_shard
from batchgen.tools.status import collect, format_status, main

ROWS, PER_SHARD = 23, 5  # five shards, the last of 3 rows
T0 = 1_700_000_000.0


def run_json(out, status="running", summary=None, fingerprint="fp1"):
    """The run record, and rank 0 of 1's worker record with ``status`` (None: no record)."""
    payload = {
        "fingerprint": fingerprint,
        "fingerprint_parts": {
            "data": {"rows": ROWS},
            "layout": {"rows_per_shard": PER_SHARD},
        },
        "config": {"output": {"rows_per_shard": PER_SHARD}},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(layout.run_file(out), payload)
    if status is not None:
        worker(out, 0, 1, status, summary, fingerprint)


def worker(out, rank, world_size, status, summary=None, fingerprint="fp1"):
    meta = {"fingerprint": fingerprint, "device": f"cuda:{rank}", "engine": "static"}
    typed = WorkerSummary.from_dict(summary) if summary is not None else None
    write_worker_file(out, meta, rank, world_size, status, typed)


def shard(out, index, mtime, tokens_per_row=4, fingerprint="fp1", skipped=0, seconds=None):
    start, stop = index * PER_SHARD, min((index + 1) * PER_SHARD, ROWS)
    n = stop - start - skipped
    rows = [
        {
            "id": f"r{i}",
            "sample_index": 0,
            "prompt": "p",
            "response": "r",
            "finish_reason": "length",
            "prompt_tokens": 2,
            "completion_tokens": tokens_per_row,
        }
        for i in range(start, start + n)
    ]
    totals = {
        "rows": n,
        "samples": n,
        "skipped": skipped,
        "prompt_tokens": 2 * n,
        "completion_tokens": tokens_per_row * n,
        "finish_reasons": {"length": n},
    }
    meta = {
        "fingerprint": fingerprint,
        "shard": {"index": index, "start": start, "stop": stop, "totals": totals},
    }
    if seconds is not None:
        meta["shard"]["timing"] = {"finished_at": mtime, "generate_seconds": seconds}
    name = f"part-{index:05d}.parquet"
    assert write_shard(out, name, rows, output_schema({}, meta))
    os.utime(out / name, (mtime, mtime))


class Clock:
    t = T0 + 100

    def __call__(self):
        return self.t


@pytest.fixture
def half_done(tmp_path):
    """Shards 0 and 2 done 10 s apart; 1 claimed live, 3 expired, 4 released; 0 claimed stale."""
    out = tmp_path / "out"
    run_json(out)
    shard(out, 0, T0)
    shard(out, 2, T0 + 10, tokens_per_row=6, skipped=1)
    clock = Clock()
    alive = ClaimStore(out, "nodeA:11:0", clock=clock)
    dead = ClaimStore(out, "nodeB:22:1", clock=lambda: clock.t - 200)  # past the lease
    assert alive.try_claim(1) and alive.try_claim(0)
    assert dead.try_claim(3) and dead.try_claim(4)
    dead.release(4)
    lock = out / "_batchgen" / "locks" / "run-rank0-of2.lock"  # rank 0's, heart-beating
    lock.parent.mkdir(parents=True)
    lock.write_text("{}")
    os.utime(lock, (clock.t - 5, clock.t - 5))
    return out, clock


def test_counts_shards_claims_rows_and_tokens(half_done):
    out, clock = half_done
    report = collect(out, clock=clock)
    assert report["shards"] == {"total": 5, "done": 2, "claimed": 1, "expired": 1, "pending": 1}
    assert report["rows"] == {"total": 23, "done": 10, "remaining": 13}
    assert report["totals"]["rows"] == 9 and report["totals"]["skipped"] == 1
    assert report["totals"]["completion_tokens"] == 5 * 4 + 4 * 6
    assert [(w["owner"], w["rank"], w["shards"], w["expired"]) for w in report["workers"]] == [
        ("nodeA:11:0", 0, [1], []),
        ("nodeB:22:1", 1, [], [3]),
    ]
    assert not report["complete"] and report["run_status"] == "running"


def test_a_running_run_without_a_live_worker_shows_as_stopped(half_done):
    out, clock = half_done
    clock.t += 200  # rank 0's lock has not been touched for longer than the lease
    report = collect(out, clock=clock)
    assert report["run_status"].startswith("stopped (no live worker")
    assert "stopped (no live worker" in format_status(report)


def test_rate_from_shard_times_and_eta(half_done):
    out, clock = half_done
    report = collect(out, clock=clock)
    # Only shard 2 was produced inside the 10 s between the two publications.
    assert report["throughput"] == {
        "rows_per_second": 0.5,
        "completion_tokens_per_second": 2.4,
        "source": "shard and batch times",
    }
    assert report["eta_seconds"] == pytest.approx(26.0)


def test_text_and_json_output_and_exit_status(half_done, capsys, monkeypatch):
    out, clock = half_done
    text = format_status(collect(out, clock=clock))
    assert "2/5 done, 1 claimed, 1 expired claims, 1 pending" in text
    assert "nodeB:22:1  0 claimed, EXPIRED [3] (to be redone)" in text
    assert "10/23 done (1 skipped), 9 samples" in text
    assert "2.4 tokens/s, 0.50 rows/s (from shard and batch times)" in text
    assert "eta         26 s for 3 shards (13 rows)" in text
    monkeypatch.setattr(time, "time", clock)
    assert main([str(out), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["shards"]["done"] == 2


def test_unreadable_claims_are_judged_by_the_runner_lease_by_default(tmp_path, capsys):
    out = tmp_path / "out"
    run_json(out)
    path = claim_path(out, 1)
    path.parent.mkdir(parents=True)
    path.write_text("")  # a creator between O_EXCL and its write: judged by its mtime
    lease = RunnerConfig().lease_seconds
    for age, field in ((lease - 10, "claimed"), (lease + 10, "expired")):
        os.utime(path, (time.time() - age, time.time() - age))
        assert main([str(out), "--json"]) == 1
        assert json.loads(capsys.readouterr().out)["shards"][field] == 1


def test_complete_run_exits_zero_with_rate_from_the_worker_record(tmp_path, capsys):
    out = tmp_path / "out"
    summary = {
        "shards_total": 5,
        "this_run": {"rows": 23, "skipped": 0, "completion_tokens": 92, "generate_seconds": 4.0},
    }
    run_json(out, status="complete", summary=summary)
    for i in range(5):
        shard(out, i, T0)  # same mtime: no span to measure
    report = collect(out)
    assert report["complete"] and report["eta_seconds"] == 0.0
    assert report["throughput"]["completion_tokens_per_second"] == 23.0
    assert report["throughput"]["source"] == "worker records"
    assert main([str(out)]) == 0
    assert "every shard is done" in capsys.readouterr().out


def test_one_finished_shard_gives_an_eta_from_its_generation_time(tmp_path):
    out = tmp_path / "out"
    run_json(out)
    shard(out, 0, T0, seconds=8.0)  # 5 rows in 8 s
    ClaimStore(out, "nodeA:11:0", clock=Clock()).try_claim(1)  # one worker at work
    report = collect(out, clock=Clock())
    assert report["throughput"]["source"] == "finished shards' generation time"
    assert report["throughput"]["rows_per_second"] == pytest.approx(5 / 8)
    assert report["eta_seconds"] == pytest.approx(report["rows"]["remaining"] * 8 / 5)
    assert "unknown" not in format_status(report)


def test_shards_of_another_fingerprint_do_not_count(tmp_path):
    out = tmp_path / "out"
    run_json(out)
    shard(out, 0, T0)
    shard(out, 1, T0 + 5, fingerprint="other")
    (out / "part-00002.parquet").write_text("not parquet")
    report = collect(out)
    assert report["shards"]["done"] == 1 and report["shards"]["pending"] == 4
    assert report["foreign"] == ["part-00001.parquet", "part-00002.parquet"]
    assert report["throughput"]["source"] is None and report["eta_seconds"] is None
    assert "eta         unknown" in format_status(report)


@pytest.mark.parametrize("setup", ["missing", "empty", "not-json", "no-fingerprint", "no-rows"])
def test_not_an_output_folder_exits_two(tmp_path, capsys, setup):
    out = tmp_path / "out"
    if setup != "missing":
        (out / "_batchgen").mkdir(parents=True)
    if setup == "not-json":
        (out / "_batchgen" / "run.json").write_text("{")
    elif setup == "no-fingerprint":
        (out / "_batchgen" / "run.json").write_text("{}")
    elif setup == "no-rows":
        (out / "_batchgen" / "run.json").write_text('{"fingerprint": "x"}')
    assert main([str(out)]) == 2
    assert "batchgen status: error:" in capsys.readouterr().err


def test_runs_as_a_module(half_done):
    out, _ = half_done
    proc = subprocess.run(
        [sys.executable, "-m", "batchgen", "status", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith(f"batchgen status  {out}")


def test_a_killed_worker_shows_as_stopped_at_once(tmp_path):
    out = tmp_path / "out"
    run_json(out)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from batchgen.cluster.lock import RunLock; "
            "RunLock(Path(sys.argv[1]), 'run-rank0-of1').acquire(); print('held', flush=True); "
            "time.sleep(60)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    assert collect(out)["run_status"] == "running"
    holder.kill()
    holder.wait()
    assert collect(out)["run_status"].startswith("stopped (no live worker")


def test_eta_from_the_first_finished_batches_before_any_shard(tmp_path):
    from batchgen.engine.interface import Sample
    from batchgen.store import checkpoints

    out = tmp_path / "out"
    run_json(out)  # 23 rows in shards of 5, none published
    identity = {"fingerprint": "fp1", "digest": "d"}
    for k, when in enumerate((T0, T0 + 4, T0 + 8)):  # three batches of two rows, 4 s apart
        batch = [(2 * k + i, [Sample("x", "length", 3)]) for i in range(2)]
        checkpoints.save(out, 0, identity, batch)
        newest = max(layout_files(out), key=lambda p: p.stat().st_mtime_ns)
        os.utime(newest, (when, when))
    report = collect(out, clock=lambda: T0 + 9)
    assert report["rows"]["remaining"] == 23 - 6
    assert report["throughput"]["rows_per_second"] == pytest.approx(4 / 8)
    assert report["eta_seconds"] == pytest.approx(17 / 0.5)


def layout_files(out):
    return list((out / "_batchgen" / "checkpoints").glob("*/rows-*.ckpt"))


def test_each_workers_record_counts_and_their_rates_add_up(tmp_path, capsys):
    out = tmp_path / "out"
    run_json(out, status=None)
    for i in range(5):
        shard(out, i, T0)  # same mtime: the rate comes from the worker records
    this_run = {"rows": 10, "skipped": 0, "completion_tokens": 40, "generate_seconds": 4.0}
    worker(out, 0, 2, "complete", {"shards_total": 5, "this_run": this_run})
    worker(out, 1, 2, "incomplete", {"shards_total": 5, "this_run": {**this_run, "rows": 13}})
    worker(out, 0, 1, "interrupted", fingerprint="fp0")  # an earlier config's: not this run's
    report = collect(out)
    assert report["run_status"] == "complete"  # rank 0 saw every shard done
    assert [(r["rank"], r["world_size"], r["status"], r["device"]) for r in report["records"]] == [
        (0, 2, "complete", "cuda:0"),
        (1, 2, "incomplete", "cuda:1"),
    ]
    assert report["throughput"] == {
        "rows_per_second": 10 / 4 + 13 / 4,
        "completion_tokens_per_second": 20.0,
        "source": "worker records",
    }
    assert "records     2 worker record(s): 1 complete, 1 incomplete" in format_status(report)


def test_records_of_an_earlier_attempt_are_set_apart_from_the_live_workers(tmp_path):
    import time as clock

    out = tmp_path / "out"
    run_json(out, status=None)
    shard(out, 0, T0)
    worker(out, 0, 1, "interrupted")  # one worker, stopped; then restarted as two
    clock.sleep(0.01)
    worker(out, 0, 2, "running")
    worker(out, 1, 2, "running")
    report = collect(out)
    assert [(r["world_size"], r["earlier"]) for r in report["records"]] == [
        (1, True),
        (2, False),
        (2, False),
    ]
    assert (
        "records     2 worker record(s): 2 running (1 more of an earlier attempt with other "
        "workers)" in format_status(report)
    )


def test_a_running_worker_makes_the_run_running(half_done):
    out, clock = half_done
    worker(out, 0, 1, "complete")
    worker(out, 1, 2, "running")  # its lock is the live one of the fixture
    assert collect(out, clock=clock)["run_status"] == "running"
    clock.t += 200
    assert collect(out, clock=clock)["run_status"].startswith("stopped (no live worker")


def test_a_folder_of_an_earlier_version_reads_its_run_json_as_the_one_record(tmp_path):
    out = tmp_path / "out"
    run_json(out, status=None)
    run = json.loads(layout.run_file(out).read_text())
    this_run = {"rows": 23, "skipped": 0, "completion_tokens": 92, "generate_seconds": 4.0}
    run.update(status="complete", summary={"shards_total": 5, "this_run": this_run})
    write_json_atomic(layout.run_file(out), run)
    for i in range(5):
        shard(out, i, T0)
    report = collect(out)
    assert report["run_status"] == "complete" and report["records"][0]["status"] == "complete"
    assert report["throughput"]["completion_tokens_per_second"] == 23.0


def test_a_stream_row_count_from_whichever_worker_read_it_to_its_end(tmp_path):
    out = tmp_path / "out"
    run_json(out, status=None)
    run = json.loads(layout.run_file(out).read_text())
    run["fingerprint_parts"]["data"]["rows"] = None
    run["config"]["dataset"] = {"streaming": True}
    write_json_atomic(layout.run_file(out), run)
    worker(out, 0, 2, "running")
    with pytest.raises(NotAnOutputDir, match="streamed"):
        collect(out)
    worker(out, 1, 2, "complete", {"shards_total": 5, "rows_total": ROWS})
    assert collect(out)["rows"]["total"] == ROWS


def test_reads_the_folder_once_through_the_one_reader(half_done, folder_reads):
    out, clock = half_done
    assert collect(out, clock=clock)["shards"]["done"] == 2
    assert folder_reads == [out]
