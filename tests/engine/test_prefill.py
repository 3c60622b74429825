"""Chunked prefill: chunk planning; generating from the prefilled cache equals plain generate."""

from __future__ import annotations

import random

import engines
import pytest
import torch

from batchgen.config import SamplingConfig
from batchgen.engine import static as engine_module
from batchgen.engine.prefill import PAD_TOLERANCE, prefill, prefill_chunks, supports_prefill
from batchgen.engine.static import StaticEngine
from batchgen.inputs.prompts import PromptRecord

# From one word to a few hundred tokens, so chunks of several lengths form.
TEXTS = [
    "hi",
    "a much longer prompt with many more words in it than the first " * 6,
    "mid size text about the weather",
    "short one",
    "the committee reviewed the quarterly figures and the supplier contracts " * 3,
    "x",
    "mid size text about the harbour",
    # One token apart: a chunk with a pad, whose positions must still start at its first token.
    "mid size text about the harbour and the boats",
    "mid size text about the harbour and boats",
]


def load(path, sampling: SamplingConfig, prefill_tokens: int = 4096) -> engines.Bound:
    return engines.load(path, sampling, prefill_tokens=prefill_tokens)[0]


def records(tok, texts=TEXTS, chat=False):
    """Raw prompts, or chat prompts that all start with the template's system header."""
    if chat:
        chats = [[{"role": "user", "content": t}] for t in texts]
        ids = [tok.apply_chat_template(c, add_generation_prompt=True)["input_ids"] for c in chats]
        return [PromptRecord(i, str(i), t, ids[i]) for i, t in enumerate(texts)]
    return [PromptRecord(i, str(i), t, tok(t)["input_ids"]) for i, t in enumerate(texts)]


def plain(engine: engines.Bound, recs, seed: int, monkeypatch) -> list:
    """The same batch through generate()'s own prefill (the fallback path)."""
    with monkeypatch.context() as m:
        m.setattr(engine_module, "prefill", lambda *a, **k: None)
        return engine.generate(recs, seed)


@pytest.mark.parametrize("seed", range(5))
def test_chunks_cover_every_row_once_within_bounds(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([0, 1, rng.randint(2, 40), rng.randint(100, 400)]) for _ in range(60)]
    cap = rng.choice([16, 256, 2048])
    chunks = prefill_chunks(lengths, cap)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    firsts = [lengths[c[0]] for c in chunks]
    assert firsts == sorted(firsts, reverse=True)  # longest first
    for chunk in chunks:
        width = lengths[chunk[0]]
        assert all(lengths[i] <= width for i in chunk)
        if len(chunk) > 1:  # one row alone may exceed the bounds; a group never does
            slots = width * len(chunk)
            assert slots <= cap
            assert slots - sum(lengths[i] for i in chunk) <= PAD_TOLERANCE * slots


def test_similar_lengths_share_a_chunk():
    assert prefill_chunks([10, 300, 10, 9, 290, 10], 4096) == [[1, 4], [0, 2, 5, 3]]


@pytest.mark.parametrize("model", ["chat", "nopad"])
@pytest.mark.parametrize("prefill_tokens", [1, 64, 4096])
@pytest.mark.parametrize("chat", [False, True])
def test_greedy_from_prefilled_cache_equals_plain_generate(
    tiny_models, monkeypatch, model, prefill_tokens, chat
):
    engine = load(tiny_models[model], SamplingConfig(max_new_tokens=10), prefill_tokens)
    recs = records(engine.tokenizer, chat=chat)
    chunked = engine.generate(recs, seed=0)
    padded_by_chunks = engine.padded_tokens
    reference = plain(engine, recs, 0, monkeypatch)
    assert chunked == reference
    # The chunks computed far fewer pad slots than the padded batch (its pads: the rest).
    assert padded_by_chunks < engine.padded_tokens - padded_by_chunks


def test_samples_from_prefilled_cache_equal_plain_generate(tiny_models, monkeypatch):
    sampling = SamplingConfig(
        do_sample=True, temperature=1.0, top_p=0.9, num_return_sequences=3, max_new_tokens=8
    )
    engine = load(tiny_models["chat"], sampling, prefill_tokens=32)
    recs = records(engine.tokenizer, chat=True)
    chunked = engine.generate(recs, seed=7)
    assert chunked == plain(engine, recs, 7, monkeypatch)
    # Each prompt is prefilled once for its three samples, yet the samples differ.
    assert any(len({s.text for s in samples}) > 1 for samples in chunked)


