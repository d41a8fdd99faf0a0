"""Products with 4-bit weights on one GPU: kiln's Triton plugin (every config of ``INT4_LINEAR_CONFIGS``),
PyTorch's tinygemm (``_weight_int4pack_mm``) and bf16 cuBLAS (``F.linear``) over the same weights decoded,
at the Llama-3.1-8B projections (qkv 4096->6144, o 4096->4096, gate_up 4096->28672, down 14336->4096), at
1 row (decode) and 128 rows (a prompt).

Each implementation is checked against float32 (the weight decoded, the same bf16 activations) and timed as
kiln's tuner times it (``kiln/builder/autotune.py``): a CUDA graph of 10 calls that cycle through copies of
the weight (and activations) that together outgrow the L2 cache (256 MB of packed weights or more; the
bf16 copies are 3.8x that). GB/s counts the weight bytes each one reads: the format's bytes (4-bit values
and the group scales and offsets, e.g. 0.53 bytes a weight for int4_g128) for tinygemm and Triton, 2 a
weight for bf16; the device's copy bandwidth (read + write) is measured in the same run. Triton configs that
take the same path with the same keys at a row count are timed once ("same_as"). Every case runs on its
own (a failure is recorded and the next one runs); the JSON is rewritten after each.

Usage (repository root):
  python benchmarks/gpu_int4_gemv.py OUT.json [--formats int4_g128,q4_k] [--rows 1,128] [--shapes qkv,o]
  python benchmarks/gpu_int4_gemv.py OUT.json --dry-run-cpu   (every code path at tiny shapes, interpreted)
  python benchmarks/gpu_int4_gemv.py OUT.json --sass          (no GPU: each kernel variant compiled for sm_90
                                                               offline, its loop's instructions per weight)
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}  # in, out
TINY_SHAPES = {"qkv": (512, 96), "down": (768, 40)}  # --dry-run-cpu: partial tiles, groups up to 256
DTYPE = torch.bfloat16
# A weight is good when its product is within bf16's reach of float32 (measured ~3e-3 relative in norm).
TOLERANCE = 1e-2


def random_weight(fmt, shape: tuple[int, int], device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """A packed weight of ``shape`` [out, in]: kiln's formats quantized from N(0, 1/in) values on the device,
    GGUF's from random fields (``random_packed``)."""
    from kiln.weight_formats import random_packed

    if fmt.can_quantize:
        return fmt.quantize(torch.randn(shape, device=device, generator=generator) / shape[1] ** 0.5)
    return random_packed(fmt, shape, device=device)


def measure(fn, calls: list[tuple], want: torch.Tensor, weight_bytes: float, flops: float, device) -> dict:
    from kiln.builder.autotune import graph_time_ms

    got = fn(*calls[0]).float()
    rel = float((got - want).norm() / want.norm())
    cycle = itertools.cycle(calls)
    us = graph_time_ms(lambda: fn(*next(cycle)), device) * 1000
    return {"us": round(us, 2), "gb_s": round(weight_bytes / us / 1e3, 1), "tflops": round(flops / us / 1e6, 1),
            "rel_err": float(f"{rel:.3g}"), "ok": rel < TOLERANCE}


