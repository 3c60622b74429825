"""status, report and finalize on a folder that two workers filled: each one's record counts."""

from __future__ import annotations

import json

from batchgen import run
from batchgen.store import layout
from batchgen.tools.finalize import main as finalize
from batchgen.tools.report import build_report, format_table
from batchgen.tools.status import collect, format_status

BAD = {1: "", 7: None, 11: "   "}  # one bad row in each shard of 5: shards 0 and 2 are rank 0's
EMPTY = "dataset.prompt_column 'prompt': empty"
NULL = "dataset.prompt_column 'prompt': missing (null)"


def two_workers(make_job, model, tmp_path):
    data, out = tmp_path / "prompts.jsonl", tmp_path / "out"
    with data.open("w") as f:
        for i in range(12):
            prompt = BAD.get(i, f"prompt number {i}")
            f.write(json.dumps({"uid": f"row-{i}", "prompt": prompt}) + "\n")
    for rank in (0, 1):
        cfg = make_job(model, data, out, runner__on_bad_row="skip", runner__steal=False)
        cfg.runner.rank, cfg.runner.world_size = rank, 2
        run(cfg)
    return out


def test_status_report_and_finalize_merge_both_workers(tiny_models, make_job, tmp_path, capsys):
    out = two_workers(make_job, tiny_models["chat"], tmp_path)
    status = collect(out)
    assert status["complete"] and status["run_status"] == "complete"
    assert [(r["rank"], r["status"]) for r in status["records"]] == [
        (0, "incomplete"),
        (1, "complete"),
    ]
    assert status["totals"]["skipped"] == 3 and status["rows"]["done"] == 12
    assert "2 worker record(s): 1 complete, 1 incomplete" in format_status(status)

    numbers, _ = build_report(out)
    assert numbers["status"] == "complete" and numbers["workers"] == 2
    assert numbers["rows_skipped"] == 3 and numbers["errors"] == {EMPTY: 2, NULL: 1}
    assert "(summed over 2 workers)" in format_table(numbers)

    assert finalize([str(out)]) == 0
    card = layout.card_file(out).read_text()
    assert "| input rows | 12 from" in card and "| skipped / failed rows | 3 / 0" in card


def test_a_rerun_rank_does_not_double_count_errors(tiny_models, make_job, tmp_path):
    out = two_workers(make_job, tiny_models["chat"], tmp_path)
    (out / "part-00001.parquet").unlink()  # rank 1 redoes its shard: its bad row is found again
    cfg = make_job(
        tiny_models["chat"],
        tmp_path / "prompts.jsonl",
        out,
        runner__on_bad_row="skip",
        runner__steal=False,
    )
    cfg.runner.rank, cfg.runner.world_size = 1, 2
    run(cfg)
    numbers, _ = build_report(out)
    assert numbers["errors"] == {EMPTY: 2, NULL: 1} and numbers["rows_skipped"] == 3
    assert collect(out)["totals"]["skipped"] == 3
