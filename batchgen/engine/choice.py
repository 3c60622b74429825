"""Which engine a job runs: ``runner.engine`` resolved for the job's settings and device, and
the engine built for that answer (vLLM only where asked for: ``runner.engine=vllm``).

Invariant: an engine is chosen here and built here, for the job loop and ``Generator`` alike;
neither builds one itself.
"""

from __future__ import annotations

from pathlib import Path

from batchgen.config import ModelConfig, RunnerConfig, SamplingConfig
from batchgen.engine import tuning, vllm_engine
from batchgen.engine.continuous import ContinuousEngine
from batchgen.engine.decode import eos_token_ids
from batchgen.engine.devices import Model
from batchgen.engine.interface import Engine
from batchgen.engine.static import StaticEngine
from batchgen.errors import ConfigError
from batchgen.inputs import models

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
    model: ModelConfig | None = None,
) -> str:
    """``static``, ``continuous``, or ``PROBE`` (``runner.engine=auto`` where both apply on a
    ``tuning.PROBE_DEVICES`` device: ``Batcher`` runs the first rows through both).

    ``logprobs``: log-probabilities are recorded (output.logprobs or output.top_logprobs), which
    takes a logits processor that continuous batching has no place for. ``per_row``: rows carry
    their own sampling (``dataset.sampling_column``), batched by setting. ``model``: the
    ``model.*`` settings, some of which vLLM refuses (``vllm_engine.blockers``).

    Raises:
        ConfigError: ``runner.engine=continuous`` or ``vllm`` for a job it cannot serve, or vLLM
            not installed; before any model loads.
    """
    if runner.engine == vllm_engine.KIND:
        refused = vllm_engine.blockers(sampling, encoder_decoder, device, logprobs, model)
        if refused:
            raise ConfigError(
                f"runner.engine=vllm cannot serve {', '.join(refused)} as batchgen's engines do; "
                "use runner.engine=static or auto."
            )
        if not vllm_engine.installed():
            vllm_engine.import_vllm()  # raises, saying how to install it
        return vllm_engine.KIND
    unsupported = tuning.continuous_blockers(sampling, encoder_decoder, logprobs, per_row)
    if runner.engine == "continuous" and unsupported:
        raise ConfigError(
            f"runner.engine=continuous: transformers' continuous batching takes no logits "
            f"processors, so it cannot serve {', '.join(unsupported)}; use runner.engine=static "
            "or auto."
        )
    if model is not None and model.tp_size > 1:
        return "static"  # the one engine a tensor-parallel group runs step for step
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
    model: Model,
    runner: RunnerConfig,
    logprobs: bool = False,
    top_logprobs: int = 0,
    context: int | None = None,
    log_file: Path | None = None,
) -> Engine:
    """The engine ``choose_engine`` named, over ``model``; for ``PROBE``, a continuous one, whose
    ``generate`` is the static engine's: it can be either. transformers' engines load the weights
    here (and never modify them); vLLM loads them itself from the model's folder.

    Args:
        logprobs: ``output.logprobs``.
        top_logprobs: ``output.top_logprobs``.
        context: the context length (vLLM's ``max_model_len``).
        log_file: where vLLM's own messages go.

    Raises:
        ConfigError: vLLM asked for over a model the caller loaded (it has no folder to load).
    """
    if kind == vllm_engine.KIND:
        if model.source is None:
            raise ConfigError(
                "runner.engine=vllm loads the model itself from its folder: give Generator the "
                "model's name or path, not a loaded model."
            )
        generation_config = models.load_generation_config(model.source, model.settings)
        return vllm_engine.VllmEngine(
            model.source.location,
            model.tokenizer,
            eos_token_ids(generation_config, model.tokenizer),
            model.dtype,
            model.device,
            context,
            runner,
            model.settings.trust_remote_code,
            logprobs,
            top_logprobs,
            log_file,
        )
    cls = ContinuousEngine if kind in ("continuous", PROBE) else StaticEngine
    options = dict(
        compile=runner.compile,
        prefill_tokens=runner.prefill_tokens,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    engine = cls(model.load(), model.tokenizer, **options)
    # A tensor-parallel group's followers build the same engine and follow this one.
    return model.group.lead(engine, options) if model.group is not None else engine
