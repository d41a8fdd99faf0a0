"""Rotary embedding of the query and key heads fused with the key/value cache write, in Triton.

One program per token reads the token's row of the fused QKV projection once: it rotates the query
heads into a new [T, H, D] tensor and writes the rotated key heads and the value heads straight into
their cache slot, instead of a rotary pass, a copy of q and k, and two scattered index copies.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.ops.triton_kernels.common import check_last_dim_contiguous


@triton.jit
def _rotate(x1, x2, cos1, cos2, sin1, sin2):
    """Rotate-half RoPE of the two halves, each product and sum rounded to the input dtype as torch does."""
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    a = (x1 * cos1[None, :].to(tl.float32)).to(dtype).to(tl.float32)
    b = (x2 * sin1[None, :].to(tl.float32)).to(dtype).to(tl.float32)
    c = (x2 * cos2[None, :].to(tl.float32)).to(dtype).to(tl.float32)
    e = (x1 * sin2[None, :].to(tl.float32)).to(dtype).to(tl.float32)
    return (a - b).to(dtype), (c + e).to(dtype)


@triton.jit
def _round_to_e4m3(x):
    """``x`` (float32, |x| <= 448) rounded to the nearest float8 e4m3 value, ties to even, in float32
    arithmetic, so that the cast after it is exact. (Triton 3.6's interpreter rounds that cast itself
    wrongly: ties up, subnormals to zero, and a carry into the exponent lost, 127.9 -> 64.)"""
    exponent = (x.to(tl.int32, bitcast=True) >> 23) & 0xFF
    # Three mantissa bits: steps of 2^(e - 3); below e4m3's smallest normal, 2^-6, subnormal steps of 2^-9.
    step = ((tl.maximum(exponent, 127 - 6) - 3) << 23).to(tl.float32, bitcast=True)
    magic = 12582912.0  # 1.5 * 2^23: adding then subtracting it rounds to an integer, ties to even
    return ((x / step + magic) - magic) * step


@triton.jit
def _to_cache(x, dtype: tl.constexpr):
    """``x`` as the cache stores it (reference.to_cache_dtype): int8 rounded half up and saturated at +-127,
    float8 e4m3 saturated at +-448, a float dtype cast."""
    if dtype == tl.int8:
        return tl.clamp(tl.floor(x.to(tl.float32) + 0.5), -127.0, 127.0).to(tl.int8)
    elif dtype == tl.float8e4nv:
        return _round_to_e4m3(tl.clamp(x.to(tl.float32), -448.0, 448.0)).to(tl.float8e4nv)
    else:
        return x.to(dtype)


@triton.jit
def _rotary_write_kv_kernel(
    q_out_ptr, qkv_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_t, stride_h, stride_ct, stride_cc, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
    Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, HALF_PAD)
    jm = j < HALF
    cs = cos_sin_ptr + t * stride_ct
    cos1 = tl.load(cs + j, mask=jm)
    cos2 = tl.load(cs + HALF + j, mask=jm)
    sin1 = tl.load(cs + stride_cc + j, mask=jm)
    sin2 = tl.load(cs + stride_cc + HALF + j, mask=jm)
    row = qkv_ptr + t * stride_t
    for h0 in tl.static_range(0, NUM_HEADS, Q_HEADS):
        h = h0 + tl.arange(0, Q_HEADS)
        m = (h < NUM_HEADS)[:, None] & jm[None, :]
        src = row + h[:, None] * stride_h + j[None, :]
        o1, o2 = _rotate(tl.load(src, mask=m), tl.load(src + HALF, mask=m), cos1, cos2, sin1, sin2)
        dst = q_out_ptr + t * stride_ot + h[:, None] * stride_oh + j[None, :]
        tl.store(dst, o1, mask=m)
        tl.store(dst + HALF, o2, mask=m)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    for h0 in tl.static_range(0, NUM_KV_HEADS, KV_HEADS):
        h = h0 + tl.arange(0, KV_HEADS)
        m = (h < NUM_KV_HEADS)[:, None] & jm[None, :]
        src = row + (NUM_HEADS + h[:, None]) * stride_h + j[None, :]
        o1, o2 = _rotate(tl.load(src, mask=m), tl.load(src + HALF, mask=m), cos1, cos2, sin1, sin2)
        dst = k_cache_ptr + block * stride_kb + offset * stride_ks + h[:, None] * stride_kh + j[None, :]
        tl.store(dst, _to_cache(o1, k_cache_ptr.dtype.element_ty), mask=m)
        tl.store(dst + HALF, _to_cache(o2, k_cache_ptr.dtype.element_ty), mask=m)
        src = row + (NUM_HEADS + NUM_KV_HEADS + h[:, None]) * stride_h + j[None, :]
        dst = v_cache_ptr + block * stride_vb + offset * stride_vs + h[:, None] * stride_vh + j[None, :]
        tl.store(dst, _to_cache(tl.load(src, mask=m), v_cache_ptr.dtype.element_ty), mask=m)
        tl.store(dst + HALF, _to_cache(tl.load(src + HALF, mask=m), v_cache_ptr.dtype.element_ty), mask=m)


def rotary_and_write_kv_cache(
    qkv: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    config: dict,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotated q [T, H, D] (in ``q_out`` when given); the rotated keys and the values land in their cache slots.

    ``config`` holds every key of ``kiln.ops.triton_plugins.ROTARY_KV_CONFIGS``' entries.
    """
    num_tokens, total_heads, head_dim = qkv.shape
    num_kv_heads = (total_heads - num_heads) // 2
    if num_heads + 2 * num_kv_heads != total_heads or head_dim % 2:
        raise ValueError(f"qkv of shape {tuple(qkv.shape)} is not {num_heads} query heads and two equal "
                         "key/value head groups of an even head size")
    if cos_sin.dtype != qkv.dtype:
        raise ValueError(f"cos_sin is {cos_sin.dtype}, expected the activations' {qkv.dtype}")
    q = torch.empty((num_tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device) if q_out is None else q_out
    for name, t in (("qkv", qkv), ("cos_sin", cos_sin), ("k_cache", k_cache), ("v_cache", v_cache), ("q", q)):
        check_last_dim_contiguous(name, t)
    if num_tokens == 0:
        return q
    half = head_dim // 2
    _rotary_write_kv_kernel[(num_tokens,)](
        q, qkv, cos_sin, k_cache, v_cache, slot_mapping,
        qkv.stride(0), qkv.stride(1), cos_sin.stride(0), cos_sin.stride(1), q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=half, HALF_PAD=triton.next_power_of_2(half),
        Q_HEADS=min(16, triton.next_power_of_2(num_heads)), KV_HEADS=min(16, triton.next_power_of_2(num_kv_heads)),
        BLOCK_SIZE=k_cache.shape[1], num_warps=config["num_warps"],
        # Separate multiply and add, as torch's elementwise ops round them, also in float32.
        enable_fp_fusion=False,
    )
    return q
