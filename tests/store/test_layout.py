"""The output folder: folder readers see exactly the shards, mid-run and after it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchgen.store import layout

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def published_rows(out: Path) -> int:
    return sum(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet"))


def test_names_live_under_the_meta_folder_or_are_hidden(tmp_path):
    for path in (
        layout.run_file(tmp_path),
        layout.worker_file(tmp_path, 3, 8),
        layout.worker_errors_file(tmp_path, 3, 8),
        layout.claims_dir(tmp_path),
        layout.lock_file(tmp_path, "run"),
        layout.quarantine_dir(tmp_path),
        layout.report_file(tmp_path),
        layout.card_file(tmp_path),
        layout.sweeps_dir(tmp_path),
    ):
        assert path.relative_to(tmp_path).parts[0] == "_batchgen"
    assert layout.shard_name(7) == "part-00007.parquet"
    assert layout.worker_file(tmp_path, 3, 8).name == "rank-00003-of-00008.record"
    assert layout.worker_file(tmp_path, 3, 8).match(layout.WORKER_RECORD_GLOB)
    assert not layout.worker_errors_file(tmp_path, 3, 8).match(layout.WORKER_RECORD_GLOB)


def test_many_workers_files_do_not_outvote_one_shard(tmp_path, readers):
    """``datasets`` picks its loader by the most common extension below the folder: neither the
    worker records nor the files of ``-m`` sweeps (as a local or Slurm sweep leaves them, also
    when every task failed) may outvote the shards, or be read as outputs."""
    from batchgen.store.records import write_worker_file
    from batchgen.store.summary import WorkerSummary
    from batchgen.store.writer import output_schema, write_json_atomic, write_shard

    out = tmp_path / "out"
    out.mkdir()
    row = {
        "id": "a",
        "sample_index": 0,
        "prompt": "p",
        "response": "r",
        "finish_reason": "stop",
        "prompt_tokens": 1,
        "completion_tokens": 1,
    }
    assert write_shard(out, layout.shard_name(0), [row], output_schema({}, {}))
    write_json_atomic(layout.run_file(out), {"fingerprint": "fp"})
    for rank in range(8):
        write_worker_file(out, {"fingerprint": "fp"}, rank, 8, "complete", WorkerSummary())
        layout.worker_errors_file(out, rank, 8).write_text('{"id": "x", "reason": "empty"}\n')
    for sweep, job in (("2026-01-01_00-00-00", "4691"), ("2026-01-02_00-00-00", "51")):
        folder = layout.sweeps_dir(out) / f"multirun-{sweep}"
        folder.mkdir(parents=True)
        (folder / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
        for rank in range(32):
            (folder / f"worker-{rank}").mkdir()
            task = folder / ".submitit" / f"{job}_{rank}"
            task.mkdir(parents=True)
            (task / f"{job}_{rank}_submitted.pkl").write_bytes(b"\x80\x05N.")
            (task / f"{job}_{rank}_0_result.pkl").write_bytes(b"\x80\x05N.")
            (task / f"{job}_{rank}_0_log.out").write_text("submitit INFO - Starting\n")
            (task / f"{job}_{rank}_0_log.err").write_text("batchgen: error: x\n")
    counts = readers(out)
    assert counts == dict.fromkeys(counts, 1)


def test_readers_see_exactly_the_shards_while_a_worker_runs_and_after(
    tiny_models, prompts_file, tmp_path, readers
):
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "batchgen",
        f"model.name_or_path={tiny_models['chat']}",
        "model.gguf_file=null",
        "dataset=local",
        f"dataset.path={prompts_file}",
        "dataset.id_column=uid",
        "dataset.keep_columns=[topic]",
        "runner.on_bad_row=skip",
        "sampling.max_new_tokens=64",
        "output.rows_per_shard=2",
        "runner.batch_size=1",
        "runner.progress=false",
        f"output.dir={out}",
    ]
    worker = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("part-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(worker.pid, signal.SIGSTOP)  # mid-shard: a claim held, its record "running"
        # What a writer cut short and a damaged shard leave behind, as a kill would.
        (out / ".part-00005.parquet.tmp-otherhost-1-abc").write_bytes(b"PAR1 half a shard")
        layout.quarantine_dir(out).mkdir(parents=True, exist_ok=True)
        (layout.quarantine_dir(out) / "part-00004.corrupt-20250101T000000Z").write_bytes(
            b"not parquet"
        )
        # A finished batch of a shard in progress: Parquet inside, but no output of the run.
        batch = layout.checkpoint_dir(out, 9) / "rows-000000018-abc.ckpt"
        batch.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(next(out.glob("part-*.parquet")), batch)
        assert json.loads(layout.worker_file(out, 0, 1).read_text())["status"] == "running"
        assert list(layout.claims_dir(out).iterdir())
        rows = published_rows(out)
        assert 0 < rows < 12
        assert readers(out) == dict.fromkeys(readers(out), rows)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    assert worker.wait(timeout=300) == 0, worker.stdout.read().decode()[-2000:]
    (out / ".part-00005.parquet.tmp-otherhost-1-abc").unlink(missing_ok=True)
    counts = readers(out)
    assert counts == dict.fromkeys(counts, 12)


def test_no_file_of_batchgen_sits_beside_the_shards(tiny_models, prompts_file, tmp_path, make_job):
    from batchgen import run

    out = tmp_path / "out"
    cfg = make_job(tiny_models["chat"], prompts_file, out, runner__on_bad_row="skip")
    run(cfg)
    beside = sorted(p.name for p in out.iterdir())
    assert beside == ["_batchgen", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert sorted(p.name for p in layout.meta_dir(out).iterdir()) == [
        "locks",
        "run.guard",
        "run.json",
        "workers",
    ]
    assert sorted(p.name for p in layout.workers_dir(out).iterdir()) == [
        "rank-00000-of-00001.errors",
        "rank-00000-of-00001.record",
    ]


@pytest.mark.parametrize("tool", ["report", "finalize"])
def test_tools_write_into_the_meta_folder(tiny_models, prompts_file, tmp_path, make_job, tool):
    from batchgen import run

    out = tmp_path / "out"
    run(make_job(tiny_models["chat"], prompts_file, out))
    done = subprocess.run(
        [sys.executable, "-m", "batchgen", tool, str(out)], env=ENV, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    written = layout.report_file(out) if tool == "report" else layout.card_file(out)
    assert written.is_file()
    assert sorted(p.name for p in out.iterdir() if p.name != "_batchgen") == [
        f"part-{i:05d}.parquet" for i in range(3)
    ]
