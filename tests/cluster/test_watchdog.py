"""The stall watchdog: work that stops moving gives its shards up and exits; a worker that loads
its model, waits for others, or keeps moving is left alone. The end-to-end case (a worker hung
inside generation, the other takes its shards) is in tests/test_faults.py."""

from __future__ import annotations

import threading
import time

from batchgen.cluster.watchdog import STALL_EXIT_CODE, Watchdog


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def watchdog(stall=10.0):
    clock, exits, steps = Clock(), [], []
    dog = Watchdog(stall, rank=3, clock=clock, exit=exits.append)
    dog.on_stall(lambda: steps.append("first"))
    dog.on_stall(lambda: steps.append("second"))
    return dog, clock, exits, steps


def test_work_that_stops_moving_gives_up_once_and_exits(capsys):
    dog, clock, exits, steps = watchdog()
    with dog.watch("part-00007.parquet"):
        clock.now = 9.0
        dog.beat()
        clock.now = 18.9
        assert not dog.check()  # moved 9.9 s ago
        clock.now = 19.0
        assert dog.check()
    assert steps == ["first", "second"] and exits == [STALL_EXIT_CODE]
    said = capsys.readouterr().err
    assert said.startswith("batchgen: error: worker 3 stalled on part-00007.parquet: ")
    assert "for 10 s (runner.stall_seconds=10)" in said and "status 3" in said


def test_nothing_in_hand_loading_or_turned_off_is_no_stall():
    dog, clock, exits, _ = watchdog()
    clock.now = 100.0
    assert not dog.check()  # waiting for other workers' shards: nothing in hand
    with dog.watch("part-00000.parquet"):
        with dog.paused():  # loading the model
            clock.now = 500.0
            assert not dog.check()
        clock.now = 509.0  # the pause ended at 500: 9 s of silence since
        assert not dog.check()
    off = Watchdog(None, clock=clock, exit=exits.append)
    with off.watch("part-00000.parquet"):
        clock.now = 10_000.0
        assert not off.check()
    assert exits == []


def test_a_give_up_step_that_hangs_is_abandoned(monkeypatch):
    from batchgen.cluster import watchdog as module

    monkeypatch.setattr(module, "STEP_TIMEOUT", 0.2)
    dog, clock, exits, steps = watchdog()
    stuck = threading.Event()
    dog.steps.insert(0, stuck.wait)  # a release on a stuck mount
    with dog.watch("part-00001.parquet"):
        clock.now = 11.0
        started = time.monotonic()
        assert dog.check()
    assert time.monotonic() - started < 2.0
    assert steps == ["first", "second"] and exits == [STALL_EXIT_CODE]
    stuck.set()


def test_the_thread_fires_on_a_real_clock():
    exits = []
    dog = Watchdog(1.0, exit=exits.append)
    with dog, dog.watch("part-00002.parquet"):
        deadline = time.monotonic() + 10
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)
    assert exits == [STALL_EXIT_CODE]
