"""A served model version: its backend and instances, its scheduler, its statistics, and the path of
one request through it (admit, queue, execute, respond), with in-flight tracking so unload can wait.

No request holds a model forever. One whose client left gets ``cancel_grace`` seconds to end; then its
instance is reclaimed (a Python model's process is stopped; it starts again for the next request).
Unload waits ``cancel_grace`` for the requests in flight, cancels them, waits again, reclaims every
instance, and after one more grace period unloads whatever is left.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from kiln.server import datatypes, validation
from kiln.server.backends.base import Backend, InstanceSpec, ModelContext, ModelInstance
from kiln.server.config import is_decoupled, mc
from kiln.server.core import InferenceRequest, InferenceResponse
from kiln.server.errors import Code, ServerError, shown
from kiln.server.outputs import OutputBuilder, read_labels
from kiln.server.scheduling import BatchPolicy, Scheduler
from kiln.server.scheduling.queue_policy import QueueConfig
from kiln.server.scheduling.response_order import ResponseOrder
from kiln.server.scheduling.sequence_batcher import SequenceBatcher, SequencePolicy
from kiln.server.shm import SharedMemoryManager
from kiln.server.trace import TraceSettings
from kiln.server.stats import BACKEND, CANCELED, REJECTED, ComputeTimes, ModelStats

log = logging.getLogger("kiln.server")


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """An input or output as the model's metadata lists it: its datatype's name and its shape, led by -1 where
    the model batches."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def tensor_metas(config, ios) -> tuple[TensorMeta, ...]:
    batch = (-1,) if config.max_batch_size > 0 else ()
    return tuple(TensorMeta(io.name, datatypes.by_config(io.data_type).name, batch + tuple(io.dims)) for io in ios)


