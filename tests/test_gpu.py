"""The CUDA path: bf16 auto dtype, SDPA/flash attention, static-cache compile, engines agree.

Marked ``gpu``; skipped cleanly where no CUDA device is present (CI, these CPU machines).
"""

from __future__ import annotations

import pytest
import torch

from batchgen.config import ModelConfig, RunnerConfig, SamplingConfig
from batchgen.engine import devices
from batchgen.engine.batching import Batcher
from batchgen.engine.continuous import ContinuousEngine
from batchgen.engine.static import StaticEngine
from batchgen.inputs import models
from batchgen.inputs.prompts import PromptRecord

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _load(path, dtype="auto"):
    cfg = ModelConfig(name_or_path=str(path), dtype=dtype)
    source = models.resolve_source(cfg)
    config, tok = models.load_config_and_tokenizer(source, cfg)
    device, dtype = devices.resolve_device_dtype(cfg)
    return devices.load_model(source, config, cfg, device, dtype), tok, device, dtype


def _records(tok):
    texts = ["short", "a somewhat longer prompt for the model", "mid length prompt here"]
    return [PromptRecord(i, str(i), t, tok(t)["input_ids"]) for i, t in enumerate(texts)]


def _texts(engine, records, sampling, batch_size=8):
    runner = Batcher(engine, RunnerConfig(batch_size=batch_size), seed=0)
    results, failed = runner.run(records, sampling, lambda r, t: None)
    assert failed == []
    return [results[r.index][0].text for r in records]


def test_auto_dtype_is_half_precision_on_cuda(tiny_models):
    model, _, device, dtype = _load(tiny_models["chat"])
    assert device == "cuda" and dtype in ("bfloat16", "float16")
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    assert model.config._attn_implementation in ("sdpa", "flash_attention_2")


def test_engines_agree_on_cuda(tiny_models):
    sampling = SamplingConfig(max_new_tokens=8)
    model, tok, _, _ = _load(tiny_models["nopad"], dtype="float32")
    records = _records(tok)
    static = _texts(StaticEngine(model, tok), records, sampling)
    single = _texts(StaticEngine(model, tok), records, sampling, batch_size=1)
    continuous = _texts(ContinuousEngine(model, tok), records, sampling)
    assert static == single == continuous


def test_sampling_same_on_cuda_and_cpu(tiny_models):
    sampling = SamplingConfig(max_new_tokens=6, do_sample=True, temperature=0.8)
    model, tok, _, _ = _load(tiny_models["chat"], dtype="float32")
    records = _records(tok)
    on_gpu = _texts(StaticEngine(model, tok), records, sampling)
    on_cpu = _texts(StaticEngine(model.to("cpu"), tok), records, sampling)
    assert on_gpu == on_cpu  # the noise is integer-hashed, identical on every device


def test_static_cache_compile(tiny_models):
    sampling = SamplingConfig(max_new_tokens=8)
    model, tok, _, _ = _load(tiny_models["nopad"], dtype="float32")
    records = _records(tok)
    eager = _texts(StaticEngine(model, tok), records, sampling)
    compiled = _texts(StaticEngine(model, tok, compile=True), records, sampling)
    assert compiled == eager
