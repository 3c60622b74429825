"""The run's identity: a local source is its rows, whatever spells it; a hub dataset its name."""

from __future__ import annotations

import pytest

from batchgen.config import JobConfig, ModelConfig
from batchgen.store import manifest


def parts(source: str, rows: int = 12) -> dict:
    cfg = JobConfig()
    cfg.dataset.path = source
    return manifest.fingerprint_parts(cfg, True, "float32", rows)


@pytest.mark.parametrize(
    "before,now",
    [
        ("prompts.jsonl", "/data/run/prompts.jsonl"),
        ("./in/prompts.jsonl", "/elsewhere/copy.jsonl"),
        ("pkg:batchgen/conf/dataset/sample_prompts.jsonl", "/tmp/sample_prompts.jsonl"),
        ("~/prompts.parquet", "prompts.parquet"),
    ],
)
def test_local_spellings_of_one_run_are_one_run(before, now):
    assert manifest.same_run(parts(before), parts(now))


@pytest.mark.parametrize(
    "before,now",
    [
        ("openai/gsm8k", "/data/gsm8k.jsonl"),  # a hub dataset is its name
        ("openai/gsm8k", "other/gsm8k"),
    ],
)
def test_hub_names_are_not_respellings(before, now):
    assert manifest.same_run(parts(before), parts(now)) is None


def test_a_respelled_source_with_other_rows_or_settings_is_another_run():
    assert manifest.same_run(parts("a.jsonl", 12), parts("/x/a.jsonl", 13)) is None
    changed = parts("/x/a.jsonl")
    changed["sampling"]["max_new_tokens"] = 9
    assert manifest.same_run(parts("a.jsonl"), changed) is None


def test_model_settings_at_their_default_leave_the_fingerprint_as_it_was(tmp_path):
    parts = manifest.fingerprint_parts(JobConfig(), chat=True, dtype="float32", num_rows=3)
    # The model keys of batchgen 0.1.0: a folder written before the later settings resumes.
    assert list(parts["model"]) == [
        "name_or_path",
        "gguf_file",
        "revision",
        "dtype",
        "pad_token",
        "max_context",
    ]
    # Where the weights sit is no part of it: a split generates the plain load's tokens.
    split = JobConfig(model=ModelConfig(device_map="auto", max_memory={"cpu": "1GB"}))
    assert manifest.fingerprint_parts(split, True, "float32", 3) == parts
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    adapted = JobConfig(model=ModelConfig(quantization="int8", adapter="x"))
    model = manifest.fingerprint_parts(adapted, True, "float32", 3, adapter=str(adapter))["model"]
    assert (model["quantization"], model["merge_adapter"]) == ("int8", True)
    (adapter / "adapter_config.json").write_text('{"r": 8}')  # another adapter, same path
    again = manifest.fingerprint_parts(adapted, True, "float32", 3, adapter=str(adapter))["model"]
    assert again["adapter"] != model["adapter"]


def test_prompt_rows_beside_messages_are_another_run_and_only_they():
    cfg = JobConfig()
    cfg.dataset.messages_column = "messages"
    alone = manifest.fingerprint_parts(cfg, True, "float32", 12)
    mixed = manifest.fingerprint_parts(cfg, True, "float32", 12, mixed=True)
    assert "messages_else_plain" not in alone["prompts"]  # older folders of messages resume
    assert mixed["prompts"]["messages_else_plain"] is True
    assert manifest.fingerprint(alone) != manifest.fingerprint(mixed)
