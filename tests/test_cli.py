"""The real entry point, ``python -m batchgen``, in a subprocess: user errors and a resumed run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchgen.store import layout

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
    assert not (out / "_batchgen" / "run.json").exists()
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


def test_bad_override_is_one_line_with_a_suggestion(work):
    out = work / "out"
    proc = run_cli("sampling.temprature=1", f"output.dir={out}", cwd=work)
    message = error_message(proc)
    assert message.startswith("batchgen: error: sampling.temprature: not a batchgen setting")
    assert "did you mean sampling.temperature?" in message
    assert "Could not override" not in proc.stderr  # not Hydra's message (exit 1) any more
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
    record = json.loads(layout.worker_file(out, 0, 1).read_text())
    assert record["status"] == "complete"
    assert record["summary"]["shards_done"] == 3
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
        ("runner.lease_seconds=1e-9", ["runner.lease_seconds: 1e-09", "floor of 1 s"]),
        ("runner.stall_seconds=0.5", ["runner.stall_seconds: 0.5", "floor of 1 s"]),
        (_bad_utf8, ["latin1.jsonl", "column 'prompt' of row 1 (line 2)", "UTF-8"]),
        (_cut_short, ["cut.jsonl", "line 3 is not valid JSON"]),
    ],
    ids=["compression", "device", "no-cuda", "lease", "stall", "non-utf8-jsonl", "truncated-jsonl"],
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


def _cli_env(cwd: Path, **extra: str) -> dict[str, str]:
    """run_cli's environment, without the offline switches when ``extra`` says so."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.update(
        BATCHGEN_CACHE=str(cwd / "cache"),
        HF_HOME=str(cwd / "hf-home"),  # an empty hub cache
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    env.update(extra)
    return env


def test_version_is_batchgens(work):
    proc = run_cli("--version", cwd=work)
    assert proc.returncode == 0, proc.stderr
    from batchgen import __version__

    assert proc.stdout.strip() == f"batchgen {__version__}"


def test_help_describes_batchgen(work):
    from batchgen.composition import dotted_keys

    proc = run_cli("--help", "model.name_or_path=/models/my-llama", cwd=work)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("batchgen: batch offline LLM generation")
    assert (
        "model: flan-t5-small, qwen2.5-0.5b, qwen2.5-0.5b-instruct, smollm2-135m-instruct" in text
    )
    assert "Examples:" in text and "Quoting:" in text and "--version" in text
    commands = text[text.index("== Commands") : text.index("== Config groups")]
    for tool in ("status", "report", "finalize", "export"):
        assert f"\n{tool} " in commands, commands
    rows = {
        line.split()[0]: line.split()[1:] for line in text.splitlines() if line.startswith("  ")
    }
    for key in dotted_keys():
        assert key in rows, key
    # The values this command line composes, the source override included.
    assert rows["model.gguf_file"] == ["null"]
    assert rows["output.dir"] == ["outputs/my-llama/sample_prompts-greedy"]


@pytest.mark.parametrize(
    "override,expected",
    [
        (
            "sampling.max_new_token=5",
            "sampling.max_new_token: not a batchgen setting; did you mean sampling.max_new_tokens?",
        ),
        (
            "dataset.template=Translate to {lang}: {text}",
            "cannot parse the override 'dataset.template=Translate to {lang}: {text}'",
        ),
        (
            "sampling=nucleas",
            "sampling=nucleas: not a sampling preset (they are greedy, model, nucleus); "
            "did you mean sampling=nucleus?",
        ),
        ("statsu", "'statsu' is not a batchgen command (they are status, report, finalize"),
    ],
    ids=["typo", "unquoted-template", "preset-typo", "command-typo"],
)
def test_command_line_mistakes_are_one_line_exit_2(work, override, expected):
    out = work / "out"
    proc = run_cli(override, f"output.dir={out}", cwd=work)
    message = error_message(proc)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert expected in message
    assert "did you mean" in message or "cannot parse" in message
    assert "Could not find" not in proc.stderr  # not Hydra's search-path listing (exit 1)
    assert_not_loaded(proc, out)


def test_source_overrides_templates_stops_and_greedy_reach_the_run(work, tiny_models, prompts_file):
    """The issue's commands: a model path and a data path alone (no gguf_file=null, no
    dataset=local), a template file, a stop string typed as \\n, temperature=0; the output
    folder named after that model and data."""
    import re

    template = work / "prompt.txt"
    template.write_text("Topic {topic}: {prompt}\n")
    args = (
        f"model.name_or_path={tiny_models['chat']}",
        f"dataset.path={prompts_file}",
        f"dataset.template_file={template}",
        'sampling.stop=["\\n"]',
        "sampling.temperature=0",
        "sampling.max_new_tokens=3",
        "output.rows_per_shard=6",
    )
    proc = run_cli(*args, cwd=work)
    assert proc.returncode == 0, proc.stderr
    (out,) = (work / "outputs" / "chat").iterdir()
    assert re.fullmatch(r"prompts-greedy-[0-9a-f]{8}", out.name), out.name
    run = json.loads((out / "_batchgen" / "run.json").read_text())
    cfg = run["config"]
    assert cfg["model"]["gguf_file"] is None and cfg["dataset"]["id_column"] is None
    assert cfg["dataset"]["template"] == "Topic {topic}: {prompt}"
    assert cfg["sampling"]["stop"] == ["\n"]
    assert cfg["sampling"]["do_sample"] is False
    table = pq.read_table(out / "part-00000.parquet")
    assert table.column("id").to_pylist() == [str(i) for i in range(6)]  # row index: no id column
    assert "Topic t0: the #0" in table.column("prompt")[0].as_py()
    again = run_cli(*args, cwd=work)  # the same command: the same folder, resumed
    assert again.returncode == 0, again.stderr
    assert "2 shards resumed" in again.stdout
    assert [p.name for p in (work / "outputs" / "chat").iterdir()] == [out.name]


