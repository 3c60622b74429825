"""Batch-invariant sampling: each sample's randomness comes from its own key, not from a shared RNG.

``argmax(scores + Gumbel noise)`` is an exact draw from ``softmax(scores)``. The noise for sample
``s`` at step ``t`` and token ``v`` is a pure function of ``(key_s, t, v)``, computed with an
integer hash (splitmix64) in tensor ops: it does not depend on which rows share a batch, on the
batch size, on resume or on the device, so a row's sample is the same however it was scheduled.
"""

from __future__ import annotations

import hashlib

import torch
from transformers import LogitsProcessorList
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from batchgen.config import SamplingConfig

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from the base seed and a sample's labels (row id, sample index).

    Hash-based, so neighbouring rows get unrelated streams and the value never depends on which
    process, batch or order the work runs in: nothing of a batch may enter it, or a row's samples
    would change with its neighbours.
    """
    key = ":".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def _signed(c: int) -> int:
    """A 64-bit constant as the signed int64 torch stores (multiplication wraps the same way)."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    x = x + _signed(_GOLDEN)
    x = (x ^ _shr(x, 30)) * _signed(_MIX1)
    x = (x ^ _shr(x, 27)) * _signed(_MIX2)
    return x ^ _shr(x, 31)


def gumbel_noise(keys: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise of shape (R, V) for R sample keys at one decoding step.

    Args:
        keys: (R,) int64 sample keys.
        step: index of the token being generated (0 for the first new token).
        vocab: V, the number of logits per row.
    """
    tokens = torch.arange(vocab, device=keys.device, dtype=torch.int64)  # (V,)
    row = _splitmix64(keys * 1_000_003 + step)  # (R,)
    bits = _splitmix64(row[:, None] ^ _splitmix64(tokens)[None, :])  # (R, V)
    uniform = (_shr(bits, 11).double() + 0.5) / float(1 << 53)  # (R, V) in (0, 1)
    return -torch.log(-torch.log(uniform))


def sample_keys(
    seed: int, ids: list[str], n: int, row_seeds: list[int | None] | None = None
) -> list[int]:
    """One key per sample, rows in order and each row's ``n`` samples together; a row's own
    seed (``row_seeds``, None: the job's) replaces ``seed`` for its samples."""
    seeds = row_seeds or [None] * len(ids)
    return [
        derive_seed(seed if own is None else own, "sample", row_id, k)
        for row_id, own in zip(ids, seeds, strict=True)
        for k in range(n)
    ]


class GumbelSampler:
    """A logits processor that turns greedy decoding into per-sample seeded sampling.

    Placed last, after temperature, top-k and top-p have shaped the scores.
    """

    def __init__(self, keys: list[int], prompt_width: int, device: torch.device):
        self.keys = torch.tensor(keys, dtype=torch.int64, device=device)  # (R,)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """(R, L) ids so far, (R, V) scores -> (R, V) scores plus this step's noise."""
        step = input_ids.shape[1] - self.prompt_width
        noise = gumbel_noise(self.keys, step, scores.shape[-1]).to(scores.dtype)
        return scores + noise


def sampling_processors(
    sampling: SamplingConfig, keys: list[int], prompt_width: int, device
) -> LogitsProcessorList:
    """Warpers plus the noise; empty for greedy decoding (``temperature=0`` is greedy too)."""
    if not sampling.do_sample or sampling.temperature == 0:
        return LogitsProcessorList()
    procs = LogitsProcessorList()
    if sampling.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        procs.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        procs.append(TopPLogitsWarper(sampling.top_p))
    if sampling.min_p > 0:
        procs.append(MinPLogitsWarper(sampling.min_p))
    procs.append(GumbelSampler(keys, prompt_width, device))
    return procs
