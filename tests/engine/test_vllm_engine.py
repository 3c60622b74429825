"""The vLLM engine, for real: vLLM's CPU build in .venv-vllm (``make vllm-env``) runs jobs on the
embedded model in fp32, compared with batchgen's static engine and with itself.

Each job is a process of that environment's Python, as ``make vllm-run`` starts it. Without the
environment the tests skip, and under CI=true they fail, saying how to build it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchgen.engine import batching

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
# fp32: greedy tokens of two engines are compared, which bf16's rounding could tip at a tie.
COMMON = ["dataset.id_column=id", "runner.progress=false", "model.dtype=float32"]
# Greedy log-probabilities of the two engines, fp32 on this CPU: measured within 7e-5 over
# 882 tokens of 32 prompts (chosen and top-2 values alike).
LOGPROB_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def vllm_python(unavailable) -> Path:
    """The vLLM environment's Python, checked to import vllm and this checkout's batchgen."""
    if not VLLM_PYTHON.exists():
        unavailable(f"{VLLM_PYTHON} is missing: build it with `make vllm-env`")
    probe = subprocess.run(
        [str(VLLM_PYTHON), "-c", "import vllm, batchgen; print(batchgen.__file__)"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if probe.returncode != 0:
        unavailable(f"vLLM does not import in {VLLM_PYTHON}: {probe.stderr.strip()[-500:]}")
    assert Path(probe.stdout.strip()).is_relative_to(REPO), probe.stdout
    return VLLM_PYTHON


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["LD_PRELOAD"] = str(REPO / ".venv-vllm" / "lib" / "libiomp5.so")
    env["PYTHONPATH"] = str(REPO)
    return env


# The command line, saying how many records each vLLM call received.
COUNTING = """
import sys
from batchgen.engine.vllm_engine import VllmEngine
real = VllmEngine.generate_all
def generate_all(self, records, *args, **kwargs):
    print(f"vllm records: {len(records)}", file=sys.stderr, flush=True)
    return real(self, records, *args, **kwargs)