def test_rows_per_shard_may_change_while_nothing_is_published(work, tiny_models, prompts_file):
    out = work / "out"
    args = (
        f"model.name_or_path={tiny_models['chat']}",
        f"dataset.path={prompts_file}",
        "sampling.max_new_tokens=2",
        f"output.dir={out}",
    )
    first = run_cli(*args, "output.rows_per_shard=5", cwd=work)
    assert first.returncode == 0, first.stderr
    for shard in out.glob("part-*.parquet"):  # as if that first attempt had been interrupted
        shard.unlink()
    # Another difference is still refused, also with nothing published.
    refused = run_cli(*args, "output.rows_per_shard=4", "seed=7", cwd=work)
    assert "seed: 0 -> 7" in error_message(refused)
    second = run_cli(*args, "output.rows_per_shard=4", cwd=work)
    assert second.returncode == 0, second.stderr
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    # Once shards are published, a new layout would mix with them: refused.
    third = run_cli(*args, "output.rows_per_shard=6", cwd=work)
    assert "layout.rows_per_shard: 4 -> 6" in error_message(third)


def test_rows_per_shard_change_is_refused_while_a_claim_is_live(tmp_path):
    from batchgen.cluster import claims
    from batchgen.cluster.claims import ClaimStore
    from batchgen.config import JobConfig
    from batchgen.errors import ResumeError
    from batchgen.store import layout, manifest

    parts = manifest.fingerprint_parts(JobConfig(), True, "float32", 12)
    run_file = layout.run_file(tmp_path)
    run_file.parent.mkdir(parents=True)
    record = {"fingerprint": manifest.fingerprint(parts), "fingerprint_parts": parts}
    run_file.write_text(json.dumps(record))
    changed = json.loads(json.dumps(parts))
    changed["layout"]["rows_per_shard"] = 7
    claims_now = lambda: claims.live_indices(tmp_path)  # noqa: E731
    admitted = {}
    # nothing published, no claim, no live worker: allowed, and run.json is to be replaced
    assert manifest.check_run_file(tmp_path, changed, claims_now, lambda: admitted) == (
        changed,
        True,
        [],
    )
    admitted[manifest.fingerprint(parts)] = {"pid": 41, "host": "node7"}  # a live old worker
    with pytest.raises(ResumeError, match="a worker of that run is live .pid 41 on host node7"):
        manifest.check_run_file(tmp_path, changed, claims_now, lambda: admitted)
    admitted = {manifest.fingerprint(changed): {"pid": 42}}  # a peer of this run: no obstacle
    assert manifest.check_run_file(tmp_path, changed, claims_now, lambda: admitted)[1]
    assert ClaimStore(tmp_path, "other:1:0", 60).try_claim(0)  # a worker of that attempt, alive
    with pytest.raises(ResumeError, match=r"live claim on shard\(s\) \[0\]"):
        manifest.check_run_file(tmp_path, changed, claims_now, lambda: admitted)
    assert manifest.check_run_file(tmp_path, parts, claims_now, lambda: admitted) == (
        parts,
        False,
        [],
    )


@pytest.fixture
def silent_server():
    """An HTTP endpoint that accepts connections and never answers (a hub that hangs)."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def _closed_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("hub", ["refused", "silent"])
@pytest.mark.parametrize(
    "override,key",
    [
        ("dataset.path=someone/some-dataset", "dataset.path"),
        ("model.name_or_path=someone/some-model", "model.name_or_path"),
    ],
    ids=["dataset", "model"],
)
def test_unreachable_hub_fails_fast(work, silent_server, hub, override, key):
    import time

    out = work / "out"
    endpoint = silent_server if hub == "silent" else _closed_port()
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "batchgen", override, f"output.dir={out}"],
        cwd=work,
        env=_cli_env(work, HF_ENDPOINT=endpoint),
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.monotonic() - started
    message = error_message(proc)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # no retry warnings
    assert f"{key}='someone/some-" in message and "hub is unreachable" in message
    assert endpoint in message and "HF_HUB_OFFLINE=1" in message
    # Before: about 37 s of retries on this project's machines; now the start-up alone.
    assert seconds < 30, seconds
    assert_not_loaded(proc, out)


def test_second_ctrl_c_is_one_line_exit_130(work, tiny_models):
    import signal
    import time

    data = work / "many.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"row {i} " * 5}) + "\n" for i in range(4000)))
    out = work / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchgen",
            f"model.name_or_path={tiny_models['chat']}",
            f"dataset.path={data}",
            "sampling.max_new_tokens=64",
            "runner.batch_size=256",
            "output.rows_per_shard=4000",
            f"output.dir={out}",
        ],
        cwd=work,
        env=_cli_env(work, HF_HUB_OFFLINE="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not any(out.rglob("run.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # into the shard loop, whose first Ctrl-C only asks for a stop
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == (
        "batchgen: interrupted at once (Ctrl-C); finished shards are intact; "
        "rerun the same command to resume."
    )
