"""Paged attention in Triton: prefill, chunked prefill and decode of one packed step in one kernel.

Each program takes one KV head and a block of rows, a row being (query token, query head of that KV
head's group): all the group's query heads share every K/V tile the program loads. Keys and values
are read in place from the paged cache through the block table, one tile of keys at a time, with an
online softmax in float32.

Two launch shapes, chosen from tensor shapes only (so a CUDA graph captures one of them):

- prefill or mixed steps: a program per (block of ``BLOCK_Q`` query tokens of one sequence, KV head).
  The grid holds ``num_tokens // BLOCK_Q + num_seqs`` query blocks, enough for any split of the tokens
  into sequences; a program finds its sequence by binary search over ``query_start_loc`` and exits
  if its block lies past that sequence's queries.
- decode-only steps (one query token per sequence): a program per (sequence, KV head, split). When
  sequences × KV heads would leave SMs idle, each sequence's keys are cut into ``num_splits`` parts
  whose partial softmax states a second kernel merges (split-K, "flash decoding").

Everything the kernels read about the step lives in device tensors (``seq_lens_t``,
``query_start_loc_t``, ``block_tables``), so replaying a captured graph with new values is correct.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.ops.attention_metadata import AttentionMetadata
from kiln.ops.triton_kernels.common import check_last_dim_contiguous, dot_in_fp32, sm_count

_LOG2E = 1.4426950408889634


@triton.jit
def _find_seq(query_start_ptr, q_block_idx, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose query blocks include ``q_block_idx`` (sequence i's start at start_i // BLOCK_Q + i)."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_ptr + mid).to(tl.int32) // BLOCK_Q + mid
        if first_block <= q_block_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tiles(
    acc, m_i, l_i, q, q_pos, tile_start, tile_end, table_row, seq_len, window, kv_head,
    k_cache_ptr, v_cache_ptr, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale_log2, d,
    DTYPE: tl.constexpr, HEAD_DIM: tl.constexpr, TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online softmax over key tiles [tile_start, tile_end); unmasked tiles are visible to every row."""
    for tile in range(tile_start, tile_end):
        k_pos = tile * TILE_N + tl.arange(0, TILE_N)
        offset = k_pos % BLOCK_SIZE
        k_off = kv_head * stride_kh + d[:, None]
        v_off = kv_head * stride_vh + d[None, :]
        if MASKED:
            k_valid = k_pos < seq_len
            # Positions past the sequence would index past its block table row: block 0, unread.
            block = tl.load(table_row + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
            k = tl.load(k_cache_ptr + block[None, :] * stride_kb + offset[None, :] * stride_ks + k_off,
                        mask=k_valid[None, :] & (d[:, None] < HEAD_DIM), other=0.0)
            v = tl.load(v_cache_ptr + block[:, None] * stride_vb + offset[:, None] * stride_vs + v_off,
                        mask=k_valid[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        else:
            block = tl.load(table_row + k_pos // BLOCK_SIZE).to(tl.int64)
            k = tl.load(k_cache_ptr + block[None, :] * stride_kb + offset[None, :] * stride_ks + k_off,
                        mask=d[:, None] < HEAD_DIM, other=0.0)
            v = tl.load(v_cache_ptr + block[:, None] * stride_vb + offset[:, None] * stride_vs + v_off,
                        mask=d[None, :] < HEAD_DIM, other=0.0)
        if k.dtype != DTYPE:  # a quantized cache: through float32 (Triton 3.6's interpreter garbles int8 -> bf16)
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        k = k.to(DTYPE)
        v = v.to(DTYPE)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k, input_precision=PRECISION) * scale_log2
        if MASKED:
            visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos < seq_len)[None, :]
            if HAS_WINDOW:
                visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # Rows that have seen no key yet keep m = -inf; shifting by 0 keeps exp2 finite (it gives 0).
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_shift = m_new
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(DTYPE)
        if DOT_FP32:
            p = p.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _paged_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr,
    part_acc_ptr, part_ml_ptr,
    scale_log2, num_seqs, num_heads, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    DECODE: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    kv_head = tl.program_id(1)
    if DECODE:
        seq = tl.program_id(0)
        q_start = seq  # one query token per sequence: token i is sequence i's
        q_len = 1
        q_block = 0
        q_end = 1
    else:
        # Last query blocks first: they see the most keys, so the long programs start early.
        pid = tl.num_programs(0) - 1 - tl.program_id(0)
        seq = _find_seq(query_start_ptr, pid, num_seqs, BLOCK_Q)
        q_start = tl.load(query_start_ptr + seq).to(tl.int32)
        q_len = tl.load(query_start_ptr + seq + 1).to(tl.int32) - q_start
        q_block = pid - (q_start // BLOCK_Q + seq)
        if q_block * BLOCK_Q >= q_len:
            return
        q_end = tl.minimum(q_len, (q_block + 1) * BLOCK_Q)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)

    rows = tl.arange(0, BLOCK_M)
    q_local = q_block * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = (rows // GROUP < BLOCK_Q) & (q_local < q_len)
    q_pos = seq_len - q_len + q_local  # the query's position in its sequence
    d = tl.arange(0, HEAD_DIM_PAD)
    token = (q_start + q_local).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_valid[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    # Keys this block of queries can see: [lo, hi), cut into tiles of TILE_N. Without a window the
    # tiles up to the block's first query are visible to every row and skip the mask.
    first_q_pos = seq_len - q_len + q_block * BLOCK_Q
    hi = seq_len - q_len + q_end
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(first_q_pos - window + 1, 0)
    tile_lo = lo // TILE_N
    tile_hi = tl.cdiv(hi, TILE_N)
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(tile_hi - tile_lo, NUM_SPLITS)
        tile_lo = tile_lo + tl.program_id(2) * per_split
        tile_hi = tl.minimum(tile_hi, tile_lo + per_split)
    if HAS_WINDOW:
        full_hi = tile_lo
    else:
        full_hi = tl.minimum(tl.maximum((first_q_pos + 1) // TILE_N, tile_lo), tile_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    dtype = q_ptr.dtype.element_ty
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, q_pos, tile_lo, full_hi, table_row, seq_len, window, kv_head,
        k_cache_ptr, v_cache_ptr, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale_log2, d,
        dtype, HEAD_DIM, TILE_N, BLOCK_SIZE, False, HAS_WINDOW, DOT_FP32, PRECISION)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, q_pos, full_hi, tile_hi, table_row, seq_len, window, kv_head,
        k_cache_ptr, v_cache_ptr, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale_log2, d,
        dtype, HEAD_DIM, TILE_N, BLOCK_SIZE, True, HAS_WINDOW, DOT_FP32, PRECISION)

    d_valid = d < HEAD_DIM
    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # padding rows saw no key
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])
    else:
        # Unnormalised partial state of this split, merged by _merge_splits_kernel.
        part = (seq.to(tl.int64) * num_heads + head) * NUM_SPLITS + tl.program_id(2)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM_PAD + d[None, :], acc, mask=row_valid[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_valid)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_valid)


@triton.jit
def _merge_splits_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr, num_heads, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    part = (seq * num_heads + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_DIM_PAD)
    m = tl.load(part_ml_ptr + part * 2)
    l = tl.load(part_ml_ptr + part * 2 + 1)
    # Every decode query sees at least its own key, so some split has a finite m.
    weight = tl.math.exp2(m - tl.max(m, 0))
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM_PAD + d[None, :])
    o = tl.sum(acc * weight[:, None], 0) / tl.sum(l * weight, 0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def num_decode_splits(num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device,
                      max_splits: int, split_min_tokens: int) -> int:
    """How many parts to cut each decode sequence's keys into: a power of two, 1 when the SMs are busy.

    Without splitting, a decode step runs sequences × KV heads programs. Below the SM count, cut
    each sequence so that about two programs land on every SM, but not into parts shorter than
    ``split_min_tokens`` of the longest context the step can hold (the block table's width): a
    shorter part costs more in its merge than it saves. Shapes alone decide, so a graph holds one answer.
    """
    programs = num_seqs * num_kv_heads
    sms = sm_count(device)
    if max_splits <= 1 or programs >= sms:
        return 1
    want = min(triton.cdiv(2 * sms, programs), max_context // max(split_min_tokens, 1), max_splits)
    return 1 << (max(want, 1).bit_length() - 1)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    config: dict,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries [T, H, D] over the paged cache; see the module docstring.

    ``config`` holds every key of ``kiln.ops.triton_plugins.PAGED_ATTENTION_CONFIGS``' entries;
    ``out`` (contiguous, like q) receives the result when given.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs, table_width = meta.block_tables.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} key/value heads")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", meta.block_tables)):
        check_last_dim_contiguous(name, t)
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    check_last_dim_contiguous("out", out)
    if num_tokens == 0:
        return out
    seq_lens = _on_device(meta, "seq_lens", q.device)
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    # NOTE: float32 runs ieee products on FMA units (tests, CPU-sized engines), which spill at the
    # half-precision tile sizes: the smallest tiles keep them in registers.
    wide = q.element_size() == 4
    decode = num_tokens == num_seqs  # every sequence brings at least one query token
    if decode:
        block_m = max(16, triton.next_power_of_2(group))
        block_q = 1
        tile_n = 16 if wide else config["decode_tile_n"]
        warps, stages = config["decode_warps"], config["decode_stages"]
        splits = num_decode_splits(num_seqs, num_kv_heads, table_width * block_size, q.device,
                                   config["max_splits"], config["split_min_tokens"])
        grid = (num_seqs, num_kv_heads, splits)
        query_start = seq_lens  # unread in decode programs
    else:
        block_m = max(16 if wide else config["prefill_block_m"], triton.next_power_of_2(group))
        block_q = block_m // group
        tile_n = 16 if wide else config["prefill_tile_n"]
        warps, stages = config["prefill_warps"], config["prefill_stages"]
        splits = 1
        grid = (num_tokens // block_q + num_seqs, num_kv_heads, 1)
        query_start = _on_device(meta, "query_start_loc", q.device)
    if splits > 1:
        part_acc = torch.empty((num_seqs, num_heads, splits, head_dim_pad), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((num_seqs, num_heads, splits, 2), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unread placeholders
    _paged_attention_kernel[grid](
        out, q, k_cache, v_cache, meta.block_tables, seq_lens, query_start, part_acc, part_ml,
        scale * _LOG2E, num_seqs, num_heads, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), meta.block_tables.stride(0),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q,
        TILE_N=tile_n, BLOCK_SIZE=block_size, DECODE=decode, NUM_SPLITS=splits,
        HAS_WINDOW=sliding_window is not None, DOT_FP32=dot_in_fp32(q.dtype),
        PRECISION="ieee" if wide else "tf32", num_warps=warps, num_stages=stages,
    )
    if splits > 1:
        _merge_splits_kernel[(num_seqs, num_heads)](
            out, part_acc, part_ml, num_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, NUM_SPLITS=splits, num_warps=4,
        )
    return out


def _on_device(meta: AttentionMetadata, field: str, device: torch.device) -> torch.Tensor:
    """``meta.<field>_t``, or the host list ``meta.<field>`` copied to the device once per step (into
    ``meta.scratch``, shared by every layer); runners that capture graphs fill the ``_t`` tensors."""
    given = getattr(meta, f"{field}_t")
    if given is not None:
        return given
    t = meta.scratch.get(f"{field}_t")
    if t is None:
        # NOTE: a host-to-device copy, once per step.
        t = meta.scratch[f"{field}_t"] = torch.tensor(getattr(meta, field), dtype=torch.int32, device=device)
    return t
