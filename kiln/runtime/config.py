"""How an engine is run: the device, the KV pool's size, scheduling policy, graphs and runtime limits."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from kiln.runtime.scheduler import Policy

EngineCorePlace = Literal["auto", "process", "thread", "inline"]


@dataclass(frozen=True)
class RuntimeConfig:
    device: str | None = None  # None: cuda when present, else cpu
    # KV cache budget in bytes. Or, on a GPU, the fraction of its memory kiln may fill (weights
    # included), all of it given to the pool. Neither: see kv_pool.num_kv_blocks.
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float | None = None
    policy: Policy = "max_utilization"
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # Step graphs (step_graphs): "auto" (CUDA graphs of decode and small mixed steps on a GPU, recorded decode
    # steps on a CPU, where the plan allows), "on" (CUDA graphs), "recorded" (a CPU's: each decode shape's op
    # calls recorded once and replayed), "off", or "static" (the padded fixed-shape steps, run eagerly).
    cuda_graphs: str = "auto"
    # Runtime limits at or below the engine's build limits (None: the build limit).
    max_batch_size: int | None = None
    max_num_tokens: int | None = None
    # Schedule and launch step N+1 while step N's sampled tokens are still on the device, so the host's
    # work hides behind the device's. None: on for a GPU (a CPU computes in the same thread: no gain).
    async_scheduling: bool | None = None
    # Check every weight's sha256 against the engine's manifest at load (KILN_VERIFY_WEIGHTS=0 also skips it).
    verify_weights: bool = True
    # Where the engine core steps: "process" (a process of its own, core_process: no interpreter lock shared
    # with the front end), "thread" (a thread of this process), "inline" (the caller's thread, LLM only), or
    # "auto": a process, but for LLM on a CPU, where it steps inline (``llm_engine.core_place`` says why).
    engine_core: EngineCorePlace = "auto"

    def __post_init__(self) -> None:
        for name, kind in (("policy", Policy), ("engine_core", EngineCorePlace)):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(f"{name} must be one of {', '.join(get_args(kind))}, got {getattr(self, name)!r}")
        for name in ("kv_cache_memory", "max_batch_size", "max_num_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        fraction = self.gpu_memory_utilization
        if fraction is not None and not 0 < fraction <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {fraction!r}")

    def torch_device(self) -> torch.device:
        """The device the engine runs on: ``device``, else cuda when present, else cpu."""
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @classmethod
    def from_options(cls, device: str | None = None, **options) -> RuntimeConfig:
        """``LLM(engine, device, **options)``'s options, with an error naming any unknown one."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown runtime option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(device=device, **options)
