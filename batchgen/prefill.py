"""Prefill a decode batch in chunks of similar length, into one static KV cache.

Decoding wants many rows per step: each step reads every weight once, whatever the rows. Prefill
wants no padding: it is compute-bound, and every pad slot is computed like a real token. So a
batch's prompts are prefilled in chunks of near-equal length, and each chunk's keys and values
are copied, right-aligned, into one static cache for the whole batch; ``generate`` then feeds
each prompt's last token and decodes from that cache. Left of each row's prompt the cache holds
zeros that the attention mask hides, exactly where left padding would have been.

Shapes: B rows, T longest prompt, b rows of a chunk, t its longest prompt minus the last token,
H key/value heads, D head dim, N new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

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


@dataclass
class Prefilled:
    """A static cache holding every row's prompt but its last token, ending at position T-1."""

    cache: StaticCache
    pad_slots: int  # pad tokens computed by the chunks' forward passes


def left_pad(rows: list[list[int]], width: int, pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """``(ids, mask)``, each (b, width): rows right-aligned, pads (mask 0) on the left."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def prefill(
    model, prompts: list[list[int]], copies: int, pad_id: int, new_tokens: int, max_tokens: int
) -> Prefilled | None:
    """Prefill ``prompts`` chunk by chunk into one static cache of T-1+N positions.

    Each prompt is computed once and fills ``copies`` consecutive cache rows (B = prompts x
    copies), one per sample.

    Returns None where this does not apply, and the caller generates the plain way: prompts of
    one token (nothing to prefill) and models whose cache is not made of plain static layers
    (sliding-window or recurrent layers).
    """
    longest = max(len(p) for p in prompts)
    if longest < 2:
        return None
    cache = StaticCache(config=model.config, max_cache_len=longest - 1 + new_tokens)
    if not all(type(layer) is StaticLayer for layer in cache.layers):
        return None
    device = next(model.parameters()).device
    end = longest - 1  # every row's cached prompt ends here; its last token goes at T-1
    pad_slots = 0
    for chunk in prefill_chunks([len(p) - 1 for p in prompts], max_tokens):
        width = len(prompts[chunk[0]]) - 1
        if width == 0:
            break  # longest first: the rest are one-token prompts, with nothing to cache
        ids, mask = left_pad([prompts[i][:-1] for i in chunk], width, pad_id, device)  # (b, t)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=DynamicCache(config=model.config),
            use_cache=True,
            logits_to_keep=1,
        )
        index = torch.tensor([i * copies + c for i in chunk for c in range(copies)], device=device)
        for layer, part in zip(cache.layers, out.cache.layers, strict=True):
            keys = part.keys.repeat_interleave(copies, dim=0)  # (b*copies, H, t, D)
            values = part.values.repeat_interleave(copies, dim=0)
            if not layer.is_initialized:
                rows = len(prompts) * copies
                layer.lazy_initialization(
                    keys.new_empty((rows, keys.shape[1], 0, keys.shape[-1])),
                    values.new_empty((rows, values.shape[1], 0, values.shape[-1])),
                )
            layer.keys[index, :, end - width : end] = keys
            layer.values[index, :, end - width : end] = values
        pad_slots += int((mask == 0).sum())
    for layer in cache.layers:
        layer.cumulative_length.fill_(end)
    return Prefilled(cache, pad_slots)
