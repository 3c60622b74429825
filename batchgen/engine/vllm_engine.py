"""The vLLM engine: a shard's requests through vLLM's own scheduler, under batchgen's guarantees.

Invariant: vLLM receives token ids and per-sample sampling parameters and returns token ids (and
log-probabilities); batchgen decodes them (``batchgen.engine.decode``), so the columns, finish
reasons and token counts mean what they mean with the other engines. Every sample is a request
of its own, seeded from (seed or the row's own, row id, sample index) as the other engines seed
it, so a sample does not depend on the requests beside it; a row's own settings are its
requests' own. A setting vLLM cannot honour is refused before any model loads (``blockers``).

vLLM is an optional install (``make vllm-env``: its CPU build in ``.venv-vllm``), imported only
when this engine is built. It runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so
the stop request, the stall watchdog and the progress bar see every step; its own logging goes
to a log file, not over the bar.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

from batchgen.config import ModelConfig, RunnerConfig, SamplingConfig
from batchgen.engine.decode import Decoder
from batchgen.engine.interface import Engine, Sample
from batchgen.engine.logprobs import RowLogprobs
from batchgen.engine.memory import available_ram
from batchgen.engine.sampling import derive_seed
from batchgen.errors import ConfigError, Interrupted
from batchgen.inputs.prompts import PromptRecord

KIND = "vllm"
# vLLM's own switches, set before it is imported (a user's own values win).
ENVIRONMENT = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core in this process: see the docstring
    "VLLM_CONFIGURE_LOGGING": "0",  # its loggers are routed by ``route_logs``
}
# The share of the GPU's memory vLLM may take (gpu_memory_utilization).
MEMORY_SHARE = 0.8
# On the CPU, its KV cache takes this share of the RAM available, at most CPU_KV_CAP: the RAM is
# the whole machine's, shared with the data, the other workers and everything else running.
CPU_KV_SHARE = 0.25
CPU_KV_CAP = 8 * 2**30


def installed() -> bool:
    """Whether vLLM is importable here (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def import_vllm():
    """The ``vllm`` module, its environment set first.

    Raises:
        ConfigError: vLLM is not installed here, saying how to get it.
    """
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    # Its own deprecation notices are not the user's to act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm(\.|$)")
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(
            f"runner.engine=vllm: vLLM is not installed in this environment ({sys.prefix}): "
            f"{e}. Build its environment with `make vllm-env` (vLLM's CPU build beside batchgen "
            "in .venv-vllm; on a GPU box `pip install vllm`), then run batchgen from it: "
            "`make vllm-run ARGS='runner.engine=vllm ...'`."
        ) from e
    return vllm


def blockers(
    sampling: SamplingConfig,
    encoder_decoder: bool,
    device: str,
    logprobs: bool,
    model: ModelConfig | None = None,
) -> list[str]:
    """The settings vLLM cannot honour as batchgen's engines do (empty: it serves the job).

    ``model.quantization``, ``model.adapter`` and ``model.device_map`` are refused: vLLM
    quantizes, adapts (LoRA requests) and splits (tensor parallel) its own ways, which batchgen
    does not drive; a checkpoint saved quantized needs none of them, vLLM reads its config.
    """
    m = model or ModelConfig()
    return [
        why
        for applies, why in (
            (encoder_decoder, "an encoder-decoder model"),
            (device.startswith("mps"), "model.device=mps"),
            (m.quantization is not None, "model.quantization"),
            (m.adapter is not None, "model.adapter"),
            (m.device_map is not None, "model.device_map"),
            # vLLM reports log-probabilities before any penalty; batchgen's engines after it.
            (
                logprobs and sampling.repetition_penalty not in (None, 1.0),
                "output.logprobs with sampling.repetition_penalty",
            ),
        )
        if applies
    ]


def route_logs(log_file: Path | None) -> None:
    """vLLM's messages to ``log_file`` (its start-up report included), or, without one, its
    warnings and errors to stderr; never over the progress bar as INFO lines."""
    logger = logging.getLogger("vllm")
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    if log_file is None:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.WARNING)
    else:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def llm_options(
    location: str,
    dtype: str,
    device: str,
    context: int | None,
    runner: RunnerConfig,
    trust_remote_code: bool = False,
) -> dict:
    """``vllm.LLM``'s arguments for batchgen's settings (``VllmEngine``'s; ``scripts/bench_vllm.py``
    drives vLLM directly with the same)."""
    options = {
        "model": location,
        "tokenizer": location,
        "dtype": dtype,
        "max_model_len": context,
        "enforce_eager": not runner.compile,
        "trust_remote_code": trust_remote_code,
        "seed": 0,  # every request has its own seed; this one seeds nothing batchgen reads
        "logprobs_mode": "raw_logprobs",
        "structured_outputs_config": {"backend": "guidance"},  # llguidance, as batchgen
        "disable_log_stats": True,
        "use_tqdm_on_load": False,
    }
    if isinstance(runner.batch_size, int):
        options["max_num_seqs"] = runner.batch_size
    if device.startswith("cuda"):
        options["gpu_memory_utilization"] = MEMORY_SHARE
    elif (ram := available_ram()) is not None:
        options["kv_cache_memory_bytes"] = min(int(ram * CPU_KV_SHARE), CPU_KV_CAP)
    return {k: v for k, v in options.items() if v is not None}


