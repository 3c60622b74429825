"""Device, dtype and loading: ``model.dtype=auto`` is bf16 on a CPU that computes it natively, fp32
on one that would emulate it, and a folder begun in one dtype keeps it under ``auto``; accelerate's
split by ``model.device_map`` over the CPU and the disk generates what the plain load does, inputs
go where the input embeddings compute (never ``model.device``, ``meta`` when all is offloaded),
and no load is moved after ``from_pretrained``."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from test_static import records

from batchgen import run
from batchgen.config import ModelConfig, SamplingConfig
from batchgen.engine import devices
from batchgen.engine.memory import model_memory
from batchgen.engine.static import StaticEngine
from batchgen.errors import ConfigError, ResumeError
from batchgen.inputs import models
from batchgen.store import layout

TEXTS = [
    "hello",
    "a much longer prompt with many more words in it than the first",
    "mid size text",
    "the quick brown fox jumps over the lazy dog",
    "one more",
]
GREEDY = SamplingConfig(max_new_tokens=12)


def load(path, **settings):
    """(model, tokenizer) of a tiny model folder, fp32, loaded as ``model.*`` ``settings`` say."""
    cfg = ModelConfig(name_or_path=str(path), **settings)
    source = models.resolve_source(cfg)
    config, tok = models.load_config_and_tokenizer(source, cfg)
    return devices.load_model(source, config, cfg, "cpu", "float32"), tok


def texts(model, tok, recs) -> list[str]:
    engine = StaticEngine(model, tok)
    return [samples[0].text for samples in engine.generate(recs, 0, GREEDY)]


def embedding_bytes(tok) -> int:
    # The tiny Llama's embedding: vocabulary x hidden size 32 x 4 bytes (its layers: ~37 KB each).
    return len(tok) * 32 * 4


@pytest.mark.parametrize(
    "spare,placed",
    [
        # Room for the embeddings (tied to the LM head) beside them, not for the layers: a split.
        (40_000, {"cpu", "disk"}),
        # No room even for the embeddings: all of the model on disk, every weight on meta.
        (-3_000_000, {"disk"}),
    ],
)
def test_device_map_over_cpu_and_disk_generates_what_the_plain_load_does(
    tiny_models, spare, placed
):
    plain, tok = load(tiny_models["chat"])
    recs = records(tok, TEXTS)
    cpu = embedding_bytes(tok) + spare
    split, _ = load(tiny_models["chat"], device_map="auto", max_memory={"cpu": cpu, "disk": "1GB"})
    assert set(split.hf_device_map.values()) == placed
    expected = texts(plain, tok, recs)
    # Left-padded together, and each prompt alone: the same greedy tokens as the plain load.
    assert texts(split, tok, recs) == expected
    assert [texts(split, tok, [r])[0] for r in recs] == expected


def test_inputs_go_to_the_embeddings_execution_device_not_model_device(tiny_models):
    model, tok = load(
        tiny_models["chat"], device_map="auto", max_memory={"cpu": "1MB", "disk": "1GB"}
    )
    assert model.device.type == "meta"  # what inputs must never be sent to
    assert model.get_input_embeddings().weight.device.type == "meta"
    assert devices.input_device(model) == torch.device("cpu")
    assert devices.compute_dtype(model) == torch.float32
    handle = devices.Model.loaded(model, tok)
    assert (handle.device, handle.dtype) == ("cpu", "float32")
    assert model_memory(model, devices.input_device(model), 8, 64, chunked=True) is not None


@pytest.mark.parametrize("settings", [{}, {"quantization": "int8"}])
def test_weights_are_never_moved_after_from_pretrained(tiny_models, monkeypatch, settings):
    from transformers import PreTrainedModel

    def moved(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__}.to{args} after from_pretrained")

    monkeypatch.setattr(PreTrainedModel, "to", moved)
    model, _tok = load(tiny_models["chat"], **settings)
    assert devices.input_device(model) == torch.device("cpu")


def test_quantization_on_mps_is_refused_before_anything_loads():
    with pytest.raises(ConfigError, match=r"^model\.quantization=int8: .* mps"):
        devices.resolve_device_dtype(ModelConfig(device="mps", quantization="int8"))


def test_offload_folder_only_with_a_device_map(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHGEN_CACHE", str(tmp_path))
    assert devices.placement(ModelConfig(), "cuda:1") == {"device_map": {"": "cuda:1"}}
    split = devices.placement(
        ModelConfig(device_map="auto", max_memory={"cuda:1": "2GiB", "0": 5, "cpu": "1GB"}), "cuda"
    )
    assert split["device_map"] == "auto"
    # accelerate names GPUs by index: cuda:1 and "0" are 1 and 0.
    assert split["max_memory"] == {1: "2GiB", 0: 5, "cpu": "1GB"}
    assert str(split["offload_folder"]).startswith(str(tmp_path / "offload"))


FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {extra}\nbogomips\t: 4000\n"


@pytest.mark.parametrize(
    "extra,expected",
    [("avx512_bf16", "avx512_bf16"), ("amx_bf16 amx_tile", "amx_bf16"), ("avx512vl", None)],
)
def test_native_bf16_reads_the_cpu_flags(tmp_path, extra, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(FLAGS.format(extra=extra))
    assert devices.native_bf16(cpuinfo) == expected
    assert devices.native_bf16(tmp_path / "missing") is None


@pytest.mark.parametrize("flag,dtype", [("avx512_bf16", "bfloat16"), (None, "float32")])
def test_auto_on_cpu_follows_the_cpu(monkeypatch, flag, dtype):
    monkeypatch.setattr(devices, "native_bf16", lambda: flag)
    cfg = ModelConfig(device="cpu")
    assert devices.resolve_device_dtype(cfg) == ("cpu", dtype)
    assert devices.resolve_device_dtype(ModelConfig(device="cpu", dtype="float32"))[1] == "float32"
    reason = devices.dtype_reason(cfg, "cpu", dtype)
    assert (flag in reason) if flag else "no native bf16" in reason


def rows(out):
    return [r for f in sorted(out.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_a_folder_begun_in_fp32_resumes_in_fp32_under_auto(
    tiny_models, prompts_file, make_job, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    monkeypatch.setattr(devices, "native_bf16", lambda: None)  # a CPU without bf16
    run(make_job(tiny_models["chat"], prompts_file, out))
    before = rows(out)
    assert (
        json.loads(layout.run_file(out).read_text())["fingerprint_parts"]["model"]["dtype"]
        == "float32"
    )
    (out / "part-00001.parquet").unlink()
    capsys.readouterr()
    monkeypatch.setattr(devices, "native_bf16", lambda: "amx_bf16")  # the same folder, moved
    run(make_job(tiny_models["chat"], prompts_file, out))
    said = capsys.readouterr().out
    assert (
        "model.dtype=auto: this folder's run was begun in float32; resuming it in float32" in said
    )
    assert " on cpu in float32 (auto: the dtype this folder's run was begun in)" in said
    assert rows(out) == before
    with pytest.raises(ResumeError, match="model.dtype: 'float32' -> 'bfloat16'"):
        run(make_job(tiny_models["chat"], prompts_file, out, model__dtype="bfloat16"))


def test_a_new_folder_under_auto_on_a_bf16_cpu_is_bf16(
    tiny_models, prompts_file, make_job, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(devices, "native_bf16", lambda: "avx512_bf16")
    out = tmp_path / "out"
    run(make_job(tiny_models["chat"], prompts_file, out))
    parts = json.loads(layout.run_file(out).read_text())["fingerprint_parts"]
    assert parts["model"]["dtype"] == "bfloat16"
    banner = capsys.readouterr().out.splitlines()[0]
    assert " on cpu in bfloat16 (auto: this CPU computes bf16 natively, avx512_bf16)" in banner
