"""Constrained decoding on a tiny random model: unconstrained it writes garbage, so every finished
sample that parses and validates was made so by the grammar mask."""

from __future__ import annotations

import json
from dataclasses import replace

import engines
import jsonschema
import pytest
import torch

from batchgen import Generator
from batchgen.config import RunnerConfig, SamplingConfig
from batchgen.conversion import schema_text
from batchgen.engine import choice
from batchgen.engine.choice import choose_engine
from batchgen.engine.constrained import (
    Constraint,
    GrammarConstraint,
    constraint_processor,
    grammar,
    grammar_cache,
    is_valid,
)
from batchgen.errors import ConfigError
from batchgen.inputs.prompts import PromptRecord

# Small enough for a random model to finish: bounded integers, enums, a short array.
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["ok", "n", "color", "tags"],
    "additionalProperties": False,
}
SCHEMA_TEXT = schema_text(json.dumps(SCHEMA), "test")
OTHER_TEXT = schema_text(json.dumps({"enum": ["yes", "no"]}), "test")
REGEX = r"[0-9]{3}-[a-z]{1,4}"
# Different lengths, so rows are left-padded differently within a batch.
PROMPTS = [
    "hi",
    "a much longer prompt with many more words in it than the others",
    "mid size",
    "x y",
]
JSON_SAMPLING = {"max_new_tokens": 40, "json_schema": SCHEMA_TEXT}
SAMPLED = {**JSON_SAMPLING, "do_sample": True, "temperature": 0.8, "top_p": 0.9}


@pytest.fixture(scope="module")
def gens(tiny_models) -> dict[int, Generator]:
    """The tiny chat model at batch sizes 1 and 4."""
    return {
        b: Generator(str(tiny_models["chat"]), progress=False, runner={"batch_size": b})
        for b in (1, 4)
    }


def assert_finished_valid(outs, sampling: SamplingConfig) -> None:
    finished = [c for c in outs if c.finish_reason == "stop"]
    assert len(finished) >= len(outs) // 2, [c.response for c in outs]
    for c in finished:
        assert is_valid(c.response, sampling), c.response


def test_unconstrained_output_is_garbage(gens):
    outs = gens[4].generate(PROMPTS, {"max_new_tokens": 16})
    assert not any(is_valid(c.response, SamplingConfig(json_schema=SCHEMA_TEXT)) for c in outs)


def test_greedy_json_schema(gens):
    outs = gens[4].generate(PROMPTS, JSON_SAMPLING)
    assert_finished_valid(outs, SamplingConfig(json_schema=SCHEMA_TEXT))
    for c in outs:
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.response), SCHEMA)


def test_inline_schema_is_read_by_the_api(gens):
    # Generator runs read_json_schema: spaced, unsorted JSON text works like the canonical one.
    outs = gens[4].generate(PROMPTS[:2], {**JSON_SAMPLING, "json_schema": json.dumps(SCHEMA)})
    assert [c.response for c in outs] == [
        c.response for c in gens[4].generate(PROMPTS[:2], JSON_SAMPLING)
    ]


def test_sampled_json_schema_with_two_samples(gens):
    outs = gens[4].generate(PROMPTS, {**SAMPLED, "num_return_sequences": 2})
    assert len(outs) == 2 * len(PROMPTS)
    assert_finished_valid(outs, SamplingConfig(json_schema=SCHEMA_TEXT))
    assert len({c.response for c in outs}) > 1


def test_regex(gens):
    outs = gens[4].generate(PROMPTS, {"max_new_tokens": 16, "regex": REGEX})
    assert all(c.finish_reason == "stop" for c in outs), [c.response for c in outs]
    assert all(is_valid(c.response, SamplingConfig(regex=REGEX)) for c in outs)


def test_encoder_decoder(tiny_models):
    """Processors see the decoder's ids there: one start token before the first new one."""
    gen = Generator(str(tiny_models["t5"]), progress=False, runner={"batch_size": 4})
    outs = gen.generate(PROMPTS, {"max_new_tokens": 16, "regex": REGEX})
    assert all(c.finish_reason == "stop" for c in outs), [c.response for c in outs]
    assert all(is_valid(c.response, SamplingConfig(regex=REGEX)) for c in outs)


@pytest.mark.parametrize("sampling", [JSON_SAMPLING, {**SAMPLED, "num_return_sequences": 2}])
def test_batch_invariant(gens, sampling):
    alone = [c.response for c in gens[1].generate(PROMPTS, sampling)]
    batched = [c.response for c in gens[4].generate(PROMPTS, sampling)]
    assert batched == alone


def test_ignore_eos_pads_a_complete_row_with_eos(gens):
    outs = gens[4].generate(PROMPTS[:2], {**JSON_SAMPLING, "ignore_eos": True})
    assert all(c.finish_reason == "length" and c.completion_tokens == 40 for c in outs)
    assert all(is_valid(c.response, SamplingConfig(json_schema=SCHEMA_TEXT)) for c in outs)


def test_rows_with_their_own_constraints_share_a_batch(tiny_models):
    """Per-row constraints (record.sampling): each row's output is the one it gets alone."""
    job = SamplingConfig(max_new_tokens=40)
    engine, tok = engines.load(tiny_models["chat"], job)
    own = [None, replace(job, json_schema=SCHEMA_TEXT), replace(job, regex=REGEX)]
    own.append(replace(job, json_schema=OTHER_TEXT))
    recs = [
        PromptRecord(i, str(i), t, tok(t)["input_ids"], sampling=s)
        for i, (t, s) in enumerate(zip(PROMPTS, own, strict=True))
    ]
    batched = [s.text for (s,) in engine.generate(recs, seed=0)]
    alone = [engine.generate([r], seed=0)[0][0].text for r in recs]
    assert batched == alone
    assert is_valid(batched[0], job) is None
    assert not is_valid(batched[0], replace(job, json_schema=SCHEMA_TEXT))
    assert all(is_valid(text, s) for text, s in zip(batched[1:], own[1:], strict=True))


