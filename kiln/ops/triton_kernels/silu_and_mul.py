"""SwiGLU's activation on a fused [gate | up] projection, in Triton: silu(gate) * up in one pass."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.ops.triton_kernels.common import check_last_dim_contiguous


@triton.jit
def _silu_and_mul_kernel(out_ptr, x_ptr, n, stride_o, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < n
    gate = tl.load(x_ptr + row * stride_x + c, mask=m, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n + c, mask=m, other=0.0)
    g = gate.to(tl.float32)
    # silu rounded to the activation dtype before the product, as torch computes silu(gate) * up.
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + c, (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=m)


def silu_and_mul(x: torch.Tensor, config: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x[..., :n]) * x[..., n:] for x [..., 2n] (in ``out`` when given). ``config``: ``block``, ``num_warps``."""
    two_n = x.shape[-1]
    if two_n % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension (gate | up), got {two_n}")
    n = two_n // 2
    x2 = x.reshape(-1, two_n)
    check_last_dim_contiguous("x", x2)
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device) if out is None else out.view(x2.shape[0], n)
    if x2.shape[0]:
        block = min(config["block"], triton.next_power_of_2(n))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](
            out, x2, n, out.stride(0), x2.stride(0), BLOCK=block, num_warps=config["num_warps"],
        )
    return out.view(*x.shape[:-1], n)
