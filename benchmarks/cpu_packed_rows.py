"""Each CPU kernel of the packed-weight ops (``kiln/ops/packed_linear.py``) from one row (a decode step) to a
prompt chunk's rows, beside the float product of the weight decoded at that call.

    python benchmarks/cpu_packed_rows.py [--threads 2] [--rows 1 8 64 256 1024] [--formats int8 q4_0 ...]
        [--shapes 576x1536 2048x8192] [--dtype float32]

A decode step's rows are what the load-time tuner times (``kiln/runtime/tuned_plan.py``); a prompt's prefill
runs the same bound kernel over many rows, where a kernel tuned for one row can be far slower than decoding
the weight once and calling the float GEMM. A cell is the median of several calls, in ms.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kiln.engine.target import device_name
from kiln.ops import get_op
from kiln.ops.packed_linear import op_name
from kiln.ops.tuning import candidates
from kiln.weight_formats import FORMATS, random_packed


def median_ms(fn, calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 256, 1024])
    parser.add_argument("--formats", nargs="+", default=["int8", "q8_0", "q4_0", "q4_k", "q6_k", "int4_g128"])
    parser.add_argument("--shapes", nargs="+", default=["576x1536", "2048x8192"], help="IN x OUT")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = torch.device("cpu")
    print(f"{device_name(device)}, {args.threads} threads, torch {torch.__version__}, "
          f"ATen {torch.backends.cpu.get_cpu_capability()}, {args.dtype} activations; ms per call")
    print("format shape kernel " + " ".join(f"rows={r}" for r in args.rows))
    for name in args.formats:
        fmt = FORMATS[name]
        op = get_op(op_name(name))
        for shape in args.shapes:
            k, n = (int(v) for v in shape.split("x"))
            if k % getattr(fmt, "block", 1):
                continue
            torch.manual_seed(0)
            packed = random_packed(fmt, (n, k))
            rows_x = {r: torch.randn(r, k, dtype=dtype) for r in args.rows}
            for cand in candidates(op, device, dtype):
                weight = cand.impl.prepare(packed, dtype) if cand.impl.prepare else packed
                fn = cand.impl.with_config(cand.config)
                cells = [median_ms(lambda x=x: fn(x, weight), 3 if r >= 256 else 9) for r, x in rows_x.items()]
                print(f"{name} {k}x{n} {cand.label} " + " ".join(f"{c:.3f}" for c in cells), flush=True)
            cells = [median_ms(lambda x=x: F.linear(x, fmt.dequantize(packed, dtype)), 3 if r >= 256 else 9)
                     for r, x in rows_x.items()]
            print(f"{name} {k}x{n} decoded-per-call " + " ".join(f"{c:.3f}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
