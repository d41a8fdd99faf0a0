"""Few-row matrix products on the GPU: cuBLAS (F.linear) against the Triton kernel's configs, at the
projections of the Llama-3.2-1B and Llama-3.1-8B shapes; and batch-1 decode attention at short
contexts with its split-K settings.

Each case is checked against float32 (bf16 within 2 roundings) and timed as a CUDA graph of 10 calls
that cycle through weights of 256 MB or more together (none stays in the 50 MB L2), as kiln's tuner
times it. GB/s counts the weight bytes read.
Usage: python benchmarks/gpu_gemv.py OUT.json
"""
from __future__ import annotations

import itertools
import json
import sys

import torch
import torch.nn.functional as F

from kiln.builder.autotune import WEIGHT_BYTES_TIMED, graph_time_ms
from kiln.ops.sample_inputs import linear_batches, paged_batch
from kiln.ops.triton_kernels.attention import paged_attention
from kiln.ops.triton_plugins import LINEAR_CONFIGS, PAGED_ATTENTION_CONFIGS, triton_linear

SHAPES = {  # name: (in, out)
    "8b qkv": (4096, 6144), "8b o": (4096, 4096), "8b gate_up": (4096, 28672), "8b down": (14336, 4096),
    "8b logits": (4096, 128256),
    "1b qkv": (2048, 3072), "1b o": (2048, 2048), "1b gate_up": (2048, 16384), "1b down": (8192, 2048),
    "1b logits": (2048, 128256),
}
dev = torch.device("cuda")
results = {"gemv": [], "attention": []}
with torch.inference_mode():
    for (name, (k, n)), rows in itertools.product(SHAPES.items(), (1, 2, 4, 8, 16)):
        if rows > 1 and "logits" in name and rows not in (8,):
            continue
        batches = linear_batches(rows, k, n, dtype=torch.bfloat16, device=dev, min_bytes=WEIGHT_BYTES_TIMED)
        x, w = batches[0]
        want = F.linear(x.float(), w.float())
        row = {"shape": name, "rows": rows, "weight_mb": round(n * k * 2 / 1e6, 1)}
        calls = itertools.cycle(batches)
        row["cublas_us"] = round(graph_time_ms(lambda: F.linear(*next(calls)), dev) * 1000, 2)
        for i, config in enumerate(LINEAR_CONFIGS):
            if config["max_rows"] < rows:
                continue
            got = triton_linear(x, w, None, **config).float()
            ok = torch.allclose(got, want, rtol=2 * 2 ** -7, atol=2 * 2 ** -6)
            calls = itertools.cycle(batches)
            t = graph_time_ms(lambda: triton_linear(*next(calls), None, **config), dev) * 1000
            row[f"config{i}_us"] = round(t, 2) if ok else f"WRONG {float((got - want).abs().max()):.3g}"
        best = min((v, key) for key, v in row.items() if key.startswith("config") and isinstance(v, float))
        row["best"] = best[1]
        row["best_gb_s"] = round(n * k * 2 / best[0] / 1e3, 1)
        row["cublas_gb_s"] = round(n * k * 2 / row["cublas_us"] / 1e3, 1)
        results["gemv"].append(row)
        print(json.dumps(row), flush=True)

    # Batch-1 decode attention, 8B and 1B heads, at contexts the graphs' ladder holds (width = 256, 512, 1024).
    for heads, label in (((32, 8, 128), "8b"), ((32, 8, 64), "1b")):
        for ctx in (150, 250, 500, 1000):
            q, kc, vc, meta = paged_batch([ctx], [1], num_heads=heads[0], num_kv_heads=heads[1], head_dim=heads[2],
                                          block_size=16, dtype=torch.bfloat16, device=dev, poison=False)
            want = paged_attention(q, kc, vc, meta, heads[2] ** -0.5, None, PAGED_ATTENTION_CONFIGS[0])
            row = {"model": label, "context": ctx}
            for split_min in (256, 128, 64, 32):
                for tile in (64, 32):
                    config = {**PAGED_ATTENTION_CONFIGS[0], "split_min_tokens": split_min, "decode_tile_n": tile}
                    got = paged_attention(q, kc, vc, meta, heads[2] ** -0.5, None, config)
                    ok = torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)
                    t = graph_time_ms(lambda: paged_attention(q, kc, vc, meta, heads[2] ** -0.5, None, config), dev)
                    row[f"split_min{split_min}_tile{tile}_us"] = round(t * 1000, 2) if ok else "WRONG"
            results["attention"].append(row)
            print(json.dumps(row), flush=True)
with open(sys.argv[1], "w") as f:
    json.dump(results, f, indent=1)
