"""The row policies: bad rows refused or passed on, long prompts refused, skipped or cut."""

from __future__ import annotations

import pytest

from batchgen.config import DatasetConfig
from batchgen.errors import ConfigError, DataError
from batchgen.inputs.dataset import Rows
from batchgen.inputs.policies import apply_length_policy, bad_rows_error, check_room
from batchgen.inputs.prompts import Skipped, build_records


def rows(**columns) -> Rows:
    return Rows(columns=columns, kept_types={})


def test_bad_rows_error_names_the_lines_it_is_given():
    listed = [Skipped(0, "a", "empty"), Skipped(4, "e", "missing (null)")]
    message = str(bad_rows_error(listed, 2, {0: 1, 4: 7}))
    assert "id 'a' (row 0, line 1): empty; id 'e' (row 4, line 7): missing (null)" in message
    assert "line" not in str(bad_rows_error(listed, 2))


def _long_records(tok):
    data = rows(p=["short", "word " * 50, "tiny", "more words " * 40])
    return build_records(data, DatasetConfig(prompt_column="p"), tok, chat=False)[0]


def test_long_prompt_error_lists_ids(smol_tokenizer):
    with pytest.raises(DataError, match=r"2 prompt\(s\) exceed the 20 tokens.*\['1', '3'\]"):
        apply_length_policy(_long_records(smol_tokenizer), 20, "error", smol_tokenizer)


def test_long_prompt_skip_reports_rows(smol_tokenizer):
    kept, skipped = apply_length_policy(_long_records(smol_tokenizer), 20, "skip", smol_tokenizer)
    assert [r.id for r in kept] == ["0", "2"]
    assert [(s.index, s.id) for s in skipped] == [(1, "1"), (3, "3")]
    assert "20 tokens" in skipped[0].reason


def test_long_prompt_truncate_left_keeps_the_end(smol_tokenizer):
    recs = _long_records(smol_tokenizer)
    original = list(recs[3].token_ids)
    kept, skipped = apply_length_policy(recs, 20, "truncate_left", smol_tokenizer)
    assert skipped == [] and len(kept) == 4
    assert kept[3].token_ids == original[-20:]
    assert kept[3].text == smol_tokenizer.decode(original[-20:])
    assert kept[0].text == "short"


def test_no_room_for_prompt(smol_tokenizer):
    with pytest.raises(ConfigError, match="max_new_tokens"):
        check_room(0)
