"""The hardware's limit for decode, measured in the same run as the benchmark.

At small batches a decode step reads every weight once, so no engine decodes faster than
(memory bandwidth) / (weight bytes) steps per second. The bandwidth is measured here as a large
device-to-device copy (bytes read plus bytes written over the time), the way METHOD-style rooflines
count it; on a CPU the same copy in main memory.
"""
from __future__ import annotations

import math
import time

import torch

from kiln.engine import Engine
from kiln.engine.format import WEIGHT_DTYPES


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30, repeats: int = 5) -> float:
    """Bytes per second (read + written) of the best of ``repeats`` copies of ``nbytes`` on ``device``."""
    if device.type == "cpu":
        nbytes = min(nbytes, 512 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(repeats + 1):  # the first is a warm-up
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            t = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t
        best = min(best, seconds)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / best


def weight_bytes(engine: Engine) -> int:
    return sum(math.prod(t["shape"]) * WEIGHT_DTYPES[t["dtype"]].itemsize for t in engine.manifest)


def decode_limit(engine: Engine, device: torch.device) -> dict:
    """The batch-1 decode limit: weight bytes read per token at the measured copy bandwidth."""
    bandwidth = copy_bandwidth(device)
    nbytes = weight_bytes(engine)
    return {"copy_bandwidth_gb_s": bandwidth / 1e9, "weight_bytes": nbytes,
            "batch1_decode_tokens_per_s_limit": bandwidth / nbytes}
