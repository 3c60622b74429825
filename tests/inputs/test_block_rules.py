"""Per-block verdicts in Arrow: the Python rules' answers, value by value."""

from __future__ import annotations

import pyarrow as pa

from batchgen.inputs import block_rules
from batchgen.inputs.prompts import messages_problem


def test_bad_text_is_null_blank_or_no_string():
    block = pa.array(["fine", None, "", " \u3000 ", "x "])
    assert block_rules.bad_text(block).tolist() == [False, True, True, True, False]
    assert block_rules.bad_text(pa.array([1, 2])).tolist() == [True, True]


def test_messages_follow_the_python_rule_and_bound_their_bytes():
    good = [{"role": "user", "content": "héllo"}]
    values = [good, [], None, [{"role": "user", "content": None}]]
    block = pa.array(values)
    bad, size = block_rules.messages(block)
    assert bad.tolist() == [messages_problem(v) is not None for v in values]
    assert size[0] == len("user") + len("héllo".encode()) + block_rules.MESSAGE_SLACK
    assert block_rules.messages(pa.array(["a", "b"])) is None
    assert block_rules.bad_messages(pa.array(["a", "b"])).tolist() == [True, True]
