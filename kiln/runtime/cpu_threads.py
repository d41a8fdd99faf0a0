"""How many threads each CPU step runs with: chosen by timing the steps themselves.

torch runs an op's parallel work on an OpenMP team of ``torch.get_num_threads()`` threads, split
evenly, and every parallel region ends at a barrier. When another process keeps a core busy, the
team's thread on that core runs only when the scheduler lets it, and the whole step waits for it at
every barrier (the others spin there first, taking CPU from it). On the 2-core dev box, batch-1
decode of SmolLM2 fell from 36 to 1-8 tokens/s beside one spinning process, with any kernels
(oneDNN, MKL, transformers' own generate), while one thread kept 30. No thread count is right for
both a quiet and a busy machine, and a machine's load changes while it serves, so the count is
measured, not configured:

each step runs under ``ThreadGovernor.step``, which times it. One count holds for all steps (the
machine's load is one fact), and the steps that run most often measure it: steps are grouped by
size (tokens per step, by powers of two), and only the most frequent size (decode, usually) keeps a
usual step time and tries other counts. Now and then one of its steps runs with the next count up
or down, and that count takes over when the step beats the usual time by 10%. The first try comes
after a few steps, then every 16, backing off to every 256 while the current count keeps winning
(the faster the more a try lost, so that losing tries cost about 2% of the time), and at once when
a step takes twice as long as usual. Rare sizes (a prefill per request) never try: a prefill with
too many threads on a busy machine can take seconds.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

PROBE_INTERVAL = 16
MAX_PROBE_INTERVAL = 256
# The share of step time that losing probes may cost (they back off until they cost no more).
PROBE_COST = 0.02
# A probe must beat the current count's usual step time by this much to take over.
MARGIN = 0.10
# A step this many times slower than usual means the machine changed: probe at once.
SLOWDOWN = 2.0
# Weight of the newest step in the usual step time.
ALPHA = 0.25


def ladder(max_threads: int) -> list[int]:
    """Thread counts to move between: powers of two below ``max_threads``, ``max_threads - 1`` and ``max_threads``."""
    counts = {1, max(1, max_threads - 1), max_threads}
    n = 2
    while n < max_threads:
        counts.add(n)
        n *= 2
    return sorted(counts)


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
        self._current = len(self.counts) - 1  # index in counts: all threads until measured otherwise
        self._steps_by_size: dict[int, int] = {}
        self._measured: int | None = None  # the size class whose steps measure the machine
        self._usual: float | None = None  # its moving-average step time at the current count (seconds)
        self._countdown = 2  # of its steps until the next probe
        self._interval = PROBE_INTERVAL
        self._direction = -1  # where the next probe goes in counts

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
        size = max(1, num_tokens).bit_length()
        seen = self._steps_by_size[size] = self._steps_by_size.get(size, 0) + 1
        if self._measured is None or (size != self._measured and seen > self._steps_by_size[self._measured]):
            # Another size became the most frequent: it measures from now on, from a fresh baseline.
            self._measured, self._usual, self._countdown = size, None, 2
        measuring = size == self._measured
        probe = self._probe_target() if measuring else None
        index = self._current if probe is None else probe
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
        seconds = self.clock() - start
        self.steps_by_threads[threads] += 1
        if measuring:
            self._record(index, probe is not None, seconds, first=seen == 1)

    def summary(self) -> dict:
        return {"max_threads": self.max_threads, "counts": self.counts,
                "steps_by_threads": {str(n): k for n, k in self.steps_by_threads.items()}, "switches": self.switches}

    # ----- the policy -----
    def _probe_target(self) -> int | None:
        if self._countdown > 0 or self._usual is None:
            return None
        target = self._current + self._direction
        if not 0 <= target < len(self.counts):
            self._direction = -self._direction
            target = self._current + self._direction
        return target

    def _record(self, index: int, probed: bool, seconds: float, first: bool) -> None:
        if probed:
            if seconds < self._usual * (1 - MARGIN):
                self._current, self._usual, self._interval = index, seconds, PROBE_INTERVAL
                self.switches += 1
            else:
                # Back off, the more the slower the probe was, so that losing probes cost at most
                # about PROBE_COST of the time: a collapsed step can take five usual ones.
                cost = seconds / self._usual - 1
                self._interval = min(max(2 * self._interval, math.ceil(cost / PROBE_COST)), MAX_PROBE_INTERVAL)
                self._direction = -self._direction
            self._countdown = self._interval
            return
        if first:
            return  # a size's first step pays for warm-up (allocations, kernel set-up)
        if self._usual is None:
            self._usual = seconds
        elif seconds > SLOWDOWN * self._usual:
            self._countdown = 0
            self._usual += ALPHA * (seconds - self._usual)
            return
        else:
            self._usual += ALPHA * (seconds - self._usual)
        self._countdown -= 1
