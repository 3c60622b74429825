"""The real entry point, ``python -m batchgen``, in a subprocess: user errors and a resumed run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parent.parent
# Markers that only appear once a job gets past its checks: the GGUF conversion message and the
# progress bar shown while the model generates (the positive test below shows both can appear).
LOAD_MARKERS = ("converting", "generating", "batchgen summary")


def run_cli(*overrides: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        # An empty conversion cache: loading the embedded model would show up as "converting".
        BATCHGEN_CACHE=str(cwd / "cache"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    return subprocess.run(
        [sys.executable, "-m", "batchgen", *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_message(proc: subprocess.CompletedProcess) -> str:
    """The batchgen error paragraph, after checking it is the one clean thing reported."""
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err)
    assert "Traceback" not in err, err
    assert err.count("batchgen: error:") == 1, err
    message = err[err.index("batchgen: error:") :].strip()
    assert message, err
    assert "\n\n" not in message, f"more than one paragraph:\n{message}"
    return message


def assert_not_loaded(proc: subprocess.CompletedProcess, out: Path) -> None:
    """The job stopped in its checks: no model conversion, generation, output or manifest."""
    text = proc.stdout + proc.stderr
    for marker in LOAD_MARKERS:
        assert marker not in text, (marker, text)
    assert not list(out.rglob("*.parquet"))
    assert not (out / "run.json").exists()
    cache = out.parent / "cache"
    assert not cache.exists() or not any(cache.iterdir())


@pytest.fixture
def work(tmp_path) -> Path:
    (tmp_path / "run").mkdir()
    return tmp_path / "run"


def test_missing_dataset_path(work, tiny_models):
    out = work / "out"
    proc = run_cli(
        "dataset=local",
        "dataset.path=/nope/x.jsonl",
        f"model.name_or_path={tiny_models['chat']}",
        "model.gguf_file=null",
        f"output.dir={out}",
        cwd=work,
    )
    message = error_message(proc)
    assert "dataset.path" in message and "/nope/x.jsonl" in message
    assert "no such file" in message
    assert_not_loaded(proc, out)


def test_local_dataset_without_path_says_it_is_mandatory(work, tiny_models):
    out = work / "out"
    proc = run_cli(
        "dataset=local",
        f"model.name_or_path={tiny_models['chat']}",
        "model.gguf_file=null",
        f"output.dir={out}",
        cwd=work,
    )
    message = error_message(proc)
    assert "dataset.path: missing mandatory value" in message
    assert_not_loaded(proc, out)


@pytest.mark.parametrize(
    "overrides,key,column",
    [
        (["dataset.prompt_column=text"], "dataset.prompt_column", "text"),
        (["dataset.id_column=row_id"], "dataset.id_column", "row_id"),
        (
            ["dataset.prompt_column=null", "dataset.messages_column=chat"],
            "dataset.messages_column",
            "chat",
        ),
    ],
    ids=["prompt_column", "id_column", "messages_column"],
)
def test_missing_column(work, tiny_models, prompts_file, overrides, key, column):
    out = work / "out"
    proc = run_cli(
        f"dataset.path={prompts_file}",
        *overrides,
        f"model.name_or_path={tiny_models['chat']}",
        "model.gguf_file=null",
        f"output.dir={out}",
        cwd=work,
    )
    message = error_message(proc)
    assert key in message
    assert repr(column) in message
    assert "uid" in message and "prompt" in message  # the columns that are there
    assert_not_loaded(proc, out)


def _empty_jsonl(path: Path) -> Path:
    path = path / "empty.jsonl"
    path.write_bytes(b"")
    return path


def _header_only_csv(path: Path) -> Path:
    path = path / "header.csv"
    path.write_text("uid,prompt,topic\n")
    return path


EMPTY = [pytest.param(_empty_jsonl, id="0-byte-jsonl"), pytest.param(_header_only_csv, id="csv")]


@pytest.mark.parametrize("make", EMPTY)
def test_empty_dataset_fails_before_the_model(work, tiny_models, make):
    data, out = make(work), work / "out"
    proc = run_cli(
        f"dataset.path={data}",
        f"model.name_or_path={tiny_models['chat']}",
        "model.gguf_file=null",
        f"output.dir={out}",
        cwd=work,
    )
    message = error_message(proc)
    assert "dataset.path" in message and data.name in message
    assert "no rows" in message
    assert "hub" not in message.lower()  # a local file: no advice about hub reachability
    assert_not_loaded(proc, out)


@pytest.mark.parametrize(
    "overrides,key,culprit",
    [
        (
            ["model.name_or_path=/nope/model", "model.gguf_file=null"],
            "model.name_or_path",
            "/nope/model",
        ),
        (
            ["model.name_or_path=someone/does-not-exist", "model.gguf_file=null"],
            "model.name_or_path",
            "someone/does-not-exist",
        ),
        (["model.gguf_file=missing.Q4_0.gguf"], "model.gguf_file", "missing.Q4_0.gguf"),
    ],
    ids=["local-path", "offline-hub-id", "gguf-file"],
)
def test_model_not_found(work, tiny_models, overrides, key, culprit):
    if key == "model.gguf_file":
        overrides = [f"model.name_or_path={tiny_models['chat']}", *overrides]
    out = work / "out"
    proc = run_cli(*overrides, f"output.dir={out}", cwd=work)
    message = error_message(proc)
    assert f"{key}={culprit!r}" in message
    assert_not_loaded(proc, out)


def test_bad_override_is_hydras_error(work):
    out = work / "out"
    proc = run_cli("sampling.temprature=1", f"output.dir={out}", cwd=work)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "Could not override 'sampling.temprature'" in proc.stderr
    assert "Key 'temprature' not in 'SamplingConfig'" in proc.stderr
    assert_not_loaded(proc, out)


def test_run_then_resume(work, tiny_models, prompts_file):
    out = work / "out"
    args = (
        f"model.name_or_path={tiny_models['chat']}",
        "model.gguf_file=null",
        f"dataset.path={prompts_file}",
        "dataset.id_column=uid",
        "sampling.max_new_tokens=4",
        "output.rows_per_shard=5",
        f"output.dir={out}",
    )
    first = run_cli(*args, cwd=work)
    assert first.returncode == 0, first.stderr
    assert "batchgen summary" in first.stdout
    assert "generating" in first.stderr  # the progress bar: the model did run
    assert "0 shards resumed" in first.stdout
    names = ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert sorted(p.name for p in out.rglob("*.parquet")) == names
    tables = [pq.read_table(out / n) for n in names]
    assert [t.num_rows for t in tables] == [5, 5, 2]
    ids = [i for t in tables for i in t.column("id").to_pylist()]
    assert ids == [f"row-{i}" for i in range(12)]
    for t in tables:
        assert set(t.column("sample_index").to_pylist()) == {0}
        assert all(0 < n <= 4 for n in t.column("completion_tokens").to_pylist())
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete"
    assert run["summary"]["shards_done"] == 3
    mtimes = {n: (out / n).stat().st_mtime_ns for n in names}

    second = run_cli(*args, cwd=work)
    assert second.returncode == 0, second.stderr
    assert "batchgen summary" in second.stdout
    assert "3 shards resumed" in second.stdout
    assert "generating" not in second.stderr
    assert sorted(p.name for p in out.rglob("*.parquet")) == names
    assert {n: (out / n).stat().st_mtime_ns for n in names} == mtimes
    assert sum(pq.read_metadata(out / n).num_rows for n in names) == 12


def _bad_utf8(path: Path) -> Path:
    path = path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    return path


def _cut_short(path: Path) -> Path:
    path = path / "cut.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c')
    return path


@pytest.mark.parametrize(
    "override,expected",
    [
        ("output.compression=nonsense", ["output.compression", "'nonsense'", "zstd"]),
        ("model.device=nonsense", ["model.device", "'nonsense'", "cuda:N"]),
        ("model.device=cuda:0", ["model.device='cuda:0'", "no CUDA device"]),
        (_bad_utf8, ["latin1.jsonl", "column 'prompt' of row 1 (line 2)", "UTF-8"]),
        (_cut_short, ["cut.jsonl", "line 3 is not valid JSON"]),
    ],
    ids=["compression", "device", "no-cuda", "non-utf8-jsonl", "truncated-jsonl"],
)
def test_bad_values_get_one_line_before_the_model_loads(work, tiny_models, override, expected):
    out = work / "out"
    (work / "ok.jsonl").write_text('{"prompt": "hello"}\n')
    data = override(work) if callable(override) else work / "ok.jsonl"
    proc = run_cli(
        "dataset=local",
        f"dataset.path={data}",
        "sampling.max_new_tokens=8",
        *([] if callable(override) else [override]),
        f"model.name_or_path={tiny_models['chat']}",
        "model.gguf_file=null",
        f"output.dir={out}",
        cwd=work,
    )
    message = error_message(proc)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for part in expected:
        assert part in message, message
    assert_not_loaded(proc, out)
