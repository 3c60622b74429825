"""The static engine: left padding, slicing, finish reasons, stop strings, samples,
encoder-decoder."""

from __future__ import annotations

import pytest
from engines import load

from batchgen.config import ModelConfig, SamplingConfig
from batchgen.engine import devices
from batchgen.engine.static import StaticEngine, decode_bucket
from batchgen.inputs.prompts import PromptRecord

TEXTS = ["hello", "a much longer prompt with many more words in it than the first", "mid size text"]


def records(tok, texts=TEXTS):
    return [PromptRecord(i, str(i), t, tok(t)["input_ids"]) for i, t in enumerate(texts)]


def test_pad_fallback_is_eos_and_padding_left(tiny_models):
    engine, tok = load(tiny_models["nopad"], SamplingConfig(max_new_tokens=4))
    assert tok.pad_token == tok.eos_token
    assert tok.padding_side == "left"
    assert engine.model.generation_config.pad_token_id == tok.eos_token_id


def test_batched_greedy_equals_one_at_a_time_without_pad_token(tiny_models):
    engine, tok = load(tiny_models["nopad"], SamplingConfig(max_new_tokens=12))
    recs = records(tok)
    batched = engine.generate(recs, seed=0)
    single = [engine.generate([r], seed=0)[0] for r in recs]
    assert [[s.text for s in b] for b in batched] == [[s.text for s in b] for b in single]
    assert all(
        b[0].completion_tokens == s[0].completion_tokens
        for b, s in zip(batched, single, strict=True)
    )


def test_prompt_is_sliced_off(tiny_models):
    engine, tok = load(tiny_models["chat"], SamplingConfig(max_new_tokens=6))
    recs = records(tok)
    for rec, (sample,) in zip(recs, engine.generate(recs, seed=0), strict=True):
        assert sample.completion_tokens == 6 and sample.finish_reason == "length"
        assert not sample.text.startswith(rec.text)
        # Decoding the sample's own tokens alone reproduces it: nothing of the prompt leaked in.
        assert len(tok(sample.text, add_special_tokens=False)["input_ids"]) <= 6 + 2


def test_finish_reasons_from_token_rows(tiny_models):
    engine, tok = load(tiny_models["chat"], SamplingConfig(max_new_tokens=5))
    eos, pad = tok.eos_token_id, tok.pad_token_id
    a, b = tok("alpha beta", add_special_tokens=False)["input_ids"][:2]
    stop = engine.sample([a, b, eos, pad, pad])
    assert (stop.finish_reason, stop.completion_tokens) == ("stop", 3)
    assert stop.text == tok.decode([a, b])
    full = engine.sample([a, b, a, b, a])
    assert (full.finish_reason, full.completion_tokens) == ("length", 5)


def test_stop_string_is_cut_and_counted(tiny_models):
    sampling = SamplingConfig(max_new_tokens=6, stop=["beta"])
    engine, tok = load(tiny_models["chat"], sampling)
    ids = tok(" alpha beta gamma", add_special_tokens=False)["input_ids"]
    # The model stopped after the token completing "beta"; generate padded the rest with the
    # pad token, which is EOS for this tokenizer and must not be counted.
    cut = next(i for i in range(1, len(ids) + 1) if "beta" in tok.decode(ids[:i]))
    row = ids[:cut] + [tok.pad_token_id] * 2
    sample = engine.sample(row)
    assert sample.finish_reason == "stop"
    assert sample.text == " alpha "
    assert sample.completion_tokens == cut


def test_stop_strings_reach_generate(tiny_models):
    engine, tok = load(tiny_models["chat"], SamplingConfig(max_new_tokens=10))
    free = engine.generate(records(tok, ["hello"]), seed=0)[0][0].text
    word = free.split()[1] if len(free.split()) > 1 else free.split()[0]
    engine2, _ = load(tiny_models["chat"], SamplingConfig(max_new_tokens=10, stop=[word]))
    sample = engine2.generate(records(tok, ["hello"]), seed=0)[0][0]
    assert word not in sample.text
    assert free.startswith(sample.text)
    assert sample.finish_reason == "stop"


