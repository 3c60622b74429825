"""Where and how a model runs: device and dtype for ``auto``, the attention kernel, the model an
engine is built over (config and tokenizer at once, the weights on first use), loading the
weights onto the device, and torch's CPU threads.

Invariant: the device and dtype a job records (fingerprint, banner) are the ones its weights are
loaded with: ``resolve_device_dtype`` answers once, before anything loads, and ``load_model``
takes its answer. ``model.dtype=auto`` is the fastest dtype that keeps the model's quality: bf16
on a GPU that has it (else fp16), fp16 on MPS, and on a CPU bf16 where the CPU computes it
natively (AMX or AVX-512 BF16: ``native_bf16``), fp32 where it would only emulate it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchgen.config import ModelConfig
from batchgen.errors import ConfigError, ModelError
from batchgen.inputs import models

# The CPU flags (Linux /proc/cpuinfo) of bf16 computed natively: AMX tiles, AVX-512 BF16.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The flag by which this CPU computes bf16 natively; None where it does not, or cannot
    tell (no /proc/cpuinfo: bf16 would be emulated, slower than fp32, as far as we know)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    flags = set(line.partition(":")[2].split())
    return next((f for f in NATIVE_BF16_FLAGS if f in flags), None)


def dtype_reason(cfg: ModelConfig, device: str, dtype: str) -> str:
    """Why ``dtype`` (``resolve_device_dtype``'s answer), for the banner."""
    if cfg.dtype != "auto":
        return f"model.dtype={cfg.dtype}"
    if device == "cpu":
        flag = native_bf16()
        if flag:
            return f"auto: this CPU computes bf16 natively, {flag}"
        return "auto: this CPU has no native bf16 (AMX, AVX-512 BF16); emulated, it loses to fp32"
    return f"auto on {device.split(':')[0]}"


def resolve_device_dtype(cfg: ModelConfig, local_rank: int | None = None) -> tuple[str, str]:
    """Pick device and dtype for ``auto``: CUDA bf16 (fp16 without bf16), MPS fp16, CPU bf16
    where it computes bf16 natively (``native_bf16``), else fp32.

    Under a launcher that gives each process of a node its ``local_rank`` (torchrun, srun),
    ``cuda`` is that process's GPU, ``cuda:LOCAL_RANK``.

    Raises:
        ConfigError: a CUDA device was asked for where none is visible.
    """
    import torch

    device = cfg.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"model.device={device!r}: no CUDA device is visible to this process "
            "(CUDA_VISIBLE_DEVICES, drivers, or a CPU build of torch); use model.device=auto."
        )
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    dtype = cfg.dtype
    if dtype == "auto":
        if device.startswith("cuda"):
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        elif device == "mps":
            dtype = "float16"
        else:
            dtype = "bfloat16" if native_bf16() else "float32"
    if device == "cuda" and local_rank is not None:
        device = f"cuda:{local_rank}"
    return device, dtype


def attention(cfg: ModelConfig, device: str, dtype: str) -> str | None:
    """The attention kernel: flash-attn 2 where it can run, else transformers' default.

    That default is PyTorch's SDPA wherever the architecture has it, and the eager kernel for
    those that lack it (RWKV, for one, which an explicit ``"sdpa"`` would refuse to load).
    """
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    import importlib.util

    flash = importlib.util.find_spec("flash_attn") is not None
    half = dtype in ("float16", "bfloat16")
    return "flash_attention_2" if flash and half and device.startswith("cuda") else None


def load_model(source: models.ModelSource, config, cfg: ModelConfig, device: str, dtype: str):
    """Load the weights with the causal-LM or seq2seq class the config calls for, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.utils import logging as hf_logging

    # A per-tensor bar for a one-second load only clutters the job's own progress bar.
    hf_logging.disable_progress_bar()
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(
            source.location,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            dtype=getattr(torch, dtype),
            attn_implementation=attention(cfg, device, dtype),
        )
    except (OSError, ValueError) as e:
        raise ModelError(
            f"model.name_or_path={cfg.name_or_path!r}: weights failed to load: {e}"
        ) from e
    return model.to(device).eval()


def set_threads(threads: int | None) -> None:
    """Set torch's CPU threads: ``runner.threads``, else Slurm's CPUs per task, else leave it.

    Several workers on one node each taking every core's worth of OpenMP threads spin against
    each other (seen at 0.4 tokens/s for two Slurm tasks on two cores, 150x slower).
    """
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    threads = threads or (int(slurm) if slurm.isdigit() else None)
    if threads:
        import torch

        torch.set_num_threads(threads)


@dataclass
class Model:
    """A model as an engine is built over: config and tokenizer at once, the weights on first use
    (transformers' engines load them; vLLM loads from ``source.location`` itself).

    Attributes:
        config: the model's config.
        tokenizer: its tokenizer, padding side and pad token set for batching.
        device: where the weights go (``cuda:LOCAL_RANK`` under a launcher).
        dtype: the dtype they load in.
        settings: the ``model.*`` settings.
        source: where the weights are (None for a model loaded by the caller).
        weights: the loaded model, once loaded.
    """

    config: Any
    tokenizer: Any
    device: str
    dtype: str
    settings: ModelConfig
    source: models.ModelSource | None = None
    weights: Any = None

    @classmethod
    def open(cls, settings: ModelConfig, source: models.ModelSource, device: str, dtype: str):
        """Config and tokenizer of ``source`` (a GGUF converted once), no weights yet.

        Raises:
            ModelError: the model cannot be found, converted or tokenized for batching.
        """
        source = models.convert_gguf(source)
        config, tokenizer = models.load_config_and_tokenizer(source, settings)
        return cls(config, tokenizer, device, dtype, settings, source)

    @classmethod
    def loaded(cls, weights, tokenizer) -> Model:
        """A model the caller loaded (and keeps: it is never moved or modified)."""
        parameter = next(weights.parameters())
        dtype = str(parameter.dtype).removeprefix("torch.")
        return cls(
            weights.config, tokenizer, str(parameter.device), dtype, ModelConfig(), None, weights
        )

    def load(self):
        """The weights, loaded at the first call."""
        if self.weights is None:
            self.weights = load_model(
                self.source, self.config, self.settings, self.device, self.dtype
            )
        return self.weights

    def generation_defaults(self) -> dict[str, Any]:
        """What ``model.generate()`` with no arguments samples with (``sampling=model``): from
        the loaded weights, else from the model's ``generation_config.json``."""
        if self.weights is not None:
            return models.generation_defaults(self.weights.generation_config)
        return models.generation_defaults(models.load_generation_config(self.source, self.settings))
