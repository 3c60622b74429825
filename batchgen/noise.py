"""Third-party log messages a batchgen user can neither act on nor avoid, kept off the screen.

Invariant: only the messages of ``QUIET`` are dropped, each picked by its logger and its text,
and nothing else those loggers say; the filters are in place from ``import batchgen`` on, before
any of those libraries is imported: transformers imports torchao wherever torchao is installed
(its quantizer registry), so a user who never asked for ``model.quantization=int8`` would see
torchao's import-time warnings on every run otherwise.
"""

from __future__ import annotations

import logging

# (logger, the start of the messages it drops). Each is a library talking to its own developers.
QUIET = (
    # torchao's kernels for CUDA-only formats (mxfp8, sm90a cutlass) cannot load on other builds;
    # its int8 weight-only path needs neither.
    ("torchao", "Failed to load "),
    # torchao's int8 matmul for Triton, which CPU builds of torch lack; weight-only int8 needs none.
    ("torchao.kernel.intmm", "Warning: Detected no triton"),
    # torchao registers enums that this torch supports natively: a deprecation for torchao.
    ("torch.utils._pytree", "%s is an Enum subclass"),
    # bitsandbytes' 8-bit matmul repeats on every forward pass that it multiplies in float16.
    ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast"),
    # bitsandbytes (which peft imports too) asks the hub for a faster CPU 4-bit kernel at import;
    # offline or untrusted, it keeps its own kernel.
    ("kernels._internals.hf_hub", "Skipping publisher trust check"),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
)


class _Drop(logging.Filter):
    """Drops a logger's records whose message (its format string) starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    """Put the ``QUIET`` filters on their loggers (once, however often it is called)."""
    for name, prefix in QUIET:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_Drop(prefix))
