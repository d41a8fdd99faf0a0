"""The HTTP ports' edge, before any route: connections, request heads and bodies held to the server's
``Limits``, browser origins checked, and errors that escape a route logged once.

``EdgeMiddleware`` (ASGI) wraps every HTTP app:

- the body is counted as it arrives: a ``Content-Length`` over ``max_request_size``, or more bytes than
  that, make the route's read of the body raise ``ServerError`` (413), so each protocol answers in its
  own error shape. What the client still sends is read and dropped (so it reads its 413 instead of a
  reset connection) for at most ``header_timeout`` seconds (``connection_guard``), then the connection
  is closed. A body whose next piece takes longer than ``header_timeout`` gets 408 and the connection
  is closed.
- a request with an ``Origin`` is refused (403) unless the access policy allows it; allowed origins get
  CORS headers and preflight answers (Starlette's ``CORSMiddleware``).
- an exception a route did not handle is answered (500) by the route's app, which logs it; here it ends,
  instead of being logged a second time by uvicorn.

``connection_guard`` makes uvicorn's HTTP/1.1 protocol (httptools, llhttp's C parser) close a connection
beyond ``max_connections`` at once, and one whose request head is not complete ``header_timeout`` seconds
after it began; a request head past ``MAX_HEAD_BYTES`` gets 431 and the connection is closed.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from starlette.middleware.cors import CORSMiddleware
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kiln.server.access import AccessPolicy
from kiln.server.errors import Code, ServerError
from kiln.server.limits import Limits

log = logging.getLogger("kiln.server")
# A request head (request line and headers) larger than this is refused: 431, and the connection closed.
MAX_HEAD_BYTES = 64 * 1024


class EdgeMiddleware:
    def __init__(self, app, limits: Limits, policy: AccessPolicy):
        self.limits = limits
        self.policy = policy
        self.app = app
        if policy.allowed_origins:
            self.app = CORSMiddleware(app, allow_origins=sorted(policy.allowed_origins), allow_methods=["*"],
                                      allow_headers=["*"], expose_headers=["*"])

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            self.policy.check_origin(headers.get("origin"), scope.get("scheme", "http"), headers.get("host"))
        except ServerError as e:
            await _plain_error(send, e, close=False)
            return
        body = _LimitedBody(receive, self.limits, headers.get("content-length"))

        started = False

        async def edge_send(message) -> None:  # notes that the response began; closes a stalled body's connection
            nonlocal started
            if not started:
                started = True
                if message["type"] == "http.response.start" and body.stalled:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, body.receive, edge_send)
        except Exception as e:  # the app answered it and logged it (its 500 handler); see the module's docstring
            if not started:
                log.error("HTTP %s %s failed before responding: %s: %s", scope.get("method"), scope.get("path"),
                          type(e).__name__, e)
                await _plain_error(send, ServerError.internal("internal error (see the server log)"), close=True)


class _LimitedBody:
    """``receive`` with the body's size and pace held to the limits (see the module's docstring)."""

    def __init__(self, receive, limits: Limits, content_length: str | None):
        self._receive = receive
        self.limits = limits
        self.declared = content_length
        self.received = 0
        self.done = False
        self.stalled = False  # the body stopped arriving: the response closes the connection

    async def receive(self):
        if self.done:
            return await self._receive()  # after the body: disconnect notices, as uvicorn sends them
        limit = self.limits.max_request_size
        if self.received == 0 and self.declared is not None:
            try:
                declared = int(self.declared)
            except ValueError:
                declared = 0  # the parser refused a malformed Content-Length before the app ran
            if declared > limit:
                raise self._refuse(Code.TOO_LARGE, f"the request body of {declared} bytes is over the server's "
                                                   f"limit of {limit} bytes (--max-request-size)")
        try:
            if self._ready():  # the body is in already (most requests): no timer needed
                message = await self._receive()
            elif hasattr(asyncio, "timeout"):  # Python 3.11+: a timer on this task; wait_for starts a task a piece
                async with asyncio.timeout(self.limits.header_timeout):
                    message = await self._receive()
            else:
                message = await asyncio.wait_for(self._receive(), self.limits.header_timeout)
        except asyncio.TimeoutError:
            raise self._refuse(Code.REQUEST_TIMEOUT, f"the request body stopped arriving: nothing for "
                                                     f"{self.limits.header_timeout:g} s (--header-timeout)") from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > limit:
                raise self._refuse(Code.TOO_LARGE, f"the request body is over the server's limit of {limit} bytes "
                                                   "(--max-request-size)")
            self.done = not message.get("more_body", False)
        else:
            self.done = True
        return message

    def _ready(self) -> bool:
        """Whether uvicorn's ``receive`` holds the next piece of the body already (it then returns at once)."""
        event = getattr(getattr(self._receive, "__self__", None), "message_event", None)
        return isinstance(event, asyncio.Event) and event.is_set()

    def _refuse(self, code: Code, message: str) -> ServerError:
        self.stalled = code == Code.REQUEST_TIMEOUT
        self.done = True
        return ServerError(code, message)


