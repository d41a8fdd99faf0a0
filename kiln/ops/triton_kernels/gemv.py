"""Matrix products of a few rows in Triton, y = x W^T (+ b): decode at small batch, where the time is
reading W.

At batch 1 a decode step reads every weight once and does two FLOPs per weight, so it is bound by
memory. cuBLAS runs some of these shapes well below the copy rate: on the H200 the Llama-3.1-8B
shape's qkv and o projections at 73% of it, with split-K kernels and a separate reduction kernel for
o and down (``benchmarks/results/h200_8b_profile_b1_graphs_auto.json``). Here a program owns
``BLOCK_N`` output features and streams their weight rows once, ``BLOCK_K`` columns at a time:

- one row (``BLOCK_M == 1``): products accumulate elementwise in a float32 [BLOCK_N, BLOCK_K] tile
  and are summed once at the end, so the loop is loads and FMAs only;
- up to 16 rows: ``tl.dot`` of the rows (padded to 16) with the weight tile, on tensor cores.

Both accumulate in float32 and round once, as cuBLAS does; only the order of the sums differs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.ops.triton_kernels.common import check_last_dim_contiguous, dot_in_fp32

MAX_ROWS = 16  # the dot path pads rows to 16; more rows are a real GEMM, cuBLAS's job


@triton.jit
def _gemv_kernel(
    y_ptr, x_ptr, w_ptr, b_ptr, M, N, K, stride_ym, stride_xm, stride_wn,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = n < N
    # Rows past N read row N-1 again (in bounds, unmasked loads) and are not stored.
    w_rows = w_ptr + tl.minimum(n, N - 1).to(tl.int64)[:, None] * stride_wn
    kk = tl.arange(0, BLOCK_K)
    m = tl.arange(0, BLOCK_M)
    m_valid = m < M
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        if EVEN_K:
            w = tl.load(w_rows + k[None, :])
        else:
            w = tl.load(w_rows + k[None, :], mask=(k < K)[None, :], other=0.0)
        if BLOCK_M == 1:
            if EVEN_K:
                x = tl.load(x_ptr + k)
            else:
                x = tl.load(x_ptr + k, mask=k < K, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        else:
            x = tl.load(x_ptr + m[:, None].to(tl.int64) * stride_xm + k[None, :],
                        mask=m_valid[:, None] & (k < K)[None, :], other=0.0)
            if DOT_FP32:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    if BLOCK_M == 1:
        y = tl.sum(acc, 1)[None, :]
    else:
        y = acc
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m[:, None].to(tl.int64) * stride_ym + n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_valid[:, None] & n_valid[None, :])


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: dict) -> torch.Tensor:
    """x [..., K] (at most ``MAX_ROWS`` rows) @ weight [N, K]^T (+ bias [N]).

    ``config``: ``block_n``, ``block_k``, ``warps``, ``stages`` for one row; ``dot_block_n``,
    ``dot_block_k``, ``dot_warps``, ``dot_stages`` for two to 16.
    """
    n_out, k_in = weight.shape
    if x.shape[-1] != k_in:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {k_in}")
    x2 = x.reshape(-1, k_in)
    rows = x2.shape[0]
    if rows > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {rows}")
    check_last_dim_contiguous("x", x2)
    check_last_dim_contiguous("weight", weight)
    y = torch.empty((rows, n_out), dtype=x.dtype, device=x.device)
    if rows:
        one = rows == 1
        block_n = config["block_n" if one else "dot_block_n"]
        block_k = min(config["block_k" if one else "dot_block_k"], max(16, triton.next_power_of_2(k_in)))
        _gemv_kernel[(triton.cdiv(n_out, block_n),)](
            y, x2, weight, bias if bias is not None else y, rows, n_out, k_in, y.stride(0), x2.stride(0),
            weight.stride(0), HAS_BIAS=bias is not None, BLOCK_M=1 if one else 16, BLOCK_N=block_n,
            BLOCK_K=block_k, EVEN_K=k_in % block_k == 0, DOT_FP32=dot_in_fp32(x.dtype),
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            num_warps=config["warps" if one else "dot_warps"], num_stages=config["stages" if one else "dot_stages"],
        )
    return y.view(*x.shape[:-1], n_out)
