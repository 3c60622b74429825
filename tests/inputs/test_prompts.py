"""Prompt rendering: messages, system prompt, raw text, templates, BOS handling, long prompts."""

from __future__ import annotations

import pytest

from batchgen.config import DatasetConfig
from batchgen.errors import ConfigError, DataError
from batchgen.inputs.dataset import Rows
from batchgen.inputs.policies import apply_bad_row_policy
from batchgen.inputs.prompts import build_records, uses_chat_template


def rows(**columns) -> Rows:
    return Rows(columns=columns, kept_types={})


def test_prompt_column_wrapped_as_user_turn_with_system_prompt(smol_tokenizer):
    cfg = DatasetConfig(prompt_column="p", system_prompt="Answer in French.")
    recs, _ = build_records(rows(p=["Hi there"]), cfg, smol_tokenizer, chat=True)
    assert recs[0].text == (
        "<|im_start|>system\nAnswer in French.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    assert recs[0].id == "0"


def test_messages_column_rendered_with_generation_prompt(smol_tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    cfg = DatasetConfig(messages_column="messages", system_prompt="ignored: row has one")
    recs, _ = build_records(rows(messages=[msgs]), cfg, smol_tokenizer, chat=True)
    expected = smol_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert recs[0].text == expected
    assert recs[0].text.endswith("<|im_start|>assistant\n")
    assert "ignored" not in recs[0].text


def test_no_double_bos_for_template_rendered_text(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["chat"])
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.add_bos_token = True
    raw_ids = tok("x")["input_ids"]
    assert raw_ids[0] == tok.bos_token_id  # the tokenizer itself would prepend a BOS
    recs, _ = build_records(rows(p=["hello"]), DatasetConfig(prompt_column="p"), tok, chat=True)
    assert recs[0].token_ids.count(tok.bos_token_id) == 1
    assert recs[0].token_ids[0] == tok.bos_token_id


def test_raw_text_for_base_model(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["base"])
    cfg = DatasetConfig(prompt_column="p")
    assert uses_chat_template(cfg, tok) is False
    recs, _ = build_records(rows(p=["Once upon a time"]), cfg, tok, chat=False)
    assert recs[0].text == "Once upon a time"
    assert recs[0].token_ids == tok("Once upon a time")["input_ids"]


def test_chat_template_modes(smol_tokenizer, tiny_models):
    from transformers import AutoTokenizer

    assert uses_chat_template(DatasetConfig(), smol_tokenizer) is True
    assert uses_chat_template(DatasetConfig(chat_template="off"), smol_tokenizer) is False
    base = AutoTokenizer.from_pretrained(tiny_models["base"])
    with pytest.raises(ConfigError, match="dataset.chat_template=on"):
        uses_chat_template(DatasetConfig(chat_template="on"), base)
    with pytest.raises(ConfigError, match="dataset.messages_column"):
        uses_chat_template(DatasetConfig(messages_column="m"), base)


def test_template_with_column_fields_and_kept_columns(smol_tokenizer):
    cfg = DatasetConfig(
        prompt_column=None,
        template="Translate to {lang}: {text}",
        id_column="uid",
        keep_columns=["lang"],
    )
    data = rows(text=["good morning"], lang=["German"], uid=[17])
    rec = build_records(data, cfg, smol_tokenizer, chat=False)[0][0]
    assert rec.text == "Translate to German: good morning"
    assert rec.id == "17"
    assert rec.kept == {"lang": "German"}


@pytest.mark.parametrize(
    "bad,why", [(None, "missing"), ("", "empty"), ("   ", "empty"), (5, "not a string: int")]
)
def test_bad_prompt_rows_are_collected_with_reason(smol_tokenizer, bad, why):
    data = rows(p=["fine", bad, "also fine"], uid=["a", "b", "c"])
    cfg = DatasetConfig(prompt_column="p", id_column="uid")
    recs, bad_rows = build_records(data, cfg, smol_tokenizer, True)
    assert [r.id for r in recs] == ["a", "c"] and [r.index for r in recs] == [0, 2]
    assert [(b.index, b.id) for b in bad_rows] == [(1, "b")]
    assert bad_rows[0].reason.startswith("dataset.prompt_column 'p': " + why)
    with pytest.raises(DataError, match=r"1 row\(s\) have no usable prompt: id 'b'.*on_bad_row"):
        apply_bad_row_policy(bad_rows, "error")
    assert apply_bad_row_policy(bad_rows, "skip") == bad_rows


@pytest.mark.parametrize(
    "bad", [[], "hello", [{"role": "user"}], [{"content": "x"}], [["user", "x"]], None]
)
def test_bad_messages_are_collected(smol_tokenizer, bad):
    good = [{"role": "user", "content": "hi"}]
    recs, bad_rows = build_records(
        rows(m=[good, bad]), DatasetConfig(messages_column="m"), smol_tokenizer, True
    )
    assert [r.id for r in recs] == ["0"]
    assert [b.id for b in bad_rows] == ["1"]
    assert "dataset.messages_column 'm': expected a non-empty list" in bad_rows[0].reason


def test_template_row_with_null_field_is_bad(smol_tokenizer):
    cfg = DatasetConfig(prompt_column=None, template="{a} and {b}")
    recs, bad_rows = build_records(rows(a=["x", "y"], b=[1, None]), cfg, smol_tokenizer, False)
    assert [r.text for r in recs] == ["x and 1"]
    assert bad_rows[0].reason == "dataset.template field 'b': missing (null)"


def test_duplicate_ids_refused(smol_tokenizer):
    data = rows(p=["a", "b", "c"], uid=["x", "y", "x"])
    with pytest.raises(DataError, match="not unique.*'x'"):
        build_records(data, DatasetConfig(prompt_column="p", id_column="uid"), smol_tokenizer, True)


def test_every_row_bad_gives_no_records(smol_tokenizer):
    recs, bad_rows = build_records(
        rows(p=[None, ""]), DatasetConfig(prompt_column="p"), smol_tokenizer, True
    )
    assert recs == [] and [b.id for b in bad_rows] == ["0", "1"]


MIXED = [
    {"m": [{"role": "user", "content": "from messages"}], "p": None},
    {"m": None, "p": "from the prompt"},
    {"m": [{"role": "user", "content": "both set"}], "p": "unused"},
    {"m": None, "p": None},
    {"m": [], "p": "not used: the messages are there, and bad"},
]


def test_a_row_uses_its_messages_else_its_prompt(smol_tokenizer):
    data = rows(m=[r["m"] for r in MIXED], p=[r["p"] for r in MIXED])
    cfg = DatasetConfig(messages_column="m", prompt_column="p", system_prompt="Be brief.")
    recs, bad = build_records(data, cfg, smol_tokenizer, chat=True)
    alike = DatasetConfig(prompt_column="p", system_prompt="Be brief.")
    as_prompt = build_records(rows(p=["from the prompt"]), alike, smol_tokenizer, True)[0]
    assert [r.index for r in recs] == [0, 1, 2]
    assert "from messages" in recs[0].text and "both set" in recs[2].text
    assert (recs[1].text, recs[1].token_ids) == (as_prompt[0].text, as_prompt[0].token_ids)
    assert all(r.text.startswith("<|im_start|>system\nBe brief.") for r in recs)
    assert [(b.index, b.reason[:44]) for b in bad] == [
        (3, "dataset.messages_column 'm': missing (null),"),
        (4, "dataset.messages_column 'm': expected a non-"),
    ]
    assert bad[0].reason.endswith("and dataset.prompt_column 'p': missing (null)")


def test_without_a_chat_template_plain_rows_stay_raw(smol_tokenizer):
    data = rows(m=[MIXED[0]["m"], None], p=[None, "raw text"])
    cfg = DatasetConfig(messages_column="m", prompt_column="p", chat_template="off")
    recs, bad = build_records(data, cfg, smol_tokenizer, chat=False)
    assert bad == [] and recs[1].text == "raw text"
    assert recs[1].token_ids == smol_tokenizer("raw text").input_ids  # its special tokens
    assert recs[0].text.startswith("<|im_start|>")
    assert recs[0].token_ids == smol_tokenizer(recs[0].text, add_special_tokens=False).input_ids


def test_without_the_prompt_column_every_row_is_its_messages(smol_tokenizer):
    data = rows(m=[MIXED[0]["m"], None])
    recs, bad = build_records(
        data, DatasetConfig(messages_column="m", prompt_column="p"), smol_tokenizer, True
    )
    assert [r.index for r in recs] == [0] and bad[0].reason.startswith(
        "dataset.messages_column 'm': expected a non-empty list"
    )
