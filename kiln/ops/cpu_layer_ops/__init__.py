"""A layer's ops on the CPU in C++: the ``cpu`` plugins of ``paged_attention``, ``rms_norm``,
``add_rms_norm``, ``silu_and_mul`` and ``rotary_and_write_kv_cache``.

At batch 1 a small model's decode step is mostly dispatch: PyTorch runs each of these ops as 4 to 10
calls (SmolLM2's step made about 2,400 torch calls for 120 matrix products). Each plugin here is one
call, one pass over its rows (``layer_ops.cpp``, float32; the KV cache may also be int8 or float8 e4m3, written
and read as ``reference.to_cache_dtype`` stores it).

``paged_attention.cpp``: each query token reads its sequence's keys and values where the paged cache
holds them, one task per (token, KV head), instead of gathering the context every layer and step as
the reference and ``batched_decode`` do (SmolLM2, profiled: about 2.9 ms of a decode step went to that
gather; at a 200-token context, 9 query and 3 KV heads of 64, 2 threads, one run: 30 us against
``batched_decode``'s 122 at batch 1, 157 against 509 at batch 8). Steps whose sequences bring more than a few query
tokens each (prompt chunks) go to the reference, whose SDPA kernel is the faster one for long queries,
except in the padded fixed-shape steps of ``cuda_graphs="static"`` (where only the device tensors hold
the lengths, as in a captured graph; the kernel reads only those there).

``int4pack_linear.cpp``: PyTorch's int4 weight-only kernel with its bfloat16 conversions in one call, for
``packed_linear``'s ``int4pack`` plugin.

``token_bitmask.cpp``: a structured output's packed token bitmask applied to the sampler's logits
(``apply_token_bitmask``, for ``runtime/structured_output.py``).

The extension is compiled at first use (``kiln.ops.cpp_extension``); where that fails the plugins are
no candidates. An argument these kernels do not take (another dtype, a strided tensor) goes to the
reference.
"""
from __future__ import annotations

from pathlib import Path

import torch

from kiln.ops import reference
from kiln.ops.attention_metadata import AttentionMetadata
from kiln.ops.cpp_extension import CppExtension
from kiln.ops.registry import plugin

# More query tokens than this per sequence on average: the reference (SDPA) instead.
MAX_QUERY_TOKENS_PER_SEQ = 8

_ops = None  # torch.ops.kiln_cpu once loaded


def _after_load() -> str:
    global _ops
    _ops = torch.ops.kiln_cpu
    return "native"


_EXTENSION = CppExtension("kiln_cpu", Path(__file__).parent,
                          ("paged_attention.cpp", "layer_ops.cpp", "token_bitmask.cpp", "int4pack_linear.cpp",
                           "few_rows_linear.cpp", "step_program.cpp", "sample_rows.cpp"), ("vector_math.h",),
                          "KILN_CPU_MARCH", _after_load, "CPU layer kernels")


def available() -> bool:
    """True when the extension compiled and loaded here (builds it on first call)."""
    return _EXTENSION.available()


def step_program():
    """An empty ``StepProgram`` (``step_program.cpp``: recorded calls replayed from C++), or None where the
    extension is not here."""
    return torch.classes.kiln_cpu.StepProgram() if available() else None


def sample_rows(logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float],
                min_p: list[float], uniform: torch.Tensor) -> torch.Tensor | None:
    """Each row's token, sampled as ``kiln.runtime.sampler`` filters and draws (``sample_rows.cpp``): float32
    logits [rows, vocab], per row its settings and a float64 uniform in [0, 1); -1 for a row whose k-th token or
    top-p nucleus lies past the tokens the kernel considers (the caller sorts it). None where the extension is
    not here or the logits are not a contiguous float32 CPU tensor."""
    if not (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous()
            and available()):
        return None
    return _kernels().sample_rows(logits, torch.tensor(temperature, dtype=torch.float32),
                                  torch.tensor(top_k, dtype=torch.int64), torch.tensor(top_p, dtype=torch.float32),
                                  torch.tensor(min_p, dtype=torch.float32), uniform)


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, masks: torch.Tensor) -> bool:
    """Set ``logits[rows[i], t]`` to -inf where bit t of ``masks[i]`` is clear, in place; False (nothing done)
    where the extension is not here or the tensors are not ones it takes."""
    if not (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous()
            and available()):
        return False
    _kernels().apply_token_bitmask(logits, rows, masks)
    return True


