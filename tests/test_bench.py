"""scripts/bench.py end to end on a tiny workload: every method runs, the table and JSON appear."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


@pytest.mark.slow
def test_bench_prints_and_writes_every_method(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    args = ["--prompts", "6", "--max-new-tokens", "5", "--batch-sizes", "2", "4"]
    assert bench.main([*args, "--json", str(out_json), "--markdown", str(out_md)]) == 0
    methods = [r["method"] for r in json.loads(out_json.read_text())["results"]]
    assert methods == [
        "pipeline, one prompt at a time",
        "pipeline(batch_size=16)",
        "batchgen static, batch 2",
        "batchgen static, batch 4",
        "batchgen auto",
        "batchgen continuous",
    ]
    table = out_md.read_text()
    assert table.startswith("# Benchmarks") and "| batchgen static, batch 4 |" in table
    # Greedy on one model: every method's outputs equal the baseline's.
    assert table.count("| 6/6 |") == 6
    assert "KV-cache padding" in capsys.readouterr().out
