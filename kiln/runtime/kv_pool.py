"""The KV cache pool: how many blocks it holds, and the tensors that hold them.

The block manager hands out block ids; this module decides how many there are and allocates one
(K, V) pair of ``[num_blocks, block_size, num_kv_heads, head_dim]`` tensors per layer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from kiln.engine import BuildConfig, Engine
from kiln.errors import RequestError


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize


def kv_cache_spec(engine: Engine) -> KVCacheSpec:
    m = engine.model
    build = engine.build
    return KVCacheSpec(m["num_layers"], build.kv_block_size, m["num_kv_heads"], m["head_dim"], build.kv_torch_dtype)


# The CPU pool's default budget: at most this, and at most a quarter of the machine's memory (vLLM's CPU
# backend reserves 4 GiB by default too). Its pages are mapped only as requests write them (allocate_kv_caches).
CPU_KV_CACHE_BYTES = 4 << 30
# The length a served sequence is planned for when the runtime sizes its batch from the pool: a request of a
# few hundred prompt tokens and as many generated ones.
PLANNED_SEQUENCE_TOKENS = 1024


def num_kv_blocks(spec: KVCacheSpec, build: BuildConfig, device: torch.device, kv_cache_memory: int | None = None,
                  gpu_memory_utilization: float | None = None, reserved_bytes: int = 0) -> int:
    """Blocks for the pool: from a byte budget when one is given; else, on a GPU, what is left of a
    fraction of its memory (0.9 unless given) after everything in use now (weights, other processes)
    and ``reserved_bytes`` (the steps' peak activations and the decode graphs, measured by the
    runner), of which at most twice a full batch at max length when no fraction is given; on the
    CPU, ``CPU_KV_CACHE_BYTES`` or a quarter of the machine's memory, whichever is less, and never
    more than a full batch at max length (every batch slot at max_seq_len: all the limits can use).
    """
    full_batch = -(-build.max_seq_len // build.kv_block_size) * build.max_batch_size
    budget = kv_cache_memory
    if budget is None and device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * (gpu_memory_utilization or 0.9)) - (total - free) - reserved_bytes
        if gpu_memory_utilization is None:
            budget = min(budget, 2 * full_batch * spec.bytes_per_block)
    elif budget is None:
        budget = min(full_batch * spec.bytes_per_block, CPU_KV_CACHE_BYTES, _memory_bytes() // 4)
    blocks = budget // spec.bytes_per_block
    if blocks < 1:
        raise RequestError(f"the KV cache budget of {budget} bytes holds no block "
                           f"(one block of {build.kv_block_size} tokens needs {spec.bytes_per_block} bytes)")
    return blocks


def batch_the_pool_holds(num_blocks: int, block_size: int, max_seq_len: int) -> int:
    """Sequences a pool of ``num_blocks`` holds at once at ``PLANNED_SEQUENCE_TOKENS`` tokens each (at most
    max_seq_len): how many the runtime admits unless told otherwise, below the build's ceiling."""
    per_sequence = -(-min(PLANNED_SEQUENCE_TOKENS, max_seq_len) // block_size)
    return max(1, num_blocks // per_sequence)


def _memory_bytes() -> int:
    """The machine's physical memory (a cgroup's limit below it is not seen: set kv_cache_memory there)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def allocate_kv_caches(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed K and V tensors per layer.

    On the CPU the memory comes from ``calloc`` (through numpy), whose large allocations are fresh
    zero pages that the kernel maps only when first written: a pool costs resident memory for the
    blocks requests have used, not for its whole size. (``torch.zeros`` writes every byte at once.)
    """
    shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    numel = num_blocks * spec.block_size * spec.num_kv_heads * spec.head_dim

    def zeros() -> torch.Tensor:
        if device.type == "cpu":
            raw = np.zeros(numel * spec.dtype.itemsize, dtype=np.uint8)
            return torch.from_numpy(raw).view(spec.dtype).view(shape)
        return torch.zeros(shape, dtype=spec.dtype, device=device)

    return [(zeros(), zeros()) for _ in range(spec.num_layers)]
