"""A pool's worker process on its own: it runs the finished config it is handed without
converting it again, reports its counts on its pipe, prints no summary, and stops cleanly (as
on SIGTERM) when its pool goes away."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from dataclasses import replace

from batchgen.job.run import finish_config
from batchgen.store import layout

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_a_worker_runs_what_it_is_handed_and_stops_when_its_pool_is_gone(
    tiny_models, prompts_file, make_job, tmp_path
):
    out = tmp_path / "out"
    job = make_job(
        tiny_models["chat"],
        prompts_file,
        out,
        sampling__max_new_tokens=48,
        sampling__do_sample=True,
        output__rows_per_shard=1,
        runner__batch_size=1,
        runner__rank=1,
        runner__world_size=2,
    )
    # "\\\\n" as typed: a backslash and an n once converted; a newline if converted twice.
    job = finish_config(replace(job, sampling=replace(job.sampling, stop=["\\\\n"])))
    assert job.sampling.stop == ["\\n"]
    read, write = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchgen.job.pool_worker", str(write)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        pass_fds=(write,),
    )
    os.close(write)
    proc.stdin.write(pickle.dumps(job))
    proc.stdin.flush()
    with os.fdopen(read) as counts:
        first = json.loads(counts.readline())
        # Its share: rank 1 of 2's half of the 12 one-row shards, none done yet.
        assert (first["share"], first["own"], first["tokens"]) == (6, 0.0, 0)
        said = first
        deadline = time.monotonic() + 120
        while said["own"] < 1 and time.monotonic() < deadline:
            said = json.loads(counts.readline())
        assert said["tokens"] > 0 and said["share"] == 6
        proc.stdin.close()  # the pool is gone
        proc.wait(timeout=120)
    stdout, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()
    assert proc.returncode == 143, stderr
    assert stdout == ""  # no banner unless told, never a summary: the pool prints those
    assert stderr.splitlines()[-1].startswith("batchgen: stopped by SIGTERM: ")
    record = json.loads(layout.worker_file(out, 1, 2).read_text())
    assert record["status"] == "interrupted" and record["pid"] == proc.pid
    run_json = json.loads(layout.run_file(out).read_text())
    assert run_json["config"]["sampling"]["stop"] == ["\\n"]  # converted once, by the pool
    claims = [json.loads(p.read_text()) for p in layout.claims_dir(out).iterdir()]
    assert claims and all(c.get("released") for c in claims)
