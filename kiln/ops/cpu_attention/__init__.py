"""Paged attention on the CPU in C++ (``paged_attention.cpp``): the ``cpu`` plugin of ``paged_attention``.

Each query token reads its sequence's keys and values where the paged cache holds them, one task per
(token, KV head) over the machine's threads. PyTorch's attention needs them gathered into one tensor
first (the reference and ``batched_decode`` copy the whole context every layer and step: SmolLM2's
decode step spent 2.9 of its 22.7 ms in that gather). Steps whose sequences bring more than a few query
tokens each (prompt chunks) go to the reference, whose SDPA kernel is the faster one for long queries,
except in the padded fixed-shape steps of ``cuda_graphs="static"`` (where only the device tensors hold the
lengths, as in a captured graph; the kernel reads only those there). The extension is compiled at first use (``kiln.ops.cpp_extension``); where that fails the plugin is
no candidate.
"""
from __future__ import annotations

from pathlib import Path

import torch

from kiln.ops.attention_metadata import AttentionMetadata
from kiln.ops.cpp_extension import CppExtension
from kiln.ops.reference import paged_attention as reference_paged_attention
from kiln.ops.registry import plugin

# More query tokens than this per sequence on average: the reference (SDPA) instead.
MAX_QUERY_TOKENS_PER_SEQ = 8

_op = None  # torch.ops.kiln_cpu_attention.paged_attention once loaded


def _after_load() -> str:
    global _op
    _op = torch.ops.kiln_cpu_attention.paged_attention
    return "native"


_EXTENSION = CppExtension("kiln_cpu_attention", Path(__file__).parent, ("paged_attention.cpp",), (),
                          "KILN_CPU_MARCH", _after_load, "CPU attention kernel")


def available() -> bool:
    """True when the extension compiled and loaded here (builds it on first call)."""
    return _EXTENSION.available()


def _supported(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16) and available()


def _step_tensors(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's lengths and offsets as int64 tensors (its device copies where it has them), made once per
    step and shared by the layers."""
    found = meta.scratch.get("cpu_attention")
    if found is None:
        lens = (meta.seq_lens_t if meta.seq_lens_t is not None else torch.tensor(meta.seq_lens)).to(torch.int64)
        starts = (meta.query_start_loc_t if meta.query_start_loc_t is not None
                  else torch.tensor(meta.query_start_loc)).to(torch.int64)
        found = meta.scratch["cpu_attention"] = (lens.contiguous(), starts.contiguous())
    return found


@plugin("paged_attention", "cpu", supports=_supported, graph_safe=True)
def cpu_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                        scale: float, sliding_window: int | None = None) -> torch.Tensor:
    q = q if q.is_contiguous() else q.contiguous()
    eager = not meta.max_seq_len  # a fixed-shape (graph) step's host lengths are only bounds
    if eager and (q.shape[0] > MAX_QUERY_TOKENS_PER_SEQ * meta.num_seqs or k_cache.dtype != q.dtype
                  or not k_cache.is_contiguous() or not v_cache.is_contiguous()):
        return reference_paged_attention(q, k_cache, v_cache, meta, scale, sliding_window)
    if _op is None:
        _EXTENSION.load()
    seq_lens, starts = _step_tensors(meta)
    tables = meta.block_tables if meta.block_tables.is_contiguous() else meta.block_tables.contiguous()
    return _op(q, k_cache, v_cache, tables, seq_lens, starts, scale, sliding_window or 0)
