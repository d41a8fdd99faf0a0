"""The ``triton`` plugins: Triton kernels for attention, rotary + cache write, RMSNorm, SwiGLU, and the
matrix products of decode steps of a few rows. (The Triton plugin of the 4-bit packed-weight ops is
registered with those ops, in ``packed_linear.py``; its configs are here with the others.)

They run on CUDA devices with Triton installed and never on the CPU, so CPU plans never pick them.
Their kernels (``kiln/ops/triton_kernels/``) are imported on first call: Triton is not a dependency
of CPU installs, and it reads ``TRITON_INTERPRET`` when a kernel is defined (see the CPU tests).

Each ``*_CONFIGS`` tuple is what a tuner may time (``Implementation.configs``); its first entry is
what a plugin does when the plan records no config, and every entry names every key.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from kiln.ops.attention_metadata import AttentionMetadata
from kiln.ops.registry import plugin

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _on_cuda(device: torch.device, dtype: torch.dtype) -> bool:
    """CUDA devices of compute capability 8.0 or newer (bf16 tensor cores), with Triton installed."""
    return (device.type == "cuda" and dtype in _FLOAT_DTYPES and _triton_available()
            and torch.cuda.get_device_capability(device) >= (8, 0))


def _configs(defaults: dict, *alternatives: dict) -> tuple[dict, ...]:
    """``defaults`` first, then ``defaults`` with each alternative's keys changed.

    NOTE: one group of keys changes at a time (not every combination): prefill keys only matter at
    prefill shapes and decode keys at decode shapes, so a tuner times each group where it matters.
    """
    return (defaults, *({**defaults, **alt} for alt in alternatives))


# Prefill tiles (rows = query tokens × the KV head's query heads; keys per step) and decode tiles.
# Defaults for Hopper: 64×64 tiles keep bf16 K/V stages for head_dim 128 within shared memory.
PAGED_ATTENTION_CONFIGS = _configs(
    dict(prefill_block_m=64, prefill_tile_n=64, prefill_warps=4, prefill_stages=2,
         decode_tile_n=64, decode_warps=4, decode_stages=2, max_splits=16, split_min_tokens=64),
    dict(prefill_block_m=128, prefill_tile_n=64, prefill_warps=8, prefill_stages=2),
    dict(prefill_block_m=64, prefill_tile_n=32, prefill_warps=4, prefill_stages=3),
    dict(prefill_block_m=128, prefill_tile_n=32, prefill_warps=8, prefill_stages=3),
    dict(decode_tile_n=32, decode_warps=4, decode_stages=3),
    dict(decode_tile_n=128, decode_warps=4, decode_stages=2),
    dict(decode_tile_n=64, decode_warps=2, decode_stages=3),
    dict(max_splits=1),  # split-K off
    dict(max_splits=32, split_min_tokens=128),
    dict(split_min_tokens=256),
    dict(split_min_tokens=32, decode_tile_n=32),
)
ROTARY_KV_CONFIGS = ({"num_warps": 4}, {"num_warps": 1}, {"num_warps": 2}, {"num_warps": 8})
# num_warps 0: chosen from the row width.
RMS_NORM_CONFIGS = ({"num_warps": 0}, {"num_warps": 4}, {"num_warps": 8}, {"num_warps": 16})
# Few-row matrix products (triton_kernels/gemv.py); more rows than max_rows go to cuBLAS (F.linear).
# Defaults from the H200 (benchmarks/gpu_gemv.py): one row with 8 x 1024 tiles beat cuBLAS on every
# projection of the 1B and 8B shapes (o and down by 7-24%); from two rows on, the tensor-core path
# was mostly slower than cuBLAS.
LINEAR_CONFIGS = _configs(
    dict(max_rows=1, block_n=8, block_k=1024, warps=4, stages=2,
         dot_block_n=64, dot_block_k=128, dot_warps=4, dot_stages=4),
    dict(block_n=16, block_k=512),
    dict(block_n=4, block_k=2048),
    dict(block_n=8, block_k=2048),
    dict(block_n=8, block_k=1024, warps=8),
    dict(max_rows=16),  # tensor-core tiles for 2-16 rows
)
# Products with 4-bit weights in groups (triton_kernels/int4_gemv.py; the triton plugin of each linear_<fmt>
# of kiln.weight_formats.FOUR_BIT, registered in packed_linear.py): the GEMV for up to max_rows rows
# (block_n x block_k tiles at one row; each further row halves block_k, its accumulators taking the
# registers), the tiled product that decodes weight tiles in registers for more rows (gemm_*), and from
# dequant_rows rows on the weight decoded for cuBLAS. Defaults from the H100 (benchmarks/gpu_int4_gemv.py,
# int4_g128 at the 8B projections, benchmarks/results/quantized/h100_int4_gemv.json): at one row 8 x 2048
# tiles took 72.4 us a layer's four products (tinygemm 70.5, 16 x 2048 76.0); at 128 rows decoding for
# cuBLAS from 128 rows on took 392 us (the tiled product 607, tinygemm 1,939).
INT4_LINEAR_CONFIGS = _configs(
    dict(max_rows=2, block_n=8, block_k=2048, warps=4, stages=2,
         gemm_block_m=64, gemm_block_n=64, gemm_block_k=128, gemm_warps=4, gemm_stages=3, dequant_rows=128),
    dict(block_n=16, block_k=1024),
    dict(block_n=16, block_k=2048),
    dict(block_n=32, block_k=1024),
    dict(block_n=64, block_k=512, warps=8),
    dict(max_rows=1),  # 2 rows and more on tensor cores
    dict(max_rows=4),
    dict(gemm_block_n=128, gemm_warps=8, dequant_rows=512),
    dict(gemm_block_m=128, gemm_block_n=128, gemm_warps=8, dequant_rows=512),
    dict(gemm_block_k=256, gemm_stages=2, dequant_rows=512),
    dict(dequant_rows=512),
    dict(dequant_rows=2048),
)
SILU_AND_MUL_CONFIGS = ({"block": 1024, "num_warps": 4}, {"block": 512, "num_warps": 2},
                        {"block": 2048, "num_warps": 8}, {"block": 4096, "num_warps": 8})


@plugin("paged_attention", "triton", supports=_on_cuda, configs=PAGED_ATTENTION_CONFIGS, graph_safe=True)
def triton_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    **config,
) -> torch.Tensor:
    from kiln.ops.triton_kernels.attention import paged_attention

    return paged_attention(q, k_cache, v_cache, meta, scale, sliding_window, {**PAGED_ATTENTION_CONFIGS[0], **config})


@plugin("rotary_and_write_kv_cache", "triton", supports=_on_cuda, configs=ROTARY_KV_CONFIGS, graph_safe=True)
def triton_rotary_and_write_kv_cache(
    qkv: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    **config,
) -> torch.Tensor:
    from kiln.ops.triton_kernels.rotary_kv_cache import rotary_and_write_kv_cache

    return rotary_and_write_kv_cache(qkv, cos_sin, k_cache, v_cache, slot_mapping, num_heads,
                                     {**ROTARY_KV_CONFIGS[0], **config})


@plugin("rms_norm", "triton", supports=_on_cuda, configs=RMS_NORM_CONFIGS, graph_safe=True)
def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, **config) -> torch.Tensor:
    from kiln.ops.triton_kernels.rms_norm import rms_norm

    return rms_norm(x, None, weight, eps, {**RMS_NORM_CONFIGS[0], **config})[0]


@plugin("add_rms_norm", "triton", supports=_on_cuda, configs=RMS_NORM_CONFIGS, graph_safe=True)
def triton_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, **config
) -> tuple[torch.Tensor, torch.Tensor]:
    from kiln.ops.triton_kernels.rms_norm import rms_norm

    return rms_norm(x, residual, weight, eps, {**RMS_NORM_CONFIGS[0], **config})


@plugin("silu_and_mul", "triton", supports=_on_cuda, configs=SILU_AND_MUL_CONFIGS, graph_safe=True)
def triton_silu_and_mul(x: torch.Tensor, **config) -> torch.Tensor:
    from kiln.ops.triton_kernels.silu_and_mul import silu_and_mul

    return silu_and_mul(x, {**SILU_AND_MUL_CONFIGS[0], **config})


@plugin("linear", "triton", supports=_on_cuda, configs=LINEAR_CONFIGS, graph_safe=True)
def triton_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, **config) -> torch.Tensor:
    config = {**LINEAR_CONFIGS[0], **config}
    rows = x.numel() // max(x.shape[-1], 1)
    if not 0 < rows <= config["max_rows"] or weight.stride(-1) != 1:
        return F.linear(x, weight, bias)
    from kiln.ops.triton_kernels.gemv import gemv

    return gemv(x, weight, bias, config)


@plugin("logits", "triton", supports=_on_cuda, configs=LINEAR_CONFIGS, graph_safe=True)
def triton_logits(hidden: torch.Tensor, weight: torch.Tensor, **config) -> torch.Tensor:
    return triton_linear(hidden, weight, None, **config)
