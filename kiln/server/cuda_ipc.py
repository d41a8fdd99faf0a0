"""CUDA IPC memory (Triton's CUDA shared memory extension): device memory another process allocated and
exported with ``cudaIpcGetMemHandle``, opened here with the CUDA driver (``libcuda``, through ctypes: no
package beyond the driver itself) and copied to and from the host.

Only what the server needs: open a handle on a device, learn the true size of the allocation behind it (so
that a region declared larger than its allocation is refused, never read past: a copy past an allocation
is an illegal address, which poisons the CUDA context of the whole process), copy bytes in and out, close.
Every call runs with the device's primary context current (the one torch and the CUDA runtime share), so it
works from any thread.
"""
from __future__ import annotations

import ctypes
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

HANDLE_BYTES = 64  # CU_IPC_HANDLE_SIZE
_LAZY_ENABLE_PEER_ACCESS = 1  # CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS


class CudaIpcError(Exception):
    """A driver call failed, or this machine has no CUDA driver or device; the message says which."""


class _Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * HANDLE_BYTES)]


@dataclass(slots=True)
class OpenedMemory:
    device_id: int
    pointer: int  # device address of the allocation's start in this process
    allocation_bytes: int  # the allocation's size, as the driver reports it


class _Driver:
    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise CudaIpcError(f"this machine has no CUDA driver (libcuda.so.1: {e})") from None
        self._contexts: dict[int, ctypes.c_void_p] = {}
        self._lock = threading.Lock()
        self.call("cuInit", ctypes.c_uint(0))
        count = ctypes.c_int(0)
        self.call("cuDeviceGetCount", ctypes.byref(count))
        self.device_count = count.value

    def call(self, name: str, *args) -> None:
        result = getattr(self.lib, name)(*args)
        if result != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorName(result, ctypes.byref(text))
            raise CudaIpcError(f"{name} failed: {(text.value or b'CUDA error').decode()} ({result})")

    @contextmanager
    def on_device(self, device_id: int) -> Iterator[None]:
        """The device's primary context current on this thread for the block."""
        if not 0 <= device_id < self.device_count:
            raise CudaIpcError(f"device {device_id} does not exist here ({self.device_count} CUDA devices)")
        with self._lock:
            ctx = self._contexts.get(device_id)
            if ctx is None:
                dev, ctx = ctypes.c_int(0), ctypes.c_void_p()
                self.call("cuDeviceGet", ctypes.byref(dev), ctypes.c_int(device_id))
                self.call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
                self._contexts[device_id] = ctx
        self.call("cuCtxPushCurrent_v2", ctx)
        try:
            yield
        finally:
            popped = ctypes.c_void_p()
            self.call("cuCtxPopCurrent_v2", ctypes.byref(popped))


_driver: _Driver | None = None
_driver_error: CudaIpcError | None = None
_driver_lock = threading.Lock()


def driver() -> _Driver:
    """The loaded driver; raises CudaIpcError (the same one every time) where there is none or no device."""
    global _driver, _driver_error
    with _driver_lock:
        if _driver is None and _driver_error is None:
            try:
                found = _Driver()
                if found.device_count == 0:
                    raise CudaIpcError("this machine has no CUDA device")
                _driver = found
            except CudaIpcError as e:
                _driver_error = e
        if _driver_error is not None:
            raise _driver_error
        return _driver


def open_handle(raw_handle: bytes, device_id: int) -> OpenedMemory:
    """Open another process's ``cudaIpcMemHandle_t`` (its 64 bytes) on ``device_id``."""
    if len(raw_handle) != HANDLE_BYTES:
        raise CudaIpcError(f"a CUDA IPC handle is {HANDLE_BYTES} bytes, got {len(raw_handle)}")
    d = driver()
    handle = _Handle()
    ctypes.memmove(ctypes.addressof(handle), raw_handle, HANDLE_BYTES)
    pointer = ctypes.c_uint64(0)
    with d.on_device(device_id):
        d.call("cuIpcOpenMemHandle_v2", ctypes.byref(pointer), handle, ctypes.c_uint(_LAZY_ENABLE_PEER_ACCESS))
        try:
            base, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
            d.call("cuMemGetAddressRange_v2", ctypes.byref(base), ctypes.byref(size), pointer)
        except CudaIpcError:
            d.call("cuIpcCloseMemHandle", pointer)
            raise
    # The handle names its allocation's start, so the range starts at the pointer.
    return OpenedMemory(device_id, pointer.value, size.value - (pointer.value - base.value))


def close(memory: OpenedMemory) -> None:
    d = driver()
    with d.on_device(memory.device_id):
        d.call("cuIpcCloseMemHandle", ctypes.c_uint64(memory.pointer))


def read(memory: OpenedMemory, offset: int, size: int) -> bytearray:
    """``size`` bytes at ``offset`` (the caller checked them against the allocation), copied to the host once:
    the driver writes straight into the returned buffer."""
    out = bytearray(size)
    if size:
        d = driver()
        with d.on_device(memory.device_id):
            d.call("cuMemcpyDtoH_v2", (ctypes.c_char * size).from_buffer(out),
                   ctypes.c_uint64(memory.pointer + offset), ctypes.c_size_t(size))
    return out


def write(memory: OpenedMemory, offset: int, data: bytes) -> None:
    """``data`` copied to ``offset`` (the caller checked it fits the allocation)."""
    if not data:
        return
    d = driver()
    with d.on_device(memory.device_id):
        d.call("cuMemcpyHtoD_v2", ctypes.c_uint64(memory.pointer + offset), ctypes.c_char_p(bytes(data)),
               ctypes.c_size_t(len(data)))
