"""``sampling=model``: the model's generation config as a preset, resolved before the run."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch

import batchgen
from batchgen.config import MODEL_DEFAULTS
from batchgen.errors import ResumeError
from batchgen.store import layout

QWEN_LIKE = {
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.05,
    "max_new_tokens": 5,
}


def with_generation_config(tiny_models, tmp_path, values) -> str:
    """A copy of the tiny chat model whose generation_config.json sets ``values``."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["chat"], folder)
    path = folder / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**config, **values}))
    return str(folder)


def model_job(model, prompts_file, out, *overrides):
    return batchgen.compose(
        [
            "sampling=model",
            f"model.name_or_path={model}",
            "model.gguf_file=null",
            "dataset=local",
            f"dataset.path={prompts_file}",
            "dataset.id_column=uid",
            "runner.progress=false",
            f"output.dir={out}",
            *overrides,
        ]
    )


def test_the_preset_leaves_every_model_setting_null():
    cfg = batchgen.compose(["sampling=model"])
    assert all(getattr(cfg.sampling, k) is None for k in MODEL_DEFAULTS)


def test_model_defaults_are_used_recorded_and_fingerprinted(tiny_models, prompts_file, tmp_path):
    model = with_generation_config(tiny_models, tmp_path, QWEN_LIKE)
    out = tmp_path / "out"
    batchgen.run(model_job(model, prompts_file, out))
    run = json.loads(layout.run_file(out).read_text())
    used = {k: run["config"]["sampling"][k] for k in QWEN_LIKE}
    assert used == QWEN_LIKE and run["config"]["sampling"]["min_p"] == 0.0
    assert {k: run["fingerprint_parts"]["sampling"][k] for k in QWEN_LIKE} == QWEN_LIKE
    rows = pq.read_table(sorted(out.glob("*.parquet"))).to_pylist()
    assert all(r["completion_tokens"] <= 5 for r in rows)
    # The model's default changed: so did the config, and the folder refuses to mix the two.
    path = tmp_path / "model" / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "temperature": 0.9}))
    with pytest.raises(ResumeError, match="temperature"):
        batchgen.run(model_job(model, prompts_file, out))


def test_a_command_line_setting_wins(tiny_models, prompts_file, tmp_path):
    model = with_generation_config(tiny_models, tmp_path, QWEN_LIKE)
    out = tmp_path / "out"
    batchgen.run(model_job(model, prompts_file, out, "sampling.temperature=0.5"))
    used = json.loads(layout.run_file(out).read_text())["config"]["sampling"]
    assert used["temperature"] == 0.5 and used["top_k"] == 20 and used["max_new_tokens"] == 5


def test_greedy_model_defaults_equal_model_generate(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    values = {"do_sample": False, "repetition_penalty": 1.3, "max_new_tokens": 6}
    model_dir = with_generation_config(tiny_models, tmp_path, values)
    # fp32 on both sides: dtype=auto may pick bf16 on this CPU, and the textbook call loads fp32.
    gen = batchgen.Generator(model_dir, progress=False, dtype="float32")
    texts = ["the quick brown fox", "jumps", "over the lazy dog again and again"]
    ours = [c.response for c in gen.generate(texts, "model")]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    textbook = []
    for text in texts:  # one at a time: no padding, the plain textbook call
        inputs = tok(text, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs)  # no arguments: the model's generation config
        new = out[0, inputs["input_ids"].shape[1] :]
        textbook.append(tok.decode(new, skip_special_tokens=True))
    assert ours == textbook
