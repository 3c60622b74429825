"""The default output folder's name: ``outputs/MODEL/DATASET-SAMPLING``.

Invariant: the same settings name the same folder, whichever way they arrive (the command line's
``${batchgen.output_dir:}``, or ``batchgen.run(JobConfig(...))`` with ``output.dir`` unset), so
rerunning a job resumes it. The folder is named after the actual model (its GGUF file, else the
last part of its path or hub id), the actual data (file stem, folder or hub name) and the
sampling preset the settings equal, else a hash of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path

from omegaconf import OmegaConf

from batchgen import paths
from batchgen.config import DatasetConfig, ModelConfig, SamplingConfig
from batchgen.conversion import normalize_sampling
from batchgen.errors import ConfigError
from batchgen.store.manifest import fingerprint

# Suffixes dropped from a source's name in the default output folder.
SUFFIXES = (".gguf", ".jsonl", ".json", ".parquet", ".csv")


def label(location: str) -> str:
    """A folder name for a model or dataset: the last part of its path or hub id."""
    text = location.removeprefix(paths.PKG_PREFIX).replace("\\", "/").rstrip("/")
    name = text.rsplit("/", 1)[-1]
    if name in ("", ".", "..", "~"):
        name = Path(location).expanduser().resolve().name or "root"
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return "".join(c if c.isalnum() or c in "._+-" else "-" for c in name).lstrip(".") or "x"


@functools.cache  # the preset files are package data: fixed for the process
def sampling_presets() -> dict[str, SamplingConfig]:
    """The ``sampling/`` presets by name, as their settings decode."""
    presets = {}
    for path in sorted((Path(paths.CONFIG_DIR) / "sampling").glob("*.yaml")):
        merged = OmegaConf.merge(OmegaConf.structured(SamplingConfig), OmegaConf.load(path))
        presets[path.stem] = normalize_sampling(OmegaConf.to_object(merged))
    return presets


def sampling_label(sampling: SamplingConfig) -> str:
    """The preset whose settings these are, else ``greedy-HASH`` / ``sampling-HASH``."""
    # A bad stop string is reported by the conversion; the folder name only has to be stable.
    with contextlib.suppress(ConfigError):
        sampling = normalize_sampling(sampling)
    for name, preset in sampling_presets().items():
        if preset == sampling:
            return name
    digest = fingerprint(dataclasses.asdict(sampling))[:8]
    return f"{'sampling' if sampling.do_sample else 'greedy'}-{digest}"


def default_output_dir(model: ModelConfig, dataset: DatasetConfig, sampling: SamplingConfig) -> str:
    """``outputs/MODEL/DATASET-SAMPLING`` for these settings, as given (before conversion).

    MODEL names an adapter and a quantization too (``my-llama+my-lora-bnb-4bit``): they make
    another model, whose rows the plain model's folder would refuse.
    """
    name = label(model.gguf_file) if model.gguf_file else label(model.name_or_path)
    name += f"+{label(model.adapter)}" if model.adapter else ""
    name += f"-{model.quantization}" if model.quantization else ""
    return f"outputs/{name}/{label(dataset.path)}-{sampling_label(sampling)}"
