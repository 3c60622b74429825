"""The whole job on tiny models: outputs, resume (also after SIGKILL), fingerprint refusal, and
a dead run's lock taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from batchgen.errors import DataError, ResumeError
from batchgen.job.run import run
from batchgen.store import layout


def read(out):
    files = sorted(out.glob("*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def test_run_writes_shards_in_row_order(tiny_models, prompts_file, make_job, tmp_path):
    out = tmp_path / "out"
    cfg = make_job(tiny_models["chat"], prompts_file, out, dataset__keep_columns=["topic"])
    summary = run(cfg)
    assert sorted(p.name for p in out.glob("*.parquet")) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    rows = read(out)
    assert [r["id"] for r in rows] == [f"row-{i}" for i in range(12)]
    assert {r["topic"] for r in rows} == {"t0", "t1", "t2"}
    assert all(r["prompt"].startswith("<|im_start|>") and r["response"] for r in rows)
    assert all(r["completion_tokens"] == 8 and r["finish_reason"] == "length" for r in rows)
    assert summary["totals"]["rows"] == 12 and summary["totals"]["completion_tokens"] == 96
    run_json = json.loads((out / "_batchgen" / "run.json").read_text())
    record = json.loads(layout.worker_file(out, 0, 1).read_text())
    assert record["status"] == "complete" and record["summary"]["shards_done"] == 3
    assert "status" not in run_json and record["fingerprint"] == run_json["fingerprint"]
    assert run_json["config"]["output"]["rows_per_shard"] == 5
    meta = json.loads(pq.read_schema(out / "part-00000.parquet").metadata[b"batchgen"])
    assert meta["fingerprint"] == run_json["fingerprint"] and "transformers" in meta["versions"]


def test_samples_and_resume_equal_uninterrupted(tiny_models, prompts_file, make_job, tmp_path):
    over = {"sampling__do_sample": True, "sampling__num_return_sequences": 2}
    full = tmp_path / "full"
    run(make_job(tiny_models["chat"], prompts_file, full, **over))
    rows = read(full)
    assert len(rows) == 24 and [r["sample_index"] for r in rows[:4]] == [0, 1, 0, 1]

    part = tmp_path / "part"
    run(make_job(tiny_models["chat"], prompts_file, part, **over))
    (part / "part-00001.parquet").unlink()
    untouched = (part / "part-00000.parquet").stat().st_mtime_ns
    summary = run(make_job(tiny_models["chat"], prompts_file, part, **over))
    assert summary["shards_resumed"] == 2 and summary["this_run"]["rows"] == 5
    assert (part / "part-00000.parquet").stat().st_mtime_ns == untouched
    assert read(part) == rows


def test_different_config_refused_even_when_finished(tiny_models, prompts_file, make_job, tmp_path):
    out = tmp_path / "out"
    run(make_job(tiny_models["chat"], prompts_file, out))
    before = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    with pytest.raises(ResumeError) as err:
        run(make_job(tiny_models["chat"], prompts_file, out, sampling__max_new_tokens=9))
    assert "sampling.max_new_tokens: 8 -> 9" in str(err.value)
    assert "output.dir=" in str(err.value)
    # Without run.json the shards' own metadata still catches it.
    (out / "_batchgen" / "run.json").unlink()
    with pytest.raises(ResumeError, match="part-00000.parquet"):
        run(make_job(tiny_models["chat"], prompts_file, out, dataset__system_prompt="Be terse."))
    assert {p.name: p.read_bytes() for p in out.glob("*.parquet")} == before


def test_long_prompts_skipped_are_reported(tiny_models, prompts_file, make_job, tmp_path):
    out = tmp_path / "out"
    cfg = make_job(
        tiny_models["base"], prompts_file, out, model__max_context=16, runner__on_long_prompt="skip"
    )
    summary = run(cfg)
    ids = {r["id"] for r in read(out)}
    assert summary["totals"]["skipped"] == 12 - len(ids) > 0
    skipped = [
        s["id"]
        for p in sorted(out.glob("*.parquet"))
        for s in json.loads(pq.read_schema(p).metadata[b"batchgen"])["shard"]["skipped"]
    ]
    assert sorted(skipped + sorted(ids)) == sorted(f"row-{i}" for i in range(12))


def _break_line(prompts_file, number: int) -> list[str]:
    """Cut line ``number`` of the prompts short and put blank lines around it; its old text."""
    lines = prompts_file.read_text().splitlines()
    broken = list(lines)
    broken[number - 1] = lines[number - 1][:-10]
    prompts_file.write_text("\n".join(broken[: number - 1] + ["", *broken[number - 1 :]]) + "\n\n")
    return lines


def test_a_malformed_line_is_a_bad_row_under_skip(
    tiny_models, prompts_file, make_job, tmp_path, monkeypatch
):
    monkeypatch.setenv("BATCHGEN_CACHE", str(tmp_path / "cache"))
    lines = _break_line(prompts_file, 6)  # row 5, now on line 7 after the blank line
    out = tmp_path / "out"
    cfg = make_job(tiny_models["chat"], prompts_file, out, dataset__id_column=None)
    with pytest.raises(
        DataError, match=r"^dataset.path='.*prompts.jsonl': line 7 is not valid JSON"
    ):
        run(cfg)
    assert not (out / "_batchgen" / "run.json").exists()  # refused before the model loaded
    summary = run(
        make_job(
            tiny_models["chat"],
            prompts_file,
            out,
            dataset__id_column=None,
            runner__on_bad_row="skip",
        )
    )
    assert summary["totals"]["rows"] == 11 and summary["totals"]["skipped"] == 1
    # The other rows keep their index, so their ids: fixing the line later shifts nothing.
    assert [r["id"] for r in read(out)] == [str(i) for i in range(12) if i != 5]
    errors = [
        json.loads(line) for line in layout.worker_errors_file(out, 0, 1).read_text().splitlines()
    ]
    assert [(e["id"], e["reason"][:26]) for e in errors] == [("5", "line 7 is not valid JSON (")]
    prompts_file.write_text("\n".join(lines) + "\n")
    fixed = tmp_path / "fixed"
    run(make_job(tiny_models["chat"], prompts_file, fixed, dataset__id_column=None))
    assert [r["id"] for r in read(fixed)] == [str(i) for i in range(12)]


def test_prompt_rows_and_messages_rows_in_one_file(tiny_models, make_job, tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"uid": "a", "prompt": "Name a color."},
        {"uid": "b", "messages": [{"role": "user", "content": "Name a color."}]},
        {"uid": "c", "messages": [{"role": "user", "content": "Hi"}], "prompt": "unused"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cfg = make_job(tiny_models["chat"], path, out, dataset__messages_column="messages")
    summary = run(cfg)
    written = read(out)
    assert summary["totals"]["rows"] == 3 and [r["id"] for r in written] == ["a", "b", "c"]
    assert written[0]["prompt"] == written[1]["prompt"]  # a prompt is a user turn
    assert "Hi" in written[2]["prompt"] and "unused" not in written[2]["prompt"]
    parts = json.loads((out / "_batchgen" / "run.json").read_text())["fingerprint_parts"]
    assert parts["prompts"]["messages_else_plain"] is True


def test_encoder_decoder_job(tiny_models, prompts_file, make_job, tmp_path):
    summary = run(make_job(tiny_models["t5"], prompts_file, tmp_path / "out"))
    assert summary["totals"]["rows"] == 12
    rows = read(tmp_path / "out")
    assert rows[0]["prompt"] == json.loads(prompts_file.read_text().splitlines()[0])["prompt"]


def _cli(model_dir, data, out, *extra):
    return [
        sys.executable,
        "-m",
        "batchgen",
        f"model.name_or_path={model_dir}",
        "model.gguf_file=null",
        f"dataset.path={data}",
        "dataset.id_column=uid",
        f"output.dir={out}",
        "output.rows_per_shard=1",
        "runner.batch_size=2",
        "runner.progress=false",
        "sampling.do_sample=true",
        "sampling.max_new_tokens=48",
        *extra,
    ]


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tiny_models, prompts_file, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(
        _cli(tiny_models["chat"], prompts_file, full),
        env=env,
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    proc = subprocess.Popen(
        _cli(tiny_models["chat"], prompts_file, killed),
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while len(list(killed.glob("*.parquet"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(killed.glob("*.parquet")))
    assert 3 <= done < 12, f"kill landed after {done} shards; the test needs a mid-run kill"
    assert all(pq.read_table(p).num_rows == 1 for p in killed.glob("*.parquet"))
    result = subprocess.run(
        _cli(tiny_models["chat"], prompts_file, killed),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert f"{done} shards resumed" in result.stdout
    assert "earlier run on this folder that died or went silent" in result.stdout
    assert f"(pid {proc.pid} on host {socket.gethostname()}, started " in result.stdout
    assert read(killed) == read(full)
    assert not [p for p in killed.iterdir() if ".tmp" in p.name]


def test_kept_columns_named_like_outputs_are_prefixed(
    tiny_models, prompts_file, make_job, tmp_path
):
    """An eval set's own `prompt` column, kept: one readable shard, never quarantined."""
    import pandas as pd

    from batchgen.errors import ConfigError
    from batchgen.tools.finalize import main as finalize

    out = tmp_path / "out"
    cfg = make_job(tiny_models["chat"], prompts_file, out, dataset__keep_columns=["prompt", "uid"])
    run(cfg)
    frame = pd.read_parquet(out)
    assert list(frame.columns)[-2:] == ["input_prompt", "uid"]  # only `prompt` is an output's
    assert frame["input_prompt"][0] == "the #0" and frame["id"][0] == frame["uid"][0]
    assert frame["prompt"][0].startswith("<|im_start|>")
    assert finalize([str(out)]) == 0
    summary = run(cfg)
    assert summary["shards_resumed"] == 3 and not (out / "_batchgen" / "quarantine").exists()
    clash = make_job(tiny_models["chat"], prompts_file, tmp_path / "o2")
    clash.dataset.keep_columns = ["prompt", "input_prompt"]
    with pytest.raises(ConfigError, match=r"\['input_prompt'\] would be written twice"):
        run(clash)


