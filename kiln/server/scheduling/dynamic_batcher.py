"""Triton's dynamic batcher rules (``dynamic_batching { preferred_batch_size, max_queue_delay_microseconds }``),
as plain functions of the queue so they are testable without a model or an event loop.

Requests batch together when they have the same inputs with the same data types and the same shapes
after the batch dimension. A batch grows from the head of the queue up to ``max_batch_size``
inferences; it is sent at once when it is full, when the next queued request cannot join it, or when
it reaches the largest preferred size. Otherwise it waits for more requests until the oldest has
waited ``max_queue_delay``, and then sends the largest prefix that makes a preferred size (or all of
it when none does).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kiln.server.config import ModelConfig
from kiln.server.core import InferenceRequest


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_batch_size: int
    preferred: tuple[int, ...]
    max_queue_delay_ns: int

    @classmethod
    def from_config(cls, config: ModelConfig) -> "BatchPolicy | None":
        """The model's policy, or None when requests run one at a time."""
        if not config.HasField("dynamic_batching") or config.max_batch_size == 0:
            return None
        db = config.dynamic_batching
        return cls(config.max_batch_size, tuple(sorted(set(db.preferred_batch_size))),
                   db.max_queue_delay_microseconds * 1000)

    def plan(self, sizes: Sequence[int], blocked: bool, oldest_wait_ns: int) -> int:
        """How many requests to take from the head of the queue now; 0 means wait for more.

        ``sizes`` are the batch sizes of the compatible requests at the head of the queue, ``blocked``
        says whether an incompatible request follows them.
        """
        total, n, totals = 0, 0, []
        for s in sizes:
            if total + s > self.max_batch_size:
                blocked = True
                break
            total += s
            n += 1
            totals.append(total)
        if n == 0:
            return 1 if sizes else 0  # a request alone larger than the limit was already refused; take it
        if blocked or total == self.max_batch_size or (self.preferred and total >= self.preferred[-1]):
            return n
        if oldest_wait_ns >= self.max_queue_delay_ns:
            for k in range(n, 0, -1):
                if totals[k - 1] in self.preferred:
                    return k
            return n
        return 0


def batch_key(request: InferenceRequest) -> tuple:
    return tuple((name, t.datatype, tuple(t.shape[1:])) for name, t in sorted(request.inputs.items()))


def compatible_head(queue: Iterable[InferenceRequest], limit: int) -> tuple[list[int], int, bool]:
    """Batch sizes of the requests at the head of ``queue`` (in serving order) that can batch with the first
    (looking no further than ``limit`` inferences), the earliest time one of them was queued, and whether an
    incompatible request stops them."""
    key, sizes, total, oldest = None, [], 0, 0
    for r in queue:
        if key is None:
            key, oldest = batch_key(r), r.queued_ns
        elif batch_key(r) != key:
            return sizes, oldest, True
        sizes.append(r.batch_size)
        oldest = min(oldest, r.queued_ns)
        total += r.batch_size
        if total > limit:
            break
    return sizes, oldest, False
