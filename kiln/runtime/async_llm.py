"""``AsyncLLM``: an engine core in its own process, requests streamed to asyncio callers.

Servers call ``generate`` for each request and ``async for`` over its outputs as tokens arrive. The
engine core steps in a process of its own (``core_process``; or a thread, ``engine_core="thread"``);
each step's outputs are handed to the event loop of the request they belong to, where the output
processor detokenizes them, so the loop is never blocked by a forward pass and the core never waits
for a consumer. Steps that arrive while the loop is busy are processed together and reach a stream as
one output (its deltas those of all the steps; see ``_Streams``). A core process that dies ends the
streams it held with an error and is restarted.

``abort`` ends a stream with a final output (``finish_reason="abort"``); a consumer that stops
iterating aborts its request too. A request the engine fails raises ``RequestFailed`` in its own
stream only. An ``AsyncLLM`` is an async context manager, and one that is dropped without
``shutdown()`` stops its thread and frees its memory when it is garbage-collected.
"""
from __future__ import annotations

import asyncio
import threading
import weakref
from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from kiln.engine import Engine
from kiln.runtime.config import RuntimeConfig
from kiln.runtime.engine_core import EngineCoreOutput
from kiln.runtime.input_processor import Prompt
from kiln.runtime.llm_engine import FrontEnd, core_place, start_core
from kiln.runtime.output_processor import OutputProcessor
from kiln.runtime.outputs import EngineStats, RequestFailed, RequestOutput
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.tokenizer import LONG_TEXT, EngineTokenizer


class AsyncLLM:
    def __init__(self, engine: str | Engine, device: str | None = None, **options):
        config = RuntimeConfig.from_options(device, **options)
        self._streams = _Streams()
        self._core = start_core(engine if isinstance(engine, Engine) else str(engine), config, self._streams.deliver,
                                core_place(config, synchronous=False))
        weakref.finalize(self, self._core.shutdown)
        front = FrontEnd(self._core.engine, self._core.facts)
        self.engine = front.engine
        self.tokenizer: EngineTokenizer = front.tokenizer
        self.max_seq_len = front.max_seq_len
        self._inputs = front.inputs
        self._streams.processor = front.outputs
        self._streams.core = self._core

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; each carries the step's deltas (``delta_text``, ...)."""
        queue: asyncio.Queue = asyncio.Queue()
        request_id = await self.submit(prompt, params, request_id, queue)
        finished = False
        try:
            while not finished:
                item = await queue.get()
                while not item.finished and not queue.empty():  # outputs this reader fell behind on: one
                    item = merge_outputs(item, queue.get_nowait())
                finished = item.finished
                if item.error is not None:
                    raise RequestFailed(item.request_id, item.error)
                yield item
        finally:
            if not finished:  # the caller went away: free its blocks now
                self._streams.abort(request_id, notify=False)

    async def submit(self, prompt: Prompt, params: SamplingParams | None, request_id: str | None, sink: Sink) -> str:
        """Start a request whose outputs go to ``sink.put_nowait(output)`` on the calling event loop, as
        ``generate``'s stream gets them (the last ``finished``; an engine failure as the output's ``error``),
        without a task of the caller's per output; its request id. ``drop`` ends it early."""
        if isinstance(prompt, str) and len(prompt) >= LONG_TEXT:  # tokenized off the loop (see LONG_TEXT)
            new, core_requests = await asyncio.to_thread(self._inputs.process, prompt, params, request_id)
        else:
            new, core_requests = self._inputs.process(prompt, params, request_id)
        self._start(new, core_requests, sink)
        return new.request_id

    def drop(self, request_id: str) -> None:
        """End a request now, without a final output (its consumer is gone); its KV blocks are freed."""
        self._streams.abort(request_id, notify=False)

    def _start(self, new, core_requests, sink: Sink) -> None:
        self._streams.add(new, asyncio.get_running_loop(), sink)
        try:
            for r in core_requests:
                self._core.add_request(r)
        except BaseException:
            self._streams.abort(new.request_id, notify=False)
            raise

    async def abort(self, request_id: str) -> None:
        """End a request: its stream gets a final output with ``finish_reason="abort"``."""
        self._streams.abort(request_id, notify=True)

    def stats(self) -> EngineStats:
        """The engine core's figures after its latest step."""
        return self._core.stats()

    async def call(self, fn):
        """Run ``fn(engine_core)`` between steps where the core runs (checks, resets); its result. With the
        core in a process (the default), ``fn`` must pickle: a module-level function, not a lambda."""
        return await asyncio.to_thread(self._core.call, fn)

    def shutdown(self) -> None:
        self._core.shutdown()
        self._streams.fail_all("the engine shut down")

    async def __aenter__(self) -> AsyncLLM:
        return self

    async def __aexit__(self, *exc) -> None:
        self.shutdown()


