"""Decoding attention over each row's own cache columns, on the CPU.

A prefilled static cache (``batchgen.engine.prefill``) holds every row of a batch right-aligned
to the longest prompt, T, with room for every new token. At each decoding step transformers'
SDPA attends, for every row, over the whole cache length under a mask; the CPU kernel does the
work of a masked column as of any other (it skips only what ``is_causal`` rules out), so a batch
of mixed prompt lengths spends much of its decoding attention on pads and on columns not
written yet. :class:`RowWindows` attends each row over its own columns only, ``[its first
prompt column, the columns written so far)``: one SDPA call per run of rows that start alike (a
prompt's samples; rows of equal length).

Each row's window holds its own tokens and nothing else, so its attention is computed on the
same inputs whatever rows share its batch: the outputs stay independent of batch composition
(``batchgen.engine.interface``), bit for bit. (Windows spanning several rows' starts were
measured as fast, but the kernel's sums then depend on where a row sits in its window.)

Transformers picks the attention function from the model's config, which the engine shares with
its caller, and ``generate`` refuses keywords its model does not name, so the engine switches
neither: :func:`windowed_sdpa` is registered in place of ``"sdpa"`` and acts only within
:func:`windowed`, which the engine holds around its ``generate`` call (a context variable: this
thread, this call); everywhere else it is transformers' own SDPA.

Shapes: R rows, L cache length, H heads, D head dim.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward


def row_runs(starts: list[int]) -> list[tuple[int, int, int]]:
    """Rows grouped into contiguous runs ``(first, end, column)`` of one first column each.

    ``starts``: each row's first prompt column, (R,); a prompt's samples share theirs.
    """
    runs = []
    for row, column in enumerate(starts):
        if runs and runs[-1][2] == column:
            runs[-1] = (runs[-1][0], row + 1, column)
        else:
            runs.append((row, row + 1, column))
    return runs


class RowWindows:
    """The runs of a batch's rows, and the cache whose written columns end their windows.

    Args:
        cache: the batch's prefilled ``StaticCache``.
        starts: each row's first prompt column, (R,).
    """

    def __init__(self, cache, starts: list[int]):
        self.cache = cache
        self.runs = row_runs(starts)

    def written(self, layer: int | None, key: torch.Tensor) -> int | None:
        """How many cache columns ``layer`` holds, the token being decoded included; None when
        ``key`` is not that layer's cache (attention over anything else is not windowed)."""
        if layer is None or key is not self.cache.layers[layer].keys:
            return None
        return int(self.cache.layers[layer].cumulative_length)


_ACTIVE: ContextVar[RowWindows | None] = ContextVar("row_windows", default=None)


def windowed_sdpa(module, query, key, value, attention_mask, **kwargs):
    """Transformers' SDPA; inside :func:`windowed`, a decoding step's attention run by run.

    ``query`` (R, H, 1, D), ``key``/``value`` (R, H_kv, L, D), ``attention_mask`` (R, 1, 1, L)
    or None; returns (R, 1, H, D) and no weights, as transformers' own.
    """
    row_windows = _ACTIVE.get()
    written = None
    if row_windows is not None and query.shape[2] == 1:  # a decoding step
        written = row_windows.written(getattr(module, "layer_idx", None), key)
    if written is None or (attention_mask is not None and attention_mask.shape[-1] != key.shape[2]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = []
    for first, end, column in row_windows.runs:
        mask = None if attention_mask is None else attention_mask[first:end, ..., column:written]
        out, _ = sdpa_attention_forward(
            module,
            query[first:end],
            key[first:end, :, column:written],
            value[first:end, :, column:written],
            mask,
            **kwargs,
        )
        outputs.append(out)
    return torch.cat(outputs), None


def applies(model, device: torch.device) -> bool:
    """Whether ``model``'s decoding attention can be windowed: on the CPU (``device``: where its
    inputs go) with SDPA attention; GPU kernels and other implementations run as they are."""
    return device.type == "cpu" and model.config._attn_implementation == "sdpa"


@contextmanager
def windowed(cache, starts: list[int]) -> Iterator[None]:
    """Within it, this thread's SDPA decoding steps attend run by run over ``cache``.

    ``starts``: each row's first prompt column, (R,). Check :func:`applies` first.
    """
    AttentionInterface.register("sdpa", windowed_sdpa)
    token = _ACTIVE.set(RowWindows(cache, starts))
    try:
        yield
    finally:
        _ACTIVE.reset(token)