def test_banner_before_the_model_and_already_complete_after(
    tiny_models, prompts_file, make_job, tmp_path, capsys
):
    out = tmp_path / "out"
    run(make_job(tiny_models["chat"], prompts_file, out))
    first = capsys.readouterr().out
    banner = first.splitlines()[0]
    assert banner.startswith(f"batchgen: {tiny_models['chat']} on cpu in ")
    assert ", static engine" in banner
    assert f"12 rows in 3 shards (0 finished); output {out}" in banner
    assert "already complete" not in first
    summary = run(make_job(tiny_models["chat"], prompts_file, out))
    again = capsys.readouterr().out
    assert "(3 finished)" in again and "already complete" in again
    assert summary["already_complete"]


def test_a_lock_left_by_a_dead_run_is_taken_over_and_named(
    tiny_models, prompts_file, make_job, tmp_path, capsys
):
    out = tmp_path / "out"
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock = layout.lock_file(out, layout.worker_lock_name(0, 1))
    lock.parent.mkdir(parents=True)
    host, started = socket.gethostname(), "2025-01-02T03:04:05+00:00"
    lock.write_text(json.dumps({"pid": gone.pid, "host": host, "started_at": started}))
    run(make_job(tiny_models["chat"], prompts_file, out))
    assert capsys.readouterr().out.splitlines()[0] == (
        "batchgen: took over the run lock of an earlier run on this folder that died or went "
        f"silent past runner.lease_seconds (pid {gone.pid} on host {host}, started {started})"
    )
    run(make_job(tiny_models["chat"], prompts_file, out))  # released cleanly: nothing to say
    assert "took over" not in capsys.readouterr().out
