"""Noticing that an HTTP client went away while its request waits for the model, for the HTTP protocols.

A streamed response notices at its next write (uvicorn's ``send`` raises); a request that sends one
response at the end would not notice until then, so its work is raced against the client's
``http.disconnect`` and cancelled when that comes first (the model then cancels the request).
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

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
