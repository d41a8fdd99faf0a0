"""The connection between the server and a Python model's process: whole messages over a Unix socket.

A message is a dict, pickled with protocol 5. A numpy array is pickled as ``ndarray(shape, dtype, buffer)``
(``_reduce_array``: numpy's own reduction rebuilds through a Python function and pickles the dtype as an
object, most of the time a small message took). Its buffer travels in the pickle when small;
from ``OUT_OF_BAND`` bytes up, out of band (pickle's ``PickleBuffer``), so a tensor goes from an array to the
socket and from the socket into the receiver's array without a copy into or out of the pickle: one copy each
way, through the kernel. A message on the socket is ``<I count>``, ``count`` lengths ``<Q>``, then the pickle
and its out-of-band buffers.

Both sides parse with a :class:`Decoder`: the model's process feeds it from a blocking :class:`Connection`
(read by one of its threads at a time), the server from an asyncio protocol on its event loop
(``backends/python/process.py``), so no thread of the server waits on the socket and no response crosses
between threads. Either reads whatever the socket holds at once: several messages a read where they queued.

Large buffers (``RING_MIN`` bytes and up) go through shared memory instead, as Triton's Python backend
moves tensors: each direction has a :class:`Ring`, a memfd both processes map. The sender copies the buffer
into its ring and the socket carries only its position (its length flagged with ``IN_RING``); the receiver's
array is the ring's memory itself, released for the sender to reuse when the receiver drops it. One copy in
all, where the socket takes two and a fresh buffer (whose first touch of each page costs more than the copy);
a buffer the ring has no room for at that moment travels on the socket as before.

Both ends are ours (the server and the process it started for the model), so pickle carries no
foreign data. This module runs on both sides and imports nothing from kiln: the model's process
imports it from this folder by itself.
"""
from __future__ import annotations

import collections
import io
import mmap
import os
import pickle
import socket
import struct
import threading
import weakref
from typing import Any

_COUNT = struct.Struct("<I")
# Frames up to this size are read through the decoder's own buffer (many messages per read); larger ones
# straight into a buffer of their own.
_SMALL = 1 << 15


# Array buffers smaller than this travel inside the pickle; larger ones out of band (one piece each, or the ring).
OUT_OF_BAND = _SMALL
# Buffers this large and up go through the sender's ring when it has room; a frame's length with this bit
# set says so (the frame on the socket is then the buffer's position in the ring, ``<Q``).
RING_MIN = 1 << 20
IN_RING = 1 << 63
_ALIGN = 64  # each buffer in a ring starts at a multiple of this: its array is aligned for any dtype
_POSITION = struct.Struct("<Q")


