"""Random inputs for the ops at chosen shapes: for plugin tests, kernel benchmarks and tuners.

Every builder draws fresh values from ``generator`` (a new random one when None), never zeros, and
poisons what a correct kernel must not read or leave unwritten with NaN.
"""
from __future__ import annotations

import torch

from kiln.ops.attention_metadata import AttentionMetadata


def _generator(device: torch.device, generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    g = torch.Generator(device=device)
    g.seed()
    return g


def paged_batch(
    seq_lens: list[int],
    q_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    kv_dtype: torch.dtype | None = None,
    table_dtype: torch.dtype = torch.int32,
    poison: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """(q [T, H, D], k_cache, v_cache, meta) of one packed step over a paged cache.

    Sequence i has ``seq_lens[i]`` tokens of context after the step, the last ``q_lens[i]`` of which
    are its queries. Its blocks are scattered at random over the cache. With ``poison``, every cache
    slot no sequence owns is NaN (-128 in an int8 cache, which no store writes) and table padding points
    at an unowned block, so a kernel that reads past a context shows it. The metadata's device tensors
    are all filled.
    """
    device = torch.device(device)
    if len(seq_lens) != len(q_lens) or any(not 0 < q <= n for n, q in zip(seq_lens, q_lens)):
        raise ValueError(f"need 0 < q_len <= seq_len per sequence, got {seq_lens=} {q_lens=}")
    g = _generator(device, generator)
    kv_dtype = kv_dtype or dtype
    per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + 2  # two blocks no sequence owns
    order = torch.randperm(num_blocks, generator=g, device=device).tolist()
    spare = order[-1]
    tables, loc, start = [], [0], 0
    for need, q in zip(per_seq, q_lens):
        tables.append(order[start:start + need])
        start += need
        loc.append(loc[-1] + q)
    width = max(per_seq)
    table = torch.tensor([t + [spare] * (width - len(t)) for t in tables], dtype=table_dtype, device=device)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = (_random_cache(shape, kv_dtype, g, device) for _ in range(2))
    if poison:
        owned = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=device)
        for t, n in zip(tables, seq_lens):
            slots = torch.tensor(t, device=device)[:, None] * block_size + torch.arange(block_size, device=device)
            owned[slots.flatten()[:n]] = True
        for cache in (k_cache, v_cache):
            if cache.dtype.itemsize == 1:  # (torch fills float8 by mask as bytes only)
                cache.view(torch.uint8).view(-1, num_kv_heads, head_dim)[~owned] = _poison_byte(kv_dtype)
            else:
                cache.view(-1, num_kv_heads, head_dim)[~owned] = float("nan")
    # Each query token's own slot (what the step's cache write used).
    slots = [t[p // block_size] * block_size + p % block_size
             for t, n, q in zip(tables, seq_lens, q_lens) for p in range(n - q, n)]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=table,
        query_start_loc=loc,
        seq_lens=list(seq_lens),
        block_size=block_size,
        query_start_loc_t=torch.tensor(loc, dtype=torch.int32, device=device),
        seq_lens_t=torch.tensor(seq_lens, dtype=torch.int64, device=device),
        max_seq_len=max(seq_lens),
    )
    q = torch.randn(loc[-1], num_heads, head_dim, generator=g, device=device).to(dtype)
    return q, k_cache, v_cache, meta


def _random_cache(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator,
                  device: torch.device) -> torch.Tensor:
    if dtype == torch.int8:
        return torch.randint(-127, 128, shape, generator=g, device=device, dtype=torch.int8)
    return torch.randn(shape, generator=g, device=device).to(dtype)


def _poison(dtype: torch.dtype) -> float:
    """What marks a cache slot nothing should read or has written yet."""
    return -128 if dtype == torch.int8 else float("nan")


def _poison_byte(dtype: torch.dtype) -> int:
    """``_poison`` of a one-byte dtype as its byte: int8's -128, float8 e4m3's NaN."""
    return torch.tensor([_poison(dtype)]).to(dtype).view(torch.uint8).item()


def rotary_batch(
    num_tokens: int,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    kv_dtype: torch.dtype | None = None,
    rope_theta: float = 10000.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The arguments of ``rotary_and_write_kv_cache``: (qkv, cos_sin, k_cache, v_cache, slot_mapping, num_heads).

    Tokens sit at random positions and write to distinct random slots of a NaN-filled cache (-128 in int8).
    """
    device = torch.device(device)
    g = _generator(device, generator)
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, generator=g, device=device).to(dtype)
    positions = torch.randint(0, 4096, (num_tokens,), generator=g, device=device).float()
    inv_freq = rope_theta ** -(torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(positions, inv_freq).repeat(1, 2)
    cos_sin = torch.stack((angles.cos(), angles.sin()), dim=1).to(dtype)
    num_blocks = -(-num_tokens // block_size) + 1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, _poison(kv_dtype or dtype), dtype=kv_dtype or dtype, device=device)
    v_cache = torch.full(shape, _poison(kv_dtype or dtype), dtype=kv_dtype or dtype, device=device)
    slots = torch.randperm(num_blocks * block_size, generator=g, device=device)[:num_tokens]
    return qkv, cos_sin, k_cache, v_cache, slots, num_heads


def norm_batch(
    rows: int, hidden: int, *, dtype: torch.dtype, device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The arguments of ``add_rms_norm``: (x, residual, weight, eps); drop ``residual`` for ``rms_norm``."""
    device = torch.device(device)
    g = _generator(device, generator)
    x = torch.randn(rows, hidden, generator=g, device=device).to(dtype)
    residual = (4 * torch.randn(rows, hidden, generator=g, device=device)).to(dtype)
    weight = (1 + 0.2 * torch.randn(hidden, generator=g, device=device)).to(dtype)
    return x, residual, weight, 1e-5


def silu_batch(
    rows: int, intermediate: int, *, dtype: torch.dtype, device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor]:
    """The argument of ``silu_and_mul``: a fused [gate | up] projection [rows, 2 * intermediate]."""
    device = torch.device(device)
    g = _generator(device, generator)
    return ((3 * torch.randn(rows, 2 * intermediate, generator=g, device=device)).to(dtype),)


def linear_batches(
    rows: int, in_features: int, out_features: int, *, dtype: torch.dtype, device: torch.device | str = "cpu",
    min_bytes: int = 0, generator: torch.Generator | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Arguments of ``linear`` (x [rows, in], weight [out, in], scaled like a trained model's), as many
    distinct weights (at most 16) as reach ``min_bytes`` together: a timing loop that cycles through
    them reads each weight from memory, not from a cache that holds one weight but not all."""
    device = torch.device(device)
    g = _generator(device, generator)
    size = out_features * in_features * torch.empty((), dtype=dtype).element_size()
    copies = min(16, max(1, -(-min_bytes // size)))
    return [((torch.randn(rows, in_features, generator=g, device=device)).to(dtype),
             (torch.randn(out_features, in_features, generator=g, device=device) / in_features ** 0.5).to(dtype))
            for _ in range(copies)]
