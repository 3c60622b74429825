"""Log-probabilities: what the engine records equals one forward pass over prompt + completion."""

from __future__ import annotations

import engines
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from batchgen.config import RunnerConfig, SamplingConfig
from batchgen.engine import choice, static
from batchgen.engine.choice import choose_engine
from batchgen.engine.logprobs import RowLogprobs
from batchgen.errors import ConfigError
from batchgen.inputs.prompts import PromptRecord

TEXTS = [
    "hello",
    "a much longer prompt with many more words in it than the first",
    "mid size text",
    "two words",
]
GREEDY = SamplingConfig(max_new_tokens=8)
SAMPLED = SamplingConfig(max_new_tokens=8, do_sample=True, temperature=0.8, num_return_sequences=2)
TOLERANCE = 1e-4
# The tiny T5's logits are wide (initializer factor 5): the padded batch's encoder and the
# unpadded reference sum in another order, which moves a log-probability by up to 1.4e-4 under
# transformers 5.25.
ENCODER_DECODER_TOLERANCE = 5e-4
K = 5


def load(path, sampling: SamplingConfig, top: int = K, prefill_tokens: int = 2048):
    engine, tok = engines.load(
        path, sampling, prefill_tokens=prefill_tokens, logprobs=True, top_logprobs=top
    )
    return engine, engine.source_model, tok


def generate(engine: engines.Bound, tok, texts=TEXTS):
    """The samples, and each sample's kept token ids (the rows generate returned, cut)."""
    records = [PromptRecord(i, str(i), t, tok(t)["input_ids"]) for i, t in enumerate(texts)]
    outputs = []
    real = engine.model.generate

    def spy(**kwargs):
        outputs.append(real(**kwargs))
        return outputs[-1]

    engine.model.generate = spy  # the engine's own shallow copy of the model
    samples = engine.generate(records, seed=3)
    width = 1 if engine.encoder_decoder else max(len(r.token_ids) for r in records)
    rows = iter(outputs[0][:, width:].tolist())
    kept = [[next(rows)[: s.completion_tokens] for s in row] for row in samples]
    return records, samples, kept


def reference(model, prompt: list[int], tokens: list[int], encoder_decoder: bool) -> list[float]:
    """Log-probabilities of ``tokens`` after ``prompt`` from one forward pass, no cache."""
    with torch.inference_mode():
        if encoder_decoder:
            start = model.config.decoder_start_token_id
            logits = model(
                input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([[start, *tokens]])
            ).logits[0, : len(tokens)]  # (n, V): decoder position i predicts token i
        else:
            logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0]
            logits = logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]  # (n, V)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1).tolist()


def check(model, records, samples, kept, encoder_decoder=False, greedy=False, top=K):
    tolerance = ENCODER_DECODER_TOLERANCE if encoder_decoder else TOLERANCE
    checked = 0
    for record, row, row_ids in zip(records, samples, kept, strict=True):
        for sample, ids in zip(row, row_ids, strict=True):
            assert len(sample.logprobs) == len(ids) == sample.completion_tokens >= 1
            expected = reference(model, record.token_ids, ids, encoder_decoder)
            assert sample.logprobs == pytest.approx(expected, abs=tolerance)
            assert len(sample.top_logprobs) == len(ids)
            for token, value, pairs in zip(ids, sample.logprobs, sample.top_logprobs, strict=True):
                values = [v for _, v in pairs]
                assert len(pairs) == top and values == sorted(values, reverse=True)
                if value > values[-1] + tolerance:  # ranks inside the top K, no tie at the edge
                    assert dict(pairs)[token] == pytest.approx(value, abs=1e-6)
                if greedy:
                    assert pairs[0] == (token, pytest.approx(value, abs=1e-6))
                checked += 1
    assert checked >= len(records) * 2


