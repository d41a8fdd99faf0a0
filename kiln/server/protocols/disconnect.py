"""Noticing that an HTTP client went away, for the HTTP protocols, so its request is cancelled at once.

A request that sends one response at the end would not notice until then, so its work is raced
against the client's ``http.disconnect`` and cancelled when that comes first (the model then cancels
the request). A streamed response notices at its next write; ``EventStream`` then ends its requests,
even when the client left before the first event.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse

from kiln.server.errors import Code, ServerError

T = TypeVar("T")


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise ServerError(CANCELLED)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, ServerError):
        await task
    raise ServerError(Code.CANCELLED, "the client disconnected")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class EventStream(StreamingResponse):
    """Server-sent events that end their requests however the response ends: ``close`` (abort what still
    runs, settle the statistics) is awaited after the events, also when they never started."""

    def __init__(self, events: AsyncIterator[bytes], close: Callable[[], Awaitable[None]]):
        super().__init__(events, media_type="text/event-stream; charset=utf-8")
        self.close = close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self.close()