async def _plain_error(send, error: ServerError, close: bool) -> None:
    headers = [(b"content-type", b"application/json")] + ([(b"connection", b"close")] if close else [])
    await send({"type": "http.response.start", "status": error.code.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps({"error": error.message}).encode()})


def connection_guard(limits: Limits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a connection cap, a request-head deadline and a request-head size
    limit (``Config(http=...)``)."""

    class GuardedHttpProtocol(HttpToolsProtocol):
        _refused_logged = 0.0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            # One timer a connection, not one a request: it stays armed while requests come, and when it fires it
            # closes a head begun ``header_timeout`` ago, waits out the rest of one begun since, or (none begun)
            # lapses until the next head begins.
            self._head_timer: asyncio.TimerHandle | None = None
            self._head_began: float | None = None  # when the request head now awaited began to arrive
            # Parsing a request head; the bytes of pieces that ended inside it; its parsed size; refused.
            self._in_head, self._head_bytes, self._head_size, self._head_refused = False, 0, 0, False
            if len(self.connections) > limits.max_connections:
                now = time.monotonic()
                if now - GuardedHttpProtocol._refused_logged > 10:  # once in a while, not once a connection
                    GuardedHttpProtocol._refused_logged = now
                    log.warning("refusing HTTP connections beyond the limit of %d open (--max-connections)",
                                limits.max_connections)
                transport.abort()
                return
            self._head_began = self.loop.time()
            self._arm_head_timer(limits.header_timeout)

        def connection_lost(self, exc) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._head_began is None and self._awaiting_head():
                self._head_began = self.loop.time()
                if self._head_timer is None:
                    self._arm_head_timer(limits.header_timeout)
            super().data_received(data)
            if not self._awaiting_head():
                self._head_began = None
            if self._in_head and not self.transport.is_closing():
                # A piece that leaves the parser inside a head: its bytes were all head (the parser holds
                # an unfinished header line itself, so it is counted here, not in on_header).
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self._head_refused = True
                    self.send_400_response("")

        # The parser's callbacks: a head's size, and a head over the limit stops the parser before a route runs.
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_bytes, self._head_size = True, 0, 0

        def on_url(self, url: bytes) -> None:
            super().on_url(url)
            self._head_size += len(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            super().on_header(name, value)
            self._head_size += len(name) + len(value) + 4

        def on_headers_complete(self) -> None:
            self._in_head = False
            if self._head_size > MAX_HEAD_BYTES:
                self._head_refused = True
                raise ValueError("request head too large")  # the parser's error: send_400_response below
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:
            if not self._head_refused:
                super().send_400_response(msg)
                return
            message = f"the request head is over the server's limit of {MAX_HEAD_BYTES} bytes".encode()
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(message), message))
            self.transport.close()

        def _awaiting_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm_head_timer(self, seconds: float) -> None:
            self._head_timer = self.loop.call_later(seconds, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._head_began is None or not self._awaiting_head():
                return  # no head on its way: armed again when one begins
            left = self._head_began + limits.header_timeout - self.loop.time()
            if left > 0:
                self._arm_head_timer(left)
            elif not self.transport.is_closing():
                self.transport.close()

    return GuardedHttpProtocol
