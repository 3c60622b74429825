"""The run's identity: a local source is its rows, whatever spells it; a hub dataset its name."""

from __future__ import annotations

import pytest

from batchgen.config import JobConfig
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
    assert manifest.respelled(parts(before), parts(now))


@pytest.mark.parametrize(
    "before,now",
    [
        ("openai/gsm8k", "/data/gsm8k.jsonl"),  # a hub dataset is its name
        ("openai/gsm8k", "other/gsm8k"),
    ],
)
def test_hub_names_are_not_respellings(before, now):
    assert not manifest.respelled(parts(before), parts(now))


def test_a_respelled_source_with_other_rows_or_settings_is_another_run():
    assert not manifest.respelled(parts("a.jsonl", 12), parts("/x/a.jsonl", 13))
    changed = parts("/x/a.jsonl")
    changed["sampling"]["max_new_tokens"] = 9
    assert not manifest.respelled(parts("a.jsonl"), changed)


def test_prompt_rows_beside_messages_are_another_run_and_only_they():
    cfg = JobConfig()
    cfg.dataset.messages_column = "messages"
    alone = manifest.fingerprint_parts(cfg, True, "float32", 12)
    mixed = manifest.fingerprint_parts(cfg, True, "float32", 12, mixed=True)
    assert "messages_else_plain" not in alone["prompts"]  # older folders of messages resume
    assert mixed["prompts"]["messages_else_plain"] is True
    assert manifest.fingerprint(alone) != manifest.fingerprint(mixed)
