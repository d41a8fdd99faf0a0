"""Activations rounded to float8 e4m3 per row (per token), in Triton: one kernel finds each row's largest
magnitude, its scale (max |row| / 448) and the row's e4m3 values, for an FP8 matrix product."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.ops.triton_kernels.common import check_last_dim_contiguous


@triton.jit
def _quantize_rows_kernel(out_ptr, scale_ptr, x_ptr, n, stride_o, stride_x, FP8_MAX: tl.constexpr,
                          MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        c = start + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row * stride_x + c, mask=c < n, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.maximum(tl.max(amax, axis=0) / FP8_MAX, MIN_SCALE)
    tl.store(scale_ptr + row, scale)
    for start in range(0, n, BLOCK):
        c = start + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row * stride_x + c, mask=c < n, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(v / scale, -FP8_MAX), FP8_MAX)
        tl.store(out_ptr + row * stride_o + c, q.to(out_ptr.dtype.element_ty), mask=c < n)


def quantize_rows_fp8(x: torch.Tensor, max_value: float, min_scale: float,
                      block: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, n] -> (its e4m3 values [rows, n], float32 scales [rows, 1]) with x ~ values * scales: each
    row's scale is max |row| / ``max_value``, at least ``min_scale``."""
    check_last_dim_contiguous("x", x)
    rows, n = x.shape
    out = torch.empty((rows, n), dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        _quantize_rows_kernel[(rows,)](out, scales, x, n, out.stride(0), x.stride(0), FP8_MAX=max_value,
                                       MIN_SCALE=min_scale, BLOCK=min(block, triton.next_power_of_2(n)),
                                       num_warps=4)
    return out, scales
