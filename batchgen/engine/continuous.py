"""Continuous batching through transformers' own manager (paged attention, slots refilled at once).

A finished sequence's slot goes to the next waiting prompt at the next step, so early-finishing
sequences leave no idle rows behind and prompts need no padding. transformers samples with its
own RNG inside the manager, so this engine does greedy decoding only; sampling jobs use the
static engine, whose per-sample noise keeps them batch-invariant.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch
from transformers import ContinuousBatchingConfig
from transformers.generation.continuous_batching.utils import WorkloadHints

from batchgen.config import SamplingConfig
from batchgen.engine.interface import Sample
from batchgen.engine.static import StaticEngine
from batchgen.engine.tuning import continuous_blockers
from batchgen.errors import Interrupted
from batchgen.inputs.prompts import PromptRecord

# Seconds to wait for one result before checking that the manager's thread is still alive.
POLL_SECONDS = 1.0
# Tokens per KV-cache page (transformers' default).
PAGE_SIZE = 256


def cache_config(records: list[PromptRecord], max_new_tokens: int, device: torch.device):
    """Size the paged KV cache: on a GPU from free memory (transformers' own rule); on the CPU
    from the workload, since there "free memory" is the whole RAM (10 GB seen for 64 prompts)."""
    if device.type != "cpu":
        return ContinuousBatchingConfig()
    blocks = sum(math.ceil((len(r.token_ids) + max_new_tokens) / PAGE_SIZE) for r in records)
    return ContinuousBatchingConfig(num_blocks=blocks + 1)


class ContinuousEngine(StaticEngine):
    """Continuous batching of a whole shard (:meth:`generate_all`); its inherited ``generate``
    is the static path, for what continuous batching cannot serve and for a shard that fails
    here."""

    kind = "continuous"

    def serves(self, sampling: SamplingConfig, per_row: bool) -> bool:
        """Greedy rows of one setting, without processors (``tuning.continuous_blockers``)."""
        logprobs = bool(self.logprobs or self.top_logprobs)
        return not continuous_blockers(sampling, self.encoder_decoder, logprobs, per_row)

    def generate_all(
        self,
        records: list[PromptRecord],
        seed: int,
        sampling: SamplingConfig,
        on_finished: Callable[[list[tuple[PromptRecord, list[Sample]]]], None] | None = None,
        stop: threading.Event | None = None,
    ) -> list[list[Sample]]:
        """Greedy-generate every record; ``on_finished`` gets each as it finishes.

        Raises:
            Interrupted: ``stop`` was set (checked as results arrive).
        """
        del seed  # greedy decoding draws nothing
        self.use(sampling)
        inputs = [r.token_ids for r in records]
        new_tokens = sampling.max_new_tokens
        results: dict[str, list[int]] = {}
        model = self.model
        with (
            torch.inference_mode(),
            model.continuous_batching_context_manager(
                generation_config=model.generation_config,
                continuous_batching_config=cache_config(records, new_tokens, self.device),
                workload_hints=WorkloadHints(
                    max_prompt_length=max(len(ids) for ids in inputs),
                    max_generated_length=new_tokens,
                    num_requests=len(inputs),
                ),
                block=True,
                timeout=5,
            ) as manager,
        ):
            request_ids = manager.add_requests(inputs=inputs, max_new_tokens=new_tokens)
            position = {rid: i for i, rid in enumerate(request_ids)}
            while len(results) < len(request_ids):
                if stop is not None and stop.is_set():
                    raise Interrupted
                result = manager.get_result(timeout=POLL_SECONDS)
                if result is None:
                    if not manager.is_running():
                        raise RuntimeError("transformers' continuous batching manager stopped")
                    continue
                if result.is_finished():
                    if result.error:
                        raise RuntimeError(f"continuous batching request failed: {result.error}")
                    results[result.request_id] = [
                        self.decoder.sample(list(result.generated_tokens), sampling)
                    ]
                    if on_finished is not None:
                        record = records[position[result.request_id]]
                        on_finished([(record, results[result.request_id])])
        return [results[rid] for rid in request_ids]
