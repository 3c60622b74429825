"""``runner.devices=2`` on the CPU: one command, two worker processes, one job. Its output equals
one worker's, it prints one summary, Ctrl-C stops both workers (exit 130) and the folder resumes,
and a worker killed with SIGKILL is named while the other finishes every shard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from job_cli import ENV, command, rows, shards

from batchgen import run
from batchgen.errors import ConfigError
from batchgen.store import layout

# Long enough to act while both workers generate: 24 one-row shards of 48 sampled tokens.
SETTINGS = [
    "dataset.id_column=uid",
    "sampling.do_sample=true",
    "sampling.max_new_tokens=48",
    "output.rows_per_shard=1",
    "runner.batch_size=2",
    "runner.progress=false",
]


def cli(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return command(model, data, out, *SETTINGS, *extra)


def ranks(out: Path) -> set[int]:
    footers = [json.loads(pq.read_schema(f).metadata[b"batchgen"]) for f in out.glob("part-*")]
    return {f["shard"]["worker"]["rank"] for f in footers}


def record(out: Path, rank: int) -> dict:
    """Worker ``rank`` of 2's record, once it has written one."""
    path = layout.worker_file(out, rank, 2)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.01)
    raise AssertionError(f"no record at {path}")


def wait_for_shards(out: Path, count: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while shards(out) < count and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the job ended before it could be interrupted"


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pool") / "prompts.jsonl"
    with path.open("w") as f:
        for i in range(24):
            f.write(json.dumps({"uid": f"u{i}", "prompt": f"tell me {i} " + "more " * (i % 7)}))
            f.write("\n")
    return path


@pytest.fixture(scope="module")
def reference(tiny_models, data, tmp_path_factory) -> list[dict]:
    """One worker's output (no runner.devices: one worker on the CPU, as ever)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    subprocess.run(cli(tiny_models["chat"], data, out), env=ENV, check=True, capture_output=True)
    assert ranks(out) == {0}
    return rows(out)


def test_two_workers_write_what_one_writes_and_one_summary(
    tiny_models, data, reference, tmp_path, capfd
):
    out = tmp_path / "out"
    job = run(
        [*cli(tiny_models["chat"], data, out, "runner.devices=2", "runner.progress=true")[3:]]
    )
    said = capfd.readouterr()
    # One bar, the pool's, over both workers' rows (theirs stay off the screen).
    assert "24/24" in said.err and "/12" not in said.err, said.err
    assert rows(out) == reference
    assert ranks(out) == {0, 1}  # both worked
    assert said.out.count("batchgen summary") == 1, said.out
    assert said.out.startswith("batchgen: 2 workers on the CPU, ")
    assert said.out.count("batchgen: sampling:") == 1  # rank 0's banner only
    assert "rows        24 generated, 0 skipped, 0 failed (24/24 shards complete)" in said.out
    assert job.complete and job.totals.rows == 24 and job.this_run.rows == 24
    assert [(w["rank"], w["devices"], w["ended"]) for w in job.workers] == [
        (0, "cpu", "finished"),
        (1, "cpu", "finished"),
    ]
    assert sum(w["rows"] for w in job.workers) == 24
    assert "Traceback" not in said.err
    # Each worker ran as rank i of 2 on half the cores, with the config finished once.
    for rank in (0, 1):
        config = json.loads(layout.worker_file(out, rank, 2).read_text())
        assert config["status"] == "complete" and config["device"] == "cpu"


def test_ctrl_c_stops_both_workers_and_the_folder_resumes(tiny_models, data, reference, tmp_path):
    out = tmp_path / "out"
    command = cli(tiny_models["chat"], data, out, "runner.devices=2")
    proc = subprocess.Popen(
        command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    pids = [record(out, rank)["pid"] for rank in (0, 1)]
    wait_for_shards(out, 3, proc)
    proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends the command
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    said = [x for x in stderr.splitlines() if x.startswith("batchgen:")]
    assert said[0] == (  # at once, once (the workers' own lines go to their logs)
        "batchgen: SIGINT: stopping at the next decoding step; finished rows are kept; "
        "Ctrl-C again to stop at once"
    ), stderr
    assert len(said) == 2 and said[1].startswith("batchgen: stopped by SIGINT: "), stderr
    assert "Rerun the same command to resume" in said[1] and "Traceback" not in stderr
    assert stdout.count("batchgen summary") == 1
    assert not any(running(pid) for pid in pids)
    for rank in (0, 1):
        assert json.loads(layout.worker_file(out, rank, 2).read_text())["status"] == "interrupted"
    claims = [json.loads(p.read_text()) for p in layout.claims_dir(out).iterdir()]
    assert all(c.get("released") for c in claims), claims
    assert 0 < shards(out) < 24
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert rows(out) == reference


def test_a_killed_worker_is_named_and_the_other_finishes_its_shards(
    tiny_models, data, reference, tmp_path
):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        cli(tiny_models["chat"], data, out, "runner.devices=2"),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim = record(out, 1)["pid"]
    wait_for_shards(out, 2, proc)
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    assert shards(out) == 24 and rows(out) == reference
    named = f"worker 1 of 2 (cpu, pid {victim}) killed by SIGKILL"
    assert f"batchgen: {named}; the other workers take its shards" in stderr
    error = [x for x in stderr.splitlines() if x.startswith("batchgen: error:")]
    assert len(error) == 1 and named in error[0], stderr
    assert "the other workers finished its shards: the output is complete" in error[0]
    assert stdout.count("batchgen summary") == 1
    assert f"rank 1 on cpu, pid {victim}: killed by SIGKILL" in stdout
    assert "(24/24 shards complete)" in stdout and "Traceback" not in stderr


def test_workers_refusing_the_job_alike_say_it_once(tiny_models, tmp_path):
    # Each worker checks every prompt before its model loads: one is too long for the model.
    data = tmp_path / "long.jsonl"
    lines = [{"uid": f"u{i}", "prompt": "word " * (400 if i == 3 else 3)} for i in range(4)]
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    command = cli(tiny_models["chat"], data, tmp_path / "out", "runner.devices=2")
    refused = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr
    errors = [x for x in refused.stderr.splitlines() if x.startswith("batchgen: error:")]
    assert len(errors) == 1 and "u3" in errors[0], refused.stderr
    assert "batchgen summary" not in refused.stdout


def test_placement_mistakes_stop_before_any_worker_starts(tiny_models, data, tmp_path):
    base = cli(tiny_models["chat"], data, tmp_path / "out")[3:]
    with pytest.raises(ConfigError, match=r"^runner\.devices=\[0, 1\] names CUDA devices"):
        run([*base, "runner.devices=[0,1]"])
    launched = [*base, "runner.devices=2", "runner.rank=0", "runner.world_size=1"]
    with pytest.raises(ConfigError, match=r"^runner\.devices=2 starts workers of its own"):
        run(launched)
    assert not (tmp_path / "out").exists()
    bad = subprocess.run(
        [*cli(tiny_models["chat"], data, tmp_path / "out"), "runner.devices=0"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert [x for x in bad.stderr.splitlines() if "batchgen" in x] == [
        "batchgen: error: runner.devices: must be auto, a number of workers (1 or more) or a "
        "list of distinct CUDA device ids such as [0,1], got 0"
    ]
