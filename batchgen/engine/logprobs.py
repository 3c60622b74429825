"""Log-probabilities of the generated tokens, recorded while ``generate`` decodes.

Invariant: the values are the model's own log-probabilities: ``log_softmax`` in float32 of the
scores that ``generate``'s built-in processors leave (its repetition penalty, when set), taken
before our temperature, top-k, top-p, sampling noise and any constraint mask. That is what vLLM
returns by default and what the OpenAI API reports: a sample is scored by the model, whatever
sampling settings drew it, and a constrained token keeps its real (not -inf) value.

Memory does not grow with vocabulary x steps: only the previous step's (R, V) log-softmax is
held, until the next step reveals which token was chosen; per step only (R,) and (R, K) remain.

Shapes: R rows, V vocabulary, K top tokens, N new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowLogprobs:
    """One row's recorded values over all N steps, before it is cut at its end."""

    chosen: list[float]  # (N,) log-probability of the token generated at each step
    top_ids: list[list[int]] | None  # (N, K) the K most likely tokens, most likely first
    top_values: list[list[float]] | None  # (N, K) their log-probabilities

    def cut(self, end: int) -> tuple[list[float], list[list[tuple[int, float]]] | None]:
        """The first ``end`` steps: the chosen values, and the (token id, log-prob) pairs."""
        if self.top_ids is None or self.top_values is None:
            return self.chosen[:end], None
        pairs = [
            list(zip(ids, values, strict=True))
            for ids, values in zip(self.top_ids[:end], self.top_values[:end], strict=True)
        ]
        return self.chosen[:end], pairs


class LogprobRecorder:
    """A logits processor, first in the list, that records every row's log-probabilities.

    It returns the scores unchanged. The token chosen at a step is only known at the next call
    (it is then the last of ``input_ids``), so each step's (R, V) log-softmax waits until that
    call; the last step's waits for :meth:`finish`, which reads it from the output ids.
    """

    def __init__(self, top: int = 0):
        self.top = top
        self.pending: torch.Tensor | None = None  # (R, V) the latest step's log-softmax
        self.chosen: list[torch.Tensor] = []  # one (R,) per step whose token is known
        self.top_values: list[torch.Tensor] = []  # one (R, K) per step
        self.top_ids: list[torch.Tensor] = []  # one (R, K) per step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """(R, L) ids so far, (R, V) scores -> the same scores, this step recorded."""
        if self.pending is not None:
            self._gather(input_ids[:, -1])
        # float32 whatever the model's dtype: a bf16 log-softmax loses digits users compare.
        self.pending = torch.log_softmax(scores.float(), dim=-1)  # (R, V)
        if self.top:
            values, ids = torch.topk(self.pending, self.top, dim=-1)  # (R, K), sorted
            self.top_values.append(values)
            self.top_ids.append(ids)
        return scores

    def _gather(self, tokens: torch.Tensor) -> None:
        """Keep the pending step's value at each row's chosen token (R,), then drop the (R, V)."""
        self.chosen.append(self.pending.gather(-1, tokens[:, None]).squeeze(-1))  # (R,)
        self.pending = None

    def finish(self, new_tokens: torch.Tensor) -> list[RowLogprobs]:
        """Each row's values over the N generated steps, once ``generate`` has returned.

        Args:
            new_tokens: (R, N) the ids generated after the prompt.

        A decoding loop that ran one step beyond what it returned (transformers defers its stop
        check on some devices and then undoes the last step) left a step too many: it is dropped.
        """
        steps = new_tokens.shape[1]
        if self.pending is not None and len(self.chosen) < steps:
            self._gather(new_tokens[:, len(self.chosen)])
        self.pending = None
        # One copy to the host per batch, not one per step.
        chosen = torch.stack(self.chosen[:steps], dim=1).tolist()  # (R, N)
        if not self.top:
            return [RowLogprobs(c, None, None) for c in chosen]
        ids = torch.stack(self.top_ids[:steps], dim=1).tolist()  # (R, N, K)
        values = torch.stack(self.top_values[:steps], dim=1).tolist()  # (R, N, K)
        return [RowLogprobs(*row) for row in zip(chosen, ids, values, strict=True)]
