"""SmolLM2's decode matmuls (30 layers' linears and the logits, float32) per implementation and thread count,
beside N busy neighbours: ms per token, median of repeats.

    python benchmarks/cpu_matvec_threads.py [--busy-neighbours N] [--rows R] [--repeats K]

OpenMP settings such as OMP_WAIT_POLICY or GOMP_SPINCOUNT are read when torch loads, so set them in
the environment of the command. The figures of BENCHMARKS.md's CPU section ("the matmuls alone")
come from this script.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from kiln.bench.neighbours import busy_neighbours
from kiln.ops import get_op

# SmolLM2-135M: fused QKV, O, fused gate/up, down (x30 layers), then the logits.
LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
LOGITS = (49152, 576)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--busy-neighbours", type=int, default=0)
    p.add_argument("--rows", type=int, default=1, help="tokens per call (decode batch size)")
    p.add_argument("--repeats", type=int, default=8)
    args = p.parse_args()
    # Distinct weights, as many bytes as the model's, so every pass streams them from memory.
    weights = [(op, torch.randn(shape)) for op, shape in [("linear", s) for s in LAYER * 30] + [("logits", LOGITS)]]
    inputs = {k: torch.randn(args.rows, k) for k in {shape[1] for shape in LAYER + [LOGITS]}}
    impls = ["reference", "onednn", "cpu"]
    prepared = {}
    for name in impls:
        prepared[name] = []
        for op, w in weights:
            impl = get_op(op).impls[name]
            prepared[name].append((impl.fn, impl.prepare(w, torch.float32) if impl.prepare else w, inputs[w.shape[1]]))
    with busy_neighbours(args.busy_neighbours):
        time.sleep(0.3)
        for threads in (2, 1):
            torch.set_num_threads(threads)
            times: dict[str, list[float]] = {name: [] for name in impls}
            for _ in range(args.repeats):
                for name in impls:
                    t0 = time.perf_counter()
                    for fn, w, x in prepared[name]:
                        fn(x, w)
                    times[name].append(time.perf_counter() - t0)
            for name, ts in times.items():
                print(f"{args.busy_neighbours} neighbours, {threads} threads, {args.rows} rows, {name:9} "
                      f"median {statistics.median(ts) * 1e3:7.1f} ms  min {min(ts) * 1e3:7.1f}  max {max(ts) * 1e3:7.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
