"""End to end on the real embedded SmolLM2-135M-Instruct, through the Hydra entry point."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest


@pytest.mark.slow
def test_default_job_on_embedded_model(tmp_path, smol_dir):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "batchgen",
        "dataset.limit=3",
        "sampling.max_new_tokens=24",
        f"output.dir={out}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "batchgen summary" in result.stdout and "tokens/s" in result.stdout
    rows = pq.read_table(out / "part-00000.parquet").to_pylist()
    assert [r["id"] for r in rows] == ["sample-000", "sample-001", "sample-002"]
    first = rows[0]
    assert first["prompt"].endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "Paris" in first["response"]
    assert "<|im" not in first["response"] and "capital of France?" not in first["response"]
    assert first["finish_reason"] == "stop" and 0 < first["completion_tokens"] < 24
    assert rows[1]["prompt"].count("写一段描写春天的散文") == 1
    assert all(r["finish_reason"] in {"stop", "length"} for r in rows)
