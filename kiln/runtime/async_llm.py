"""``AsyncLLM``: the executor stepping in a background thread, requests streamed to asyncio callers.

Servers call ``generate`` for each request and ``async for`` over its outputs as tokens arrive;
``abort`` (or a caller that stops iterating) frees the request's KV blocks before the next step.
A step that fails fails only the requests it held; the loop goes on serving the rest.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import AsyncIterator

from kiln.runtime.executor import Executor, ExecutorConfig
from kiln.runtime.outputs import EngineStats, RequestOutput
from kiln.runtime.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class AsyncLLM:
    def __init__(self, engine_dir: str, device: str | None = None, **options):
        self.executor = Executor(str(engine_dir), ExecutorConfig(device=device, **options))
        self._cond = threading.Condition()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="kiln-executor", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.executor.tokenizer

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; each carries the text so far and the delta since the last one."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        request_id = await asyncio.to_thread(self._add, prompt, params, request_id, loop, queue)
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the caller went away: free its blocks now
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        await asyncio.to_thread(self._abort, request_id)

    def stats(self) -> EngineStats:
        with self._cond:
            return self.executor.stats()

    def shutdown(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # ----- the background thread and what it shares -----
    def _add(self, prompt, params, request_id, loop, queue) -> str:
        with self._cond:
            if self._stopped:
                raise RuntimeError("this AsyncLLM has been shut down")
            rid = self.executor.add_request(prompt, params, request_id)
            self._streams[rid] = (loop, queue)
            self._cond.notify_all()
            return rid

    def _abort(self, request_id: str) -> None:
        with self._cond:
            self.executor.abort(request_id)
            self._streams.pop(request_id, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self.executor.has_unfinished():
                    self._cond.wait()
                if self._stopped:
                    self._fail_all(RuntimeError("the engine shut down"))
                    return
                try:
                    outputs = self.executor.step()
                except Exception as e:  # NOTE: keep serving; only this step's requests fail
                    log.exception("engine step failed")
                    self._fail_all(e)
                    continue
                deliveries = []
                for out in outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is not None:
                        deliveries.append((stream, out))
                    if out.finished:
                        self._streams.pop(out.request_id, None)
            for (loop, queue), out in deliveries:
                _deliver(loop, queue, out)

    def _fail_all(self, error: BaseException) -> None:
        for rid, (loop, queue) in list(self._streams.items()):
            self.executor.abort(rid)
            _deliver(loop, queue, error)
        self._streams.clear()


def _deliver(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item: object) -> None:
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
        pass
