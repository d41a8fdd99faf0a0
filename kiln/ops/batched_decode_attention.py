"""A plugin for ``paged_attention`` in plain PyTorch: a whole step in one batched product.

The reference runs one attention call per sequence, which costs more in dispatch than in arithmetic
when every sequence brings a single query. This one gathers, for every query token, its sequence's
blocks at once, masks what the token may not see, and computes grouped-query attention with two
batched matmuls. It reads lengths only from device tensors, with ``meta.max_seq_len`` fixing the
shapes, so it can be captured in a CUDA graph: decode steps always, and steps with prefill chunks
when they are padded to a fixed shape (graph buckets). Eager steps with prefill chunks go to the
reference, since gathering keys per query token costs tokens x context memory.
"""
from __future__ import annotations

import torch

from kiln.ops.attention_metadata import AttentionMetadata
from kiln.ops.reference import paged_attention as reference_paged_attention
from kiln.ops.registry import plugin


@plugin("paged_attention", "batched_decode", graph_safe=True)
def batched_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    num_tokens, heads, head_dim = q.shape
    decode = num_tokens == meta.block_tables.shape[0]  # every sequence brings at least one query token
    if not decode and not meta.max_seq_len:
        return reference_paged_attention(q, k_cache, v_cache, meta, scale, sliding_window)
    heads_kv = k_cache.shape[2]
    group = heads // heads_kv
    max_len = meta.max_seq_len or max(meta.seq_lens)
    num_blocks = -(-max_len // meta.block_size)
    table, lens = _per_token(meta, num_tokens, decode, q.device)
    # [T, blocks, block, Hk, D] -> [T, Hk, L, D]: each query token with its own sequence's keys
    k = k_cache[table[:, :num_blocks]].flatten(1, 2)[:, :max_len].permute(0, 2, 1, 3).to(q.dtype)
    v = v_cache[table[:, :num_blocks]].flatten(1, 2)[:, :max_len].permute(0, 2, 1, 3).to(q.dtype)
    qg = q.view(num_tokens, heads_kv, group, head_dim)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [T, Hk, G, L]
    scores.masked_fill_(_mask(meta, lens, max_len, sliding_window, q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, v).reshape(num_tokens, heads, head_dim)


def _per_token(meta: AttentionMetadata, num_tokens: int, decode: bool,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query token's block-table row and how many keys it sees (its position + 1), from device
    tensors only, so that a captured graph computes them for each replay's step."""
    lens = meta.seq_lens_t if meta.seq_lens_t is not None else torch.tensor(meta.seq_lens, device=device)
    if decode:
        return meta.block_tables, lens
    starts = meta.query_start_loc_t
    if starts is None:
        starts = torch.tensor(meta.query_start_loc, device=device)
    starts = starts.to(torch.int64)
    token = torch.arange(num_tokens, device=device)
    seq = torch.searchsorted(starts[1:], token, right=True)
    # Query token j of a sequence with q_len new tokens and L in all sits at L - q_len + j.
    seen = lens[seq] - (starts[seq + 1] - 1 - token)
    return meta.block_tables[seq], seen


def _mask(meta: AttentionMetadata, lens: torch.Tensor, max_len: int, window: int | None,
          device: torch.device) -> torch.Tensor:
    """[T, 1, 1, L], True where a key is after the query token or outside the window; built once per
    step and window."""
    key = ("batched_decode_mask", window)
    mask = meta.scratch.get(key)
    if mask is None:
        pos = torch.arange(max_len, device=device)
        mask = pos[None, :] >= lens[:, None]
        if window is not None:
            mask |= pos[None, :] <= (lens[:, None] - 1 - window)
        mask = meta.scratch[key] = mask[:, None, None, :]
    return mask
