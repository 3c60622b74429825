"""From an engine's generated token ids to a sample: cut at the end, decode, cut at a stop string.

Invariant: every engine's tokens are decoded here and nowhere else, so a finish reason, a token
count and a text mean the same whichever engine produced them. A row ends at its first
end-of-sequence id (kept and counted: ``stop``), else runs to the token limit (``length``); the
text is decoded without special tokens and cut at the first stop string (``stop``); a character
the token limit cut in two is left out of the text (``partial_char``), never out of the count.
"""

from __future__ import annotations

from batchgen.config import SamplingConfig
from batchgen.engine.interface import Sample
from batchgen.engine.logprobs import RowLogprobs
from batchgen.engine.partial_char import PartialCharTrimmer


def eos_token_ids(generation_config, tokenizer) -> set[int]:
    """Every id that ends a sequence: the generation config's (often several), the tokenizer's."""
    ids = generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class Decoder:
    """Decodes one model's generated rows into samples.

    Args:
        tokenizer: the model's tokenizer.
        model_eos_ids: the ids that end a sequence (``eos_token_ids``).
        pad_id: the id a finished row is padded with.
    """

    def __init__(self, tokenizer, model_eos_ids: set[int], pad_id: int | None):
        self.tokenizer = tokenizer
        self.model_eos_ids = model_eos_ids
        self.pad_id = pad_id
        self.partial_char = PartialCharTrimmer(tokenizer)

    def eos_ids(self, sampling: SamplingConfig) -> set[int]:
        """The ids that end a sample under ``sampling``: none with ``ignore_eos``."""
        return set() if sampling.ignore_eos else self.model_eos_ids

    def sample(
        self,
        ids: list[int],
        sampling: SamplingConfig,
        scores: RowLogprobs | None = None,
        logprobs: bool = False,
    ) -> Sample:
        """Cut one generated row at its end, decode it and say why it ended.

        Args:
            ids: the row's generated ids, pads after its end included.
            sampling: the settings it was generated with (its end-of-sequence rule and stop
                strings).
            scores: its recorded log-probabilities, cut at the same end: one per token the
                text was decoded from, the EOS included when it ends the row, nothing of the
                pads after it.
            logprobs: whether the chosen tokens' values were asked for (``top_logprobs``
                alone records them too).
        """
        eos_ids = self.eos_ids(sampling)
        end, reason = len(ids), "length"
        eos_at = next((i for i, t in enumerate(ids) if t in eos_ids), None)
        if eos_at is not None:
            end, reason = eos_at + 1, "stop"
        elif sampling.stop:
            # A row stopped by a stop string is filled with pads up to the batch's longest row.
            while end and ids[end - 1] == self.pad_id:
                end -= 1
        text = self.tokenizer.decode(ids[:end], skip_special_tokens=True)
        hit = first_stop(text, sampling.stop)
        if hit is not None:
            text, reason = text[:hit], "stop"
            if eos_at is not None and self.pad_id in eos_ids:
                end = eos_at  # that "EOS" was the pad filled in after the stop string
        if reason == "length":
            # Only the token limit cuts a character in two: EOS and stop strings end the text
            # where the model did.
            text = self.partial_char.trim(ids[:end], text)
        if scores is None:
            return Sample(text, reason, end)
        chosen, top = scores.cut(end)
        return Sample(text, reason, end, chosen if logprobs else None, top)


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where the first of ``stops`` begins in ``text``; None when none occurs."""
    hits = [p for p in (text.find(s) for s in stops) if p >= 0]
    return min(hits) if hits else None
