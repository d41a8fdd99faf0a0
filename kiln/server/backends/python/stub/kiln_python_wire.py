"""The connection between the server and a Python model's process: whole messages over a Unix socket.

A message is a dict, pickled with protocol 5; the buffers of numpy arrays travel out of band (pickle's
``PickleBuffer``), so a tensor goes from an array to the socket and from the socket into the receiver's
array without a copy into or out of the pickle: one copy each way, through the kernel. A message on the
socket is ``<I count>``, ``count`` lengths ``<Q>``, then the pickle and its buffers.

The model's process reads with a blocking :class:`Connection` (a reader thread of its own); the server
reads on its event loop with a :class:`Decoder` fed by an asyncio protocol (``backends/python/process.py``),
so no thread of the server waits on the socket and no response crosses between threads.

Both ends are ours (the server and the process it started for the model), so pickle carries no
foreign data. This module runs on both sides and imports nothing from kiln: the model's process
imports it from this folder by itself.
"""
from __future__ import annotations

import pickle
import socket
import struct
import threading
from typing import Any

_COUNT = struct.Struct("<I")
# Frames up to this size are read through the decoder's own buffer (many messages per read); larger ones
# straight into a buffer of their own.
_SMALL = 1 << 15


def encode(message: dict[str, Any]) -> list:
    """The message as the pieces to write in order: the header with the pickle, then each out-of-band buffer
    (a small message as one piece: one write)."""
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    header = _COUNT.pack(1 + len(raws)) + struct.pack(f"<{1 + len(raws)}Q", len(payload), *(r.nbytes for r in raws))
    if len(header) + len(payload) + sum(r.nbytes for r in raws) <= _SMALL:
        return [b"".join([header, payload, *raws])]
    return [header + payload, *raws]


class Connection:
    """One end of the socket. ``send`` may be called from any thread; ``recv`` from one thread at a time."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        pieces = encode(message)
        with self._send_lock:
            for piece in pieces:
                self.sock.sendall(piece)

    def recv(self) -> dict[str, Any]:
        """The next message; EOFError when the other side has closed the connection."""
        (count,) = _COUNT.unpack(self._exactly(_COUNT.size))
        lengths = struct.unpack(f"<{count}Q", self._exactly(8 * count))
        frames = [self._exactly(n) for n in lengths]
        # bytearray frames: the arrays built over them are writable, as a model expects its inputs to be.
        return pickle.loads(frames[0], buffers=frames[1:])

    def _exactly(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise EOFError("connection closed")
            got += k
        return buf

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class Decoder:
    """Whole messages out of a byte stream, for a reader that is handed bytes as they come (asyncio's
    ``BufferedProtocol``): ``buffer()`` is where the next bytes go, ``filled(n)`` says how many came and
    returns the messages they completed. Small frames are copied out of one reusable buffer; a large one
    is read straight into its own ``bytearray``, which its array then uses (writable, as a model expects)."""

    def __init__(self) -> None:
        self._buf = bytearray(4 * _SMALL)
        self._start = 0  # unread bytes are _buf[_start:_end]
        self._end = 0
        self._lengths: tuple[int, ...] | None = None  # the current message's frame lengths, once known
        self._frames: list[bytearray] = []
        self._big: bytearray | None = None  # a large frame being read into its own buffer
        self._big_got = 0

    def buffer(self) -> memoryview:
        if self._big is not None:
            return memoryview(self._big)[self._big_got:]
        if len(self._buf) - self._end < _SMALL:
            unread = self._end - self._start
            if unread + _SMALL > len(self._buf):  # a header longer than the buffer (a message of many buffers)
                self._buf.extend(bytes(unread + _SMALL - len(self._buf)))
            self._buf[:unread] = self._buf[self._start:self._end]
            self._start, self._end = 0, unread
        return memoryview(self._buf)[self._end:]

    def filled(self, n: int) -> list[dict[str, Any]]:
        if self._big is not None:
            self._big_got += n
            if self._big_got < len(self._big):
                return []
            self._frames.append(self._big)
            self._big = None
        else:
            self._end += n
        messages = []
        while (message := self._next()) is not None:
            messages.append(message)
        return messages

    def _next(self) -> dict[str, Any] | None:
        buf = self._buf
        if self._lengths is None:
            if self._end - self._start < _COUNT.size:
                return None
            (count,) = _COUNT.unpack_from(buf, self._start)
            if self._end - self._start < _COUNT.size + 8 * count:
                return None
            self._lengths = struct.unpack_from(f"<{count}Q", buf, self._start + _COUNT.size)
            self._start += _COUNT.size + 8 * count
        while len(self._frames) < len(self._lengths):
            if self._big is not None:
                return None
            length = self._lengths[len(self._frames)]
            have = self._end - self._start
            if have >= length:
                self._frames.append(buf[self._start:self._start + length])
                self._start += length
            elif length > _SMALL:
                self._big = bytearray(length)
                self._big[:have] = buf[self._start:self._end]
                self._big_got = have
                self._start = self._end = 0
                return None
            else:
                return None
        frames, self._frames, self._lengths = self._frames, [], None
        return pickle.loads(frames[0], buffers=frames[1:])
