"""A model version's request queue and the workers that feed its instances.

Requests wait in a :class:`PriorityQueue` (priority levels, queue limits and timeouts: ``queue_policy.py``).
Each instance gets ``max_concurrency + calls_ahead`` worker tasks; a free worker takes the next batch (one
request, or what the dynamic batcher forms) and awaits the instance's ``execute``. A worker whose instance
already runs ``max_concurrency`` calls hands it one ahead, but not while another instance has a call free,
and never a request whose wait has a limit: that one stays queued until an instance has a call free.
Afterwards the scheduler records the execution's statistics and fails any request the backend left without
a final response (for an ordinary model, returning without responding is an error; a decoupled model may
respond later).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from kiln.server.backends.base import ModelInstance
from kiln.server.core import InferenceRequest
from kiln.server.errors import Code, ServerError
from kiln.server.scheduling.dynamic_batcher import BatchPolicy, compatible_head
from kiln.server.scheduling.queue_policy import DELAY, PriorityQueue, QueueConfig
from kiln.server.stats import ComputeTimes, ModelStats

log = logging.getLogger("kiln.server")


class Scheduler:
    def __init__(self, model: str, instances: list[ModelInstance], policy: BatchPolicy | None, stats: ModelStats,
                 decoupled: bool, on_done: Callable[[InferenceRequest], None], queueing: QueueConfig = QueueConfig()):
        self.model = model
        self.on_done = on_done  # called for each request the scheduler is finished with
        self.instances = instances
        self.policy = policy
        self.stats = stats
        self.decoupled = decoupled
        self._queue = PriorityQueue(queueing)
        self._arrived = asyncio.Event()
        self._forming = asyncio.Lock()  # one worker forms a batch at a time
        self._running: dict[asyncio.Future, tuple[ModelInstance, list[InferenceRequest]]] = {}
        self._calls: dict[ModelInstance, int] = {i: 0 for i in instances}  # calls taken, not yet returned
        # Set when a worker held back from handing the head ahead may try again: a call began or ended, or the
        # head left the queue.
        self._retry = asyncio.Event()
        self._workers: list[asyncio.Task] = []
        self._stopping = False

    def start(self) -> None:
        for instance in self.instances:
            for _ in range(self._worker_count(instance)):
                self._workers.append(asyncio.create_task(self._work(instance), name=f"{instance.spec.name}"))

    def _worker_count(self, instance: ModelInstance) -> int:
        return instance.max_concurrency + instance.calls_ahead

    async def stop(self) -> None:
        """Stop the workers (call once no request is queued or running)."""
        self._stopping = True
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()

    def submit(self, request: InferenceRequest) -> None:
        """Queue ``request`` (its ``priority`` and ``timeout`` parameters were checked on admission)."""
        # Workers not executing take the head of the queue as soon as they run: two requests that arrive
        # together at an idle model are one running and one waiting, not one waiting and one refused.
        idle = len(self._workers) - sum(self._calls.values())
        timeout_us = self._queue.push(request, request.parameters.get("priority", 0), leaving=idle)
        request.wait_limited = bool(timeout_us)
        request.queued_ns = time.monotonic_ns()
        self.stats.pending += 1
        self._arrived.set()
        if timeout_us:
            asyncio.get_running_loop().call_later(timeout_us / 1e6, self._expire, request)

    def _expire(self, request: InferenceRequest) -> None:
        """The request's wait limit passed: its level's policy rejects it or delays it, if it is still queued."""
        action = self._queue.expire(request)
        if action is not None:
            self._retry.set()  # the head may have moved
        if action is None or action == DELAY:
            return
        self.stats.pending -= 1
        request.fail(ServerError.unavailable("Request timeout expired"))
        request.executed = True
        self.on_done(request)

    def cancel(self, request: InferenceRequest) -> None:
        """The client went away: drop the request if still queued, else stop its execution if it can be."""
        if self._drop(request, ServerError(Code.CANCELLED, "request cancelled")):
            return
        for task, (instance, batch) in self._running.items():
            if request in batch and instance.cancel_execute and all(r.cancelled for r in batch):
                task.cancel()

    def _drop(self, request: InferenceRequest, error: ServerError) -> bool:
        """Fail ``request`` with ``error`` if it is still queued (True), else leave it be (False)."""
        if not self._queue.remove(request):
            return False
        self.stats.pending -= 1
        self._retry.set()
        request.fail(error)
        request.executed = True
        self.on_done(request)
        return True

    async def _next_batch(self, instance: ModelInstance) -> list[InferenceRequest]:
        while True:
            async with self._forming:
                batch = await self._form(instance)
            if batch is not None:
                return batch
            self._retry.clear()  # the head must not go ahead: wait for a call to end or the head to leave
            await self._retry.wait()

    async def _form(self, instance: ModelInstance) -> list[InferenceRequest] | None:
        """The next batch for ``instance``, or None when the head of the queue may not be handed ahead to it."""
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if self._calls[instance] >= instance.max_concurrency and (
                    next(iter(self._queue)).wait_limited or self._one_free()):
                return None
            if self.policy is None:
                n = 1
            else:
                sizes, oldest, blocked = compatible_head(self._queue, self.policy.max_batch_size)
                waited = time.monotonic_ns() - oldest
                n = self.policy.plan(sizes, blocked, waited)
                if n == 0:
                    self._arrived.clear()
                    timeout = (self.policy.max_queue_delay_ns - waited) / 1e9
                    try:
                        await asyncio.wait_for(self._arrived.wait(), timeout)
                    except asyncio.TimeoutError:  # not the builtin before Python 3.11
                        pass
                    continue
            return [self._queue.pop() for _ in range(n)]

    def _one_free(self) -> bool:
        """Whether an instance has a call free (its worker takes the head at once: nothing goes ahead)."""
        return any(self._calls[i] < i.max_concurrency for i in self.instances)

    async def _work(self, instance: ModelInstance) -> None:
        while True:
            batch = await self._next_batch(instance)
            start = time.monotonic_ns()
            for r in batch:
                self.stats.pending -= 1
                r.queue_ns = start - r.queued_ns
            self._calls[instance] += 1
            self._retry.set()  # the instance that was free may be busy now
            try:
                await self._execute(instance, batch, start)
            finally:
                self._calls[instance] -= 1
                self._retry.set()

    async def _execute(self, instance: ModelInstance, batch: list[InferenceRequest], start: int) -> None:
        for r in batch:
            r.instance = instance
        error: ServerError | None = None
        times: ComputeTimes | None = None
        # Only an instance whose execute may be cancelled gets a task of its own (``cancel`` cancels it);
        # the others run in this worker's task, one step fewer through the loop.
        task = asyncio.ensure_future(instance.execute(batch)) if instance.cancel_execute else None
        if task is not None:
            self._running[task] = (instance, batch)
        try:
            times = await (task if task is not None else instance.execute(batch))
        except asyncio.CancelledError:
            if self._stopping or task is None:
                raise
            error = ServerError(Code.CANCELLED, "request cancelled")
        except ServerError as e:
            error = e
        except Exception as e:
            log.exception("model '%s' instance %s failed", self.model, instance.spec.name)
            error = ServerError.internal(f"model '{self.model}' failed: {type(e).__name__}: {e}")
        finally:
            if task is not None:
                self._running.pop(task, None)
        end = time.monotonic_ns()
        for r in batch:
            r.compute_end_ns = end
        if error is None:
            times = times or ComputeTimes(infer_ns=time.monotonic_ns() - start)
            self.stats.record_execution(sum(max(r.batch_size, 1) for r in batch), times)
        for r in batch:
            if error is not None:
                r.fail(error)
            elif not self.decoupled and not r.final_sent:
                r.fail(ServerError.internal(f"model '{self.model}' returned from execute without responding "
                                            "to a request"))
            r.compute = times
            r.executed = True
            self.on_done(r)
