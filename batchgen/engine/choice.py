"""Which engine a job runs: ``runner.engine`` resolved for the job's settings and device, and
the engine built for that answer.

Invariant: an engine is chosen here and built here, for the job loop and ``Generator`` alike;
neither builds one itself.
"""

from __future__ import annotations

from batchgen.config import RunnerConfig, SamplingConfig
from batchgen.engine import tuning
from batchgen.engine.continuous import ContinuousEngine
from batchgen.engine.interface import Engine
from batchgen.engine.static import StaticEngine
from batchgen.errors import ConfigError

# Devices where continuous batching beat static batching in scripts/bench.py (docs/benchmarks.md).
# On the CPU it lost (0.89x vs 4.66x the baseline); no GPU run has been measured yet.
AUTO_CONTINUOUS_DEVICES: tuple[str, ...] = ()


# What ``choose_engine`` answers where both engines apply and the first rows decide.
PROBE = "probe"


def choose_engine(
    runner: RunnerConfig,
    sampling: SamplingConfig,
    encoder_decoder: bool,
    device: str,
    logprobs: bool = False,
    per_row: bool = False,
) -> str:
    """``static``, ``continuous``, or ``PROBE`` (``runner.engine=auto`` where both apply on a
    ``tuning.PROBE_DEVICES`` device: ``Batcher`` runs the first rows through both).

    ``logprobs``: log-probabilities are recorded (output.logprobs or output.top_logprobs), which
    takes a logits processor that continuous batching has no place for. ``per_row``: rows carry
    their own sampling (``dataset.sampling_column``), batched by setting.

    Raises:
        ConfigError: ``runner.engine=continuous`` for a job it cannot serve.
    """
    unsupported = tuning.continuous_blockers(sampling, encoder_decoder, logprobs, per_row)
    if runner.engine == "continuous" and unsupported:
        raise ConfigError(
            f"runner.engine=continuous: transformers' continuous batching takes no logits "
            f"processors, so it cannot serve {', '.join(unsupported)}; use runner.engine=static "
            "or auto."
        )
    if runner.engine == "auto":
        kind = device.split(":")[0]
        if unsupported:
            return "static"
        if kind in AUTO_CONTINUOUS_DEVICES:
            return "continuous"
        return PROBE if kind in tuning.PROBE_DEVICES else "static"
    return runner.engine


def build_engine(
    kind: str,
    model,
    tokenizer,
    runner: RunnerConfig,
    logprobs: bool = False,
    top_logprobs: int = 0,
) -> Engine:
    """The engine ``choose_engine`` named, over ``model`` (which it does not modify); for
    ``PROBE``, a continuous one, whose ``generate`` is the static engine's: it can be either.

    ``logprobs`` and ``top_logprobs`` are output.logprobs and output.top_logprobs.
    """
    cls = ContinuousEngine if kind in ("continuous", PROBE) else StaticEngine
    return cls(
        model,
        tokenizer,
        compile=runner.compile,
        prefill_tokens=runner.prefill_tokens,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
