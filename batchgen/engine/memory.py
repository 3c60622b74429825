"""What a batch costs in memory, what the device has free, and the token budget in force.

Invariant: a plan counts only on memory seen free once the weights are loaded, less a margin, and
counts each token slot's cost generously (its KV cache, a share of its row's logits copies, and
its activations where prefill is not chunked), so a budget from here is one the device can hold;
where it is wrong anyway, ``Budget`` halves on the out-of-memory error and the batch is split.

Units: bytes, and token slots (rows x (longest prompt + new tokens), as ``batch_tokens`` counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from batchgen.config import SamplingConfig
from batchgen.engine.devices import compute_dtype
from batchgen.inputs.prompts import PromptRecord

# Clean batches after an out-of-memory before the token budget grows back by GROWTH.
GROW_AFTER = 8
GROWTH = 1.25
# Share of the free memory kept back: allocator fragmentation, temporaries not modelled here.
MARGIN = 0.10
# fp32 copies of one step's logits a row holds at once (upcast, processed, noised, softmax).
LOGIT_COPIES = 4


def _text_config(config):
    """The decoder's text config of a composite model (vision-language, encoder-decoder)."""
    try:
        return config.get_text_config(decoder=True)
    except (AttributeError, ValueError):
        return config


def _first(config, names: tuple[str, ...]) -> int | None:
    return next((v for v in (getattr(config, n, None) for n in names) if v), None)


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """Bytes of KV cache per token slot: layers x KV heads x head dim x 2 (keys, values) x dtype.

    Decoder layers count (an encoder-decoder's cross-attention cache holds the same per prompt
    token); ``num_key_value_heads`` missing means as many as attention heads; ``head_dim``
    missing (``d_kv`` in T5) means hidden size / heads.

    Raises:
        ValueError: the config names no layers, heads or hidden size.
    """
    text = _text_config(config)
    layers = _first(text, ("num_decoder_layers", "decoder_layers", "num_hidden_layers"))
    heads = _first(text, ("decoder_attention_heads", "num_attention_heads"))
    hidden = _first(text, ("hidden_size", "d_model"))
    if not (layers and heads and (hidden or getattr(text, "head_dim", None))):
        raise ValueError(f"{type(config).__name__}: no layer, head or width count to size a cache")
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return layers * kv_heads * head_dim * 2 * dtype_bytes


def activation_bytes_per_token(config, dtype_bytes: int) -> int:
    """Bytes one prompt token's forward pass holds at its peak layer: the residual stream, the
    attention projections and the MLP's hidden activations (a rough, generous count)."""
    text = _text_config(config)
    hidden = _first(text, ("hidden_size", "d_model")) or 0
    inner = _first(text, ("intermediate_size", "d_ff", "decoder_ffn_dim")) or 4 * hidden
    return (4 * hidden + 2 * inner) * dtype_bytes


def available_ram() -> int | None:
    """Bytes of memory the system can give without swapping (Linux ``MemAvailable``), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def free_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes free for batches on ``device`` now, where that figure comes from), or None when
    unknown (MPS, a model spread over devices)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Blocks torch's allocator holds but no tensor uses are this process's to reuse.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, "CUDA memory free after the weights"
    if device.type == "cpu":
        ram = available_ram()
        return (ram, "available RAM after the weights") if ram else None
    return None


@dataclass(frozen=True)
class MemoryPlan:
    """The token budget that the memory free after the weights allows."""

    free: int  # bytes free once the weights are loaded
    usable: int  # bytes for batches: free less MARGIN and the prefill reserve
    slot_bytes: int  # per token slot: its KV cache, activations unless chunked, its row's logits
    budget: int  # token slots: usable // slot_bytes
    source: str  # where ``free`` comes from

    def describe(self) -> str:
        """The plan in one line, for the run's records."""
        gib = 2**30
        return (
            f"auto: {self.usable / gib:.1f} GiB usable of {self.free / gib:.1f} GiB "
            f"{self.source}, {self.slot_bytes / 1024:.1f} KiB per token slot"
        )


def plan_memory(
    free: int,
    kv_per_token: int,
    row_bytes: int,
    new_tokens: int,
    reserve: int,
    source: str = "free",
) -> MemoryPlan:
    """The token budget for ``free`` bytes.

    A row's ``row_bytes`` (its logits) are spread over its slots, at least ``new_tokens`` + 1 of
    them (one prompt token): short rows are counted as dearest. ``reserve`` bytes (one prefill
    pass) and ``MARGIN`` of ``free`` are kept back.
    """
    usable = max(0, int(free * (1 - MARGIN)) - reserve)
    slot = kv_per_token + math.ceil(row_bytes / (new_tokens + 1))
    return MemoryPlan(free, usable, slot, max(1, usable // slot), source)


def model_memory(
    model, device: torch.device, new_tokens: int, prefill_tokens: int, chunked: bool
) -> MemoryPlan | None:
    """``plan_memory`` for ``model`` on ``device`` (weights loaded), or None when the free memory
    or the model's shape is unknown.

    With chunked prefill (``batchgen.engine.prefill``) one pass of ``prefill_tokens`` is reserved;
    without it the whole padded batch is prefilled at once, so each slot pays its activations.
    """
    free = free_memory(device)
    if free is None:
        return None
    dtype_bytes = compute_dtype(model).itemsize  # the KV cache takes the model's dtype
    try:
        kv = kv_bytes_per_token(model.config, dtype_bytes)
    except ValueError:
        return None
    split = getattr(getattr(model.config, "distributed_config", None), "tp_size", None) or 1
    if device.type == "cuda":  # tensor parallel: each GPU caches its share of the heads (on
        kv //= split  # the CPU, the group's processes share one RAM: the whole cache counts)
    act = activation_bytes_per_token(model.config, dtype_bytes)
    row = (getattr(_text_config(model.config), "vocab_size", 0) or 0) * 4 * LOGIT_COPIES
    reserve = prefill_tokens * (kv + act) if chunked else 0
    per_token = kv if chunked else kv + act
    return plan_memory(free[0], per_token, row, new_tokens, reserve, free[1])


@dataclass
class Budget:
    """The padded-token budget of a batch: halved on out-of-memory, grown back after clean runs."""

    # The ceiling: runner.max_batch_tokens, or under batch_size=auto the memory plan's (which
    # batchgen.engine.tuning may move); None: bounded by batch_size only.
    limit: int | None
    current: int | None = None
    clean: int = 0
    splits: int = 0

    def __post_init__(self) -> None:
        self.current = self.limit

    def shrink(self, failed_tokens: int) -> None:
        """A batch of ``failed_tokens`` token slots ran out of memory."""
        self.current = max(1, min(self.current or failed_tokens, failed_tokens) // 2)
        self.clean = 0
        self.splits += 1

    def succeeded(self) -> None:
        """A batch went through; after enough of them, give back some of the budget."""
        self.clean += 1
        if self.clean >= GROW_AFTER and self.current != self.limit:
            grown = int(self.current * GROWTH) + 1
            self.current = grown if self.limit is None or grown < self.limit else self.limit
            self.clean = 0


def batch_tokens(batch: list[PromptRecord], sampling: SamplingConfig) -> int:
    """Token slots a batch occupies: rows x samples x (longest prompt + new tokens)."""
    longest = max(len(r.token_ids) for r in batch)
    return len(batch) * sampling.num_return_sequences * (longest + sampling.max_new_tokens)
