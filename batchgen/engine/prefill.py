"""Prefill a decode batch in chunks of similar length, into one static KV cache.

Decoding wants many rows per step: each step reads every weight once, whatever the rows. Prefill
wants no padding: it is compute-bound, and every pad slot is computed like a real token. So a
batch's prompts are prefilled in chunks of near-equal length, and each chunk's keys and values
are copied, right-aligned, into one static cache for the whole batch; ``generate`` then feeds
each prompt's last token and decodes from that cache. Left of each row's prompt the cache holds
zeros or a chunk's pad keys, which the attention mask hides, as it would hide left padding.

The tokens every prompt of the batch starts with (a system prompt, few-shot examples, a chat
template's header) are computed once and copied in front of each row, not once per row.

Shapes: B rows, T longest prompt, b rows of a chunk, t its longest prompt minus the last token,
H key/value heads, D head dim, N new tokens.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

from batchgen.engine.devices import input_device

# A prefill chunk closes before its pad slots exceed this share of its slots.
PAD_TOLERANCE = 0.1


def prefill_chunks(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Row indices grouped for prefill, longest first.

    A chunk holds rows of similar length: at most ``max_tokens`` padded slots (one row alone may
    exceed it) and pad slots at most ``PAD_TOLERANCE`` of its slots.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    chunks: list[list[int]] = []
    real = 0  # real tokens in the open chunk
    for i in order:
        if chunks:
            slots = lengths[chunks[-1][0]] * (len(chunks[-1]) + 1)
            pads = slots - real - lengths[i]
            if slots <= max_tokens and pads <= PAD_TOLERANCE * slots:
                chunks[-1].append(i)
                real += lengths[i]
                continue
        chunks.append([i])
        real = lengths[i]
    return chunks


def supports_prefill(model) -> bool:
    """Whether ``model`` takes and returns transformers' KV ``cache`` with explicit positions.

    Encoder-decoders, recurrent models (RWKV, Mamba: no default cache) and remote code (whose
    forward may take other arguments) generate the plain way.
    """
    params = inspect.signature(model.forward).parameters
    return (
        not model.config.is_encoder_decoder
        and model._supports_default_dynamic_cache()
        and not model.is_remote_code()
        and "cache" in params
        and "position_ids" in params
    )


def shared_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens all ``prompts`` share, short of the shortest one's last token."""
    common = os.path.commonprefix(prompts)  # element-wise, so it works on token lists
    return min(len(common), min(len(p) for p in prompts) - 1)


@dataclass
class Prefilled:
    """A static cache holding every row's prompt but its last token, ending at position T-1."""

    cache: StaticCache
    pad_slots: int  # pad tokens computed by the chunks' forward passes
    shared: int  # leading tokens common to every prompt, computed once


def left_pad(rows: list[list[int]], width: int, pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """``(ids, mask)``, each (b, width): rows right-aligned, pads (mask 0) on the left."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def prefill(
    model,
    prompts: list[list[int]],
    copies: int,
    pad_id: int,
    cache_len: int,
    max_tokens: int,
    on_chunk: Callable[[], None] | None = None,
) -> Prefilled | None:
    """Prefill ``prompts`` chunk by chunk into one static cache of ``cache_len`` positions.

    ``cache_len`` must hold T-1 prompt tokens plus the new ones. Each prompt is computed once
    and fills ``copies`` consecutive cache rows (B = prompts x copies), one per sample.
    ``on_chunk`` is called after each forward pass (the shared prefix, each chunk).

    Returns None where this does not apply, and the caller generates the plain way: prompts of
    one token (nothing to prefill) and caches not made of plain static layers (sliding windows).
    The caller checks :func:`supports_prefill` first.
    """
    longest = max(len(p) for p in prompts)
    if longest < 2:
        return None
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    if not all(type(layer) is StaticLayer for layer in cache.layers):
        return None
    device = input_device(model)
    end = longest - 1  # every row's cached prompt ends here; its last token goes at T-1
    shared = shared_prefix(prompts)
    rows = len(prompts) * copies
    prefix = _forward(model, torch.tensor([prompts[0][:shared]], device=device)) if shared else []
    if shared and on_chunk is not None:
        on_chunk()
    _allocate(cache, prefix, rows)
    pad_slots = 0
    for chunk in prefill_chunks([len(p) - 1 - shared for p in prompts], max_tokens):
        width = len(prompts[chunk[0]]) - 1 - shared
        if width == 0:
            break  # longest first: the rest are the prefix plus a last token, nothing more
        suffixes = [prompts[i][shared:-1] for i in chunk]
        ids, mask = left_pad(suffixes, width, pad_id, device)  # (b, t)
        pad_slots += int((mask == 0).sum())
        if shared:  # the prefix, then the pads, then each row's own tokens
            mask = torch.cat([mask.new_ones((len(chunk), shared)), mask], dim=-1)  # (b, P+t)
        past = [
            (k.expand(len(chunk), -1, -1, -1), v.expand(len(chunk), -1, -1, -1)) for k, v in prefix
        ]
        parts = _forward(model, ids, mask, past)
        if on_chunk is not None:
            on_chunk()
        _allocate(cache, parts, rows)
        index = torch.tensor([i * copies + c for i in chunk for c in range(copies)], device=device)
        for layer, (keys, values) in zip(cache.layers, parts, strict=True):
            # A model split over GPUs keeps each layer's cache on that layer's device.
            index = index.to(layer.keys.device)
            layer.keys[index, :, end - width : end] = keys[:, :, -width:].repeat_interleave(
                copies, dim=0
            )  # (b*copies, H, t, D)
            layer.values[index, :, end - width : end] = values[:, :, -width:].repeat_interleave(
                copies, dim=0
            )
    for i, prompt in enumerate(prompts if shared else ()):  # each row: prefix, then its own
        start = end - (len(prompt) - 1)
        for layer, (keys, values) in zip(cache.layers, prefix, strict=True):
            layer.keys[i * copies : (i + 1) * copies, :, start : start + shared] = keys
            layer.values[i * copies : (i + 1) * copies, :, start : start + shared] = values
    for layer in cache.layers:
        layer.cumulative_length.fill_(end)
    return Prefilled(cache, pad_slots, shared)


def _forward(model, ids, mask=None, past=()) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values, (b, H, P+t, D) per layer, of ``ids`` after the cached ``past`` ones.

    Positions count real tokens only, as generate() numbers left-padded rows.
    """
    if mask is None:
        mask = torch.ones((ids.shape[0], ids.shape[1]), dtype=torch.long, device=ids.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]  # (b, t)
    cache = DynamicCache(config=model.config)
    for layer_idx, (keys, values) in enumerate(past):
        cache.update(keys, values, layer_idx)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return [(layer.keys, layer.values) for layer in out.cache.layers]


def _allocate(cache: StaticCache, like: list, rows: int) -> None:
    """Allocate each layer's (rows, H, T-1+N, D) tensors once, shaped like a forward pass's."""
    for layer, (keys, values) in zip(cache.layers, like, strict=False):
        if not layer.is_initialized:
            layer.lazy_initialization(
                keys.new_empty((rows, keys.shape[1], 0, keys.shape[-1])),
                values.new_empty((rows, values.shape[1], 0, values.shape[-1])),
            )
