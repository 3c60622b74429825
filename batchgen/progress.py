"""Progress bar (rows, tokens/s, ETA) and the decoding settings in one line.

Invariant: a bar counts each row once. A worker's bar counts its share of the job (its own
shards, and those it steals); its own rows (generated, skipped, or found in its checkpoints) are
what it reports to a pool (``report``), while rows of its share that a stealer published
(``others``) move its bar only, so a pool that adds up its workers' reports (``show``) counts
every row once, over the sum of their shares.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable

from tqdm import tqdm

from batchgen.config import SamplingConfig

# Seconds between two reports of a worker's counts to its pool.
REPORT_SECONDS = 0.5


class Progress:
    """A tqdm bar over input rows that moves with every decoding step, not once per batch.

    Each step's tokens advance the bar by their share of a row's token budget
    (``max_new_tokens`` x samples); when a batch finishes, the bar settles on its exact row
    count. Before the first token the bar says what is happening (``phase``: loading the model,
    prefilling). Its tokens/s and ETA count from the first token over the last ``WINDOW``
    seconds, and the ETA is tokens left over that rate: the rows left times the tokens a
    finished row took so far (the budget until one finished). Rows/s would swing with every
    batch's length; tokens/s over a minute does not.

    Args:
        total_rows: rows to do (None when unknown: a stream).
        enabled: draw the bar at all.
        row_tokens: the most tokens one row can produce (``max_new_tokens`` x samples).
        clock: seconds, monotonic; a fake one in tests.
        report: called with ``counts()`` at the start, at most every ``REPORT_SECONDS`` after,
            and at ``close``: a pool's worker tells its pool (``batchgen.job.pool``) how far
            it got.
    """

    WINDOW = 60.0

    def __init__(
        self,
        total_rows: int | None,
        enabled: bool = True,
        row_tokens: int = 1,
        clock=time.monotonic,
        report: Callable[[dict], None] | None = None,
    ):
        self.clock = clock
        self.total = total_rows
        self.share = total_rows  # this worker's share at the start, before any shard is stolen
        self.tokens = 0
        self.row_tokens = max(row_tokens, 1)
        self.partial = 0.0  # rows advanced by steps of batches not finished yet
        self.step_tokens = 0  # tokens counted by steps of batches not finished yet
        self.position = 0.0  # rows on the bar (tqdm keeps no count while disabled)
        self.rows_done = 0  # rows finished here (not skipped ones, not other workers')
        self.done_tokens = 0  # their tokens
        self.marks: deque[tuple[float, int]] = deque()  # (time, tokens so far), last WINDOW s
        self.own = 0.0  # rows of this worker's own work, steps included (not others')
        self.what = "starting"  # the phase before the first token
        self.report = report
        self.reported = 0.0  # when report was last called
        # Steps move the bar by fractions of a row: show whole rows. The ETA is ours (postfix).
        shape = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total_fmt} [{elapsed}{postfix}]"
        self.bar = tqdm(
            total=total_rows,
            unit="row",
            desc="starting",
            file=sys.stderr,
            disable=not enabled,
            dynamic_ncols=True,
            bar_format=shape if total_rows is not None else None,
        )
        self._report(force=True)

    def grow(self, rows: int) -> None:
        """Add ``rows`` to do (a shard taken over from another worker)."""
        if self.total is not None:
            self.total += rows
            self.bar.total = self.total
            self.bar.refresh()

    def phase(self, what: str) -> None:
        """Say what the job is doing before it decodes (``loading the model``, ``prefilling``)."""
        if not self.marks:
            self.what = what
            self.bar.set_description_str(what)
            self._report(force=True)

    def step(self, tokens: int) -> None:
        """Count ``tokens`` decoded in one step of the batch in progress."""
        if not self.marks:
            self.what = "generating"
            self.bar.set_description_str(self.what)
        self.tokens += tokens
        self.step_tokens += tokens
        advance = tokens / self.row_tokens
        self.partial += advance
        self.position += advance
        self.own += advance
        self._mark()
        self.bar.update(advance)
        self._report()

    def update(self, rows: int, completion_tokens: int) -> None:
        """Count ``rows`` finished input rows that produced ``completion_tokens`` tokens."""
        self.tokens += completion_tokens - self.step_tokens
        self.position += rows - self.partial
        self.own += rows - self.partial
        if completion_tokens:  # the ETA over the rows left after these
            self.rows_done += rows
            self.done_tokens += completion_tokens
            self._mark()
        self.bar.update(rows - self.partial)
        self.partial, self.step_tokens = 0.0, 0
        self._report()

    def others(self, rows: int) -> None:
        """Count ``rows`` of this worker's share that another worker published (not reported:
        that worker does)."""
        self.position += rows
        self.bar.update(rows)

    def counts(self) -> dict:
        """What a pool's bar adds up: this worker's share, its own rows and tokens, what its
        finished rows took (for the ETA) and what it does before its first token."""
        return {
            "share": self.share,
            "own": self.own,
            "tokens": self.tokens,
            "rows_done": self.rows_done,
            "done_tokens": self.done_tokens,
            "row_tokens": self.row_tokens,
            "phase": self.what,
        }

    def show(self, reports: list[dict]) -> None:
        """A pool's bar: move on to its workers' ``counts`` added up. Their shares are its
        total; it never goes backwards nor past the total (a dead worker's rows redone)."""
        if not reports:
            return
        share = sum(r["share"] for r in reports) if self.total is not None else None
        if share is not None and share > self.total:  # a worker reported late
            self.grow(share - self.total)
        self.row_tokens = max(r["row_tokens"] for r in reports)
        self.rows_done = sum(r["rows_done"] for r in reports)
        self.done_tokens = sum(r["done_tokens"] for r in reports)
        rows = sum(r["own"] for r in reports)
        if self.total is not None:
            rows = min(rows, self.total)
        tokens = sum(r["tokens"] for r in reports)
        if not self.marks and not tokens:
            self.phase(reports[0]["phase"])
        elif not self.marks:
            self.bar.set_description_str("generating")
        moved = max(rows - self.position, 0)
        self.position += moved
        if tokens != self.tokens:  # the ETA over the rows left after these
            self.tokens = tokens
            self._mark()
        if moved:
            self.bar.update(moved)

    def write(self, line: str, file=None) -> None:
        """Print ``line`` above the bar, to ``file`` (stdout by default)."""
        self.bar.write(line, file=file or sys.stdout)

    def _mark(self) -> None:
        now = self.clock()
        self.marks.append((now, self.tokens))
        while len(self.marks) > 2 and now - self.marks[1][0] >= self.WINDOW:
            self.marks.popleft()
        rate, eta = self.tokens_per_second(), self.eta_seconds()
        left = f", ETA {_clock(eta)}" if eta else ""  # none once every row is done
        self.bar.set_postfix_str(f"{rate:,.1f} tok/s{left}", refresh=False)

    def tokens_per_second(self) -> float:
        """Output tokens per second over the last ``WINDOW`` seconds of decoding."""
        if len(self.marks) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / max(t1 - t0, 1e-9)

    def eta_seconds(self) -> float | None:
        """Seconds left: the tokens the rows left will take, at ``tokens_per_second``."""
        rate = self.tokens_per_second()
        if self.total is None or rate <= 0:
            return None
        per_row = self.done_tokens / self.rows_done if self.rows_done else self.row_tokens
        rows_left = max(self.total - self.position, 0.0)
        return rows_left * per_row / rate

    def _report(self, force: bool = False) -> None:
        if self.report is None:
            return
        now = self.clock()
        if force or now - self.reported >= REPORT_SECONDS:
            self.reported = now
            self.report(self.counts())

    def close(self) -> None:
        """Close the bar; a last report."""
        self._report(force=True)
        self.bar.close()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


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


def describe_row_sampling(s: SamplingConfig, column: str, requests: bool) -> str:
    """The decoding settings in one line where each row's ``column`` overrides the run's ``s``
    (``dataset.sampling_column``): the rows' settings rule, so the run's are said to be what a
    row leaves out. ``requests``: an OpenAI Batch file, whose every request sets ``do_sample``
    (sampled unless its temperature is 0) and leaves out the rest as the hosted API does."""
    if requests:
        return (
            "sampling settings from each request's body (sampled unless its temperature is 0); "
            f"a key it leaves out: temperature {s.temperature}, top_p {s.top_p}, "
            f"max_new_tokens {s.max_new_tokens}, n {s.num_return_sequences}"
        )
    return (
        f"sampling settings from each row's {column!r} column; what a row leaves out: "
        f"{describe_sampling(s)}"
    )
