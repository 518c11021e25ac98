"""The intra-op thread governor (server.core.threads) with hand-fed step slowdowns and a fake clock."""

from __future__ import annotations

import pytest

from server.core.threads import PROBE_EVERY_S, SLOW, WINDOW, ThreadGovernor


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def feed(governor: ThreadGovernor, clock: Clock, slowdown: float, steps: int = WINDOW) -> None:
    for _ in range(steps):
        governor.step_done(slowdown)
        clock.now += 0.05


def test_a_quiet_machine_keeps_one_thread_per_core():
    clock, applied = Clock(), []
    governor = ThreadGovernor(4, applied.append, clock)
    feed(governor, clock, 1.1, 10 * WINDOW)
    assert governor.threads == 4 and applied == []


def test_a_busy_neighbour_moves_to_one_thread_and_the_better_count_wins_each_probe():
    clock, applied = Clock(), []
    governor = ThreadGovernor(2, applied.append, clock)
    feed(governor, clock, 6.0)  # a neighbour busy-loops: 6x slower on 2 threads
    assert governor.threads == 1 and applied == [1]
    feed(governor, clock, 2.5, 3 * WINDOW)  # 1 thread: slower than calibrated (2 threads), but better
    assert governor.threads == 1, "no probe before PROBE_EVERY_S"
    clock.now += PROBE_EVERY_S
    feed(governor, clock, 2.5)  # a full window on 1 thread, then the probe starts
    assert governor.threads == 2 and applied == [1, 2]
    feed(governor, clock, 6.0)  # the neighbour is still there
    assert governor.threads == 1 and applied == [1, 2, 1]
    clock.now += PROBE_EVERY_S
    feed(governor, clock, 2.0)
    assert governor.threads == 2
    feed(governor, clock, 1.0)  # the neighbour has gone: 2 threads beat 1
    assert governor.threads == 2 and applied == [1, 2, 1, 2]
    feed(governor, clock, 1.2, 5 * WINDOW)
    assert governor.threads == 2


def test_one_slow_window_under_the_threshold_changes_nothing():
    clock, applied = Clock(), []
    governor = ThreadGovernor(2, applied.append, clock)
    feed(governor, clock, SLOW * 0.9, 4 * WINDOW)
    assert applied == []


def test_a_governor_needs_threads_to_choose_from():
    with pytest.raises(ValueError):
        ThreadGovernor(1, print)


def test_traffic_dearer_than_the_calibration_costs_at_most_one_probe():
    """Speech costs more than the silence the calibration timed: on a quiet machine the steps run
    at 3x their calibrated time on N threads (and 5x on 1). One probe learns that N threads are
    better, and that 3x is what this traffic costs: no further switch."""
    clock, applied = Clock(), []
    governor = ThreadGovernor(2, applied.append, clock)
    feed(governor, clock, 3.0)
    assert governor.threads == 1
    clock.now += PROBE_EVERY_S
    feed(governor, clock, 5.0)  # 1 thread
    feed(governor, clock, 3.0)  # the probe on 2 threads wins
    assert governor.threads == 2 and applied == [1, 2]
    feed(governor, clock, 3.3, 20 * WINDOW)
    assert applied == [1, 2]
    feed(governor, clock, 7.0)  # then a neighbour: 2x what this traffic cost
    assert governor.threads == 1 and applied == [1, 2, 1]
