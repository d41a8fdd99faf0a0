"""Timing an implementation and its tunable configs on given inputs.

The kernel benchmark's ``--tune`` mode and a tuner choosing a plan call the same two functions, so
a config chosen at load is the one the benchmark reports as fastest.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from kiln.ops.registry import Implementation


def time_ms(fn: Callable[[], Any], device: torch.device, warmup_ms: float = 10, rep_ms: float = 50) -> float:
    """Median milliseconds of one ``fn()`` call.

    On CUDA: ``triton.testing.do_bench`` (device events, the L2 cache flushed before each call).
    Elsewhere: host clock over repeated calls for about ``rep_ms``.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while not times or (time.perf_counter() < deadline and len(times) < 1000):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def time_configs(
    impl: Implementation,
    args: tuple,
    device: torch.device,
    configs: tuple[dict, ...] | None = None,
    warmup_ms: float = 10,
    rep_ms: float = 50,
) -> list[tuple[dict, float | None, str | None]]:
    """(config, median ms, error) of each of ``configs`` (the implementation's own by default) on ``args``.

    A config that fails (e.g. a tile too large for the device's shared memory) gets None and its
    error message instead of stopping the others.
    """
    results = []
    for config in (impl.configs or ({},)) if configs is None else configs:
        fn = impl.with_config(config)
        try:
            results.append((config, time_ms(lambda: fn(*args), device, warmup_ms, rep_ms), None))
        except Exception as e:  # noqa: BLE001 - reported per config, the caller decides
            results.append((config, None, f"{type(e).__name__}: {e}"))
    return results


def fastest(results: list[tuple[dict, float | None, str | None]]) -> dict | None:
    """The config of the fastest successful result, or None if every config failed."""
    timed = [(ms, i) for i, (_, ms, _) in enumerate(results) if ms is not None]
    return results[min(timed)[1]][0] if timed else None