class VllmEngine(Engine):
    """vLLM over one model folder (see the module docstring).

    Args:
        location: the model's folder (a GGUF is converted before this).
        tokenizer: batchgen's tokenizer of it: batchgen renders, tokenizes and decodes.
        eos_ids: the ids that end a sequence (``decode.eos_token_ids``).
        dtype: the dtype as resolved (``model.dtype``).
        device: the device as resolved.
        context: the context length (``model.max_context``, else the model's).
        runner: ``batch_size`` (a number: vLLM's most sequences at once; auto: vLLM's own)
            and ``compile`` (compiled, else eager).
        trust_remote_code: ``model.trust_remote_code``.
        logprobs: record the chosen tokens' log-probabilities (``output.logprobs``).
        top_logprobs: record the K most likely tokens at each position.
        log_file: where vLLM's own messages go.
    """

    kind = KIND
    chunked_prefill = True  # vLLM prefills in chunks under its own token budget

    def __init__(
        self,
        location: str,
        tokenizer,
        eos_ids: set[int],
        dtype: str,
        device: str,
        context: int | None,
        runner: RunnerConfig,
        trust_remote_code: bool = False,
        logprobs: bool = False,
        top_logprobs: int = 0,
        log_file: Path | None = None,
    ):
        super().__init__()
        vllm = import_vllm()
        route_logs(log_file)
        self.tokenizer = tokenizer
        self.device_name = device
        self.encoder_decoder = False
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs
        options = llm_options(location, dtype, device, context, runner, trust_remote_code)
        options["max_logprobs"] = max(top_logprobs, 1)
        self.llm = vllm.LLM(**options)
        self.model = None  # vLLM holds the weights; batchgen's memory plan does not apply
        self.device = _torch_device(device)
        self.decoder = Decoder(tokenizer, eos_ids, tokenizer.pad_token_id)
        self.vllm = vllm

    def serves(self, sampling: SamplingConfig, per_row: bool) -> bool:
        """Every setting the plan let through (``blockers``), rows with their own included."""
        return True

    def params(self, record: PromptRecord, k: int, sampling: SamplingConfig, seed: int):
        """vLLM's parameters for sample ``k`` of ``record``: its settings, its own seed."""
        own = record.sampling or sampling
        sampled = bool(own.do_sample) and own.temperature != 0
        structured = None
        if own.json_schema or own.regex:
            structured = self.vllm.sampling_params.StructuredOutputsParams(
                json=own.json_schema, regex=own.regex
            )
        eos = sorted(self.decoder.eos_ids(own))
        return self.vllm.SamplingParams(
            n=1,
            temperature=own.temperature if sampled else 0.0,
            top_p=own.top_p if sampled else 1.0,
            top_k=own.top_k if sampled else 0,
            min_p=own.min_p if sampled else 0.0,
            repetition_penalty=own.repetition_penalty,
            seed=derive_seed(seed if record.seed is None else record.seed, "sample", record.id, k),
            max_tokens=own.max_new_tokens,
            ignore_eos=own.ignore_eos,
            stop=list(own.stop) or None,
            stop_token_ids=eos or None,
            logprobs=self.top_logprobs if (self.logprobs or self.top_logprobs) else None,
            detokenize=bool(own.stop),  # batchgen decodes; vLLM's text only finds stop strings
            structured_outputs=structured,
        )

    def generate(
        self, records: list[PromptRecord], seed: int, sampling: SamplingConfig
    ) -> list[list[Sample]]:
        """The samples of every record (``generate_all`` without progress)."""
        return self.generate_all(records, seed, sampling)

    def generate_all(
        self,
        records: list[PromptRecord],
        seed: int,
        sampling: SamplingConfig,
        on_finished: Callable[[list[tuple[PromptRecord, list[Sample]]]], None] | None = None,
        stop: threading.Event | None = None,
    ) -> list[list[Sample]]:
        """Every record's samples, vLLM scheduling the requests; ``on_finished`` gets the rows
        each step finished.

        Raises:
            Interrupted: ``stop`` was set; the unfinished requests were aborted (the rows
                ``on_finished`` received are final).
        """
        from vllm.inputs import TokensPrompt

        engine = self.llm.llm_engine
        requests: dict[str, tuple[int, int]] = {}  # request id -> (record position, sample)
        for i, record in enumerate(records):
            n = (record.sampling or sampling).num_return_sequences
            for k in range(n):
                request_id = f"{i}:{k}"
                prompt = TokensPrompt(prompt_token_ids=list(record.token_ids))
                engine.add_request(request_id, prompt, self.params(record, k, sampling, seed))
                requests[request_id] = (i, k)
        samples: list[dict[int, Sample]] = [{} for _ in records]
        done: list[list[Sample] | None] = [None] * len(records)
        try:
            while engine.has_unfinished_requests():
                if stop is not None and stop.is_set():
                    raise Interrupted
                finished = []
                for output in engine.step():
                    if not output.finished:
                        continue
                    completion = output.outputs[0]
                    i, k = requests[output.request_id]
                    own = records[i].sampling or sampling
                    samples[i][k] = self._sample(completion, own)
                    if len(samples[i]) == own.num_return_sequences:
                        done[i] = [samples[i][j] for j in range(own.num_return_sequences)]
                        finished.append((records[i], done[i]))
                if self.on_step is not None:
                    self.on_step(0)  # its tokens count as their rows finish
                if finished and on_finished is not None:
                    on_finished(finished)
        except BaseException:
            unfinished = [r for r, (i, _) in requests.items() if done[i] is None]
            engine.abort_request(unfinished)
            raise
        return done

    def _sample(self, completion, sampling: SamplingConfig) -> Sample:
        scores = None
        if completion.logprobs is not None:
            scores = _row_logprobs(completion.token_ids, completion.logprobs, self.top_logprobs)
        return self.decoder.sample(list(completion.token_ids), sampling, scores, self.logprobs)


def _row_logprobs(token_ids, positions, top: int) -> RowLogprobs:
    """vLLM's per-position logprob dicts as batchgen's recorded values."""
    chosen = [step[token].logprob for token, step in zip(token_ids, positions, strict=True)]
    if not top:
        return RowLogprobs(chosen, None, None)
    ranked = [
        sorted(((v.rank, t, v.logprob) for t, v in step.items() if v.rank <= top))
        for step in positions
    ]
    return RowLogprobs(
        chosen,
        [[t for _, t, _ in step] for step in ranked],
        [[v for _, _, v in step] for step in ranked],
    )


def _torch_device(device: str):
    import torch

    return torch.device(device)
