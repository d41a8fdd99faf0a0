"""A Python model's process as the server sees it: start it, wait for its replies, read it, stop it.

The process is ``python stub/kiln_python_stub.py FD [TO FROM SIZE]`` started with ``subprocess``, its end of
a Unix socket pair passed as FD, and the memfds of the two shared-memory rings for large tensors
(``wire.Ring``: TO carries what the server sends, FROM what the process sends; SIZE bytes each). Not
``multiprocessing``: the stub imports nothing of the server, so it starts
in a fraction of a second and inherits none of the server's threads, event loop or sockets. Its
stdout and stderr are the server's, so a model's ``print`` lands in the server's log.

Until ``attach``, the socket is used blocking (``request``: the ``init`` and ``auto_complete`` exchanges,
in a worker thread while the model loads). From ``attach`` on it belongs to the event loop: messages are
read by an asyncio protocol as their bytes arrive and handed to the instance on the loop, and ``send``
writes without blocking (asyncio buffers what the socket does not take at once). No thread of the
server waits on the model, and a response reaches its request without crossing threads.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln.server.backends.python.stub import kiln_python_wire as wire

log = logging.getLogger("kiln.server")

STUB = Path(__file__).resolve().parent / "stub" / "kiln_python_stub.py"
# Shared memory per direction for a model process's large tensors (``wire.Ring``): a memfd whose pages are
# taken as tensors first pass through it; a tensor the ring has no room for travels on the socket. 0 where
# the system has no memfd (not Linux): every tensor on the socket.
RING_BYTES = 64 << 20 if hasattr(os, "memfd_create") else 0
_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR, "verbose": logging.DEBUG}


class StubProcess:
    def __init__(self, label: str, ring_bytes: int | None = None):
        self.label = label  # "model 'm' instance 'm_0_0'", for log lines and errors
        ring_bytes = RING_BYTES if ring_bytes is None else ring_bytes
        ours, theirs = socket.socketpair()
        rings = _rings(ring_bytes, label)
        fds = (theirs.fileno(), *(ring.fd for ring in rings))
        try:
            # Unbuffered: a model's print reaches the log when it prints, not when the process ends.
            argv = [sys.executable, str(STUB), *map(str, fds), *([str(ring_bytes)] if rings else [])]
            self.proc = subprocess.Popen(argv, pass_fds=fds, stdin=subprocess.DEVNULL,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            for ring in rings:
                ring.close_fd()
        # The first ring carries what the server sends, the second what the model's process sends.
        self.conn = wire.Connection(ours, *rings)
        # Set (under the owner's lock) once the connection has ended; stopping: the server ended it.
        self.exited = False
        self.stopping = False
        self.reclaimed = False  # killed by the server because requests outlived their cancellation
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lost: asyncio.Future | None = None  # done once the attached connection has ended

    def request(self, message: dict[str, Any], reply_op: str) -> dict[str, Any]:
        """Send ``message`` and wait for the reply named ``reply_op`` (blocking, before ``attach``).
        Raises EOFError when the process ends first."""
        self.conn.send(message)
        while True:
            reply = self.conn.recv()
            if reply["op"] == "log":
                self.log_line(reply)
            elif reply["op"] == reply_op:
                return reply

    async def attach(self, on_message: Callable[[dict[str, Any]], None], on_exit: Callable[[], None]) -> None:
        """Hand the socket to the running loop: ``on_message`` for each later message, ``on_exit`` once the
        connection ends (both on the loop)."""
        self._loop = loop = asyncio.get_running_loop()
        self._lost = loop.create_future()
        sock = self.conn.sock
        sock.setblocking(False)

        def lost() -> None:
            if not self._lost.done():
                self._lost.set_result(None)
            on_exit()

        def handle(message: dict[str, Any]) -> None:
            try:
                on_message(message)
            except Exception:
                log.exception("handling a message from the Python process of %s failed", self.label)
                self.proc.kill()

        decoder, pending = self.conn.hand_over()
        for message in pending:  # read with the last blocking exchange, after its reply
            handle(message)
        self._transport, _ = await loop.connect_accepted_socket(lambda: _Channel(handle, lost, decoder), sock=sock)

    def send(self, message: dict[str, Any]) -> None:
        """Send ``message``: blocking before ``attach``; after it, on the loop and without blocking (nothing
        happens once the connection has ended: the instance learns that from ``on_exit``)."""
        if self._transport is None:
            self.conn.send(message)
            return
        # The socket takes what it can of each piece; asyncio keeps only the rest.
        for piece in wire.encode(message, self.conn.send_ring):
            self._transport.write(piece)

    def exit_status(self, timeout: float = 5.0) -> str:
        """How the process ended ("exit code 1", "killed by signal SIGSEGV"), waiting up to ``timeout``
        for it (and killing it after that: its connection is gone, it can do nothing more)."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if code < 0:
            try:
                return f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    async def finish(self, timeout: float) -> None:
        """``stop`` for an attached process, on the loop: its log lines and ``finalize_done`` still arrive."""
        self.stopping = True
        if self._transport is None:
            await asyncio.to_thread(self.stop, timeout)
            return
        if self.proc.poll() is None:
            self.send({"op": "finalize"})
            try:
                await asyncio.wait_for(asyncio.shield(self._lost), timeout)
                await asyncio.to_thread(self.proc.wait, timeout)
            except (asyncio.TimeoutError, subprocess.TimeoutExpired):
                log.warning("the Python process of %s did not end within %.0f s of finalize; killing it",
                            self.label, timeout)
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
        self.close()

    def stop(self, timeout: float) -> None:
        """Ask the model to finalize and the process to end; kill it after ``timeout`` seconds (blocking,
        for a process that was never attached to a loop)."""
        self.stopping = True
        if self._transport is not None:
            self.kill()
            return
        if self.proc.poll() is None:
            try:
                self.conn.send({"op": "finalize"})
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("the Python process of %s did not end within %.0f s of finalize; killing it",
                            self.label, timeout)
                self.proc.kill()
                self.proc.wait()
        self.close()

    def reclaim(self) -> None:
        """Kill the process while it holds requests: its reader then fails them (``reclaimed`` says why)."""
        self.reclaimed = True
        if self.proc.poll() is None:
            self.proc.kill()

    def kill(self) -> None:
        self.stopping = True
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.close()

    def close(self) -> None:
        if self._transport is not None:  # an ended connection's transport is closed already
            if self._loop.is_closed():
                return
            try:
                on_loop = asyncio.get_running_loop() is self._loop
            except RuntimeError:
                on_loop = False
            if on_loop:
                self._transport.abort()
            else:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    self._loop.call_soon_threadsafe(self._transport.abort)
        else:
            self.conn.close()

    def log_line(self, message: dict[str, Any]) -> None:
        where = f" {message['where']}]" if message.get("where") else ""
        log.log(_LEVELS.get(message["level"], logging.INFO), "%s%s %s", self.label, where, message["message"])


def _rings(size: int, label: str) -> tuple[wire.Ring, ...]:
    """The two shared-memory rings of a model process, or none (``size`` 0, or a system that refuses them:
    its tensors then travel on the socket)."""
    if not size:
        return ()
    made: list[wire.Ring] = []
    try:
        for _ in range(2):
            made.append(wire.Ring.create(size))
    except OSError as e:
        log.warning("no shared memory for the tensors of %s (%s); they travel on its socket", label, e)
        for ring in made:
            ring.close_fd()
        return ()
    return tuple(made)


class _Channel(asyncio.BufferedProtocol):
    """Reads the process's messages on the loop, straight into the decoder's buffers."""

    def __init__(self, on_message: Callable[[dict[str, Any]], None], on_lost: Callable[[], None],
                 decoder: wire.Decoder):
        self._decoder = decoder
        self._on_message = on_message
        self._on_lost = on_lost

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._decoder.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        for message in self._decoder.filled(nbytes):
            self._on_message(message)

    def eof_received(self) -> bool:
        return False  # close the transport: the process has nothing more to say

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost()
