"""Shared memory (Triton's two extensions): regions a client registers, that requests then name for their
inputs and outputs instead of carrying the bytes. System regions are POSIX shm objects named by key; CUDA
regions are device memory named by a CUDA IPC handle (``cuda_ipc``). Both kinds share one namespace of
region names and one set of limits, as in Triton.

A key names an object in ``/dev/shm`` and nothing else: it is opened relative to that folder with
``O_NOFOLLOW`` (as ``shm_open`` does), so a key that is a symbolic link, or a path, is refused, and the
object must be a regular file of the ``/dev/shm`` file system. The server keeps the descriptor and reads
and writes the region with ``pread`` / ``pwrite``, never through a mapping: a client that shrinks its
object after registering it gets a 400 for a request that reaches past the new end, where a mapping
would have killed the server with SIGBUS. Inputs are copied out on admission, so a client may rewrite
or unregister a region as soon as its request is admitted, and unregistering never waits on a request.

A CUDA region is opened on its device when it is registered, and its byte size is checked against the
allocation the handle names (as the driver reports it), so no request can reach past that allocation;
inputs are copied from the device and outputs to it (a copy through the host).

Each region holds a descriptor or an opened handle, so their number is capped (``max_regions``), and so is
the sum of their registered sizes (``max_bytes``).
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from kiln.server import cuda_ipc
from kiln.server.config import NAME_MAX
from kiln.server.core import ShmRef
from kiln.server.errors import Code, ServerError, shown
from kiln.server.limits import Limits

SHM_DIR = Path("/dev/shm")


@dataclass(slots=True)
class Region:
    name: str
    key: str  # a system region's shm key ("" for CUDA)
    offset: int
    byte_size: int
    fd: int  # a system region's descriptor (-1 for CUDA)
    device_id: int = -1  # a CUDA region's device
    memory: cuda_ipc.OpenedMemory | None = None  # a CUDA region's opened handle

    @property
    def is_cuda(self) -> bool:
        return self.memory is not None


class SharedMemoryManager:
    def __init__(self, max_regions: int | None = None, max_bytes: int | None = None, shm_dir: Path = SHM_DIR):
        self.max_regions = Limits().shm_max_regions if max_regions is None else max_regions
        self.max_bytes = Limits().shm_max_bytes if max_bytes is None else max_bytes
        self.shm_dir = shm_dir
        self._regions: dict[str, Region] = {}

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        what = f"shared memory region '{shown(name)}'"
        self._admit(name, offset, byte_size, what)
        fd = self._open(key)
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size:
                raise ServerError.invalid(
                    f"failed to register {what}: invalid args (offset {offset} + byte_size {byte_size} exceeds "
                    f"the {size} bytes of '{shown(key)}')")
        except BaseException:
            os.close(fd)
            raise
        self._regions[name] = Region(name, key, offset, byte_size, fd)

    def register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        what = f"CUDA shared memory region '{shown(name)}'"
        self._admit(name, 0, byte_size, what)
        try:
            memory = cuda_ipc.open_handle(raw_handle, device_id)
        except cuda_ipc.CudaIpcError as e:
            raise ServerError.invalid(f"failed to register {what}: {e}") from None
        if byte_size > memory.allocation_bytes:
            cuda_ipc.close(memory)
            raise ServerError.invalid(
                f"failed to register {what}: byte_size {byte_size} exceeds the {memory.allocation_bytes} bytes of "
                f"the allocation its handle names on device {device_id}")
        self._regions[name] = Region(name, "", 0, byte_size, -1, device_id, memory)

    def _admit(self, name: str, offset: int, byte_size: int, what: str) -> None:
        """Refuse a region whose name, bounds or size the server cannot take (before opening anything)."""
        if not name or len(name) > NAME_MAX or "\0" in name:
            raise ServerError.invalid(f"failed to register {what}: a region name has 1 to {NAME_MAX} characters "
                                      "and no NUL")
        if name in self._regions:
            raise ServerError(Code.ALREADY_EXISTS, f"{what} already in manager")
        if offset < 0 or byte_size <= 0:
            raise ServerError.invalid(f"failed to register {what}: invalid args (offset {offset}, "
                                      f"byte_size {byte_size})")
        if len(self._regions) >= self.max_regions:
            raise ServerError.invalid(
                f"failed to register {what}: the server holds its limit of {self.max_regions} shared memory "
                "regions (--shm-max-regions); unregister one first")
        registered = sum(r.byte_size for r in self._regions.values())
        if registered + byte_size > self.max_bytes:
            raise ServerError.invalid(
                f"failed to register {what}: its {byte_size} bytes would take the registered total past the "
                f"server's limit of {self.max_bytes} bytes (--shm-max-bytes)")

    def _open(self, key: str) -> int:
        """A descriptor of the regular file ``key`` names directly in the shm folder (no link, no path)."""
        bare = key[1:] if key.startswith("/") else key
        refused = f"Unable to open shared memory region: '{shown(key)}'"
        if not bare or bare in (".", "..") or "/" in bare or "\0" in bare or len(bare) > NAME_MAX:
            raise ServerError.invalid(f"{refused} (a POSIX shm key is '/' and a file name: no other '/', no NUL, "
                                      f"at most {NAME_MAX} characters)")
        try:
            folder = os.open(self.shm_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ServerError.unavailable(f"{refused} (this machine has no {self.shm_dir}: {e.strerror})") from None
        try:
            # O_NONBLOCK: a FIFO or device placed there cannot hang the open; it is refused below.
            fd = os.open(bare, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY,
                         dir_fd=folder)
        except OSError as e:
            reason = "it is a symbolic link" if e.errno == errno.ELOOP else e.strerror
            raise ServerError.invalid(f"{refused} ({reason})") from None
        else:
            info, home = os.fstat(fd), os.fstat(folder)
            if not stat.S_ISREG(info.st_mode) or info.st_dev != home.st_dev:
                os.close(fd)
                raise ServerError.invalid(f"{refused} (not a shared memory object of {self.shm_dir})")
            return fd
        finally:
            os.close(folder)

    def unregister(self, name: str = "", cuda: bool = False) -> None:
        """Unregister one region of the kind (system, or ``cuda``), or every region of it when ``name`` is
        empty; unknown names, and names of the other kind, are no error."""
        for n in ([name] if name else list(self._regions)):
            region = self._regions.get(n)
            if region is None or region.is_cuda != cuda:
                continue
            del self._regions[n]
            if region.is_cuda:
                try:
                    cuda_ipc.close(region.memory)
                except cuda_ipc.CudaIpcError as e:
                    raise ServerError.internal(f"failed to unregister CUDA shared memory region "
                                               f"'{shown(n)}': {e}") from None
            else:
                os.close(region.fd)

    def status(self, name: str = "", cuda: bool = False) -> list[Region]:
        """The regions of the kind (system, or ``cuda``), or the one named."""
        if not name:
            return [r for r in self._regions.values() if r.is_cuda == cuda]
        region = self._regions.get(name)
        if region is None or region.is_cuda != cuda:
            kind = "cuda" if cuda else "system"
            raise ServerError.not_found(f"Unable to find {kind} shared memory region: '{shown(name)}'")
        return [region]

    def read(self, ref: ShmRef, what: str) -> bytes | bytearray:
        region, start = self._locate(ref, what)
        if region.is_cuda:
            try:
                return cuda_ipc.read(region.memory, start, ref.byte_size)
            except cuda_ipc.CudaIpcError as e:
                raise ServerError.internal(f"failed to read {what} from CUDA shared memory region "
                                           f"'{region.name}': {e}") from None
        data = os.pread(region.fd, ref.byte_size, start)
        if len(data) != ref.byte_size:
            raise self._shrunk(region, what)
        return data

    def write(self, ref: ShmRef, data: bytes, what: str) -> None:
        region, start = self._locate(ref, what)
        if len(data) > ref.byte_size:
            raise ServerError.invalid(
                f"shared memory size specified with the request for {what} ({ref.byte_size} bytes) should be "
                f"at least {len(data)} bytes to hold the results")
        if region.is_cuda:
            try:
                return cuda_ipc.write(region.memory, start, data)
            except cuda_ipc.CudaIpcError as e:
                raise ServerError.internal(f"failed to write {what} to CUDA shared memory region "
                                           f"'{region.name}': {e}") from None
        # A write past the end would grow the object instead of failing: check its size first.
        if os.fstat(region.fd).st_size < start + len(data):
            raise self._shrunk(region, what)
        view = memoryview(data)
        while view:
            view = view[os.pwrite(region.fd, view, start + len(data) - len(view)):]

    def close(self) -> None:
        self.unregister()
        self.unregister(cuda=True)

    def _locate(self, ref: ShmRef, what: str) -> tuple[Region, int]:
        region = self._regions.get(ref.region)
        if region is None:
            raise ServerError.not_found(
                f"Unable to find shared memory region: '{shown(ref.region)}' (named by {what})")
        if ref.offset < 0 or ref.byte_size < 0 or ref.offset + ref.byte_size > region.byte_size:
            raise ServerError.invalid(
                f"Invalid offset + byte size for shared memory region: '{region.name}' ({what} asks for "
                f"{ref.byte_size} bytes at offset {ref.offset}; the region holds {region.byte_size})")
        return region, region.offset + ref.offset

    @staticmethod
    def _shrunk(region: Region, what: str) -> ServerError:
        return ServerError.invalid(
            f"shared memory region '{region.name}' (key '{region.key}') is smaller than when it was registered; "
            f"{what} reaches past its end")

