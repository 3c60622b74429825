"""Where and how a model runs: device and dtype for ``auto``, the attention kernel, the model an
engine is built over (config and tokenizer at once, the weights on first use), loading the
weights onto their device(s), where its inputs go, and torch's CPU threads.

Invariant: the device and dtype a job records (fingerprint, banner) are the ones its weights are
loaded with: ``resolve_device_dtype`` answers once, before anything loads, and ``load_model``
takes its answer. ``model.dtype=auto`` is the fastest dtype that keeps the model's quality: bf16
on a GPU that has it (else fp16), fp16 on MPS, and on a CPU bf16 where the CPU computes it
natively (AMX or AVX-512 BF16: ``native_bf16``), fp32 where it would only emulate it.
``from_pretrained`` itself places the weights (all on the device, or split by
``model.device_map``) and quantizes them; nothing moves or casts them afterwards. Inputs go where
the input embeddings compute (``input_device``), the one answer every engine reads.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from batchgen.config import ModelConfig
from batchgen.engine import tensor_parallel, tp_leader
from batchgen.engine.weights import apply_adapter, quantization_config
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
    if cfg.quantization and device == "mps":
        raise ConfigError(
            f"model.quantization={cfg.quantization}: neither bitsandbytes nor torchao quantizes "
            "on mps; run on cpu or cuda (model.device), or without model.quantization."
        )
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


def placement(cfg: ModelConfig, device: str) -> dict[str, Any]:
    """``from_pretrained``'s placement arguments: all of the weights on ``device``, or
    accelerate's split by ``model.device_map`` and ``model.max_memory``, with a folder for the
    modules it puts on disk (removed when the process ends)."""
    if cfg.tp_size > 1:  # transformers places each process's part on its bound device
        from transformers.distributed import DistributedConfig

        return {"distributed_config": DistributedConfig(tp_size=cfg.tp_size)}
    if cfg.device_map is None:
        return {"device_map": {"": device}}
    mapping = isinstance(cfg.device_map, Mapping)
    memory = None
    if cfg.max_memory is not None:
        # accelerate names a GPU by its index: cuda:1 and "1" (a mapping's key) are 1.
        memory = {
            int(str(k).removeprefix("cuda:")) if str(k).removeprefix("cuda:").isdigit() else k: v
            for k, v in cfg.max_memory.items()
        }
    folder = models.cache_root() / "offload"
    folder.mkdir(parents=True, exist_ok=True)
    offload = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=folder)
    atexit.register(shutil.rmtree, offload, True)
    return {
        "device_map": dict(cfg.device_map) if mapping else cfg.device_map,
        "max_memory": memory,
        "offload_folder": offload,
    }


def load_model(source: models.ModelSource, config, cfg: ModelConfig, device: str, dtype: str):
    """Load the weights with the causal-LM or seq2seq class the config calls for, in eval mode.

    ``from_pretrained`` puts them on their device(s) (``placement``) and quantizes them as
    ``model.quantization`` says, or as the checkpoint's own quantization config does; they are
    never moved or cast afterwards (a dispatched or quantized model cannot be). The adapter of
    ``model.adapter`` goes over them last.

    Raises:
        ModelError: the weights or the adapter failed to load.
    """
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
            quantization_config=quantization_config(cfg.quantization, dtype),
            **placement(cfg, device),
        )
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        raise ModelError(
            f"model.name_or_path={cfg.name_or_path!r}: weights failed to load: {e}"
        ) from e
    if source.adapter is not None:
        try:
            model = apply_adapter(model, source.adapter, cfg.merge_adapter)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise ModelError(
                f"model.adapter={cfg.adapter!r}: the adapter failed to load over "
                f"{cfg.name_or_path!r}: {e}"
            ) from e
    return model.eval()


def _input_embeddings(model):
    """The module that embeds the input ids (None for a model that does not say: remote code)."""
    try:
        return model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        return None


def _execution_device(module):
    """The device accelerate's hook on ``module`` runs it on, or None without such a hook."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", (hook,)):
        if getattr(h, "execution_device", None) is not None:
            return h.execution_device
    return None


