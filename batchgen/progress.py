"""Progress bar (rows, tokens/s, ETA) and the decoding settings in one line.

Invariant: a bar counts each row once. A worker's own rows (generated, skipped, or found in its
checkpoints) are what it reports to a pool (``report``); rows that another worker published
(``others``) move its bar only, so a pool that adds up its workers' reports counts every row
once.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from tqdm import tqdm

from batchgen.config import SamplingConfig

# Seconds between two reports of a worker's counts to its pool.
REPORT_SECONDS = 0.5


class Progress:
    """A tqdm bar over input rows that moves with every decoding step, not once per batch.

    Each step's tokens advance the bar by their share of a row's token budget
    (``max_new_tokens`` x samples), so the rate and the ETA show from the first step and count
    the decoding left; when a batch finishes, the bar settles on its exact row count. The
    postfix shows output tokens/s of this process.

    Args:
        total_rows: rows to do (None when unknown: a stream).
        enabled: draw the bar at all.
        row_tokens: the most tokens one row can produce (``max_new_tokens`` x samples).
        report: called with (``total_rows``, own rows so far, tokens so far) at the start, at
            most every ``REPORT_SECONDS`` after, and at ``close``: a pool's worker tells its
            pool (``batchgen.job.pool``) how far it got.
    """

    def __init__(
        self,
        total_rows: int | None,
        enabled: bool = True,
        row_tokens: int = 1,
        report: Callable[[int | None, float, int], None] | None = None,
    ):
        self.start = time.perf_counter()
        self.total = total_rows
        self.tokens = 0
        self.row_tokens = max(row_tokens, 1)
        self.partial = 0.0  # rows advanced by steps of batches not finished yet
        self.step_tokens = 0  # tokens counted by steps of batches not finished yet
        self.own = 0.0  # rows of this worker's own work, steps included
        self.report = report
        self.reported = 0.0  # when report was last called
        # Steps move the bar by fractions of a row: show whole rows.
        shape = "{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
        self.bar = tqdm(
            total=total_rows,
            unit="row",
            desc="generating",
            file=sys.stderr,
            disable=not enabled,
            dynamic_ncols=True,
            smoothing=0.1,
            bar_format=shape if total_rows is not None else None,
        )
        self._report(force=True)

    def step(self, tokens: int) -> None:
        """Count ``tokens`` decoded in one step of the batch in progress."""
        self.tokens += tokens
        self.step_tokens += tokens
        advance = tokens / self.row_tokens
        self.partial += advance
        self.own += advance
        self.bar.set_postfix_str(f"{self.tokens_per_second():,.1f} tok/s", refresh=False)
        self.bar.update(advance)
        self._report()

    def update(self, rows: int, completion_tokens: int) -> None:
        """Count ``rows`` finished input rows that produced ``completion_tokens`` tokens."""
        self.tokens += completion_tokens - self.step_tokens
        self.own += rows - self.partial
        self.bar.set_postfix_str(f"{self.tokens_per_second():,.1f} tok/s", refresh=False)
        self.bar.update(rows - self.partial)
        self.partial, self.step_tokens = 0.0, 0
        self._report()

    def others(self, rows: int) -> None:
        """Count ``rows`` that another worker published (not reported: that worker does)."""
        self.bar.update(rows)

    def show(self, rows: float, tokens: int) -> None:
        """Move the bar on to ``rows`` done and ``tokens`` decoded in all: a pool's bar, over
        its workers' reports added up (never backwards, never past the total)."""
        if self.total is not None:
            rows = min(rows, self.total)
        self.tokens = tokens
        self.bar.set_postfix_str(f"{self.tokens_per_second():,.1f} tok/s", refresh=False)
        if rows > self.own:
            self.bar.update(rows - self.own)
            self.own = rows

    def write(self, line: str, file=None) -> None:
        """Print ``line`` above the bar, to ``file`` (stdout by default)."""
        self.bar.write(line, file=file or sys.stdout)

    def tokens_per_second(self) -> float:
        """Output tokens per wall-clock second since the bar started."""
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def _report(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.report is not None and (force or now - self.reported >= REPORT_SECONDS):
            self.reported = now
            self.report(self.total, self.own, self.tokens)

    def close(self) -> None:
        """Close the bar; a last report."""
        self._report(force=True)
        self.bar.close()


def describe_sampling(s: SamplingConfig) -> str:
    """The decoding settings in one line, as they run (a model's defaults resolved)."""
    if s.do_sample:
        shape = (
            f"sampling: temperature {s.temperature}, top_p {s.top_p}, top_k {s.top_k}, "
            f"min_p {s.min_p}"
        )
    else:
        shape = "greedy"
    penalty = f", repetition_penalty {s.repetition_penalty}" if s.repetition_penalty != 1 else ""
    n = f", {s.num_return_sequences} samples per prompt" if s.num_return_sequences > 1 else ""
    return f"{shape}{penalty}, max_new_tokens {s.max_new_tokens}{n}"