def run_case(fmt_name: str, shape: str, k: int, n: int, rows: int, device: torch.device) -> dict:
    from kiln.builder.autotune import WEIGHT_BYTES_TIMED
    from kiln.ops import get_op
    from kiln.ops.packed_linear import op_name
    from kiln.ops.triton_kernels.int4_gemv import GEMM_KEYS, GEMV_KEYS, path
    from kiln.weight_formats import FORMATS

    fmt = FORMATS[fmt_name]
    op = get_op(op_name(fmt_name))
    g = torch.Generator(device=device).manual_seed(k + n + rows)
    weight_bytes = n * k * fmt.bytes_per_weight
    copies = min(16, max(2, math.ceil(WEIGHT_BYTES_TIMED / weight_bytes))) if device.type == "cuda" else 1
    packed = [random_weight(fmt, (n, k), device, g) for _ in range(copies)]
    xs = [torch.randn(rows, k, device=device, generator=g).to(DTYPE) for _ in range(copies)]
    want = F.linear(xs[0].float(), fmt.dequantize(packed[0]))
    flops = 2 * rows * n * k
    row = {"format": fmt_name, "shape": shape, "in": k, "out": n, "rows": rows, "copies": copies,
           "weight_mb": round(weight_bytes / 1e6, 1)}
    dense = [fmt.dequantize(p, DTYPE) for p in packed]
    row["bf16"] = measure(F.linear, list(zip(xs, dense)), want, 2 * n * k, flops, device)
    del dense
    for name in ("tinygemm", "triton"):
        impl = op.impls.get(name)
        # (--dry-run-cpu runs the CUDA-only Triton plugin in the interpreter)
        if impl is None or not (impl.supports(device, DTYPE) or (device.type == "cpu" and name == "triton")):
            row[name] = "unsupported here"
            continue
        prepared = [impl.prepare(p, DTYPE) for p in packed]
        calls = list(zip(xs, prepared))
        if name == "tinygemm":
            row[name] = measure(impl.fn, calls, want, weight_bytes, flops, device)
            continue
        timed, first = {}, {}
        for i, config in enumerate(impl.configs):
            kernel = path(rows, DTYPE, config)
            keys = {"gemv": GEMV_KEYS, "gemm": GEMM_KEYS, "dequant": ()}[kernel]
            key = (kernel, *(config[k] for k in keys))
            label = f"config{i}"
            if key in first:
                timed[label] = {"same_as": first[key]}
                continue
            first[key] = label
            try:
                timed[label] = {"path": kernel, **measure(impl.with_config(config), calls, want, weight_bytes, flops,
                                                          device)}
            except Exception as e:  # noqa: BLE001 - a config the device cannot run; the others go on
                timed[label] = {"path": kernel, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        row[name] = timed
        good = {label: t for label, t in timed.items() if t.get("ok")}
        if good:
            best = min(good, key=lambda label: good[label]["us"])
            row["best_triton"] = {"config": best, **good[best]}
            for other in ("bf16", "tinygemm"):
                if isinstance(row.get(other), dict) and "us" in row[other]:
                    row["best_triton"][f"speedup_vs_{other}"] = round(row[other]["us"] / good[best]["us"], 2)
    return row


def copy_gb_s(device: torch.device) -> float:
    from kiln.ops.timing import time_ms

    src = torch.empty((256 if device.type == "cuda" else 1) << 20, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / time_ms(lambda: dst.copy_(src), device, 10, 40) / 1e6


def environment(device: torch.device) -> dict:
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=torch.cuda.get_device_name(device), capability=f"{props.major}.{props.minor}",
                   sms=props.multi_processor_count, cuda=torch.version.cuda)
    else:
        env["device"] = "cpu (dry run: Triton's interpreter)"
    return env


def summary_line(row: dict) -> str:
    def cell(r) -> str:
        if not isinstance(r, dict) or "us" not in r:
            return f"{'-':>22}"
        return f"{r['us']:9.1f}us {r['gb_s']:6.0f}GB/s{'' if r['ok'] else ' BAD'}"

    best = row.get("best_triton", {})
    return (f"{row['format']:<9} {row['shape']:<8} rows={row['rows']:<4} bf16 {cell(row.get('bf16'))} | tinygemm "
            f"{cell(row.get('tinygemm'))} | triton {cell(best)} {best.get('config', 'none ok')} "
            f"x{best.get('speedup_vs_tinygemm', '?')} vs tinygemm, x{best.get('speedup_vs_bf16', '?')} vs bf16")


# ---------------------------------------------------------------- --sass


def _loop_counts(sass: str) -> Counter:
    """Instructions of the longest backward branch's body (the kernel's K loop) in nvdisasm output."""
    lines, labels = [], {}
    for text in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", text)
        if label:
            labels[label.group(1)] = len(lines)
            continue
        op = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*)", text)
        if op:
            lines.append((op.group(1), op.group(2)))
    loops = [(labels[t.group(1)], i) for i, (op, rest) in enumerate(lines)
             if op == "BRA" and (t := re.search(r"(\.L_x_\d+)", rest)) and labels.get(t.group(1), i) < i]
    if not loops:
        return Counter()
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    return Counter(op.split(".")[0] for op, _ in lines[start:end + 1])


