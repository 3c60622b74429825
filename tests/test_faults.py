"""Fault injection: kills, damaged shards, a second runner, signals, unwritable and full disks,
bad rows. Each compares the final folder with an uninterrupted run or asserts the exact outcome."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from job_cli import ENV, command, rows, shards

from batchgen import run
from batchgen.errors import DataError
from batchgen.store import layout

SETTINGS = [
    "sampling.do_sample=true",
    "sampling.max_new_tokens=32",
    "output.rows_per_shard=1",
    "runner.batch_size=2",
    "runner.progress=false",
    "dataset.id_column=uid",
]


def cli(model, data, out, *extra) -> list[str]:
    return command(model, data, out, *SETTINGS, *extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "prompts.jsonl"
    with path.open("w") as f:
        for i in range(24):
            f.write(
                json.dumps({"uid": f"u{i}", "prompt": f"tell me {i} " + "more " * (i % 7)}) + "\n"
            )
    return path


@pytest.fixture(scope="module")
def reference(tiny_models, data, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("reference") / "out"
    subprocess.run(cli(tiny_models["chat"], data, out), env=ENV, check=True, capture_output=True)
    return rows(out)


def test_sigkill_at_twenty_random_points_loses_and_duplicates_nothing(
    tiny_models, data, reference, tmp_path
):
    out = tmp_path / "out"
    rng = random.Random(1234)
    kills = 0
    for _ in range(20):
        target = shards(out) + rng.choice([0, 0, 1, 1, 2])
        proc = subprocess.Popen(
            cli(tiny_models["chat"], data, out),
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while shards(out) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.4))  # anywhere: start-up, a batch, a write, a rename
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        if shards(out) == 24:
            break
    assert kills >= 15, f"only {kills} kills landed before the run finished"
    final = subprocess.run(
        cli(tiny_models["chat"], data, out), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert final.returncode == 0, final.stderr
    assert rows(out) == reference
    assert all(p.suffix != ".parquet" or p.name.startswith("part-") for p in out.iterdir())
    # What the killed writers left is gone: their temp files, and (the run complete) the claims.
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert not (out / "_batchgen" / "claims").exists()


def test_truncated_and_corrupted_shards_are_regenerated(tiny_models, data, reference, tmp_path):
    out = tmp_path / "out"
    subprocess.run(cli(tiny_models["chat"], data, out), env=ENV, check=True, capture_output=True)
    cut = out / "part-00003.parquet"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # a copy cut short
    flipped = out / "part-00007.parquet"
    raw = bytearray(flipped.read_bytes())
    footer = pq.ParquetFile(flipped).metadata.serialized_size
    middle = (len(raw) - footer - 8) // 2  # inside the data pages, ahead of the footer
    raw[middle : middle + 16] = bytes(b ^ 0xFF for b in raw[middle : middle + 16])
    flipped.write_bytes(bytes(raw))
    again = subprocess.run(
        cli(tiny_models["chat"], data, out), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr
    assert "part-00003.parquet is damaged" in again.stdout
    assert "part-00007.parquet is damaged" in again.stdout
    assert "22 shards resumed" in again.stdout
    assert rows(out) == reference
    moved = sorted(
        p.name.split(".corrupt-")[0] for p in out.glob("_batchgen/quarantine/*.corrupt-*")
    )
    assert moved == ["part-00003", "part-00007"]


def test_second_runner_on_the_same_folder_is_refused(tiny_models, data, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen(
        cli(tiny_models["chat"], data, out, "sampling.max_new_tokens=200"),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while (
            not (out / "_batchgen" / "locks" / "run-rank0-of1.lock").exists()
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        second = subprocess.run(
            cli(tiny_models["chat"], data, out, "sampling.max_new_tokens=200"),
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2
    assert f"pid {first.pid}" in second.stderr and "batchgen: error:" in second.stderr


# The command line, with a pause between the run-record check and what follows it, so two
# workers started together both reach the check before either has recorded the run.
SLOW_ADMISSION = """
import sys, time
from batchgen.store import manifest
real = manifest.check_run_file
def slow(*args, **kwargs):
    verdict = real(*args, **kwargs)
    time.sleep(1.0)
    return verdict