def test_processor_masks_ends_and_survives_padding(smol_tokenizer):
    tok = smol_tokenizer
    eos = tok.eos_token_id
    proc = GrammarConstraint([Constraint("regex", "ab"), None], tok, [eos], prompt_width=2)
    scores = torch.zeros(2, len(tok))  # (R, V)
    prompt = torch.zeros(2, 2, dtype=torch.long)
    first = proc(prompt, scores)
    assert torch.isinf(first[0]).sum() > len(tok) - 10  # only "a" or "ab"-like tokens left
    assert not torch.isinf(first[1]).any()  # the unconstrained row is untouched
    assert first[0, eos] == float("-inf")  # not complete yet
    ab = tok("ab", add_special_tokens=False)["input_ids"]
    ids = torch.cat([prompt, torch.tensor([ab] * 2)], dim=1)  # the grammar is now complete
    done = proc(ids, scores)
    assert (done[0] > float("-inf")).nonzero().view(-1).tolist() == [eos]
    # The row emits EOS, then generate pads it (a pad that is not an EOS id here): no error.
    pad = 5
    for token in (eos, pad, pad):
        ids = torch.cat([ids, torch.tensor([[token], [token]])], dim=1)
        assert (proc(ids, scores)[0] > float("-inf")).nonzero().view(-1).tolist() == [eos]


def test_processor_padded_vocabulary(smol_tokenizer):
    """Logit ids past the tokenizer's (a model's padded lm_head): never for a constrained row,
    untouched for an unconstrained one."""
    tok = smol_tokenizer
    proc = GrammarConstraint([Constraint("regex", "a+"), None], tok, [tok.eos_token_id], 1)
    out = proc(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, len(tok) + 64))
    assert torch.isinf(out[0, len(tok) :]).all() and not torch.isinf(out[1]).any()


def test_processor_forbidden_token_stops_the_row(smol_tokenizer):
    """A token the mask forbade (a pad after a stop string) leaves only EOS, no exception."""
    tok = smol_tokenizer
    eos = tok.eos_token_id
    proc = GrammarConstraint([Constraint("regex", "[0-9]+")], tok, [eos], prompt_width=1)
    scores = torch.zeros(1, len(tok))
    proc(torch.zeros(1, 1, dtype=torch.long), scores)
    letters = tok("zz", add_special_tokens=False)["input_ids"][:1]
    out = proc(torch.tensor([[0, *letters]]), scores)
    assert (out[0] > float("-inf")).nonzero().view(-1).tolist() == [eos]


def test_grammars_compile_once_per_tokenizer(smol_tokenizer):
    cache = grammar_cache(smol_tokenizer, [smol_tokenizer.eos_token_id])
    assert grammar_cache(smol_tokenizer, [smol_tokenizer.eos_token_id]) is cache
    c = Constraint("json_schema", SCHEMA_TEXT)
    first = cache.matcher(c)
    template = cache.templates[c]
    assert cache.matcher(c) is not first and cache.templates[c] is template


def test_no_constraint_no_processor(smol_tokenizer):
    recs = [PromptRecord(0, "0", "hi", [1, 2])]
    eos = {smol_tokenizer.eos_token_id}
    assert constraint_processor(recs, SamplingConfig(), 1, smol_tokenizer, eos, 2) is None
    with_regex = SamplingConfig(regex=REGEX)
    proc = constraint_processor(recs, with_regex, 2, smol_tokenizer, eos, 2)
    assert len(proc.rows) == 2


@pytest.mark.parametrize(
    ("constraint", "key"),
    [
        (Constraint("regex", "(?=a)b"), "sampling.regex"),
        (Constraint("json_schema", '{"not":{"type":"string"}}'), "sampling.json_schema"),
    ],
)
def test_unenforceable_constraint_names_the_key(constraint, key):
    with pytest.raises(ConfigError, match=key):
        grammar(constraint)


def test_is_valid():
    schema = SamplingConfig(json_schema=SCHEMA_TEXT)
    assert is_valid('{"color":"red","n":3,"ok":true,"tags":[]}', schema) is True
    assert is_valid('{"color":"pink","n":3,"ok":true,"tags":[]}', schema) is False
    assert is_valid('{"color":"red","n":3', schema) is False  # cut by max_new_tokens
    regex = SamplingConfig(regex=REGEX)
    assert is_valid("123-abc", regex) is True
    assert is_valid("123-abc!", regex) is False
    assert is_valid("anything", SamplingConfig()) is None


@pytest.mark.parametrize("key", ["json_schema", "regex"])
def test_continuous_engine_refuses_constraints(key, monkeypatch):
    sampling = SamplingConfig(**{key: SCHEMA_TEXT if key == "json_schema" else REGEX})
    monkeypatch.setattr(choice, "AUTO_CONTINUOUS_DEVICES", ("cpu",))
    assert (
        choose_engine(RunnerConfig(engine="auto"), SamplingConfig(), False, "cpu") == "continuous"
    )
    assert choose_engine(RunnerConfig(engine="auto"), sampling, False, "cpu") == "static"
    with pytest.raises(ConfigError, match=f"sampling.{key}"):
        choose_engine(RunnerConfig(engine="continuous"), sampling, False, "cpu")