def input_device(model):
    """The torch device a model's inputs go to: where its input embeddings compute.

    That is the embedding weight's device, except under accelerate's hooks (a ``device_map``
    that offloads): an offloaded module's weights sit on ``meta`` until its hook brings them
    to its execution device, which the closest hook above the embeddings names. Never
    ``model.device``, the first parameter's device: ``meta`` when all is offloaded.
    """
    import torch

    embeddings = _input_embeddings(model)
    if embeddings is None:
        return next(model.parameters()).device
    name = next(n for n, m in model.named_modules() if m is embeddings)
    parts = name.split(".")
    for depth in range(len(parts), -1, -1):
        execution = _execution_device(model.get_submodule(".".join(parts[:depth])))
        if execution is not None:
            return torch.device(execution)
    return embeddings.weight.device


def compute_dtype(model):
    """The dtype a model computes (and keeps its KV cache) in: its input embeddings', which no
    quantization method here touches (their quantized linear layers hold integer weights)."""
    embeddings = _input_embeddings(model)
    return (embeddings.weight if embeddings is not None else next(model.parameters())).dtype


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
        parallel: the tensor-parallel group this process leads (``model.tp_size``), if any.
        group: that group, once its followers are started (with the weights).
    """

    config: Any
    tokenizer: Any
    device: str
    dtype: str
    settings: ModelConfig
    source: models.ModelSource | None = None
    weights: Any = None
    parallel: tensor_parallel.Spec | None = None
    group: tp_leader.Group | None = None

    @classmethod
    def open(
        cls,
        settings: ModelConfig,
        source: models.ModelSource,
        device: str,
        dtype: str,
        parallel: tensor_parallel.Spec | None = None,
    ):
        """Config and tokenizer of ``source`` (a GGUF converted once), no weights yet; with
        ``parallel``, a model its group can split, on the leader's device.

        Raises:
            ModelError: the model cannot be found, converted or tokenized for batching.
            ConfigError: ``parallel`` cannot split this model (``tensor_parallel.check_model``).
        """
        source = models.convert_gguf(source)
        config, tokenizer = models.load_config_and_tokenizer(source, settings)
        if parallel is not None:
            tensor_parallel.check_model(config, parallel.size)
            device = parallel.devices[0]
        return cls(config, tokenizer, device, dtype, settings, source, parallel=parallel)

    @classmethod
    def loaded(cls, weights, tokenizer) -> Model:
        """A model the caller loaded (and keeps: it is never moved or modified)."""
        dtype = str(compute_dtype(weights)).removeprefix("torch.")
        device = str(input_device(weights))
        return cls(weights.config, tokenizer, device, dtype, ModelConfig(), None, weights)

    def load(self):
        """The weights, loaded at the first call."""
        if self.weights is None:
            if self.parallel is not None and self.group is None:  # its followers load theirs
                set_threads(self.parallel.threads)
                self.group = tp_leader.Group.start(replace(self, parallel=None), self.parallel)
            split = self.settings.tp_size > 1
            with tensor_parallel.bound_to(self.device) if split else contextlib.nullcontext():
                self.weights = load_model(
                    self.source, self.config, self.settings, self.device, self.dtype
                )
        return self.weights

    def close(self) -> None:
        """End its tensor-parallel group, if any (its followers exit; the weights, split over
        them, go too). Without this, the group ends when the process does."""
        if self.group is not None:
            self.group.end()
            self.group, self.weights = None, None

    def generation_defaults(self) -> dict[str, Any]:
        """What ``model.generate()`` with no arguments samples with (``sampling=model``): from
        the loaded weights, else from the model's ``generation_config.json``."""
        if self.weights is not None:
            return models.generation_defaults(self.weights.generation_config)
        return models.generation_defaults(models.load_generation_config(self.source, self.settings))