def int4pack_linear(x: torch.Tensor, packed: torch.Tensor, group: int, scales_zeros: torch.Tensor,
                    rows: int) -> torch.Tensor | None:
    """PyTorch's int4 CPU kernel with its bfloat16 conversions and the cut of padded rows in one call
    (``int4pack_linear.cpp``); None where the extension is not loaded (the caller makes the calls itself)."""
    if _ops is None and not available():
        return None
    return _ops.int4pack_linear(x, packed, group, scales_zeros, rows)


def _attention_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16) and available()


def _float32_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and available()


def _kernels():
    if _ops is None:
        _EXTENSION.load()
    return _ops


def _float_rows(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def _cache_fits(k_cache: torch.Tensor, v_cache: torch.Tensor, dtype: torch.dtype) -> bool:
    """Caches the kernels read and write: contiguous, in ``dtype`` (the activations') or a one-byte quantized one."""
    return (k_cache.dtype == v_cache.dtype and k_cache.dtype in (dtype, *reference.KV_CACHE_MAX)
            and k_cache.is_contiguous() and v_cache.is_contiguous())


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


@plugin("paged_attention", "cpu", supports=_attention_supported, graph_safe=True)
def cpu_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                        scale: float, sliding_window: int | None = None) -> torch.Tensor:
    q = q if q.is_contiguous() else q.contiguous()
    eager = not meta.max_seq_len  # a fixed-shape (graph) step's host lengths are only bounds
    if eager and (q.shape[0] > MAX_QUERY_TOKENS_PER_SEQ * meta.num_seqs
                  or not _cache_fits(k_cache, v_cache, q.dtype)):
        return reference.paged_attention(q, k_cache, v_cache, meta, scale, sliding_window)
    seq_lens, starts = _step_tensors(meta)
    tables = meta.block_tables if meta.block_tables.is_contiguous() else meta.block_tables.contiguous()
    return _kernels().paged_attention(q, k_cache, v_cache, tables, seq_lens, starts, scale, sliding_window or 0)


# The most rows few_rows_linear.cpp takes (a decode step's); more go to the reference (MKL's GEMM).
FEW_ROWS = 16


@plugin("linear", "cpu", supports=_float32_supported, graph_safe=True)
def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > FEW_ROWS or not _float_rows(rows, weight):
        return reference.linear(x, weight, bias)
    y = _kernels().few_rows_linear(rows, weight).reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


@plugin("logits", "cpu", supports=_float32_supported, graph_safe=True)
def cpu_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return cpu_linear(hidden, weight)


@plugin("rms_norm", "cpu", supports=_float32_supported, graph_safe=True)
def cpu_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if not _float_rows(x, weight):
        return reference.rms_norm(x, weight, eps)
    return _kernels().rms_norm(x, weight, eps)


@plugin("add_rms_norm", "cpu", supports=_float32_supported, graph_safe=True)
def cpu_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not _float_rows(x, residual, weight) or x.shape != residual.shape:
        return reference.add_rms_norm(x, residual, weight, eps)
    return _kernels().add_rms_norm(x, residual, weight, eps)


@plugin("silu_and_mul", "cpu", supports=_float32_supported, graph_safe=True)
def cpu_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if not _float_rows(x):
        return reference.silu_and_mul(x)
    return _kernels().silu_and_mul(x)


@plugin("rotary_and_write_kv_cache", "cpu", supports=_float32_supported, graph_safe=True)
def cpu_rotary_and_write_kv_cache(qkv: torch.Tensor, cos_sin: torch.Tensor, k_cache: torch.Tensor,
                                  v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int) -> torch.Tensor:
    if (not _float_rows(qkv, cos_sin) or not _cache_fits(k_cache, v_cache, torch.float32)
            or slot_mapping.dtype != torch.int64):
        return reference.rotary_and_write_kv_cache(qkv, cos_sin, k_cache, v_cache, slot_mapping, num_heads)
    q = _kernels().rotary_and_write_kv_cache(qkv, cos_sin, k_cache, v_cache, slot_mapping.contiguous(), num_heads)
    if q.dim() == 1 and qkv.shape[0]:  # the kernel's answer to a slot outside the cache (it wrote nothing)
        raise RuntimeError(f"kiln_cpu::rotary_and_write_kv_cache: a slot of {slot_mapping.tolist()} is outside "
                           f"the cache of {k_cache.shape[0] * k_cache.shape[1]} slots")
    return q
