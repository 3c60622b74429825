"""Output rows: row order then sample order, failed records left out, kept columns renamed."""

from __future__ import annotations

import pytest

from batchgen.config import OutputConfig
from batchgen.engine.interface import Sample
from batchgen.inputs.prompts import PromptRecord
from batchgen.store.rows import OutputSpec, reasoning_tags, shard_rows, split_reasoning
from batchgen.store.summary import Totals


def test_rows_follow_records_then_samples_and_totals_add_up():
    records = [
        PromptRecord(0, "a", "say a", [1, 2, 3], {"prompt": "raw a", "lang": "en"}),
        PromptRecord(1, "b", "say b", [4, 5]),  # failed: no samples
        PromptRecord(2, "c", "say c", [6]),
    ]
    results = {
        0: [Sample("A1", "stop", 2), Sample("A2", "length", 4)],
        2: [Sample("C1", "stop", 1)],
    }
    rows, totals = shard_rows(records, results)
    assert [(r["id"], r["sample_index"], r["response"]) for r in rows] == [
        ("a", 0, "A1"),
        ("a", 1, "A2"),
        ("c", 0, "C1"),
    ]
    assert rows[0] == {
        "id": "a",
        "sample_index": 0,
        "prompt": "say a",
        "response": "A1",
        "finish_reason": "stop",
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "input_prompt": "raw a",  # a kept column named like an output column
        "lang": "en",
    }
    assert (totals.rows, totals.samples, totals.prompt_tokens, totals.completion_tokens) == (
        2,
        3,
        4,
        7,
    )
    assert totals.finish_reasons == {"stop": 2, "length": 1}
    assert shard_rows([], {}) == ([], Totals())


THINK = ("<think>", "</think>")


@pytest.mark.parametrize(
    ("prompt", "text", "expected"),
    [
        ("q", "<think>plan</think>\n\nanswer", ("plan", "\n\nanswer", False)),
        ("q", "  <think>plan</think>answer", ("plan", "answer", False)),
        ("q<think>\n", "plan</think>answer", ("plan", "answer", False)),  # opened by template
        ("q", "plan</think>answer", ("plan", "answer", False)),  # close tag alone
        ("q", "<think>still thinking", ("still thinking", "", True)),  # cut off
        ("q<think>\n", "still thinking", ("still thinking", "", True)),
        ("q", "no tags at all", (None, "no tags at all", False)),
    ],
)
def test_split_reasoning(prompt, text, expected):
    assert split_reasoning(prompt, text, THINK) == expected


def test_the_split_keeps_the_raw_text_recoverable():
    text = "<think>a\n b </think>\n\nThe answer."
    reasoning, response, _ = split_reasoning("q", text, THINK)
    assert "<think>" + reasoning + "</think>" + response == text


def test_reasoning_tags_follow_the_setting_and_the_template():
    template = "{% if enable_thinking %}<think>{% endif %}"
    assert reasoning_tags(OutputConfig(), template) == THINK
    assert reasoning_tags(OutputConfig(), "{{ messages }}") is None
    assert reasoning_tags(OutputConfig(reasoning="off"), template) is None
    assert reasoning_tags(OutputConfig(reasoning="[THINK] [/THINK]"), None) == (
        "[THINK]",
        "[/THINK]",
    )


def test_optional_columns_follow_the_spec():
    spec = OutputSpec(reasoning=THINK, logprobs=True, top_logprobs=1, token_text=lambda t: f"t{t}")
    assert spec.columns == (
        "reasoning",
        "reasoning_truncated",
        "token_logprobs",
        "logprob_sum",
        "top_logprobs",
    )
    sample = Sample("<think>x</think>y", "stop", 3)
    sample.logprobs, sample.top_logprobs = (
        [-0.5, -1.0, -0.25],
        [[(4, -0.5)], [(5, -0.9)], [(6, -0.25)]],
    )
    (row,), _ = shard_rows([PromptRecord(0, "a", "q", [1])], {0: [sample]}, spec)
    assert (row["reasoning"], row["response"], row["reasoning_truncated"]) == ("x", "y", False)
    assert row["logprob_sum"] == -1.75 and row["token_logprobs"] == [-0.5, -1.0, -0.25]
    assert row["top_logprobs"][1] == [{"token_id": 5, "token": "t5", "logprob": -0.9}]
    assert OutputSpec().columns == ()