def sass_report(formats: list[str], shapes: dict, rows_list: list[int]) -> list[dict]:
    """Every kernel variant the runs would launch, compiled for sm_90 (``compile_kernels.offline_compile``):
    registers, spills, shared memory and its K loop's instructions per weight (per thread and iteration)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compile_kernels import offline_compile

    from kiln.ops.triton_kernels import int4_gemv
    from kiln.ops.triton_plugins import INT4_LINEAR_CONFIGS
    from kiln.weight_formats import FORMATS, four_bit_group_size

    reports: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp, offline_compile(90, reports, Path(tmp)):
        for fmt_name, (k, n) in itertools.product(formats, shapes.values()):
            group = four_bit_group_size(FORMATS[fmt_name])
            scale_dtype = torch.float32 if fmt_name == "q4_k" else torch.float16
            weight = (torch.zeros(n, k // 8, dtype=torch.int32), torch.zeros(n, k // group, dtype=scale_dtype),
                      torch.zeros(n, k // group, dtype=scale_dtype))
            for config, rows in itertools.product(INT4_LINEAR_CONFIGS, rows_list):
                if int4_gemv.path(rows, DTYPE, config) != "dequant":  # (its cuBLAS product would run on the CPU)
                    int4_gemv.int4_linear(torch.zeros(rows, k, dtype=DTYPE), weight, None, group, config)
            int4_gemv.dequantize(weight, group, DTYPE)
        for r in reports:
            c = r["constexprs"]
            r["constexprs"] = {key: v for key, v in c.items() if not isinstance(v, str)}
            sass = Path(tmp) / f"{r['index']:03d}_{r['kernel']}.sass"
            counts = _loop_counts(sass.read_text()) if sass.exists() else Counter()
            if counts and "BLOCK_N" in c:
                per_thread = c["BLOCK_N"] * c["BLOCK_K"] / (32 * r["num_warps"])
                r["instructions_per_weight"] = round(sum(counts.values()) / per_thread, 2)
                r["barriers_per_iteration"] = counts.get("BAR", 0)
            print(f"{r['kernel']:<22} {json.dumps(r['constexprs'])} warps={r['num_warps']} "
                  f"regs={r.get('registers')} spill={r.get('spill_bytes')} smem={r.get('shared_bytes')} "
                  f"instr/weight={r.get('instructions_per_weight')} bar={r.get('barriers_per_iteration')}"
                  + (f" ERROR {r['error'][:300]}" if "error" in r else ""), flush=True)
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="where to write the JSON results")
    parser.add_argument("--formats", default="int4_g128", help="4-bit formats, comma-separated (kiln.weight_formats)")
    parser.add_argument("--rows", default="1,128")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="check this script's code paths on the CPU: Triton's interpreter, tiny shapes")
    parser.add_argument("--sass", action="store_true", help="compile for sm_90 offline instead; no GPU")
    args = parser.parse_args()
    formats = args.formats.split(",")
    rows_list = [int(r) for r in args.rows.split(",")]
    shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
    if args.sass:
        if os.environ.get("TRITON_INTERPRET"):
            sys.exit("unset TRITON_INTERPRET: --sass compiles the kernels")
        reports = sass_report(formats, shapes, rows_list)
        args.out.write_text(json.dumps({"sass": reports, "command": sys.argv}, indent=1, default=str))
        return
    if args.dry_run_cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
        sys.path.insert(0, str(ROOT / "tests"))
        import triton_interpreter  # noqa: F401  (its numpy-2.4 fix for the interpreter)

        shapes = {name: TINY_SHAPES.get(name, (512, 64)) for name in shapes}
        rows_list = [min(r, 40) for r in rows_list]
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark runs on the GPU machine (--sass and --dry-run-cpu run anywhere)")
    else:
        device = torch.device("cuda")
    from kiln.weight_formats import FOUR_BIT

    unknown = [f for f in formats if f not in FOUR_BIT]
    if unknown:
        sys.exit(f"not 4-bit formats: {unknown}; these are {', '.join(FOUR_BIT)}")
    start = time.perf_counter()
    from kiln.ops.triton_plugins import INT4_LINEAR_CONFIGS

    report = {"environment": environment(device), "command": sys.argv, "copy_gb_s": round(copy_gb_s(device), 1),
              "configs": {f"config{i}": c for i, c in enumerate(INT4_LINEAR_CONFIGS)}, "results": [], "failures": []}
    print(json.dumps(report["environment"]), f"copy {report['copy_gb_s']} GB/s", flush=True)
    with torch.inference_mode():
        for fmt_name, (shape, (k, n)), rows in itertools.product(formats, shapes.items(), rows_list):
            try:
                row = run_case(fmt_name, shape, k, n, rows, device)
                report["results"].append(row)
                print(summary_line(row), flush=True)
            except Exception as e:  # noqa: BLE001 - record it, go on with the next case
                report["failures"].append({"case": f"{fmt_name} {shape} rows={rows}",
                                           "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
                print(f"FAILED {fmt_name} {shape} rows={rows}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            report["seconds"] = round(time.perf_counter() - start, 1)
            args.out.write_text(json.dumps(report, indent=1))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"wrote {args.out}: {len(report['results'])} cases, {len(report['failures'])} failed, "
          f"{report['seconds']:.0f} s; copy bandwidth {report['copy_gb_s']} GB/s")


if __name__ == "__main__":
    main()
