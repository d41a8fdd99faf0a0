"""Giving an unloaded model's memory back to the operating system (glibc; a no-op elsewhere).

Freed memory goes back to the allocator, which keeps it unless told otherwise: glibc raises its mmap
threshold after large blocks are freed, so the next model's weights land in heap arenas that are
never returned, and a server that loads and unloads models grows. A fixed threshold keeps every block
of 4 MiB or more (weights, large tensors) in its own mapping, returned the moment it is freed, and
``release()`` trims what smaller blocks leave in the heap.
"""
from __future__ import annotations

import ctypes
import gc

_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
MMAP_THRESHOLD = 4 * 1024 * 1024


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def configure() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def release() -> None:
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
