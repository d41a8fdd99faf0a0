"""The kiln backend's typed request, and the relays from the engine to a request's responses.

A generation the OpenAI routes hand to a kiln model is an ``InferenceRequest`` whose ``payload`` is a
:class:`Generation` instead of input tensors, so that it goes through the model's admission, queue, instances and
statistics as every KServe request does.

A :class:`Generation` holds prompts as token ids, each with its ``SamplingParams`` (checked by their maker), run
side by side; each response's payload is a list of ``(prompt index, RequestOutput)`` in the order the engine
produced them (replies a slow reader fell behind on join into one list: ``InferenceRequest.next_reply``).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from kiln.runtime import SamplingParams
from kiln.runtime.outputs import RequestFailed
from kiln.server.core import InferenceRequest
from kiln.server.errors import ServerError

log = logging.getLogger("kiln.server")


@dataclass(frozen=True, slots=True)
class Generation:
    prompts: list[list[int]]
    params: list[SamplingParams]
    request_id: str  # the engine requests are "<request_id>-<prompt index>"


class Relay:
    """Engine outputs -> a request's responses, called on the loop for each engine output (``ServedLLM.submit``),
    so no task of the backend runs per output. It ends the request's engine requests when the request is
    cancelled or one of them fails (the request's error), and ``done`` resolves when it has its final response.
    Subclasses say what a response holds (``output``, ``finish``)."""

    def __init__(self, request: InferenceRequest, llm, parts: int):
        self.request = request
        self.llm = llm
        self.running = parts
        self.engine_ids: list[str] = []
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    async def start(self, part: int, prompt, params, engine_id: str) -> None:
        self.engine_ids.append(engine_id)
        await self.llm.submit(prompt, params, engine_id, lambda out: self.put(part, out))

    def put(self, part: int, out) -> None:
        """On the loop, from the engine's delivery of every stream: nothing may escape it."""
        if self.done.done():  # ended (or cancelled): outputs still on their way are dropped
            return
        try:
            if out.error is not None or self.request.cancelled:
                if out.error is not None:
                    self.request.respond(error=ServerError.internal(str(RequestFailed(out.request_id, out.error))))
                self.stop()
                return
            self.output(part, out)
            if out.finished:
                self.running -= 1
                if self.running == 0:
                    self.finish()
                    self.done.set_result(None)
        except Exception as e:
            log.exception("relaying an engine output of request '%s' failed", self.request.id)
            self.request.fail(ServerError.internal(f"{type(e).__name__}: {e}"))
            self.stop()

    def stop(self) -> None:
        """End what still runs (its consumer is gone, or it failed)."""
        for engine_id in self.engine_ids:
            self.llm.drop(engine_id)
        if not self.done.done():
            self.done.set_result(None)

    def output(self, part: int, out) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


class GenerationRelay(Relay):
    """A :class:`Generation`: each output as a payload ``[(prompt index, output)]``, then the final flag."""

    def output(self, part: int, out) -> None:
        self.request.respond(payload=[(part, out)], final=False)

    def finish(self) -> None:
        self.request.respond(final=True)
