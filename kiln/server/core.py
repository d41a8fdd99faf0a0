"""The server's one request and response type.

Protocol adapters (KServe HTTP, gRPC, later OpenAI) turn a wire request into an
:class:`InferenceRequest` and each :class:`InferenceResponse` back into wire format; everything in
between (validation, scheduling, backends, statistics, metrics, cancellation) sees only these types.

A request's input tensors arrive in their wire form (raw bytes, a JSON or typed-contents list, or a
shared-memory reference) and become numpy arrays once the model has checked them (``validation.py``),
so both protocols share the checks and their wording. A backend answers a request with
:meth:`InferenceRequest.respond`, from any thread, as often as its model's transaction policy allows:
exactly once for an ordinary model, zero or more times and then a final flag for a decoupled one.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.server.errors import ServerError
from kiln.server.stats import ComputeTimes

if TYPE_CHECKING:
    from kiln.server.backends.base import ModelInstance


@dataclass(slots=True)
class ShmRef:
    """A place in a registered system shared-memory region."""

    region: str
    byte_size: int
    offset: int = 0


@dataclass(slots=True)
class Tensor:
    name: str
    datatype: str  # protocol name: "FP32", "BYTES", ...
    shape: list[int]
    # Inputs before validation: bytes | memoryview (raw) | list (JSON / typed contents) | ShmRef.
    # Inputs after validation and outputs: np.ndarray. An output written to shared memory: ShmRef.
    data: Any


@dataclass(slots=True)
class RequestedOutput:
    name: str
    shm: ShmRef | None = None
    class_count: int = 0  # > 0: return the top classes as "value:index[:label]" strings (classification)


@dataclass(slots=True)
class InferenceResponse:
    model_name: str
    model_version: int
    id: str
    outputs: list[Tensor] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    final: bool = True
    error: ServerError | None = None
    # The backend sent the final flag alone (decoupled models): no response to deliver unless the
    # client asked for empty final responses.
    flag_only: bool = False
    # A typed request's answer (see ``InferenceRequest.payload``), instead of output tensors.
    payload: list | None = None


@dataclass(slots=True)
class Reply:
    """What a backend hands to :meth:`InferenceRequest.respond`, before the model turns it into a response."""

    outputs: dict[str, np.ndarray] | None
    parameters: dict[str, Any]
    error: ServerError | None
    final: bool
    payload: list | None = None


class InferenceRequest:
    """One inference request, from admission to its final response."""

    def __init__(self, model_name: str, model_version: int = -1, id: str = "",
                 inputs: list[Tensor] | None = None, outputs: list[RequestedOutput] | None = None,
                 parameters: dict[str, Any] | None = None, payload: Any = None):
        self.model_name = model_name
        # A typed request that a backend reads instead of input tensors (the OpenAI routes' generation for the
        # kiln backend: ``backends/kiln/generation.py``); its responses carry lists (``respond(payload=...)``),
        # so that those a slow reader fell behind on join into one.
        self.payload = payload
        self.model_version = model_version  # -1: the latest ready version; set to the served version on admission
        self.id = id
        self.inputs: dict[str, Tensor] = {}
        for t in inputs or []:
            if t.name in self.inputs:
                raise ServerError.invalid(f"input '{t.name}' already exists in request")
            self.inputs[t.name] = t
        self.outputs: list[RequestedOutput] = list(outputs or [])
        self.parameters: dict[str, Any] = dict(parameters or {})
        # Set on admission by the model: 0 when the model has no batch dimension.
        self.batch_size = 0
        self.output_names: list[str] = []  # the outputs the backend must produce (the requested, or all)
        # For statistics: timestamps (time.monotonic_ns), what the execution took, how it ended.
        self.received_ns = time.monotonic_ns()
        self.queued_ns = 0
        self.queue_ns = 0
        self.compute_end_ns = 0  # when its execution returned (the scheduler's clock)
        self.priority_level = 0  # the queue's priority level (set when queued)
        self.wait_limited = False  # its wait in the queue has a limit (set when queued)
        self.traced = False  # the trace extension keeps its timestamps (``trace.py``)
        # A stateful model's implicit state: the outputs the backend asks the model for beside the requested ones,
        # and their values once it answers (``scheduling/sequence_batcher.py``).
        self.state_outputs: list[str] = []
        self.captured: dict[str, np.ndarray] = {}
        self.first_response_ns = 0
        self.final_ns = 0
        self.compute: ComputeTimes | None = None
        self.instance: ModelInstance | None = None  # the instance that executed it (set by the scheduler)
        self.executed = False  # the scheduler is done with it (executed, failed or dropped from the queue)
        self.failure: str | None = None  # the failure reason once a response carried an error
        self.settled = False
        self._cancelled = False
        self._final_sent = False
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._replies: collections.deque[Reply] | None = None  # delivered on the loop, not yet read
        self._waiter: asyncio.Future | None = None  # next_reply waiting for one

    # -- for backends -----------------------------------------------------------------------------

    def input(self, name: str) -> np.ndarray | None:
        """The named input as a numpy array (None when an optional input is absent)."""
        t = self.inputs.get(name)
        return None if t is None else t.data

    @property
    def cancelled(self) -> bool:
        """True once the client has gone away or cancelled; a backend should stop and send the final flag."""
        return self._cancelled

    def respond(self, outputs: dict[str, np.ndarray] | None = None, *, parameters: dict[str, Any] | None = None,
                error: ServerError | Exception | None = None, final: bool = True, payload: list | None = None) -> None:
        """Send a response (thread-safe). ``outputs=None, final=True`` sends the final flag alone; with
        ``error`` the response carries the error instead of outputs; a typed request's answer is a ``payload``."""
        if not self._send(Reply(outputs, dict(parameters or {}), _as_server_error(error), final, payload)):
            raise RuntimeError(f"request '{self.id}' to model '{self.model_name}' already has its final response")

    def _send(self, reply: Reply) -> bool:
        with self._lock:
            if self._final_sent:
                return False
            self._final_sent = reply.final
            if self.state_outputs and reply.outputs:
                self.captured.update((k, v) for k, v in reply.outputs.items() if k in self.state_outputs)
        if threading.get_ident() == self._loop_thread:
            self._deliver(reply)
        else:
            self._loop.call_soon_threadsafe(self._deliver, reply)
        return True

    def amendable(self) -> bool:
        """On the loop: whether the last reply sent is still unread and carries outputs (no error, payload or
        final flag), so that ``amend`` may replace them. A streaming backend whose reader fell behind sends its
        deltas so, joined into one reply, instead of one reply each: the reader's work per reply then falls as
        its backlog grows, as typed replies join in ``next_reply``."""
        if threading.get_ident() != self._loop_thread:
            raise RuntimeError("amendable and amend run on the request's event loop")
        last = self._replies[-1] if self._replies else None
        return not (last is None or self.state_outputs or last.final or last.error is not None
                    or last.payload is not None or last.outputs is None)

    def amend(self, outputs: dict[str, np.ndarray], final: bool) -> None:
        """Replace the outputs (and finality) of the last reply sent, unread (``amendable``)."""
        if not self.amendable():
            raise RuntimeError(f"request '{self.id}' has no unread reply to amend")
        with self._lock:
            self._final_sent = final
        self._replies[-1] = Reply(outputs, self._replies[-1].parameters, None, final)

    def _deliver(self, reply: Reply) -> None:  # on the loop
        self._replies.append(reply)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- for the server ---------------------------------------------------------------------------

    @property
    def final_sent(self) -> bool:
        return self._final_sent

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind the response channel to the event loop that will read it (on admission)."""
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._replies = collections.deque()

    async def next_reply(self) -> Reply:
        """The next reply; typed replies queued behind it join it (their payloads, in order) up to the final one."""
        while not self._replies:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        reply = self._replies.popleft()
        while reply.payload is not None and not reply.final and reply.error is None and self._replies:
            later = self._replies.popleft()
            reply = Reply(later.outputs, later.parameters, later.error, later.final,
                          reply.payload + (later.payload or []))
        return reply

    def fail(self, error: ServerError) -> None:
        """End the request with ``error`` unless it already has its final response."""
        self._send(Reply(None, {}, error, True))

    def cancel(self) -> None:
        self._cancelled = True


def _as_server_error(error: ServerError | Exception | None) -> ServerError | None:
    if error is None or isinstance(error, ServerError):
        return error
    return ServerError.internal(f"{type(error).__name__}: {error}")