class Ring:
    """One direction's shared memory: a memfd of ``HEADER + size`` bytes that both processes map. One
    process writes (``put``), the other takes each buffer as an array over the ring itself (``take``), no
    copy: the bytes stay the array's until the last array over them is gone, then they are released. Positions
    count bytes written since the start; the header holds ``consumed``, the position up to which every buffer
    is released, which the writer may overwrite. A buffer never wraps: one that does not fit before the end
    starts at the beginning, and the bytes skipped count as written. A receiver that holds arrays for long
    only fills the ring, and the sender's buffers then go on the socket."""

    HEADER = 64

    def __init__(self, fd: int, size: int):
        self.fd = fd  # until close_fd
        self.size = size
        if size % _ALIGN:
            raise ValueError(f"a ring's size must be a multiple of {_ALIGN} bytes, got {size}")
        self._map = mmap.mmap(fd, self.HEADER + size)
        self._data = memoryview(self._map)[self.HEADER:]
        self._written = 0  # the writer's position
        self._lock = threading.Lock()  # the reader's releases come from whichever thread drops an array
        self._held: dict[int, int] = {}  # the reader's: start -> end of each buffer taken, in the ring's order
        self._released: set[int] = set()  # starts of held buffers no array uses any more

    @classmethod
    def create(cls, size: int) -> Ring:
        """A new ring (the server's side): its ``fd`` is passed to the model's process, which maps it too."""
        fd = os.memfd_create("kiln-python-ring", 0)  # inheritable only where passed (pass_fds)
        try:
            os.ftruncate(fd, cls.HEADER + size)  # pages are taken as they are first written
            return cls(fd, size)
        except BaseException:
            os.close(fd)
            raise

    def _consumed(self) -> int:
        return _POSITION.unpack_from(self._map, 0)[0]

    def put(self, raw: memoryview) -> int | None:
        """Copy ``raw`` in and return its position, or None when the ring has no room for it now."""
        n = raw.nbytes
        if n > self.size:
            return None
        start = -(-self._written // _ALIGN) * _ALIGN
        offset = start % self.size
        if offset + n > self.size:  # to the beginning
            start += self.size - offset
            offset = 0
        if start + n - self._consumed() > self.size:
            return None
        self._data[offset:offset + n] = raw
        self._written = start + n
        return start

    def take(self, start: int, n: int):
        """The ``n`` bytes at ``start`` (a position ``put`` returned, taken in order) as a writable uint8 array
        over the ring; they are released when no array uses them any more."""
        import numpy as np  # the model's process has numpy (its inputs are arrays); imported when first used

        offset = start % self.size
        if n > self.size or offset + n > self.size:
            raise ValueError(f"a ring frame of {n} bytes at {start} does not lie in the ring")
        array = np.frombuffer(self._data[offset:offset + n], np.uint8)
        with self._lock:
            self._held[start] = start + n
        weakref.finalize(array, self._release, start)
        return array

    def _release(self, start: int) -> None:
        with self._lock:
            self._released.add(start)
            consumed = None
            for first, end in list(self._held.items()):  # the oldest first: consumed moves over released ones
                if first not in self._released:
                    break
                self._released.discard(first)
                del self._held[first]
                consumed = end
            if consumed is not None:
                _POSITION.pack_into(self._map, 0, consumed)

    def close_fd(self) -> None:
        """Close the memfd once the other process has it (the mapping holds its own, and goes with the ring)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_pickler_class = None
_DTYPE_CODES: dict = {}  # dtype -> the string that names it for ``ndarray``, or None where none does (bfloat16)


def _reduce_array(a):
    code = _DTYPE_CODES.get(a.dtype, 0)
    if code == 0:
        import numpy as np

        code = a.dtype.str if not a.dtype.hasobject and np.dtype(a.dtype.str) == a.dtype else None
        _DTYPE_CODES[a.dtype] = code
    if code is None:  # object arrays (BYTES) and dtypes a code does not name: numpy's own way
        return a.__reduce_ex__(5)
    if not a.flags.c_contiguous:
        import numpy as np

        a = np.ascontiguousarray(a)
    # A writable array's buffer comes back as a bytearray (a writable array, as a model expects its inputs to
    # be), a read-only one's as bytes (read-only again).
    return type(a), (a.shape, code, pickle.PickleBuffer(a))


def _pickler() -> type:
    """The pickler of messages (made on first use: the model's process imports numpy only then)."""
    global _pickler_class
    if _pickler_class is None:
        import copyreg

        import numpy as np

        class MessagePickler(pickle.Pickler):
            dispatch_table = {**copyreg.dispatch_table, np.ndarray: _reduce_array}

        _pickler_class = MessagePickler
    return _pickler_class


def encode(message: dict[str, Any], ring: Ring | None = None) -> list:
    """The message as the pieces to write in order: the header with the pickle, then each out-of-band buffer
    (a small message as one piece: one write). With ``ring``, large buffers go into it and only their
    positions into the pieces (so pieces are written in the order messages were encoded)."""
    buffers: list[pickle.PickleBuffer] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        if buffer.raw().nbytes < OUT_OF_BAND:
            return True  # in the pickle
        buffers.append(buffer)
        return False

    stream = io.BytesIO()
    _pickler()(stream, protocol=5, buffer_callback=out_of_band).dump(message)
    payload = stream.getbuffer()
    if not buffers:
        return [_COUNT.pack(1) + _POSITION.pack(payload.nbytes) + payload]
    raws: list = [b.raw() for b in buffers]
    lengths = [payload.nbytes]
    for i, raw in enumerate(raws):
        start = ring.put(raw) if ring is not None and raw.nbytes >= RING_MIN else None
        if start is None:
            lengths.append(raw.nbytes)
        else:
            lengths.append(IN_RING | raw.nbytes)
            raws[i] = _POSITION.pack(start)
    header = _COUNT.pack(len(lengths)) + struct.pack(f"<{len(lengths)}Q", *lengths)
    return [header + payload, *raws]


def _wire_length(length: int) -> int:
    """How many bytes a frame of this (flagged) length takes on the socket."""
    return _POSITION.size if length & IN_RING else length


def _frame(ring: Ring | None, length: int, got: bytearray):
    """The frame's bytes: ``got`` itself, or for a frame in the ring, an array over its bytes there."""
    if not length & IN_RING:
        return got
    if ring is None:
        raise ValueError("a frame in shared memory, but this connection has no ring")
    return ring.take(_POSITION.unpack(got)[0], length & ~IN_RING)


class Connection:
    """One end of the socket, with the rings it writes to and reads from, if any. ``send`` may be called
    from any thread; ``recv`` from one thread at a time."""

    def __init__(self, sock: socket.socket, send_ring: Ring | None = None, recv_ring: Ring | None = None):
        self.sock = sock
        self.send_ring = send_ring
        self.recv_ring = recv_ring
        self._send_lock = threading.Lock()
        self._decoder = Decoder(recv_ring)
        self._received: collections.deque[dict[str, Any]] = collections.deque()  # decoded, not yet returned

    def send(self, message: dict[str, Any]) -> None:
        with self._send_lock:  # encoded under the lock: the ring's buffers in the order the messages go
            for piece in encode(message, self.send_ring):
                self.sock.sendall(piece)

    def recv(self) -> dict[str, Any]:
        """The next message; EOFError when the other side has closed the connection."""
        while not self._received:
            n = self.sock.recv_into(self._decoder.buffer())
            if n == 0:
                raise EOFError("connection closed")
            self._received.extend(self._decoder.filled(n))
        return self._received.popleft()

    def hand_over(self) -> tuple[Decoder, list[dict[str, Any]]]:
        """For a reader that takes the socket over (the server's event loop): the decoder, with any bytes it
        read past the last message returned, and the messages decoded but not yet returned."""
        pending, self._received = list(self._received), collections.deque()
        return self._decoder, pending

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

    def __init__(self, ring: Ring | None = None) -> None:
        self._ring = ring
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
            self._frames.append(self._big)  # a large frame is never in the ring (that one is 8 bytes)
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
            flagged = self._lengths[len(self._frames)]
            length = _wire_length(flagged)
            have = self._end - self._start
            if have >= length:
                self._frames.append(_frame(self._ring, flagged, buf[self._start:self._start + length]))
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