manifest.check_run_file = slow
from batchgen.cli import main
sys.argv[0] = "batchgen"
main()
"""


@pytest.mark.parametrize(
    "settings",
    [
        (["sampling.max_new_tokens=12"], ["sampling.max_new_tokens=13"]),
        (["sampling.do_sample=false"], ["seed=5"]),
    ],
    ids=["max_new_tokens", "greedy-vs-sampled"],
)
def test_two_configs_started_at_once_never_share_a_folder(tiny_models, data, tmp_path, settings):
    for attempt in range(2):
        out = tmp_path / f"out{attempt}"
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    SLOW_ADMISSION,
                    *cli(tiny_models["chat"], data, out)[3:],
                    "dataset.limit=6",
                    "runner.world_size=2",
                    f"runner.rank={rank}",
                    *settings[rank],
                ],
                env=ENV,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in (0, 1)
        ]
        ends = [(p.communicate(timeout=300), p.returncode) for p in procs]
        assert sorted(code for _, code in ends) == [0, 2], [err for (_, err), _ in ends]
        (_, refused), _ = next(e for e in ends if e[1] == 2)
        assert "batchgen: error:" in refused and "different config fingerprint" in refused
        assert all("Traceback" not in out + err for (out, err), _ in ends)
        recorded = json.loads(layout.run_file(out).read_text())["fingerprint"]
        footers = [
            json.loads(pq.read_schema(f).metadata[b"batchgen"]) for f in out.glob("*.parquet")
        ]
        assert len(footers) == 6
        assert {f["fingerprint"] for f in footers} == {recorded}


# The command line, with generation hung for good at its second batch while every thread of the
# process lives on (a hung CUDA kernel, a dead collective); it says when the hang began.
HUNG_GENERATION = """
import sys, threading, time
from batchgen.engine.static import StaticEngine
real = StaticEngine.generate
calls = []
def generate(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        print(f"hung at {time.time()}", file=sys.stderr, flush=True)
        threading.Event().wait()
    return real(self, *args, **kwargs)
StaticEngine.generate = generate
from batchgen.cli import main
sys.argv[0] = "batchgen"
main()
"""


def test_worker_hung_inside_generation_gives_its_shards_up(tiny_models, data, reference, tmp_path):
    out = tmp_path / "out"
    extra = ["runner.world_size=2", "runner.lease_seconds=2", "runner.stall_seconds=3"]
    hung = subprocess.Popen(
        [sys.executable, "-c", HUNG_GENERATION, *cli(tiny_models["chat"], data, out)[3:]]
        + [*extra, "runner.rank=1"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    healthy = subprocess.Popen(
        cli(tiny_models["chat"], data, out, *extra, "runner.rank=0"),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, said = hung.communicate(timeout=300)
        ended = time.time()
        _, healthy_said = healthy.communicate(timeout=300)
    finally:
        for proc in (hung, healthy):
            if proc.poll() is None:
                proc.kill()
    assert hung.returncode == 3, said
    began = float(said.split("hung at ")[1].split()[0])
    assert ended - began < 3 + 2 + 5  # stall + lease, and the slack of a busy machine
    stalled = [x for x in said.splitlines() if x.startswith("batchgen: error: worker 1 stalled")]
    assert len(stalled) == 1 and "runner.stall_seconds=3" in stalled[0], said
    assert "Traceback" not in said
    assert healthy.returncode == 0, healthy_said
    assert rows(out) == reference
    record = json.loads(layout.worker_file(out, 1, 2).read_text())
    assert record["status"] == "stalled"


# The command line with every forward pass of the model slowed to 50 ms: one batch of 12 rows
# and 200 new tokens decodes for about 10 s.
SLOW_STEPS = """
import sys, time
from transformers import LlamaForCausalLM
real = LlamaForCausalLM.forward
def forward(self, *args, **kwargs):
    time.sleep(0.05)
    return real(self, *args, **kwargs)
LlamaForCausalLM.forward = forward
from batchgen.cli import main
sys.argv[0] = "batchgen"
main()
"""


def test_ctrl_c_in_a_long_batch_is_answered_at_once_and_stops_within_steps(
    tiny_models, data, tmp_path
):
    out = tmp_path / "out"
    settings = ["dataset.limit=12", "output.rows_per_shard=12", "runner.batch_size=12"]
    settings.append("sampling.max_new_tokens=200")
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_STEPS, *cli(tiny_models["chat"], data, out)[3:], *settings],
        env=ENV,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lines: list[tuple[float, str]] = []

    def read():
        for line in proc.stderr:
            lines.append((time.monotonic(), line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not list(out.glob("_batchgen/claims/*.claim")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(3.0)  # well inside the batch's decoding
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    ended = time.monotonic()
    reader.join(timeout=10)
    said = [(at, line) for at, line in lines if "stopping at the next decoding step" in line]
    assert said, "".join(x for _, x in lines)
    assert said[0][0] - sent < 1.0
    assert said[0][1].strip() == (
        "batchgen: SIGINT: stopping at the next decoding step; finished rows are kept; "
        "Ctrl-C again to stop at once"
    )
    assert proc.returncode == 130
    assert ended - sent < 5.0, f"took {ended - sent:.1f} s to stop"  # the batch had ~7 s left
    assert shards(out) == 0
    # The rerun finishes the shard, as an uninterrupted run would have.
    again = subprocess.run(
        cli(tiny_models["chat"], data, out, *settings), env=ENV, capture_output=True, timeout=300
    )
    assert again.returncode == 0
    reference = tmp_path / "reference"
    subprocess.run(
        cli(tiny_models["chat"], data, reference, *settings), env=ENV, check=True, timeout=300
    )
    assert rows(out) == rows(reference)


def test_sigterm_and_ctrl_c_stop_cleanly_and_resume(tiny_models, data, reference, tmp_path):
    out = tmp_path / "out"
    for sig, code, name in ((signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")):
        proc = subprocess.Popen(
            cli(tiny_models["chat"], data, out),
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        start = shards(out)
        deadline = time.monotonic() + 120
        while shards(out) < start + 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == code, stderr
        assert f"stopped by {name}" in stderr and "Rerun the same command to resume" in stderr
        record = json.loads(layout.worker_file(out, 0, 1).read_text())
        assert record["status"] == "interrupted"
        claims = [json.loads(p.read_text()) for p in (out / "_batchgen" / "claims").iterdir()]
        assert all(c.get("released") for c in claims), claims
        assert not (out / "_batchgen" / "locks" / "run-rank0-of1.lock").exists()
        assert 0 < shards(out) < 24
    done = subprocess.run(
        cli(tiny_models["chat"], data, out), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert rows(out) == reference


def _mount_tmpfs(path: Path, options: str, unavailable) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if result.returncode != 0:
        unavailable(f"cannot mount a tmpfs here to simulate the disk: {result.stderr.strip()}")


def test_read_only_output_folder(tiny_models, data, tmp_path, unavailable):
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "ro,size=1m", unavailable)
    try:
        result = subprocess.run(
            cli(tiny_models["chat"], data, ro), env=ENV, capture_output=True, text=True, timeout=120
        )
    finally:
        subprocess.run(["umount", str(ro)])
    assert result.returncode == 2
    assert "output.dir=" in result.stderr and "Read-only file system" in result.stderr


def test_disk_full_keeps_finished_shards_and_resumes(
    tiny_models, data, reference, tmp_path, unavailable
):
    small = tmp_path / "small"
    _mount_tmpfs(small, "size=48k", unavailable)
    out = small / "out"
    try:
        result = subprocess.run(
            cli(tiny_models["chat"], data, out),
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 2, result.stderr
        assert (
            "the disk is full" in result.stderr
            and "Every finished shard is intact" in result.stderr
        )
        assert f"({out}/" in result.stderr  # the file whose write failed
        kept = shards(out)
        assert 0 < kept < 24
        moved = tmp_path / "moved"
        shutil.copytree(out, moved)
    finally:
        subprocess.run(["umount", str(small)])
    assert not list(moved.glob("*.tmp-*"))
    done = subprocess.run(
        cli(tiny_models["chat"], data, moved), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert f"{kept} shards resumed" in done.stdout
    assert rows(moved) == reference


def test_each_bad_row_kind_is_skipped_and_logged(tiny_models, make_job, tmp_path):
    data = tmp_path / "bad.jsonl"
    lines = [
        {"uid": "ok-1", "prompt": "fine"},
        {"uid": "null", "prompt": None},
        {"uid": "empty", "prompt": ""},
        {"uid": "blank", "prompt": "   "},
        {"uid": "long", "prompt": "word " * 400},
        {"uid": "absent"},
    ]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    cfg = make_job(
        tiny_models["base"],
        data,
        out,
        runner__on_bad_row="skip",
        runner__on_long_prompt="skip",
        sampling__max_new_tokens=4,
    )
    summary = run(cfg)
    assert [r["id"] for r in rows(out)] == ["ok-1"]
    errors = [
        json.loads(line) for line in layout.worker_errors_file(out, 0, 1).read_text().splitlines()
    ]
    assert [(e["id"], e["kind"]) for e in errors] == [
        ("null", "skipped"),
        ("empty", "skipped"),
        ("blank", "skipped"),
        ("long", "skipped"),
        ("absent", "skipped"),
    ]
    reasons = [e["reason"] for e in errors]
    assert reasons[0] == reasons[4] == "dataset.prompt_column 'prompt': missing (null)"
    assert reasons[1] == reasons[2] == "dataset.prompt_column 'prompt': empty"
    assert reasons[3].startswith("prompt longer than 252 tokens")
    assert summary["totals"]["skipped"] == 5 and summary["totals"]["rows"] == 1

    refused = make_job(tiny_models["base"], data, tmp_path / "out2", sampling__max_new_tokens=4)
    with pytest.raises(DataError, match=r"4 row\(s\) have no usable prompt: id 'null'"):
        run(refused)
    assert not list((tmp_path / "out2").glob("*.parquet"))


def test_non_string_prompts_are_bad_rows(tiny_models, make_job, tmp_path):
    data = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"uid": ["a", "b"], "prompt": [1, 2]}), data)
    out = tmp_path / "out"
    summary = run(make_job(tiny_models["base"], data, out, runner__on_bad_row="skip"))
    assert summary["totals"]["skipped"] == 2 and rows(out) == []
    errors = [
        json.loads(line) for line in layout.worker_errors_file(out, 0, 1).read_text().splitlines()
    ]
    assert errors[0]["reason"] == "dataset.prompt_column 'prompt': not a string: int '1'"


def test_one_bad_value_in_a_mixed_column_is_the_one_bad_row(tiny_models, make_job, tmp_path):
    data = tmp_path / "mixed.jsonl"
    lines = [{"uid": f"row-{i}", "prompt": 42 if i == 7 else f"hello {i}"} for i in range(12)]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    refused = make_job(tiny_models["base"], data, tmp_path / "refused", sampling__max_new_tokens=4)
    with pytest.raises(DataError) as err:
        run(refused)
    assert str(err.value).startswith(
        "1 row(s) have no usable prompt: id 'row-7' (row 7, line 8): "
        "dataset.prompt_column 'prompt': not a string: int '42'. Fix the data"
    )
    out = tmp_path / "out"
    cfg = make_job(
        tiny_models["base"], data, out, runner__on_bad_row="skip", sampling__max_new_tokens=4
    )
    summary = run(cfg)
    assert [r["id"] for r in rows(out)] == [f"row-{i}" for i in range(12) if i != 7]
    errors = [
        json.loads(line) for line in layout.worker_errors_file(out, 0, 1).read_text().splitlines()
    ]
    assert [(e["id"], e["kind"]) for e in errors] == [("row-7", "skipped")]
    assert summary["totals"]["skipped"] == 1 and summary["totals"]["rows"] == 11


def _in_pid_namespace(args: list[str], log) -> subprocess.Popen:
    """A worker in its own pid namespace (as in a container: it is pid 1 there)."""
    return subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", *args],
        env=ENV,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: freeze and thaw it whole
    )


def _claims_of(out: Path, rank: int) -> list[str]:
    found = []
    for p in (
        (out / "_batchgen" / "claims").glob("*.claim")
        if (out / "_batchgen" / "claims").exists()
        else []
    ):
        try:
            info = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if info.get("owner", "").endswith(f":{rank}") and not info.get("released"):
            found.append(p.name)
    return found


@pytest.mark.parametrize("freeze_after", [0.0, 0.05, 0.15, "temp file"])
def test_worker_frozen_past_its_lease_in_another_pid_namespace(
    tiny_models, data, reference, tmp_path, freeze_after, unavailable
):
    """Two containers on one folder, both pid 1: one is frozen mid-shard past its lease,
    the other takes its work over; thawed, the frozen one drops its copy quietly."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        unavailable("unshare --pid needs root and util-linux")
    out = tmp_path / "out"
    extra = ["runner.world_size=2", "runner.lease_seconds=2"]
    logs = [(tmp_path / f"rank{r}.log").open("w") for r in (0, 1)]
    procs = [
        _in_pid_namespace(cli(tiny_models["chat"], data, out, f"runner.rank={r}", *extra), logs[r])
        for r in (0, 1)
    ]
    try:
        deadline = time.monotonic() + 120
        while not _claims_of(out, 1) and time.monotonic() < deadline:
            time.sleep(0.002)
        if freeze_after == "temp file":  # as close to mid-write as polling gets
            while not list(out.glob(".part-*.tmp-*")) and time.monotonic() < deadline:
                time.sleep(0.0005)
        else:
            time.sleep(freeze_after)
        os.killpg(procs[1].pid, signal.SIGSTOP)
        assert procs[0].wait(timeout=240) == 0
        os.killpg(procs[1].pid, signal.SIGCONT)
        assert procs[1].wait(timeout=240) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for log in logs:
            log.close()
    for r in (0, 1):
        text = (tmp_path / f"rank{r}.log").read_text()
        assert "Traceback" not in text and "batchgen summary" in text, text[-3000:]
    for shard in sorted(out.glob("*.parquet")):
        pq.read_table(shard).validate(full=True)
    assert rows(out) == reference
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


def test_damaged_shard_moved_by_another_worker_meanwhile(
    tiny_models, make_job, prompts_file, tmp_path, monkeypatch
):
    """The quarantine race: another worker moves the damaged file between our listing and our
    open, or between our verdict and our move; either way we regenerate it, no traceback."""
    from batchgen.job import shard_loop
    from batchgen.store import verify

    out = tmp_path / "out"
    run(make_job(tiny_models["chat"], prompts_file, out))
    before = rows(out)
    real = verify.verify_shard
    for moment in ("before open", "after verdict"):
        (out / "part-00001.parquet").write_bytes(b"damaged")

        def racing(path, *args, moment=moment):
            if path.name != "part-00001.parquet" or not path.exists():
                return real(path, *args)
            if moment == "before open":
                verify.quarantine(path)  # the other worker
                return real(path, *args)
            verdict = real(path, *args)
            verify.quarantine(path)
            return verdict

        monkeypatch.setattr(shard_loop, "verify_shard", racing)
        summary = run(make_job(tiny_models["chat"], prompts_file, out))
        assert summary["this_run"]["rows"] == 5 and rows(out) == before
    assert len(list(out.glob("_batchgen/quarantine/part-00001.corrupt-*"))) == 2