class _Streams:
    """The open streams and their output processor. The core's client calls ``deliver`` from its thread
    (the core thread, or the reader of the core process); the rest runs on the callers' event loops. It
    holds no reference to the ``AsyncLLM``, so that can be collected.

    Outputs wait in a list per event loop until that loop drains it: a loop that keeps up drains each
    step's outputs alone; one that falls behind (many streams, a fast engine) drains several steps at
    once, with one decode and one stream event per request for all of them, so its cost per token falls
    as its load grows. ``deliver`` takes only the short lock of that list, never the one held while a
    loop detokenizes."""

    def __init__(self):
        self.processor: OutputProcessor | None = None  # set once the core is built, before any request
        self.core = None  # the core's client (a process or a thread), set with the processor
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._loop_of: dict[str, asyncio.AbstractEventLoop] = {}  # core sequence id -> its caller's loop
        self._pending_lock = threading.Lock()
        self._pending: dict[asyncio.AbstractEventLoop, list[EngineCoreOutput]] = {}

    def add(self, new, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        with self._lock:
            self.processor.add(new)
            self._streams[new.request_id] = _Stream(loop, queue, list(new.seq_ids))
            for seq_id in new.seq_ids:
                self._loop_of[seq_id] = loop

    def deliver(self, outputs: list[EngineCoreOutput]) -> None:
        """On the core's thread: queue each event loop the outputs of its requests."""
        by_loop: dict[asyncio.AbstractEventLoop, list[EngineCoreOutput]] = {}
        for out in outputs:
            loop = self._loop_of.get(out.request_id)
            if loop is not None:
                by_loop.setdefault(loop, []).append(out)
        for loop, outs in by_loop.items():
            with self._pending_lock:
                pending = self._pending.get(loop)
                if pending is not None:
                    pending.extend(outs)
                    continue
                self._pending[loop] = outs
            try:
                loop.call_soon_threadsafe(self._drain, loop)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                with self._pending_lock:
                    self._pending.pop(loop, None)
                self._drop({self.processor.request_id_of(o.request_id) for o in outs})

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """On a caller's event loop: detokenize, stop, merge what arrived; put one output on each stream."""
        with self._pending_lock:
            outputs = self._pending.pop(loop, [])
        with self._lock:
            processed = self.processor.process(outputs)
            deliveries = []
            for out in processed.outputs:
                stream = self._forget(out.request_id) if out.finished else self._streams.get(out.request_id)
                if stream is not None:
                    deliveries.append((stream.queue, out))
        self.core.abort(processed.to_abort)
        for queue, out in deliveries:
            queue.put_nowait(out)

    def _forget(self, request_id: str) -> _Stream | None:
        """Under ``_lock``: drop the request's stream and its sequences' routes; the stream."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            for seq_id in stream.seq_ids:
                self._loop_of.pop(seq_id, None)
        return stream

    def abort(self, request_id: str, notify: bool) -> None:
        with self._lock:
            final, seq_ids = self.processor.abort(request_id)
            stream = self._forget(request_id)
        self.core.abort(seq_ids)
        if notify and final is not None and stream is not None:
            _put(stream.loop, stream.queue, final)

    def _drop(self, request_ids) -> None:
        for rid in request_ids:
            if rid is not None:
                self.abort(rid, notify=False)

    def fail_all(self, message: str) -> None:
        with self._lock:
            request_ids = list(self._streams)
        for rid in request_ids:
            with self._lock:
                final, _ = self.processor.abort(rid)
                stream = self._forget(rid)
            if final is not None and stream is not None:
                final.error = message
                _put(stream.loop, stream.queue, final)


class Sink(Protocol):
    """Where a request's outputs go, on its event loop: an ``asyncio.Queue``, or a consumer of its own."""

    def put_nowait(self, output: RequestOutput) -> None: ...


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: Sink
    seq_ids: list[str]


def merge_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """``later`` with ``earlier``'s deltas in front of its own: two outputs a stream's reader had not yet
    taken, read as one."""
    before = {c.index: c for c in earlier.outputs}
    for c in later.outputs:
        e = before.get(c.index)
        if e is None:
            continue
        c.delta_text = e.delta_text + c.delta_text
        c.delta_token_ids = e.delta_token_ids + c.delta_token_ids
        if e.delta_logprobs is not None:
            c.delta_logprobs = e.delta_logprobs + (c.delta_logprobs or [])
    if later.prompt_logprobs is None:
        later.prompt_logprobs = earlier.prompt_logprobs
    return later


def _put(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item: RequestOutput) -> None:
    try:
        if loop is _running_loop():
            queue.put_nowait(item)
        else:
            loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:  # the caller's event loop is closed
        pass


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None