class ServedModel:
    def __init__(self, context: ModelContext, backend: Backend, instances: list[ModelInstance],
                 shm: SharedMemoryManager, load_seconds: float, cancel_grace: float = 10.0):
        self.context = context
        self.name = context.name
        self.version = context.version
        self.config = context.config
        self.backend = backend
        self.instances = instances
        self.shm = shm
        self.load_seconds = load_seconds
        self.stats = ModelStats(self.name, self.version)
        self.admission = validation.Admission(self.config, shm)
        # Read once per load: the metadata route and the generate extension's JSON-to-tensor mapping use them.
        self.input_metas = tensor_metas(self.config, self.config.input)
        self.output_metas = tensor_metas(self.config, self.config.output)
        self.input_by_name = {m.name: m for m in self.input_metas}
        self.outputs = OutputBuilder(self.config, self.version, read_labels(self.config, context.model_dir), shm)
        if self.config.HasField("sequence_batching"):
            self.scheduler: Scheduler = SequenceBatcher(
                self.name, instances, self.config.max_batch_size,
                SequencePolicy.from_config(self.config, context.model_dir), self.stats, is_decoupled(self.config),
                self._settle)
        else:
            self.scheduler = Scheduler(self.name, instances, BatchPolicy.from_config(self.config), self.stats,
                                       is_decoupled(self.config), self._settle, QueueConfig.from_config(self.config))
        self.order = ResponseOrder() if self.config.dynamic_batching.preserve_ordering else None
        self.trace: TraceSettings | None = None  # the server's trace settings (set by the repository)
        self.ready = False
        self.cancel_grace = cancel_grace
        self._requests: set[InferenceRequest] = set()  # admitted, not yet settled
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._abandoned: set[asyncio.Task] = set()  # requests whose client left, finishing in the background

    @classmethod
    def load(cls, context: ModelContext, backend_cls: type[Backend], shm: SharedMemoryManager,
             cancel_grace: float = 10.0) -> ServedModel:
        """Load the backend and create every instance (blocking: call in a worker thread)."""
        start = time.monotonic()
        backend = backend_cls(context)
        instances: list[ModelInstance] = []
        try:
            for group in context.config.instance_group:
                gpu = group.kind == mc.ModelInstanceGroup.KIND_GPU
                index = 0
                for device in (list(group.gpus) if gpu else [None]):
                    for _ in range(group.count):
                        spec = InstanceSpec(f"{group.name}_{index}", "gpu" if gpu else "cpu", device)
                        instances.append(backend.create_instance(spec))
                        index += 1
        except BaseException:
            for instance in instances:
                instance.close()
            backend.close()
            raise
        return cls(context, backend, instances, shm, time.monotonic() - start, cancel_grace)

    async def start(self) -> None:
        """On the event loop: start each instance (``ModelInstance.start``), then take requests."""
        await asyncio.gather(*(instance.start() for instance in self.instances))
        self.scheduler.start()
        self.ready = True

    async def infer(self, request: InferenceRequest) -> AsyncIterator[InferenceResponse]:
        """Admit ``request`` and yield its responses, the last one final.

        The request stays in flight (unload waits for it) until it has its final response and the
        scheduler is done with it. If the consumer stops early (the client went away), the request is
        cancelled and finished in the background.
        """
        if not self.ready:
            raise ServerError.unavailable(f"'{self.name}' version {self.version} is not at ready state")
        # A request its model refuses at validation (a wrong shape, type or input) is no failure of the model:
        # Triton counts it neither in the statistics' fail nor in nv_inference_request_failure.
        self.admission.admit(request)
        request.model_version = self.version
        request.attach(asyncio.get_running_loop())
        try:
            self.scheduler.submit(request)
        except ServerError:
            self.stats.record_failure(time.monotonic_ns() - request.received_ns, REJECTED)
            raise
        self._inflight += 1
        self._requests.add(request)
        self._idle.clear()
        request.traced = self.trace is not None and self.trace.sample(self.name)
        ticket = self.order.take() if self.order is not None else None
        final = False
        try:
            while not final:
                reply = await request.next_reply()
                if ticket is not None:
                    await self.order.turn(ticket)  # at once after the first: the turn stays until it is handed on
                response = self._account(request, self.outputs.response(request, reply))
                final = response.final
                if final and ticket is not None:
                    self.order.finish(ticket)
                yield response
        finally:
            if not final and ticket is not None:
                self.order.finish(ticket)
            if not final:
                request.cancel()
                self.scheduler.cancel(request)
                task = asyncio.get_running_loop().create_task(self._finish_abandoned(request))
                self._abandoned.add(task)
                task.add_done_callback(self._abandoned.discard)

    def _account(self, request: InferenceRequest, response: InferenceResponse) -> InferenceResponse:
        now = time.monotonic_ns()
        if not request.first_response_ns and not response.flag_only:
            request.first_response_ns = now
            self.stats.record_first_response(now - request.received_ns)
        if response.error is not None and request.failure is None:
            request.failure = CANCELED if response.error.code == Code.CANCELLED else BACKEND
        if response.final:
            request.final_ns = now
            self._settle(request)
        return response

    def _settle(self, request: InferenceRequest) -> None:
        """Count a request once it has its final response and the scheduler is done with it."""
        if request.settled or not request.final_ns or not request.executed:
            return
        request.settled = True
        self._requests.discard(request)
        if request.traced:
            self.trace.record(request)
        duration = request.final_ns - request.received_ns
        if request.failure is not None:
            self.stats.record_failure(duration, request.failure)
        else:
            self.stats.record_success(request.batch_size, duration, request.queue_ns,
                                      request.compute or ComputeTimes())
        self._done()

    async def _finish_abandoned(self, request: InferenceRequest) -> None:
        try:
            await asyncio.wait_for(_drain(request), self.cancel_grace)
        except asyncio.TimeoutError:
            log.warning("request '%s' to model '%s' did not end within %g s of its cancellation (--cancel-grace): "
                        "reclaiming its instance", shown(request.id), self.name, self.cancel_grace)
            if request.instance is not None:
                await request.instance.reclaim()
            request.fail(ServerError(Code.CANCELLED, "request cancelled"))
            await _drain(request)
        request.failure = CANCELED
        request.final_ns = time.monotonic_ns()
        self._settle(request)

    def _done(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    async def unload(self) -> None:
        """Stop taking requests, wait for those in flight (see the module's docstring), then free the
        backend's memory."""
        self.ready = False
        if not await self._wait_idle():
            log.warning("model '%s' version %d: %d request(s) still in flight %g s into its unload; cancelling them",
                        self.name, self.version, self._inflight, self.cancel_grace)
            for request in list(self._requests):
                request.cancel()
                self.scheduler.cancel(request)
            if not await self._wait_idle():
                log.warning("model '%s' version %d: requests did not end once cancelled; reclaiming its instances",
                            self.name, self.version)
                await asyncio.gather(*(i.reclaim() for i in self.instances), return_exceptions=True)
                if not await self._wait_idle():
                    log.error("model '%s' version %d: %d request(s) never ended; unloading it anyway", self.name,
                              self.version, self._inflight)
        await self.scheduler.stop()
        await asyncio.gather(*(instance.stop() for instance in self.instances), return_exceptions=True)
        await asyncio.to_thread(self._close)

    async def _wait_idle(self) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), self.cancel_grace)
        except asyncio.TimeoutError:
            return False
        return True

    def _close(self) -> None:
        for instance in self.instances:
            instance.close()
        self.instances.clear()
        self.scheduler.instances = []
        self.backend.close()
        self.backend = None


async def _drain(request: InferenceRequest) -> None:
    while not (await request.next_reply()).final:
        pass
