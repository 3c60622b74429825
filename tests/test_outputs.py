"""Issue 13's outputs through a whole job: optional columns, per-row settings, template kwargs."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from batchgen import run
from batchgen.conversion import convert as batchgen_convert
from batchgen.errors import ResumeError
from batchgen.store import layout

THINKING_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}"
)


def table(out):
    return pq.read_table(sorted(out.glob("*.parquet")))


@pytest.fixture(scope="module")
def thinking_model(tiny_models, tmp_path_factory):
    """The tiny chat model whose template opens <think> in the prompt unless told not to."""
    folder = tmp_path_factory.mktemp("thinking") / "model"
    shutil.copytree(tiny_models["chat"], folder)
    config = folder / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data["chat_template"] = THINKING_TEMPLATE
    config.write_text(json.dumps(data))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


def test_logprob_columns(tiny_models, prompts_file, make_job, tmp_path):
    out = tmp_path / "out"
    cfg = make_job(tiny_models["chat"], prompts_file, out, output__logprobs=True)
    cfg.output.top_logprobs = 3
    run(cfg)
    t = table(out)
    assert t.schema.field("token_logprobs").type.value_type.bit_width == 32
    for row in t.to_pylist():
        assert len(row["token_logprobs"]) == row["completion_tokens"] == len(row["top_logprobs"])
        assert row["logprob_sum"] == pytest.approx(sum(row["token_logprobs"]), abs=1e-4)
        for position in row["top_logprobs"]:
            values = [p["logprob"] for p in position]
            assert len(position) == 3 and values == sorted(values, reverse=True)
            assert all(isinstance(p["token"], str) for p in position)
    # The columns are part of what the folder holds: the same folder without them is refused.
    with pytest.raises(ResumeError, match="output"):
        run(make_job(tiny_models["chat"], prompts_file, out))


def test_reasoning_cut_off_by_max_new_tokens_is_flagged(
    thinking_model, prompts_file, make_job, tmp_path
):
    out = tmp_path / "out"
    run(make_job(thinking_model, prompts_file, out))
    rows = table(out).to_pylist()
    # The template opened <think> in the prompt and 8 random tokens never close it.
    assert all(r["prompt"].endswith("<think>\n") for r in rows)
    assert all(r["reasoning_truncated"] and r["response"] == "" for r in rows)
    assert all(r["reasoning"] and r["finish_reason"] == "length" for r in rows)


def test_reasoning_is_exported_as_reasoning_content(
    thinking_model, prompts_file, make_job, tmp_path
):
    from openai.types.chat import ChatCompletion

    from batchgen.tools import export

    out = tmp_path / "out"
    run(make_job(thinking_model, prompts_file, out))
    target = tmp_path / "batch.jsonl"
    assert export.main([str(out), "--format", "openai_batch", "-o", str(target)]) == 0
    rows = {r["id"]: r for r in table(out).to_pylist()}
    for line in target.read_text().splitlines():
        record = json.loads(line)
        body = ChatCompletion.model_validate(record["response"]["body"])
        message = body.choices[0].message
        assert message.reasoning_content == rows[record["custom_id"]]["reasoning"]
        assert message.content == ""


def test_chat_template_kwargs_switch_thinking_off(thinking_model, prompts_file, make_job, tmp_path):
    out = tmp_path / "out"
    cfg = make_job(thinking_model, prompts_file, out, output__reasoning="off")
    cfg.dataset.chat_template_kwargs = {"enable_thinking": False}
    run(cfg)
    t = table(out)
    assert "reasoning" not in t.column_names
    assert all(p.endswith("</think>\n\n") for p in t.column("prompt").to_pylist())
    parts = json.loads(layout.run_file(out).read_text())["fingerprint_parts"]
    assert parts["prompts"]["chat_template_kwargs"] == {"enable_thinking": False}


def test_per_row_sampling_column(tiny_models, tmp_path, make_job):
    data = tmp_path / "rows.jsonl"
    settings = [
        {"max_new_tokens": 2},
        {"max_new_tokens": 6, "do_sample": True, "temperature": 0.7, "seed": 3},
        None,
        {"top_p": 5},  # a bad row
        json.dumps({"max_new_tokens": 2, "stop": ["\n"]}),
    ]
    with data.open("w") as f:
        for i, s in enumerate(settings):
            f.write(json.dumps({"uid": f"r{i}", "prompt": f"prompt {i} " * (i + 1), "s": s}) + "\n")
    out = tmp_path / "out"
    cfg = make_job(tiny_models["chat"], data, out, dataset__sampling_column="s")
    cfg.runner.on_bad_row = "skip"
    summary = run(cfg)
    rows = {r["id"]: r for r in table(out).to_pylist()}
    assert sorted(rows) == ["r0", "r1", "r2", "r4"] and summary["totals"]["skipped"] == 1
    assert rows["r0"]["completion_tokens"] <= 2 and rows["r4"]["completion_tokens"] <= 2
    assert rows["r2"]["completion_tokens"] <= 8  # the job's max_new_tokens
    # A row gives the same output whatever its neighbours: alone, with the job's other settings.
    solo = tmp_path / "solo.jsonl"
    solo.write_text(data.read_text().splitlines()[1] + "\n")
    run(make_job(tiny_models["chat"], solo, tmp_path / "solo", dataset__sampling_column="s"))
    assert table(tmp_path / "solo").to_pylist()[0]["response"] == rows["r1"]["response"]


def test_json_schema_job_writes_a_valid_column_and_counts_invalid(
    tiny_models, prompts_file, make_job, tmp_path
):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    out = tmp_path / "out"
    cfg = make_job(tiny_models["chat"], prompts_file, out, sampling__max_new_tokens=3)
    cfg.sampling.json_schema = json.dumps(schema)
    summary = run(batchgen_convert(cfg))
    rows = table(out).to_pylist()
    # 3 tokens cannot finish {"ok":true}: every sample is cut, and reported invalid.
    assert all(r["valid"] is False and r["finish_reason"] == "length" for r in rows)
    assert summary["totals"]["invalid"] == len(rows) == 12
    roomy = tmp_path / "roomy"
    cfg = make_job(tiny_models["chat"], prompts_file, roomy, sampling__max_new_tokens=16)
    cfg.sampling.json_schema = json.dumps(schema)
    summary = run(batchgen_convert(cfg))
    rows = table(roomy).to_pylist()
    assert all(r["valid"] and json.loads(r["response"])["ok"] in (True, False) for r in rows)
    assert summary["totals"]["invalid"] == 0
