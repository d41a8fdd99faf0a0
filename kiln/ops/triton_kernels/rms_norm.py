"""RMSNorm, alone or fused with the residual add before it, in Triton: one program per row."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.ops.triton_kernels.common import check_last_dim_contiguous


@triton.jit
def _rms_norm_kernel(
    out_ptr, sum_ptr, x_ptr, residual_ptr, weight_ptr, eps, n_cols,
    stride_o, stride_s, stride_x, stride_r,
    BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    m = c < n_cols
    x = tl.load(x_ptr + row * stride_x + c, mask=m, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + c, mask=m, other=0.0)
        # The sum rounded to the activation dtype, as transformers adds the residual.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * stride_s + c, x, mask=m)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    h = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + c, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + c, (w * h).to(out_ptr.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
             config: dict, out: torch.Tensor | None = None,
             summed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(RMSNorm of x + residual, x + residual), or (RMSNorm of x, None) without a residual.

    Rows are x's leading dimensions flattened. ``config``: ``num_warps`` (0: by row width).
    ``out`` and ``summed`` (contiguous, shaped like x) receive the results when given.
    """
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    check_last_dim_contiguous("x", x2)
    if out is None:
        out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    out = out.view(x2.shape)
    if residual is None:
        summed, r2 = out, x2  # unread placeholders
    else:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not match x "
                             f"{tuple(x.shape)} {x.dtype}")
        r2 = residual.reshape(-1, n)
        check_last_dim_contiguous("residual", r2)
        summed = torch.empty_like(x2) if summed is None else summed.view(x2.shape)
    if x2.shape[0]:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(x2.shape[0],)](
            out, summed, x2, r2, weight, eps, n, out.stride(0), summed.stride(0), x2.stride(0), r2.stride(0),
            BLOCK=block, HAS_RESIDUAL=residual is not None,
            num_warps=config["num_warps"] or min(16, max(4, block // 512)),
        )
    if residual is None:
        return out.view(x.shape), None
    return out.view(x.shape), summed.view(x.shape)