@pytest.mark.parametrize("prefill_tokens", [4, 4096], ids=["chunked", "one-chunk"])
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_recorded_equals_one_forward_pass(tiny_models, sampling, prefill_tokens):
    engine, model, tok = load(tiny_models["chat"], sampling, prefill_tokens=prefill_tokens)
    assert engine.chunked_prefill
    records, samples, kept = generate(engine, tok)
    assert [len(row) for row in samples] == [sampling.num_return_sequences] * len(TEXTS)
    check(model, records, samples, kept, greedy=not sampling.do_sample)
    if sampling.do_sample:  # the samples differ, and each is scored by the model, not the warpers
        assert len({tuple(ids) for row in kept for ids in row}) > len(TEXTS)


def test_encoder_decoder_scores_decoder_positions(tiny_models):
    engine, model, tok = load(tiny_models["t5"], GREEDY, top=3)
    records, samples, kept = generate(engine, tok)
    check(model, records, samples, kept, encoder_decoder=True, greedy=True, top=3)


def test_values_are_the_models_before_later_processors(tiny_models, monkeypatch):
    """A processor after the recorder (as a constraint mask is) forces one token: its recorded
    value is still the model's, finite and below 0, not the masked distribution's 0."""
    forced = 42

    class OnlyForced(LogitsProcessor):
        def __call__(self, input_ids, scores):
            masked = torch.full_like(scores, float("-inf"))
            masked[:, forced] = 0
            return masked

    monkeypatch.setattr(
        static, "sampling_processors", lambda *a: LogitsProcessorList([OnlyForced()])
    )
    engine, model, tok = load(tiny_models["chat"], GREEDY, top=2)
    records, samples, kept = generate(engine, tok)
    assert {t for row in kept for ids in row for t in ids} == {forced}
    check(model, records, samples, kept, top=2)
    assert all(v < -1e-3 for row in samples for s in row for v in s.logprobs)


def test_off_by_default_and_top_alone(tiny_models):
    engine, _, tok = load(tiny_models["chat"], GREEDY)
    engine.logprobs, engine.top_logprobs = False, 0
    (sample,) = generate(engine, tok, ["hello"])[1][0]
    assert sample.logprobs is None and sample.top_logprobs is None
    engine.top_logprobs = 2
    (sample,) = generate(engine, tok, ["hello"])[1][0]
    assert sample.logprobs is None and len(sample.top_logprobs) == sample.completion_tokens


def test_cut_with_the_text_at_eos_and_stop_strings(tiny_models):
    engine, _, tok = load(tiny_models["chat"], SamplingConfig(max_new_tokens=5, stop=["beta"]))
    eos, pad = tok.eos_token_id, tok.pad_token_id
    a, b = tok("alpha gamma", add_special_tokens=False)["input_ids"][:2]
    steps = [-0.5, -1.0, -1.5, -2.0, -2.5]
    scores = RowLogprobs(steps, [[i, 7] for i in range(5)], [[v, -9.0] for v in steps])
    stop = engine.sample([a, b, eos, pad, pad], scores)
    assert stop.completion_tokens == 3 and stop.logprobs == steps[:3]  # the EOS counts
    assert stop.top_logprobs == [[(i, v), (7, -9.0)] for i, v in enumerate(steps[:3])]
    ids = tok(" alpha beta gamma", add_special_tokens=False)["input_ids"]
    cut = next(i for i in range(1, len(ids) + 1) if "beta" in tok.decode(ids[:i]))
    # Filled with pads (EOS here) after the token completing the stop string: none of them kept.
    hit = engine.sample(ids[:cut] + [pad] * (5 - cut), scores)
    assert hit.finish_reason == "stop" and hit.logprobs == steps[:cut]


def test_continuous_engine_cannot_record_logprobs(monkeypatch):
    runner, greedy = RunnerConfig(engine="continuous"), SamplingConfig()
    with pytest.raises(ConfigError, match="runner.engine=continuous.*output.logprobs"):
        choose_engine(runner, greedy, False, "cpu", logprobs=True)
    monkeypatch.setattr(choice, "AUTO_CONTINUOUS_DEVICES", ("cpu",))
    assert choose_engine(RunnerConfig(engine="auto"), greedy, False, "cpu") == "continuous"
    assert choose_engine(RunnerConfig(engine="auto"), greedy, False, "cpu", True) == "static"
