"""Small helpers the Triton launchers share: device facts and the interpreter's limits."""
from __future__ import annotations

import functools

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether dot operands of ``dtype`` must be widened to float32 before ``tl.dot``.

    NOTE: Triton 3.6's interpreter multiplies bfloat16 operands as their raw uint16 bits; widening
    is exact, and the products a GPU's bf16 dot forms are exact in float32 too, so only the
    accumulation order can differ.
    """
    return dtype == torch.bfloat16 and interpreting()


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a plausible Hopper count elsewhere, for the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {tuple(t.stride())}")
