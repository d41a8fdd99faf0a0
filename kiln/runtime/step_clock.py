"""Where the engine core's steps spend the host's time: seconds per phase, summed since load.

``kiln bench`` reads two snapshots (``EngineStats.step_seconds``) and reports the difference per step.
The phases:

- ``schedule``: the scheduler picks the step's requests and token counts;
- ``prepare``: the step's inputs (token ids, positions, KV slots, block tables) built and sent to the device;
- ``forward``: the model (on a GPU: launching its kernels or replaying its graph; on a CPU: computing it);
- ``sample``: the sampler (launched on a GPU);
- ``wait``: waiting for the device (the device's time showing, not the host's work): for the sampled tokens to
  reach the host, and inside ``prepare`` for the earlier copies of the host buffers it reuses (``PREPARE_WAIT``,
  timed apart and moved from ``prepare`` to ``wait``);
- ``output``: recording the tokens in the requests and building the step's outputs.

On a GPU the host's share of a step is every phase but ``wait``; with async scheduling the device computes
one step while the host prepares the next, so the host bounds the step rate only when its share is the larger.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

PHASES = ("schedule", "prepare", "forward", "sample", "wait", "output")
# A wait for the device inside ``prepare``: reported as ``wait``.
PREPARE_WAIT = "prepare_wait"


class StepClock:
    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds = dict.fromkeys((*PHASES, PREPARE_WAIT), 0.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def snapshot(self) -> dict[str, float]:
        """Seconds per phase so far: ``forward`` without the ``prepare`` it contains, ``prepare`` without its
        waits for the device, which count as ``wait``."""
        found = {name: self.seconds[name] for name in PHASES}
        inner = self.seconds[PREPARE_WAIT]
        found["forward"] -= found["prepare"]
        found["prepare"] -= inner
        found["wait"] += inner
        return found


def per_step_ms(before: dict[str, float], after: dict[str, float], steps: int) -> dict[str, float]:
    """Milliseconds per step of each phase between two snapshots (empty when no step ran)."""
    if steps <= 0 or not after:
        return {}
    return {name: 1e3 * (after[name] - before.get(name, 0.0)) / steps for name in PHASES if name in after}
