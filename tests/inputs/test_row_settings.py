"""Per-row settings: chat-template arguments and sampling overrides, checked per row."""

from __future__ import annotations

import copy
import json

import pytest

from batchgen.config import DatasetConfig, SamplingConfig
from batchgen.inputs.dataset import Rows
from batchgen.inputs.prompts import build_records, render_texts
from batchgen.inputs.row_settings import RowSampling, row_sampling

THINKING_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}"
)


@pytest.fixture
def thinking_tok(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = THINKING_TEMPLATE
    return tok


def rows(**columns):
    return Rows(columns=columns, kept_types={})


def test_chat_template_kwargs_change_the_rendering(thinking_tok):
    data = rows(prompt=["hi", "yo"], kw=[None, {"enable_thinking": True}])
    plain = DatasetConfig(prompt_column="prompt")
    _, default, _ = render_texts(data, plain, thinking_tok, chat=True)
    off = DatasetConfig(prompt_column="prompt", chat_template_kwargs={"enable_thinking": False})
    _, texts, _ = render_texts(data, off, thinking_tok, chat=True)
    assert default[0].endswith("<|assistant|><think>\n")
    assert texts[0].endswith("<think>\n\n</think>\n\n") and texts != default
    # A row's own mapping is merged over the job's.
    per_row = DatasetConfig(
        prompt_column="prompt",
        chat_template_kwargs={"enable_thinking": False},
        chat_template_kwargs_column="kw",
    )
    _, texts, problems = render_texts(data, per_row, thinking_tok, chat=True)
    assert texts[0].endswith("</think>\n\n") and texts[1].endswith("<think>\n")
    assert problems == ["", ""]


def test_a_bad_template_kwargs_value_is_a_bad_row(thinking_tok):
    data = rows(prompt=["hi", "yo"], kw=["{not json", "[1, 2]"])
    cfg = DatasetConfig(prompt_column="prompt", chat_template_kwargs_column="kw")
    records, bad = build_records(data, cfg, thinking_tok, chat=True)
    assert records == []
    assert "column 'kw': not JSON" in bad[0].reason
    assert "expected a mapping" in bad[1].reason


def test_row_sampling_merges_over_the_job():
    job = SamplingConfig(max_new_tokens=64, stop=["###"])
    own = row_sampling(job, {"max_new_tokens": 8, "temperature": 0.5, "do_sample": True}, "s")
    assert own.sampling.max_new_tokens == 8 and own.sampling.temperature == 0.5
    assert own.sampling.stop == ["###"] and own.seed is None
    assert row_sampling(job, None, "s") is None and row_sampling(job, "{}", "s") is None
    text = json.dumps({"seed": 7, "stop": "\n", "json_schema": {"type": "object"}})
    own = row_sampling(job, text, "s")
    assert own == RowSampling(
        SamplingConfig(max_new_tokens=64, stop=["\n"], json_schema='{"type":"object"}'), 7
    )
    greedy = row_sampling(SamplingConfig(do_sample=True), {"temperature": 0}, "s").sampling
    assert not greedy.do_sample and greedy.temperature == 1.0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"temp": 1}, "temp not a sampling setting"),
        ({"top_p": 2.0}, r"column 's'\.top_p: must be in"),
        ({"max_new_tokens": "8"}, "max_new_tokens must be int"),
        ({"do_sample": 1}, "do_sample must be bool"),
        ({"seed": "x"}, "seed must be an integer"),
        ({"json_schema": {"type": 5}}, "not a valid JSON schema"),
        ({"num_return_sequences": 2}, r"column 's'\.num_return_sequences: more than one"),
        ("[1]", "expected a mapping"),
    ],
)
def test_bad_row_sampling_is_named(value, message):
    with pytest.raises(ValueError, match=message):
        row_sampling(SamplingConfig(), value, "column 's'")


def test_a_row_has_its_own_number_of_samples():
    """An OpenAI Batch file mixes ``n`` values: a row's own count is its own, not refused."""
    own = row_sampling(SamplingConfig(), {"num_return_sequences": 3, "do_sample": True}, "s")
    assert own.sampling.num_return_sequences == 3


def test_records_carry_their_own_sampling_and_bad_ones_are_bad_rows(smol_tokenizer):
    data = rows(
        prompt=["a", "b", "c"],
        s=[{"max_new_tokens": 3, "seed": 11}, None, {"top_k": -1}],
    )
    cfg = DatasetConfig(prompt_column="prompt", sampling_column="s")
    job = SamplingConfig(max_new_tokens=9)
    records, bad = build_records(data, cfg, smol_tokenizer, chat=False, sampling=job)
    assert [(r.index, r.sampling and r.sampling.max_new_tokens, r.seed) for r in records] == [
        (0, 3, 11),
        (1, None, None),
    ]
    assert bad[0].index == 2 and "dataset.sampling_column column 's'.top_k" in bad[0].reason