def test_num_return_sequences_and_seed(tiny_models):
    sampling = SamplingConfig(max_new_tokens=8, do_sample=True, num_return_sequences=3)
    engine, tok = load(tiny_models["chat"], sampling)
    recs = records(tok)
    out = engine.generate(recs, seed=7)
    assert [len(o) for o in out] == [3, 3, 3]
    assert len({s.text for s in out[0]}) > 1
    again = engine.generate(recs, seed=7)
    assert [[s.text for s in o] for o in out] == [[s.text for s in o] for o in again]


def test_encoder_decoder_uses_seq2seq_and_no_slicing(tiny_models):
    engine, tok = load(tiny_models["t5"], SamplingConfig(max_new_tokens=5))
    assert engine.encoder_decoder
    assert type(engine.model).__name__ == "T5ForConditionalGeneration"
    assert tok.padding_side == "right"
    recs = records(tok)
    batched = engine.generate(recs, seed=0)
    single = [engine.generate([r], seed=0)[0] for r in recs]
    for (b,), (s,) in zip(batched, single, strict=True):
        assert b.text == s.text
        assert 1 <= b.completion_tokens <= 5


@pytest.mark.parametrize(
    "device,dtype,expected",
    [("cpu", "auto", ("cpu", "float32")), ("cpu", "bfloat16", ("cpu", "bfloat16"))],
)
def test_device_dtype_resolution(device, dtype, expected, monkeypatch):
    monkeypatch.setattr(devices, "native_bf16", lambda: None)  # a CPU without native bf16
    assert devices.resolve_device_dtype(ModelConfig(device=device, dtype=dtype)) == expected


@pytest.mark.parametrize("model", ["chat", "t5"])
def test_each_decoding_step_reports_its_tokens(tiny_models, model):
    engine, tok = load(tiny_models[model], SamplingConfig(max_new_tokens=7))
    steps = []
    engine.on_step = steps.append
    outs = engine.generate(records(tok), seed=0)
    assert len(steps) >= 6 and max(steps) <= len(TEXTS)
    assert sum(steps) == sum(s.completion_tokens for row in outs for s in row)


def test_decode_buckets_are_few_and_waste_at_most_a_third():
    sizes = [decode_bucket(rows) for rows in range(1, 513)]
    assert sorted(set(sizes))[:10] == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    assert len(set(sizes)) == 18  # 512 batch sizes compile as 18 shapes
    assert all(rows <= size <= max(rows * 3 / 2, rows + 1) for rows, size in enumerate(sizes, 1))


def test_compiled_shapes_give_the_same_samples(tiny_models):
    """With runner.compile the batch is filled up to its bucket; every row's sample is kept."""
    sampling = SamplingConfig(max_new_tokens=6, do_sample=True, temperature=0.9)
    plain, tok = load(tiny_models["chat"], sampling)
    texts = [*TEXTS, "one more prompt", "and the fifth"]
    expected = plain.generate(records(tok, texts), seed=3)
    compiled = StaticEngine(plain.source_model, tok, compile=True)
    assert decode_bucket(len(texts)) == 6
    assert compiled.generate(records(tok, texts), 3, sampling) == expected
    assert compiled.cache_len % 256 == 0  # cache lengths in buckets too


def test_a_stop_ends_the_batch_at_the_next_step_keeping_finished_rows(tiny_models):
    """A stop request mid-batch: generate ends at the next decoding step, and the rows that had
    ended by themselves (here a stop string) come back complete, the rest not at all."""
    import threading

    from batchgen.errors import Interrupted

    free, tok = load(tiny_models["chat"], SamplingConfig(max_new_tokens=40))
    recs = records(tok)
    texts = [s.text for (s,) in free.generate(recs, 0)]
    # A word row 0 writes early and the others never do: row 0 ends there by itself.
    word = next(w for w in texts[0].split()[:4] if all(w not in t for t in texts[1:]))
    sampling = SamplingConfig(max_new_tokens=40, stop=[word])
    engine, _ = load(tiny_models["chat"], sampling)
    alone = engine.generate(recs[:1], 0)[0]
    engine.stop = threading.Event()
    steps = []

    def on_step(tokens):
        steps.append(tokens)
        if len(steps) == 30:  # row 0 has stopped; the others run on
            engine.stop.set()

    engine.on_step = on_step
    with pytest.raises(Interrupted) as stopped:
        engine.generate(recs, 0)
    assert len(steps) <= 31  # ended at the next step, not at 40
    assert [(r.index, samples) for r, samples in stopped.value.partial] == [(0, alone)]
