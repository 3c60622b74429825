"""Test helpers: a static engine over a tiny model, bound to the sampling its tests decode with."""

from __future__ import annotations

from batchgen.config import ModelConfig, SamplingConfig
from batchgen.engine import devices
from batchgen.engine.static import StaticEngine
from batchgen.inputs import models


class Bound:
    """A static engine and the sampling its tests decode with: ``generate(records, seed)`` and
    ``sample(ids, scores)`` use it; every other attribute is the engine's."""

    def __init__(self, engine: StaticEngine, sampling: SamplingConfig):
        object.__setattr__(self, "engine", engine)
        object.__setattr__(self, "sampling", sampling)
        engine.use(sampling)

    def generate(self, records, seed):
        return self.engine.generate(records, seed, self.sampling)

    def sample(self, ids, scores=None):
        return self.engine.decoder.sample(ids, self.sampling, scores, self.engine.logprobs)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def __setattr__(self, name, value):
        setattr(self.engine, name, value)


def load_model(path):
    """(model, tokenizer) of a tiny model folder, fp32 on the CPU."""
    cfg = ModelConfig(name_or_path=str(path))
    source = models.resolve_source(cfg)
    config, tok = models.load_config_and_tokenizer(source, cfg)
    return devices.load_model(source, config, cfg, "cpu", "float32"), tok


def load(path, sampling: SamplingConfig, **engine_options):
    """(a ``Bound`` static engine over the model at ``path``, its tokenizer)."""
    model, tok = load_model(path)
    return Bound(StaticEngine(model, tok, **engine_options), sampling), tok
