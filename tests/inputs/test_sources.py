"""Prompt sources: which columns a config reads, and when a row falls back to its prompt."""

from __future__ import annotations

from batchgen.config import DatasetConfig
from batchgen.inputs.sources import falls_back, needed_columns, plain_fields


def test_the_plain_source_is_the_template_else_the_prompt_column():
    assert plain_fields(DatasetConfig(prompt_column="p")) == ["p"]
    assert plain_fields(DatasetConfig(prompt_column="p", template="{a} {b}")) == ["a", "b"]
    assert plain_fields(DatasetConfig(prompt_column=None)) == []


def test_messages_fall_back_only_where_the_data_has_the_plain_source():
    both = DatasetConfig(messages_column="m", prompt_column="p")
    assert falls_back(both, ["m", "p"])
    assert not falls_back(both, ["m"])  # the schema's default prompt column, not in the data
    assert not falls_back(DatasetConfig(prompt_column="p"), ["m", "p"])  # no messages at all
    templated = DatasetConfig(messages_column="m", template="{a} {b}")
    assert falls_back(templated, ["m", "a", "b"]) and not falls_back(templated, ["m", "a"])


def test_beside_messages_the_plain_source_is_not_required():
    cfg = DatasetConfig(messages_column="m", prompt_column="p", id_column="u", keep_columns=["k"])
    assert needed_columns(cfg) == ["m", "u", "k"]
    assert needed_columns(DatasetConfig(prompt_column=None, template="{a}{b}")) == ["a", "b"]
