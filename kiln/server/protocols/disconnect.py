"""Noticing that an HTTP client went away, for the HTTP protocols, so its request is cancelled at once.

A request that sends one response at the end would not notice until then, so once its work has run
``WATCH_AFTER`` seconds it is raced against the client's ``http.disconnect`` and cancelled when that
comes first (the model then cancels the request). A streamed response notices at its next write;
``EventStream`` then ends its requests, even when the client left before the first event.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from pydantic_core import to_json
from starlette.requests import Request
from starlette.responses import StreamingResponse

from kiln.server.errors import Code, ServerError

T = TypeVar("T")


# A request that ends sooner than this is never watched (most do): the watcher is a task of its own, and
# starting one for each request would cost more than the request's whole routing.
WATCH_AFTER = 0.05


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise ServerError(CANCELLED).

    ``work`` runs in the caller's task. Once it has run ``WATCH_AFTER`` seconds, a watcher task waits for
    the disconnect and cancels the caller."""
    loop = asyncio.get_running_loop()
    caller = asyncio.current_task()
    left = False
    watcher: asyncio.Task | None = None

    async def watch() -> None:
        nonlocal left
        await _disconnected(request)
        left = True
        caller.cancel()

    def start_watching() -> None:
        nonlocal watcher
        watcher = loop.create_task(watch())

    timer = loop.call_later(WATCH_AFTER, start_watching)
    try:
        result = await work
    except asyncio.CancelledError:
        if not left:
            raise
        _uncancel(caller)
        raise ServerError(Code.CANCELLED, "the client disconnected") from None
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()
    if left:  # the work finished anyway: the watcher's cancellation is withdrawn
        _uncancel(caller)
    return result


def _uncancel(task: asyncio.Task) -> None:
    if hasattr(task, "uncancel"):  # Python 3.11+ counts cancellations; 3.10 keeps none to withdraw
        task.uncancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse_event(message) -> bytes:
    """One server-sent event of an ``EventStream``: ``message`` (a dict or a pydantic model) as compact UTF-8
    JSON, by pydantic's own encoder (in Rust: an event per streamed token)."""
    return b"data: " + to_json(message) + b"\n\n"


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
