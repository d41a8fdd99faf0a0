"""A model's request queue with Triton's priority levels and queue policies (``dynamic_batching {
priority_levels, default_priority_level, default_queue_policy, priority_queue_policy }``).

Each priority level has its own queue and policy: ``priority_queue_policy[level]`` where the config gives one,
``default_queue_policy`` otherwise. Level 1 is served first. A request's ``priority`` parameter picks its level;
0, or a level above ``priority_levels``, means ``default_priority_level`` (Triton's rule). Without priority
levels every request shares one queue under the default policy.

A policy bounds its level's queue (``max_queue_size``: a request beyond it is refused at once, 503) and the time
a request may wait in it: ``default_timeout_microseconds``, or the request's own ``timeout`` parameter where
``allow_timeout_override`` is set and the request's is shorter (a default of 0, "no timeout", counts as the
longest: Triton's code compares against 0 there, so that an override never applies, against its own docs).
A request still queued at its deadline is rejected ("Request timeout expired") or, with ``timeout_action:
DELAY``, moved behind its level's unexpired requests, where it still goes before any lower level's.

A model with no dynamic batcher has no queue policy; there kiln honours a request's own ``timeout`` as the
limit of its wait (Triton ignores it there).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from kiln.server.config import ModelConfig, mc
from kiln.server.core import InferenceRequest
from kiln.server.errors import ServerError

REJECT, DELAY = "reject", "delay"


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    timeout_action: str = REJECT
    default_timeout_us: int = 0  # 0: no limit
    allow_timeout_override: bool = False
    max_queue_size: int = 0  # 0: unlimited

    @classmethod
    def from_proto(cls, policy) -> QueuePolicy:
        action = DELAY if policy.timeout_action == mc.ModelQueuePolicy.DELAY else REJECT
        return cls(action, policy.default_timeout_microseconds, policy.allow_timeout_override,
                   policy.max_queue_size)

    def timeout_us(self, requested_us: int) -> int:
        """How long a request that asked for ``requested_us`` (0: nothing) may wait; 0 for no limit."""
        if self.allow_timeout_override and requested_us and (
                not self.default_timeout_us or requested_us < self.default_timeout_us):
            return requested_us
        return self.default_timeout_us


# A model without a dynamic batcher: unbounded, and a request's own timeout is its limit.
UNBATCHED = QueuePolicy(allow_timeout_override=True)


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """The config's queueing rules: levels (0: none), the default level, and the policy of each level."""

    priority_levels: int = 0
    default_level: int = 0
    default_policy: QueuePolicy = UNBATCHED
    level_policies: tuple[tuple[int, QueuePolicy], ...] = ()

    @classmethod
    def from_config(cls, config: ModelConfig) -> QueueConfig:
        if not config.HasField("dynamic_batching"):
            return cls()
        batching = config.dynamic_batching
        return cls(batching.priority_levels, batching.default_priority_level,
                   QueuePolicy.from_proto(batching.default_queue_policy),
                   tuple(sorted((level, QueuePolicy.from_proto(p))
                                for level, p in batching.priority_queue_policy.items())))

    def level(self, priority: int) -> int:
        if not self.priority_levels:
            return 0
        return priority if 1 <= priority <= self.priority_levels else self.default_level

    def policy(self, level: int) -> QueuePolicy:
        for lv, policy in self.level_policies:
            if lv == level:
                return policy
        return self.default_policy


class _Level:
    __slots__ = ("policy", "pending", "delayed")

    def __init__(self, policy: QueuePolicy):
        self.policy = policy
        self.pending: deque[InferenceRequest] = deque()  # unexpired, in arrival order
        self.delayed: deque[InferenceRequest] = deque()  # past their timeout under a DELAY policy

    def __len__(self) -> int:
        return len(self.pending) + len(self.delayed)


class PriorityQueue:
    """Queued requests in the order they are served: by level, then unexpired before delayed, then arrival."""

    def __init__(self, config: QueueConfig):
        self.config = config
        self._levels: dict[int, _Level] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[InferenceRequest]:
        for level in sorted(self._levels):
            q = self._levels[level]
            yield from q.pending
            yield from q.delayed

    def push(self, request: InferenceRequest, priority: int, leaving: int = 0) -> int:
        """Queue ``request`` at the level its priority picks; its wait limit in microseconds (0: none).
        A full level refuses it (503), as Triton's ``max_queue_size``. ``leaving``: how many queued requests
        free workers are about to take (woken, not yet run); they do not count against the limit."""
        level = self.config.level(priority)
        q = self._levels.get(level)
        if q is None:
            q = self._levels[level] = _Level(self.config.policy(level))
        if q.policy.max_queue_size and len(q) - min(leaving, len(q)) >= q.policy.max_queue_size:
            raise ServerError.unavailable(f"Exceeds maximum queue size ({q.policy.max_queue_size}) of model "
                                          f"'{request.model_name}'" + (f" at priority level {level}" if level else ""))
        request.priority_level = level
        q.pending.append(request)
        self._size += 1
        return q.policy.timeout_us(request.parameters.get("timeout", 0))

    def expire(self, request: InferenceRequest) -> str | None:
        """``request`` reached its deadline: DELAY moves it behind its level's unexpired requests and REJECT
        takes it out; the action taken, or None when it is no longer queued."""
        q = self._levels.get(request.priority_level)
        if q is None or request not in q.pending:
            return None
        q.pending.remove(request)
        if q.policy.timeout_action == DELAY:
            q.delayed.append(request)
            return DELAY
        self._size -= 1
        return REJECT

    def remove(self, request: InferenceRequest) -> bool:
        q = self._levels.get(request.priority_level)
        if q is None:
            return False
        for part in (q.pending, q.delayed):
            try:
                part.remove(request)
            except ValueError:
                continue
            self._size -= 1
            return True
        return False

    def pop(self) -> InferenceRequest:
        """The first request in serving order (the queue must not be empty)."""
        for level in sorted(self._levels):
            q = self._levels[level]
            if q.pending or q.delayed:
                self._size -= 1
                return q.pending.popleft() if q.pending else q.delayed.popleft()
        raise IndexError("pop from an empty queue")
