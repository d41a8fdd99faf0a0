"""The CPU thread governor: it follows measured step times on quiet and busy machines and restores torch's count."""
from __future__ import annotations

import pytest
import torch

from kiln.runtime.cpu_threads import MAX_PROBE_INTERVAL, ThreadGovernor, ladder


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(gov: ThreadGovernor, clock: Clock, cost: dict[int, float], steps: int, tokens: int = 1) -> list[int]:
    """Run ``steps`` steps whose duration depends on the thread count; the counts used, in order."""
    used = []
    for _ in range(steps):
        with gov.step(tokens) as threads:
            assert torch.get_num_threads() == threads
            clock.now += cost[threads]
        used.append(threads)
    return used


QUIET = {1: 0.030, 2: 0.020}  # SmolLM2 batch-1 decode on the dev box: all threads win
BUSY = {1: 0.030, 2: 0.150}  # one core held by another process: two threads collapse


@pytest.fixture
def threads2():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_ladder():
    assert ladder(1) == [1]
    assert ladder(2) == [1, 2]
    assert ladder(16) == [1, 2, 4, 8, 15, 16]


def test_quiet_machine_keeps_every_thread(threads2):
    clock = Clock()
    gov = ThreadGovernor(2, clock=clock)
    used = run(gov, clock, QUIET, 300)
    assert used[0] == 2 and used[-1] == 2
    # Probes of one thread are rare and back off.
    assert used.count(1) <= 6 and gov.switches == 0
    assert torch.get_num_threads() == 2  # restored after every step


def test_busy_machine_drops_to_one_thread_and_stays(threads2):
    clock = Clock()
    gov = ThreadGovernor(2, clock=clock)
    used = run(gov, clock, BUSY, 300)
    assert used.index(1) <= 4  # the first probe
    # Probes back up are rare: a collapsed step costs five usual ones, so they back off far.
    assert used[10:].count(2) <= 3
    assert clock.now < 1.05 * 300 * BUSY[1] + 4 * BUSY[2]
    assert gov.summary()["steps_by_threads"] == {"1": used.count(1), "2": used.count(2)}
    assert torch.get_num_threads() == 2


def test_follows_a_neighbour_that_comes_and_goes(threads2):
    clock = Clock()
    gov = ThreadGovernor(2, clock=clock)
    run(gov, clock, QUIET, 100)
    arrived = run(gov, clock, BUSY, 50)
    # A step twice as slow as usual makes it probe at once.
    assert arrived[:4].count(1) >= 1 and arrived[-1] == 1
    left = run(gov, clock, QUIET, 2 * MAX_PROBE_INTERVAL)
    assert left[-1] == 2
    assert left.index(2) <= MAX_PROBE_INTERVAL + 1


def test_the_most_frequent_step_size_measures_and_rare_ones_follow(threads2):
    clock = Clock()
    gov = ThreadGovernor(2, clock=clock)
    run(gov, clock, BUSY, 1, tokens=128)  # the warmup's prefill, before anything was learned
    run(gov, clock, BUSY, 40, tokens=1)  # decode learns that the machine is busy
    # Prefills follow, and never try two threads: on a busy machine that can take seconds.
    assert run(gov, clock, {1: 0.3, 2: 1.5}, 20, tokens=128) == [1] * 20
    # Once prefill-sized steps are the most frequent, they measure (and find a quiet machine).
    used = run(gov, clock, {1: 0.3, 2: 0.2}, 60, tokens=128)
    assert used[-1] == 2


def test_an_error_inside_a_step_restores_threads(threads2):
    gov = ThreadGovernor(2)
    with pytest.raises(RuntimeError):
        for _ in range(10):
            with gov.step(1):
                raise RuntimeError("model failed")
    assert torch.get_num_threads() == 2
    assert sum(gov.steps_by_threads.values()) == 0


def test_one_thread_or_a_gpu_means_no_governing(threads2):
    gov = ThreadGovernor.for_device(torch.device("meta"))
    assert gov.counts == [1]
    with gov.step(1) as threads:
        assert threads == 2 and torch.get_num_threads() == 2  # left as it is
    assert ThreadGovernor(1).summary()["steps_by_threads"] == {"1": 0}
