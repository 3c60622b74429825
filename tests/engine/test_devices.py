"""Loading the weights onto their device(s): accelerate's split by ``model.device_map`` over the
CPU and the disk generates what the plain load does, inputs go where the input embeddings
compute (never ``model.device``, ``meta`` when all is offloaded), and no load is moved after
``from_pretrained``."""

from __future__ import annotations

import pytest
import torch
from test_static import records

from batchgen.config import ModelConfig, SamplingConfig
from batchgen.engine import devices
from batchgen.engine.memory import model_memory
from batchgen.engine.static import StaticEngine
from batchgen.errors import ConfigError
from batchgen.inputs import models

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
