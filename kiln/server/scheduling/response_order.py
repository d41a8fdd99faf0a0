"""``dynamic_batching { preserve_ordering: true }``: a request's responses go out only after every response of
the requests the scheduler took before it, whatever order the instances finish them in (several instances,
a decoupled model answering over time). Requests are numbered as they are queued; each waits for its turn
before its first response and hands the turn on with its final one (or when its client leaves)."""
from __future__ import annotations

import asyncio


class ResponseOrder:
    def __init__(self) -> None:
        self._issued = 0
        self._front = 0  # the lowest number not yet finished: its responses may go out
        self._finished: set[int] = set()
        self._waiting: dict[int, asyncio.Future] = {}

    def take(self) -> int:
        ticket = self._issued
        self._issued += 1
        return ticket

    async def turn(self, ticket: int) -> None:
        """Wait until every request numbered before ``ticket`` has finished."""
        if ticket > self._front:
            waiter = self._waiting[ticket] = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiting.pop(ticket, None)

    def finish(self, ticket: int) -> None:
        self._finished.add(ticket)
        while self._front in self._finished:
            self._finished.discard(self._front)
            self._front += 1
        waiter = self._waiting.get(self._front)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