VllmEngine.generate_all = generate_all
from batchgen.cli import main
sys.argv[0] = "batchgen"
main()
"""


def job(python: Path, out: Path, *overrides: str, wait: bool = True):
    """A batchgen job on the embedded model over the bundled sample prompts."""
    cmd = [str(python), "-c", COUNTING, f"output.dir={out}", *COMMON, *overrides]
    if not wait:
        return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def rows(out: Path) -> list[dict]:
    return [r for f in sorted(out.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_greedy_rows_and_logprobs_equal_the_static_engine(vllm_python, tmp_path):
    settings = ["dataset.limit=12", "sampling.max_new_tokens=24", "output.top_logprobs=2"]
    settings.append("output.logprobs=true")
    job(vllm_python, tmp_path / "vllm", "runner.engine=vllm", *settings)
    job(vllm_python, tmp_path / "static", "runner.engine=static", *settings)
    got, want = rows(tmp_path / "vllm"), rows(tmp_path / "static")
    assert len(got) == 12
    for a, b in zip(got, want, strict=True):
        same = ("id", "prompt", "response", "finish_reason", "completion_tokens")
        assert {k: a[k] for k in same} == {k: b[k] for k in same}
        assert a["token_logprobs"] == pytest.approx(b["token_logprobs"], abs=LOGPROB_TOLERANCE)
        assert [[t["token_id"] for t in step] for step in a["top_logprobs"]] == [
            [t["token_id"] for t in step] for step in b["top_logprobs"]
        ]
    log = next((tmp_path / "vllm" / "_batchgen" / "workers").glob("*.engine.log")).read_text()
    assert "vLLM" in log or "vllm" in log  # its start-up report went to the log, not the bar


def test_sampled_job_killed_mid_shard_resumes_to_the_uninterrupted_rows(vllm_python, tmp_path):
    """One shard of 96 rows, 2 samples each, decoded 8 sequences at a time: killed once its
    first finished rows are checkpointed, then resumed; equal to an uninterrupted run that
    decoded 32 at a time (samples do not depend on the batch)."""
    data = tmp_path / "prompts.jsonl"
    with data.open("w") as f:
        for i in range(96):
            f.write(
                json.dumps({"id": f"q{i}", "prompt": f"Write one line about {i}. " * (1 + i % 4)})
            )
            f.write("\n")
    settings = [
        "dataset=local",
        f"dataset.path={data}",
        "sampling=nucleus",
        "sampling.max_new_tokens=24",
        "sampling.num_return_sequences=2",
        "output.rows_per_shard=96",
        "runner.engine=vllm",
    ]
    reference = tmp_path / "reference"
    job(vllm_python, reference, *settings, "runner.batch_size=32")
    out = tmp_path / "out"
    proc = job(vllm_python, out, *settings, "runner.batch_size=8", wait=False)
    deadline = time.monotonic() + 600
    checkpoints = out / "_batchgen" / "checkpoints"
    while not list(checkpoints.glob("*/rows-*.ckpt")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = sum(
        len(pq.read_table(f).column("index").unique()) for f in checkpoints.glob("*/rows-*.ckpt")
    )
    assert batching.FLUSH_ROWS <= kept < 96 and not list(out.glob("part-*.parquet"))
    resumed = job(vllm_python, out, *settings, "runner.batch_size=8")
    # The resume generated only the rows the checkpoints lacked.
    assert f"vllm records: {96 - kept}" in resumed.stderr.splitlines()
    assert rows(out) == rows(reference)
    run = json.loads((out / "_batchgen" / "run.json").read_text())
    assert run["fingerprint_parts"]["layout"]["engine"] == "vllm"  # sampled: vLLM's own rows


def test_json_schema_rows_are_valid(vllm_python, tmp_path):
    schema = '{"type":"object","properties":{"answer":{"type":"string"}},"required":["answer"]}'
    job(
        vllm_python,
        tmp_path / "out",
        "runner.engine=vllm",
        "dataset.limit=6",
        "sampling.max_new_tokens=48",
        f"sampling.json_schema='{schema}'",
    )
    written = rows(tmp_path / "out")
    finished = [r for r in written if r["finish_reason"] == "stop"]
    assert finished and all(r["valid"] for r in finished)
    assert all("answer" in json.loads(r["response"]) for r in finished)


def test_what_vllm_cannot_honour_is_refused_before_the_model_loads(
    vllm_python, tiny_models, tmp_path
):
    out = tmp_path / "out"
    done = subprocess.run(
        [
            str(vllm_python),
            "-m",
            "batchgen",
            f"model.name_or_path={tiny_models['t5']}",
            "model.gguf_file=null",
            "runner.engine=vllm",
            f"output.dir={out}",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "batchgen: error: runner.engine=vllm cannot serve an encoder-decoder model as batchgen's "
        "engines do; use runner.engine=static or auto."
    ]
    assert not (out / "_batchgen" / "run.json").exists()  # refused before anything was recorded


def test_quantization_adapters_and_device_maps_are_refused_with_vllm_before_loading(
    tiny_models, prompts_file, make_job, tmp_path
):
    import batchgen
    from batchgen.errors import ConfigError

    out, adapter = tmp_path / "out", tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    cfg = make_job(tiny_models["chat"], prompts_file, out, runner__engine="vllm")
    cfg.model.quantization, cfg.model.adapter, cfg.model.device_map = "int8", str(adapter), "auto"
    with pytest.raises(ConfigError) as refused:
        batchgen.run(cfg)
    assert str(refused.value) == (
        "runner.engine=vllm cannot serve model.quantization, model.adapter, model.device_map as "
        "batchgen's engines do; use runner.engine=static or auto."
    )
    assert not (out / "_batchgen" / "run.json").exists()


def test_without_vllm_the_error_says_how_to_get_it(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "batchgen", "runner.engine=vllm", f"output.dir={tmp_path / 'o'}"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("batchgen: error: runner.engine=vllm: vLLM is not installed")
    assert "make vllm-env" in line
