"""kiln's C++ paged attention on the CPU, timed alone at a decode step's shapes, beside the reference
(a gather of each sequence's keys and values, then torch's scaled_dot_product_attention).

Why: in a SmolLM2 decode step at batch 16 the attention op takes 1.0-1.2 ms per layer inside the engine
(benchmarks/profile_decode_step.py); this says what the kernel costs by itself, with the bytes it reads.

Usage: python benchmarks/cpu_attention.py [--batch 16] [--context 210] [--heads 9] [--kv-heads 3] [--dim 64]
"""
from __future__ import annotations

import argparse
import time

import torch

from kiln.ops import cpu_layer_ops, reference
from kiln.ops.attention_metadata import AttentionMetadata


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=210)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=200)
    a = ap.parse_args()
    if not cpu_layer_ops.available():
        raise SystemExit("the C++ CPU kernels could not be built here")
    per_seq = -(-a.context // a.block)
    blocks = a.batch * per_seq + 1
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(blocks, a.block, a.kv_heads, a.dim, generator=g)
    v_cache = torch.randn(blocks, a.block, a.kv_heads, a.dim, generator=g)
    order = torch.randperm(blocks - 1, generator=g) + 1  # scattered, as a pool hands blocks out
    tables = order.view(a.batch, per_seq).contiguous()
    meta = AttentionMetadata(slot_mapping=torch.zeros(a.batch, dtype=torch.long), block_tables=tables,
                             query_start_loc=list(range(a.batch + 1)), seq_lens=[a.context] * a.batch,
                             block_size=a.block)
    q = torch.randn(a.batch, a.heads, a.dim, generator=g)
    scale = a.dim ** -0.5
    want = reference.paged_attention(q, k_cache, v_cache, meta, scale, None)
    got = cpu_layer_ops.cpu_paged_attention(q, k_cache, v_cache, meta, scale, None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    def timed(fn) -> float:
        for _ in range(5):
            fn()
        start = time.perf_counter()
        for _ in range(a.repeat):
            fn()
        return (time.perf_counter() - start) / a.repeat * 1e6

    kiln_us = timed(lambda: cpu_layer_ops.cpu_paged_attention(q, k_cache, v_cache, meta, scale, None))
    ref_us = timed(lambda: reference.paged_attention(q, k_cache, v_cache, meta, scale, None))
    kv_bytes = 2 * a.batch * a.context * a.kv_heads * a.dim * 4
    print(f"decode attention, {a.batch} sequences of {a.context} tokens, {a.heads}/{a.kv_heads} heads of {a.dim}, "
          f"{torch.get_num_threads()} threads")
    print(f"  kiln C++   {kiln_us:9.1f} us  ({kv_bytes / kiln_us / 1e3:.1f} GB/s of keys and values)")
    print(f"  reference  {ref_us:9.1f} us")


if __name__ == "__main__":
    main()
