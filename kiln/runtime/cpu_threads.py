"""How many threads each CPU step runs with: chosen by timing the steps themselves.

torch runs an op's parallel work on an OpenMP team of ``torch.get_num_threads()`` threads, split
evenly, and every parallel region ends at a barrier. When another process keeps a core busy, the
team's thread on that core runs only when the scheduler lets it, and the whole step waits for it at
every barrier (the others spin there first, taking CPU from it). On the 2-core dev box, batch-1
decode of SmolLM2 fell from 36 to 1-8 tokens/s beside one spinning process, with any kernels
(oneDNN, MKL, transformers' own generate), while one thread kept 30. No thread count is right for
both a quiet and a busy machine, and a machine's load changes while it serves, so the count is
measured, not configured:

each step runs under ``ThreadGovernor.step``, which times it. Steps are compared within classes of
similar size (tokens per step, by powers of two). A class uses the count the others last settled
on (at first, all threads) until it has a usual step time of its own. Then, now and then (every 16
steps, backing off to every 256 while the current count keeps winning, and at once when a step
takes twice as long as usual), one step tries the next count up or down, and the class switches
when that step beats its usual time by 10%.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

PROBE_INTERVAL = 16
MAX_PROBE_INTERVAL = 256
# A probe must beat the current count's usual step time by this much to take over.
MARGIN = 0.10
# A step this many times slower than usual means the machine changed: probe at once.
SLOWDOWN = 2.0
# Weight of the newest step in a class's usual step time.
ALPHA = 0.25


def ladder(max_threads: int) -> list[int]:
    """Thread counts to move between: powers of two below ``max_threads``, ``max_threads - 1`` and ``max_threads``."""
    counts = {1, max(1, max_threads - 1), max_threads}
    n = 2
    while n < max_threads:
        counts.add(n)
        n *= 2
    return sorted(counts)


@dataclass(slots=True)
class _Class:
    current: int  # index in the ladder
    usual: float | None = None  # moving average of the current count's step time (seconds)
    steps: int = 0
    countdown: int = 2  # steps until the next probe
    interval: int = PROBE_INTERVAL
    direction: int = -1  # where the next probe goes in the ladder


@dataclass
class ThreadGovernor:
    """Picks the thread count of each step from measured step times; one per model runner."""

    max_threads: int
    clock: Callable[[], float] = time.perf_counter
    counts: list[int] = field(init=False)
    steps_by_threads: dict[int, int] = field(init=False)
    switches: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.counts = ladder(self.max_threads)
        self.steps_by_threads = dict.fromkeys(self.counts, 0)
        self._classes: dict[int, _Class] = {}
        self._last = len(self.counts) - 1

    @classmethod
    def for_device(cls, device: torch.device) -> ThreadGovernor:
        """On a CPU, governs up to the threads torch has now; elsewhere it leaves threads alone."""
        return cls(torch.get_num_threads() if device.type == "cpu" else 1)

    @contextlib.contextmanager
    def step(self, num_tokens: int) -> Iterator[int]:
        """Run the block (one step of ``num_tokens`` tokens) with the chosen thread count, which it yields.

        torch's thread count is restored afterwards, so code that runs between steps (another
        model in the same process) keeps its own.
        """
        if len(self.counts) == 1:  # nothing to choose: leave torch's count alone
            yield torch.get_num_threads()
            return
        key = max(1, num_tokens).bit_length()
        c = self._classes.get(key)
        if c is None:
            c = self._classes[key] = _Class(current=self._last)
        elif c.usual is None:  # rare sizes (a prefill per request) follow the others until they have a baseline
            c.current = self._last
        probe = self._probe_target(c)
        index = c.current if probe is None else probe
        threads = self.counts[index]
        before = torch.get_num_threads()
        if threads != before:
            torch.set_num_threads(threads)
        start = self.clock()
        try:
            yield threads
        finally:
            if threads != before:
                torch.set_num_threads(before)
        self._record(c, index, probe is not None, self.clock() - start)

    def summary(self) -> dict:
        return {"max_threads": self.max_threads, "counts": self.counts,
                "steps_by_threads": {str(n): k for n, k in self.steps_by_threads.items()}, "switches": self.switches}

    # ----- the policy -----
    def _probe_target(self, c: _Class) -> int | None:
        if c.countdown > 0 or c.usual is None:
            return None
        target = c.current + c.direction
        if not 0 <= target < len(self.counts):
            c.direction = -c.direction
            target = c.current + c.direction
        return target

    def _record(self, c: _Class, index: int, probed: bool, seconds: float) -> None:
        self.steps_by_threads[self.counts[index]] += 1
        c.steps += 1
        if probed:
            if seconds < c.usual * (1 - MARGIN):
                c.current, c.usual, c.interval = index, seconds, PROBE_INTERVAL
                self.switches += 1
            else:
                c.interval = min(2 * c.interval, MAX_PROBE_INTERVAL)
                c.direction = -c.direction
            c.countdown = c.interval
            self._last = c.current
            return
        if c.steps == 1:
            return  # a class's first step pays for warm-up (allocations, kernel set-up)
        if c.usual is None:
            c.usual = seconds
        elif seconds > SLOWDOWN * c.usual:
            c.countdown = 0
            c.usual += ALPHA * (seconds - c.usual)
            return
        else:
            c.usual += ALPHA * (seconds - c.usual)
        c.countdown -= 1
