"""Quantization on load and LoRA adapters, as jobs: ``model.quantization`` (bitsandbytes 4/8-bit,
torchao int8) runs and is recorded, an adapter changes the outputs to a merged-then-saved
model's, and resuming under another quantization or adapter is refused; a missing library is
one line naming the key and the extra."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from tiny import tiny_lm

import batchgen
from batchgen import config_checks, noise
from batchgen.config import ModelConfig
from batchgen.config_checks import validate
from batchgen.errors import ConfigError, ResumeError


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory, tiny_models):
    """The tiny chat Llama at hidden size 64: bitsandbytes' 4-bit blocks (64 values) need
    layers at least that wide (at 32 its CPU kernel fails on the block shape)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_models["chat"])
    model = tiny_lm(
        LlamaForCausalLM,
        LlamaConfig,
        tok,
        hidden_size=64,
        intermediate_size=128,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("tiny64") / "chat64"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _adapter(base, path, seed: int):
    """A LoRA adapter over ``base`` saved to ``path``: random, non-zero B matrices (peft's
    default makes them zero, an adapter that changes nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    get_peft_model(model, lora).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_models):
    """Two different adapters over the tiny chat model, and the first merged and saved."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("adapters")
    first = _adapter(tiny_models["chat"], root / "first", seed=1)
    second = _adapter(tiny_models["chat"], root / "second", seed=2)
    base = AutoModelForCausalLM.from_pretrained(tiny_models["chat"], dtype=torch.float32)
    PeftModel.from_pretrained(base, first).merge_and_unload().save_pretrained(root / "merged")
    AutoTokenizer.from_pretrained(tiny_models["chat"]).save_pretrained(root / "merged")
    return {"first": first, "second": second, "merged": root / "merged"}


def responses(out) -> list[tuple[str, str]]:
    rows = pq.read_table(out, columns=["id", "response"]).to_pylist()
    return sorted((r["id"], r["response"]) for r in rows)


def recorded_model(out) -> dict:
    return json.loads((out / "_batchgen" / "run.json").read_text())["fingerprint_parts"]["model"]


@pytest.mark.parametrize("quantization", ["bnb-4bit", "bnb-8bit", "int8"])
def test_quantized_jobs_run_and_record_the_quantization(
    tiny64, prompts_file, tmp_path, make_job, capfd, quantization
):
    out = tmp_path / "out"
    summary = batchgen.run(make_job(tiny64, prompts_file, out, model__quantization=quantization))
    assert summary.totals.rows == 12
    assert len(responses(out)) == 12
    assert recorded_model(out)["quantization"] == quantization
    # The libraries' own chatter (bitsandbytes repeats one line per forward pass) stays off.
    printed = capfd.readouterr()
    assert not any(prefix in printed.out + printed.err for _, prefix in noise.QUIET)


def test_resuming_under_another_quantization_is_refused(tiny64, prompts_file, tmp_path, make_job):
    out = tmp_path / "out"
    batchgen.run(make_job(tiny64, prompts_file, out, model__quantization="bnb-8bit"))
    for other in ("int8", None):
        with pytest.raises(ResumeError, match=r"model\.quantization: 'bnb-8bit' -> "):
            batchgen.run(make_job(tiny64, prompts_file, out, model__quantization=other))
    # Left at its default, the setting leaves the fingerprint as batchgen 0.1.0 made it.
    plain = tmp_path / "plain"
    batchgen.run(make_job(tiny64, prompts_file, plain))
    assert "quantization" not in recorded_model(plain)


def test_an_adapter_gives_the_merged_then_saved_models_outputs(
    tiny_models, adapters, prompts_file, tmp_path, make_job
):
    chat = tiny_models["chat"]
    # float32 throughout: dtype=auto is bfloat16 on a CPU with native bf16, where merging rounds.
    fp32 = {"model__dtype": "float32"}
    batchgen.run(make_job(chat, prompts_file, tmp_path / "base", **fp32))
    lora = str(adapters["first"])
    batchgen.run(make_job(chat, prompts_file, tmp_path / "lora", model__adapter=lora, **fp32))
    batchgen.run(make_job(adapters["merged"], prompts_file, tmp_path / "merged", **fp32))
    unmerged = make_job(chat, prompts_file, tmp_path / "apart", model__adapter=lora, **fp32)
    unmerged.model.merge_adapter = False
    batchgen.run(unmerged)
    lora = responses(tmp_path / "lora")
    base = responses(tmp_path / "base")
    assert sum(a != b for a, b in zip(lora, base, strict=True)) >= 10  # of 12 rows
    assert lora == responses(tmp_path / "merged")
    # In float32 the adapter kept apart decodes the same greedy tokens (not so in bfloat16:
    # merging rounds the weights once, so merge_adapter is in the fingerprint).
    assert responses(tmp_path / "apart") == lora
    recorded = recorded_model(tmp_path / "apart")
    assert (len(recorded["adapter"]), recorded["merge_adapter"]) == (16, False)


def test_resuming_with_another_adapter_is_refused_a_moved_copy_is_the_same(
    tiny_models, adapters, prompts_file, tmp_path, make_job
):
    chat, out = tiny_models["chat"], tmp_path / "out"
    batchgen.run(make_job(chat, prompts_file, out, model__adapter=str(adapters["first"])))
    for other in (adapters["second"], None):
        setting = None if other is None else str(other)
        with pytest.raises(ResumeError, match=r"model\.adapter: '[0-9a-f]{16}' -> "):
            batchgen.run(make_job(chat, prompts_file, out, model__adapter=setting))
    copy = shutil.copytree(adapters["first"], tmp_path / "elsewhere")
    (copy / "README.md").write_text("notes that peft does not load\n")
    summary = batchgen.run(make_job(chat, prompts_file, out, model__adapter=str(copy)))
    assert summary.totals.rows == 12  # resumed: every shard was already finished


@pytest.mark.parametrize(
    "settings,module,key,extra",
    [
        ({"quantization": "int8"}, "torchao", "model.quantization", "quant"),
        ({"quantization": "bnb-4bit"}, "bitsandbytes", "model.quantization", "quant"),
        ({"adapter": "some/adapter"}, "peft", "model.adapter", "lora"),
    ],
)
def test_a_missing_library_is_one_line_naming_the_key_and_the_extra(
    monkeypatch, make_job, tmp_path, settings, module, key, extra
):
    monkeypatch.setattr(config_checks, "installed", lambda name: name != module)
    cfg = make_job(tmp_path, tmp_path / "x.jsonl", tmp_path / "out")
    cfg.model = ModelConfig(name_or_path=str(tmp_path), **settings)
    with pytest.raises(ConfigError) as caught:
        validate(cfg)
    message = str(caught.value)
    assert message.startswith(f"{key}: ") and "\n" not in message
    assert f"pip install 'batchgen[{extra}]'" in message and module in message
