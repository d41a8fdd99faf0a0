"""The connection between the server and a Python model's process: whole messages over a Unix socket.

A message is a dict, pickled with protocol 5; the buffers of numpy arrays travel out of band (pickle's
``PickleBuffer``), so a tensor goes from an array to the socket and from the socket into the receiver's
array without a copy into or out of the pickle: one copy each way, through the kernel. A message on the
socket is ``<I count>``, ``count`` lengths ``<Q>``, then the pickle and its buffers.

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


class Connection:
    """One end of the socket. ``send`` may be called from any thread; ``recv`` from one thread at a time."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        buffers: list[pickle.PickleBuffer] = []
        payload = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
        raws = [b.raw() for b in buffers]
        header = _COUNT.pack(1 + len(raws)) + struct.pack(f"<{1 + len(raws)}Q", len(payload),
                                                          *(r.nbytes for r in raws))
        with self._send_lock:
            self.sock.sendall(header + payload)
            for r in raws:
                self.sock.sendall(r)

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
