"""The progress bar: it moves with every decoding step and settles on whole rows per batch."""

from __future__ import annotations

import pytest

from batchgen.config import SamplingConfig
from batchgen.progress import Progress, describe_row_sampling


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_before_the_first_token_the_bar_says_what_happens(capsys):
    bar = Progress(total_rows=10, enabled=True, row_tokens=8)
    assert bar.bar.desc == "starting"
    bar.phase("loading the model")
    assert bar.bar.desc == "loading the model"
    bar.phase("prefilling")
    bar.step(2)
    assert bar.bar.desc == "generating"
    bar.phase("prefilling")  # the next batch's prefill: decoding has begun, the bar says so
    assert bar.bar.desc == "generating"
    bar.close()


def test_rate_and_eta_count_tokens_from_the_first_one_and_do_not_swing():
    clock = Clock()
    bar = Progress(total_rows=100, enabled=False, row_tokens=64, clock=clock)
    clock.t += 80.0  # loading the model and prefilling: not in the rate
    lengths = [16 if batch % 2 else 48 for batch in range(10)]  # short and long rows in turn
    etas = []
    for per_row in lengths:
        for _ in range(per_row):  # 10 rows decode one token each per step, 0.1 s a step
            clock.t += 0.1
            bar.step(10)
        bar.update(10, 10 * per_row)
        etas.append(bar.eta_seconds())
    assert bar.tokens_per_second() == pytest.approx(100.0)  # 10 tokens per 0.1 s
    actual = [0.1 * sum(lengths[b + 1 :]) for b in range(len(lengths))]  # seconds really left
    # The estimate is right within a factor of 2.5 all along (the last batches are few rows,
    # shorter or longer than the mean): never 10x off.
    for eta, truth in zip(etas[:-1], actual[:-1], strict=True):
        assert truth / 2.5 <= eta <= truth * 2.5, (etas, actual)
    assert etas[-1] == pytest.approx(0.0)
    assert bar.bar.postfix == "100.0 tok/s"  # done: no "ETA 0:00" left on the last line


def test_steps_move_the_bar_by_their_share_of_a_row(capsys):
    bar = Progress(total_rows=10, enabled=True, row_tokens=8)
    for _ in range(4):
        bar.step(2)  # two rows decoding, one token each, four steps
    assert bar.bar.n == 1.0 and bar.tokens == 8 and bar.tokens_per_second() > 0
    bar.update(2, 7)  # the batch of two rows is done: 7 tokens after stop-string trimming
    assert bar.bar.n == 2 and bar.tokens == 7
    bar.update(3, 0)  # rows skipped, or another worker's shard
    assert bar.bar.n == 5 and bar.tokens == 7
    bar.close()
    assert "5/10" in capsys.readouterr().err  # whole rows on the bar, never 4.999...


def test_rows_settings_are_said_to_be_the_rows_own():
    """With a sampling column, the banner does not present the run's settings as the ones used."""
    job = SamplingConfig(max_new_tokens=12)
    line = describe_row_sampling(job, "settings", requests=False)
    assert line == (
        "sampling settings from each row's 'settings' column; what a row leaves out: "
        "greedy, max_new_tokens 12"
    )
    line = describe_row_sampling(job, "sampling", requests=True)
    assert line.startswith("sampling settings from each request's body")
    assert "greedy" not in line and "max_new_tokens 12" in line


def test_a_worker_reports_only_its_own_rows_and_a_pool_bar_adds_them_up():
    from batchgen import progress

    clock = Clock()
    said = []
    bar = Progress(10, enabled=False, row_tokens=4, clock=clock, report=said.append)
    assert [(c["share"], c["own"], c["phase"]) for c in said] == [(10, 0.0, "starting")]
    bar.phase("loading the model")  # a phase is reported at once: the pool's bar says it
    assert said[-1]["phase"] == "loading the model"
    reports = len(said)
    clock.t += 1.0
    bar.step(2)  # half a row
    assert len(said) == reports + 1 and said[-1]["own"] == 0.5 and said[-1]["tokens"] == 2
    bar.step(2)  # within REPORT_SECONDS of the last report: kept for later
    assert len(said) == reports + 1
    bar.others(3)  # a shard of its share that a stealer published: that worker reports it
    bar.grow(5)  # a shard it stole joins its bar, not its share
    clock.t += progress.REPORT_SECONDS
    bar.update(2, 7)
    assert (said[-1]["share"], said[-1]["own"], said[-1]["tokens"]) == (10, 2.0, 7)
    assert bar.position == 5.0 and bar.total == 15
    bar.close()  # a last report, whenever
    assert said[-1]["own"] == 2.0 and said[-1]["rows_done"] == 2

    pool = Progress(20, enabled=False, clock=clock)
    first = dict(said[-1], own=2.5, tokens=30)
    loading = dict(said[0], own=0.0, tokens=0, phase="loading the model")
    pool.show([first, loading])
    assert pool.position == 2.5 and pool.tokens == 30 and pool.bar.desc == "generating"
    pool.show([dict(first, own=1.0, tokens=35), loading])  # never backwards
    assert pool.position == 2.5 and pool.tokens == 35
    pool.show([dict(first, own=12.0), dict(loading, own=12.0)])  # a dead worker's rows
    assert pool.position == 20  # redone by another: never past the total


def test_a_pool_bar_says_what_its_workers_do_before_the_first_token():
    pool = Progress(20, enabled=True)
    counts = Progress(10, enabled=False).counts()
    pool.show([dict(counts, phase="prefilling"), dict(counts, phase="loading the model")])
    assert pool.bar.desc == "prefilling"
    pool.close()
