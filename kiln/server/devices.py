"""Which CUDA GPUs this machine has, found without importing torch where there is no NVIDIA driver
(so a CPU-only server starts without paying for the import)."""
from __future__ import annotations

import functools
import os


@functools.cache
def cuda_devices() -> tuple[int, ...]:
    if not (os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidiactl")):
        return ()
    try:
        import torch
    except ImportError:
        return ()
    return tuple(range(torch.cuda.device_count())) if torch.cuda.is_available() else ()