def test_stop_strings_and_repetition_penalty_survive_prefill(tiny_models, monkeypatch):
    engine = load(tiny_models["chat"], SamplingConfig(max_new_tokens=12, repetition_penalty=1.3))
    recs = records(engine.tokenizer)
    text = engine.generate(recs, seed=0)[1][0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip()
    engine = load(
        tiny_models["chat"],
        SamplingConfig(max_new_tokens=12, repetition_penalty=1.3, stop=[stop]),
    )
    chunked = engine.generate(recs, seed=0)
    assert chunked == plain(engine, recs, 0, monkeypatch)
    assert chunked[1][0].finish_reason == "stop" and stop not in chunked[1][0].text


@pytest.mark.parametrize("chat", [False, True])
def test_cache_layout_matches_one_prompt_alone(tiny_models, chat):
    """The cache holds each row's prompt right-aligned at T-1, as its own forward pass makes it."""
    from transformers import DynamicCache

    engine = load(tiny_models["chat"], SamplingConfig(max_new_tokens=4), prefill_tokens=16)
    prompts = [r.token_ids for r in records(engine.tokenizer, chat=chat)]
    longest = max(len(p) for p in prompts)
    filled = prefill(engine.model, prompts, 2, engine.decoder.pad_id, longest - 1 + 4, 16)
    # The chat template's header is computed once for all rows; raw texts share nothing.
    assert (filled.shared > 10) if chat else (filled.shared == 0)
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            ids = torch.tensor([p[:-1]])
            if not p[:-1]:
                continue
            out = engine.model(input_ids=ids, cache=DynamicCache(config=engine.model.config))
            for layer, ref in zip(filled.cache.layers, out.cache.layers, strict=True):
                for copy in (2 * i, 2 * i + 1):
                    cached = layer.keys[copy, :, longest - len(p) : longest - 1]
                    torch.testing.assert_close(cached, ref.keys[0], rtol=1e-4, atol=1e-5)
                    values = layer.values[copy, :, longest - len(p) : longest - 1]
                    torch.testing.assert_close(values, ref.values[0], rtol=1e-4, atol=1e-5)
    assert int(filled.cache.get_seq_length()) == longest - 1


def test_one_token_prompts_and_sliding_windows_fall_back(tiny_models, tmp_path):
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    engine = load(tiny_models["chat"], SamplingConfig(max_new_tokens=4))
    assert prefill(engine.model, [[5], [7]], 1, engine.decoder.pad_id, 4, 64) is None
    torch.manual_seed(0)
    windowed = MistralForCausalLM(
        MistralConfig(
            vocab_size=engine.model.config.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=4,
        )
    ).eval()
    assert prefill(windowed, [[5, 6, 7], [7, 8]], 1, 0, 6, 64) is None
    windowed.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_models["chat"]).save_pretrained(tmp_path)
    engine = load(tmp_path, SamplingConfig(max_new_tokens=4))
    recs = records(engine.tokenizer)
    assert all(s[0].completion_tokens for s in engine.generate(recs, seed=0))


def test_compile_reuses_one_bucketed_cache_length_without_changing_outputs(tiny_models):
    sampling = SamplingConfig(max_new_tokens=6)
    engine = load(tiny_models["chat"], sampling)
    recs = records(engine.tokenizer, chat=True)
    reference = engine.generate(recs, seed=0)
    compiled = engines.Bound(  # no-op on the CPU
        StaticEngine(engine.source_model, engine.tokenizer, compile=True), sampling
    )
    assert not compiled.model.generation_config.disable_compile
    assert compiled.generate(recs, seed=0) == reference
    assert compiled.cache_len == 256
    short = sorted(recs, key=lambda r: len(r.token_ids))[:2]
    assert compiled.generate(short, seed=0) == engine.generate(short, seed=0)
    assert compiled.cache_len == 256  # shorter batches reuse the longer shape


@pytest.mark.parametrize(
    "setting", [{"use_cache": False}, {"cache_implementation": "dynamic"}], ids=str
)
def test_repo_generation_settings_do_not_break_prefill(tiny_models, monkeypatch, setting):
    """Repos saved with gradient checkpointing say use_cache=false; some name their own cache."""
    model, tok = engines.load_model(tiny_models["chat"])
    for key, value in setting.items():
        setattr(model.generation_config, key, value)
    engine = engines.Bound(StaticEngine(model, tok), SamplingConfig(max_new_tokens=6))
    recs = records(tok, chat=True)
    assert engine.generate(recs, seed=0) == plain(engine, recs, 0, monkeypatch)
    assert engine.padded_tokens < engine.cache_pad_slots  # the chunked path ran


def test_recurrent_model_generates_the_plain_way(tiny_models, tmp_path):
    from transformers import AutoTokenizer, RwkvConfig, RwkvForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_models["chat"])
    torch.manual_seed(0)
    rwkv = RwkvForCausalLM(
        RwkvConfig(
            vocab_size=len(tok),
            hidden_size=16,
            attention_hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
        )
    ).eval()
    assert not supports_prefill(rwkv)
    rwkv.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    engine = load(tmp_path, SamplingConfig(max_new_tokens=4))
    recs = records(engine.tokenizer)
    assert all(s[0].completion_tokens for s in engine.generate(recs, seed=0))
