"""System shared memory (Triton's extension): regions a client registers by POSIX shm key, that
requests then name for their inputs and outputs instead of carrying the bytes.

A region maps the shm object read-write. Inputs are copied out on admission, so a client may rewrite
or unregister a region as soon as its request is admitted, and unregistering never waits on a request.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from kiln.server.core import ShmRef
from kiln.server.errors import Code, ServerError

SHM_DIR = Path("/dev/shm")


@dataclass(slots=True)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    _map: mmap.mmap


class SharedMemoryManager:
    def __init__(self) -> None:
        self._regions: dict[str, Region] = {}

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if name in self._regions:
            raise ServerError(Code.ALREADY_EXISTS, f"shared memory region '{name}' already in manager")
        if offset < 0 or byte_size <= 0:
            raise ServerError.invalid(f"failed to register shared memory region '{name}': invalid args "
                                      f"(offset {offset}, byte_size {byte_size})")
        if not key.lstrip("/") or "/" in key.lstrip("/"):
            raise ServerError.invalid(f"Unable to open shared memory region: '{key}' (not a POSIX shm key)")
        path = SHM_DIR / key.lstrip("/")
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise ServerError.invalid(f"Unable to open shared memory region: '{key}' ({e.strerror})") from None
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size:
                raise ServerError.invalid(
                    f"failed to register shared memory region '{name}': invalid args (offset {offset} + "
                    f"byte_size {byte_size} exceeds the {size} bytes of '{key}')")
            # Map from the start so any offset works (mmap offsets must be page-aligned).
            region_map = mmap.mmap(fd, offset + byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._regions[name] = Region(name, key, offset, byte_size, region_map)

    def unregister(self, name: str = "") -> None:
        """Unregister one region, or every region when ``name`` is empty (unknown names are no error)."""
        for n in ([name] if name else list(self._regions)):
            region = self._regions.pop(n, None)
            if region is not None:
                region._map.close()

    def status(self, name: str = "") -> list[Region]:
        if not name:
            return list(self._regions.values())
        if name not in self._regions:
            raise ServerError.not_found(f"Unable to find system shared memory region: '{name}'")
        return [self._regions[name]]

    def read(self, ref: ShmRef, what: str) -> bytes:
        region, start = self._locate(ref, what)
        return region._map[start:start + ref.byte_size]

    def write(self, ref: ShmRef, data: bytes, what: str) -> None:
        region, start = self._locate(ref, what)
        if len(data) > ref.byte_size:
            raise ServerError.invalid(
                f"shared memory size specified with the request for {what} ({ref.byte_size} bytes) should be "
                f"at least {len(data)} bytes to hold the results")
        region._map[start:start + len(data)] = data

    def close(self) -> None:
        self.unregister()

    def _locate(self, ref: ShmRef, what: str) -> tuple[Region, int]:
        region = self._regions.get(ref.region)
        if region is None:
            raise ServerError.not_found(f"Unable to find shared memory region: '{ref.region}' (named by {what})")
        if ref.offset < 0 or ref.byte_size < 0 or ref.offset + ref.byte_size > region.byte_size:
            raise ServerError.invalid(
                f"Invalid offset + byte size for shared memory region: '{ref.region}' ({what} asks for "
                f"{ref.byte_size} bytes at offset {ref.offset}; the region holds {region.byte_size})")
        return region, region.offset + ref.offset
