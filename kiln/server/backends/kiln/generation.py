"""The kiln backend's typed request: a generation the OpenAI routes hand to a kiln model as an
``InferenceRequest`` (``payload``) instead of input tensors, so that they go through the model's admission, queue,
instances and statistics as every KServe request does.

A :class:`Generation` holds prompts as token ids, each with its ``SamplingParams`` (checked by their maker), run
side by side; each response's payload is a list of ``(prompt index, RequestOutput)`` in the order the engine
produced them (replies a slow reader fell behind on join into one list: ``InferenceRequest.next_reply``).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from kiln.runtime import SamplingParams
from kiln.runtime.outputs import RequestFailed
from kiln.server.core import InferenceRequest
from kiln.server.errors import ServerError


@dataclass(frozen=True, slots=True)
class Generation:
    prompts: list[list[int]]
    params: list[SamplingParams]
    request_id: str  # the engine requests are "<request_id>-<prompt index>"


class Relay:
    """Engine outputs of a :class:`Generation`'s prompts -> the request's responses: each output as a payload
    ``[(prompt index, output)]``, the final flag once every prompt has finished, an engine failure as the
    request's error. ``done`` resolves then."""

    def __init__(self, request: InferenceRequest, prompts: int):
        self.request = request
        self.running = prompts
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    def to(self, index: int):
        return lambda out: self.put(index, out)

    def put(self, index: int, out) -> None:
        if self.done.done():  # ended (or cancelled): outputs still on their way are dropped
            return
        if out.error is not None:
            self.request.respond(error=ServerError.internal(str(RequestFailed(out.request_id, out.error))))
            self.done.set_result(None)
            return
        self.request.respond(payload=[(index, out)], final=False)
        if out.finished:
            self.running -= 1
            if self.running == 0:
                self.request.respond(final=True)
                self.done.set_result(None)
