"""A quantized KV cache (``kiln build --kv-cache-dtype fp8|int8``): its scales, calibrated on a text the
package ships (or for fp8, a checkpoint's own), one for the keys and one for the values of each layer.

The cache holds k / s_k and v / s_v, one byte a value (``reference.to_cache_dtype``). The division is
folded into the weights: the key and value rows of the QKV projection (and its bias) are divided by s_k
and s_v, so the projection itself writes what the cache stores (RoPE is linear, so it commutes with the
scaling). The multiplication back is the attention layer's (``nn.attention.set_kv_cache_scales``): s_k
joins the softmax scale, s_v multiplies the layer's attention output. Only rows are divided, by
factors >= 1 for any activations below the cache's range, so packed weights keep their float16 scales'
precision (multiplying the output projection by a small s_v instead would push them to subnormals).

s_k is the largest norm over (i, i + D/2) pairs, the pairs RoPE rotates, of the layer's keys on the
calibration text, over the cache's largest value (127 or 448): a bound on every rotated key at any
position, not only the positions seen. s_v is the values' largest magnitude over the same. For float8 each
is rounded up to a power of two, which costs a float format no precision and divides float weights
exactly. Keys or values beyond what calibration saw saturate. ``kiln refit`` folds the engine's recorded
scales into new weights.

A checkpoint with its own FP8 KV cache (``Checkpoint.kv_cache_scales``: a compressed-tensors
``kv_cache_scheme``'s per-tensor ``k_scale`` and ``v_scale``, the same k / s_k and v / s_v in e4m3) gives an
fp8 cache its scales as stored, and nothing is calibrated (``stored_scales``). They bound only the post-RoPE
keys its tool saw (any others saturate, as in vLLM), and, not being powers of two, round float weights once
in the build dtype as they are divided in (packed weights: their float scales, once). An int8 cache calibrates
its own (the stored scales map to e4m3's 448); a build without ``--kv-cache-dtype`` keeps its cache in the
build dtype and does not use them (logged).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from kiln.builder.calibration import run_text
from kiln.builder.transforms import scale_output_rows
from kiln.engine import BuildConfig
from kiln.models import ModelConfig
from kiln.ops.reference import KV_CACHE_MAX

log = logging.getLogger("kiln.builder")


def stored_scales(stored: dict | None, build: BuildConfig) -> dict | None:
    """The checkpoint's own KV cache scales (``stored``, its FP8 cache's) where ``build`` uses them as they are:
    for an fp8 cache. None where it calibrates its own (int8) or keeps a float cache; either is logged."""
    if stored is None or build.kv_cache_dtype == "fp8":
        return stored
    if build.kv_cache_quantized:
        log.info("the checkpoint's FP8 KV cache scales are for float8 e4m3: the %s KV cache's are calibrated",
                 build.kv_cache_dtype)
    else:
        log.info("the checkpoint has FP8 KV cache scales; without --kv-cache-dtype the KV cache stays in %s "
                 "and does not use them (--kv-cache-dtype fp8 does)", build.dtype)
    return None


def calibrate(engine_dir: Path, build: BuildConfig, device: torch.device) -> dict:
    """The scales of ``build.kv_cache_dtype`` (quantized) for the engine at ``engine_dir``, which has a float KV
    cache: {"k": [s_k per layer], "v": [s_v per layer]}."""
    peaks: list[tuple[float, float]] | None = None

    def after_chunk(core) -> None:
        nonlocal peaks
        found = _cache_peaks(core.runner.kv_caches)
        peaks = found if peaks is None else [(max(k, k2), max(v, v2)) for (k, v), (k2, v2) in zip(peaks, found)]

    run_text(engine_dir, device, after_chunk=after_chunk)
    top, exact = KV_CACHE_MAX[build.kv_torch_dtype], build.kv_cache_dtype == "fp8"
    return {"k": [_scale(k, top, exact) for k, _ in peaks], "v": [_scale(v, top, exact) for _, v in peaks]}


def _cache_peaks(caches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[float, float]]:
    """Per layer: the largest RoPE-pair norm of the cached keys, and the largest |value|."""
    peaks = []
    for k_cache, v_cache in caches:
        pairs = k_cache.float().reshape(-1, 2, k_cache.shape[3] // 2)  # [slots x heads, halves, D/2]
        peaks.append((float(pairs.square().sum(dim=1).sqrt().max()), float(v_cache.float().abs().max())))
    return peaks


def _scale(peak: float, top: float, power_of_two: bool) -> float:
    """The scale that maps ``peak`` to ``top``; for float8, the next power of two up, which loses no precision
    (a float format's relative steps are the same at any scale) and folds into float weights exactly."""
    if peak <= 0:
        return 1.0
    return 2.0 ** math.ceil(math.log2(peak / top)) if power_of_two else peak / top


def fold(model: ModelConfig, tensors: dict[str, torch.Tensor], formats: dict[str, str], scales: dict) -> None:
    """Divide each layer's key and value rows of the QKV projection by its scales, in place."""
    q_rows, kv_rows = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    for layer, (s_k, s_v) in enumerate(zip(scales["k"], scales["v"])):
        factors = torch.tensor([1.0] * q_rows + [1 / s_k] * kv_rows + [1 / s_v] * kv_rows, dtype=torch.float64)
        scale_output_rows(tensors, formats, f"model.layers.{layer}.self_attn.qkv_proj", factors)
