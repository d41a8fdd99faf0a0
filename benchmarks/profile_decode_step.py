"""Where a decode step's time goes: the device's kernels, grouped by job, beside the step's wall time.

Usage: python benchmarks/profile_decode_step.py MODEL_OR_ENGINE [--batch B] [--context N]
           [--graphs auto|off] [--steps S] [--json FILE] [--trace FILE]

The engine core alone is stepped in this thread (no front end): B requests of N-token prompts are
admitted, prefilled and decoded a few steps, then S decode steps are timed and S more are traced with
torch.profiler (kernels replayed inside CUDA graphs are traced too). Printed: the step's wall time,
the device's busy time per step (the union of kernel intervals), and per kernel group (matrix products,
attention, norms, rotary + KV write, SiLU-mul, sampling, other) its time and launches per step. The gap
between wall and busy time is launch latency and host work the device waited on. On a CPU, torch's ops
(kiln's C++ kernels among them) by their own time per step instead.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from kiln.builder.engine_cache import engine_for
from kiln.runtime import SamplingParams
from kiln.runtime.config import RuntimeConfig
from kiln.runtime.engine_core import EngineCore, EngineCoreRequest

GROUPS = [  # (group, pattern on the kernel's name), first match wins
    ("attention", r"paged_attention|merge_splits|flash|fmha"),
    ("rms_norm", r"rms"),
    ("rotary_kv_write", r"rotary|kv_cache"),
    ("silu_mul", r"silu"),
    ("matmul", r"gemm|gemv|cutlass|nvjet|sm90_|sm80_|cublas|splitk|matmul"),
    ("sampling", r"argmax|topk|top_k|sort|softmax|multinomial|exponential|gather|scatter|max|reduce"),
]


def group_of(name: str) -> str:
    low = name.lower()
    for group, pattern in GROUPS:
        if re.search(pattern, low):
            return group
    return "other"


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=128, help="prompt tokens per request")
    ap.add_argument("--graphs", default="auto", choices=["auto", "off"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--trace", help="write the Chrome trace here")
    args = ap.parse_args()

    engine = engine_for(args.model, max_batch_size=args.batch, max_seq_len=4096, max_num_tokens=8192)
    cuda = torch.cuda.is_available()
    # A fixed, modest pool: the profile needs B sequences of context + a few hundred tokens.
    config = RuntimeConfig(cuda_graphs=args.graphs, kv_cache_memory=2 << 30)
    core = EngineCore(str(engine), config)
    rng = random.Random(0)
    params = SamplingParams(max_tokens=10 * args.steps + 64, temperature=0, ignore_eos=True)
    for i in range(args.batch):
        core.add_request(EngineCoreRequest(f"r{i}", [rng.randrange(100, 300) for _ in range(args.context)], params,
                                           frozenset(), time.monotonic()))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(8):  # prefill, graph capture and a few decode steps
        core.step()
    sync()
    t = time.perf_counter()
    for _ in range(args.steps):
        core.step()
    sync()
    step_ms = (time.perf_counter() - t) / args.steps * 1000

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            core.step()
        sync()
    trace = args.trace or tempfile.mktemp(suffix=".json")
    prof.export_chrome_trace(trace)
    events = json.loads(Path(trace).read_text())["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    per_group: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        g = per_group[group_of(e["name"]) if e["cat"] == "kernel" else e["cat"]]
        g[0] += e["dur"]
        g[1] += 1
        k = per_kernel[e["name"][:90]]
        k[0] += e["dur"]
        k[1] += 1
    steps = args.steps
    busy = busy_us([(e["ts"], e["ts"] + e["dur"]) for e in kernels]) / steps / 1000
    span = ((max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)) / steps / 1000
            if kernels else 0.0)
    summary = {
        "model": args.model, "batch": args.batch, "context": args.context, "graphs": args.graphs,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "step_ms": round(step_ms, 4), "traced_span_ms_per_step": round(span, 4),
        "device_busy_ms_per_step": round(busy, 4), "kernels_per_step": round(len(kernels) / steps, 1),
        "groups": {g: {"ms_per_step": round(v[0] / steps / 1000, 4), "launches_per_step": round(v[1] / steps, 1)}
                   for g, v in sorted(per_group.items(), key=lambda kv: -kv[1][0])},
        "top_kernels": [{"name": n, "us_per_step": round(v[0] / steps, 2), "launches_per_step": round(v[1] / steps, 1)}
                        for n, v in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:25]],
    }
    if not cuda:  # no device kernels: torch's CPU ops by their own time (kiln's C++ ops are named kiln_cpu::...)
        averages = prof.key_averages()
        ops = sorted(averages, key=lambda e: -e.self_cpu_time_total)[:14]
        # All of torch's ops together: the rest of the wall time is Python (the model's code, the engine loop).
        summary["cpu_ops_total"] = {"ms_per_step": round(sum(e.self_cpu_time_total for e in averages) / steps / 1000, 4),
                                    "calls_per_step": round(sum(e.count for e in averages) / steps, 1),
                                    "threads": torch.get_num_threads()}
        summary["cpu_ops"] = [{"name": e.key, "ms_per_step": round(e.self_cpu_time_total / steps / 1000, 4),
                               "calls_per_step": round(e.count / steps, 1)} for e in ops]
    print(f"{args.model}: batch {args.batch}, context {args.context}, graphs {args.graphs}")
    print(f"  decode step {step_ms:.3f} ms wall; device busy {busy:.3f} ms, traced span {span:.3f} ms, "
          f"{summary['kernels_per_step']} kernels a step")
    for g, v in summary["groups"].items():
        print(f"  {g:16s} {v['ms_per_step']:8.4f} ms  {v['launches_per_step']:6.1f} launches")
    for k in summary["top_kernels"][:14]:
        print(f"    {k['us_per_step']:9.2f} us  x{k['launches_per_step']:<6} {k['name']}")
    if "cpu_ops_total" in summary:
        total = summary["cpu_ops_total"]
        print(f"  torch ops {total['ms_per_step']:.3f} ms in {total['calls_per_step']} calls a step "
              f"(profiled), {total['threads']} threads at the end")
    for op in summary.get("cpu_ops", []):
        print(f"    {op['ms_per_step']:9.3f} ms  x{op['calls_per_step']:<6} {op['name']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
