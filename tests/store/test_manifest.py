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
