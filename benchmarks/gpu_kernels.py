"""Check and time kiln's Triton kernels on one GPU, against the implementations they replace.

For the attention shapes of SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B (bfloat16, KV blocks of 16):

- checks each Triton kernel against its plain-PyTorch reference on fresh random inputs (attention
  against the reference computed in float32 from the same bf16 inputs, outputs poisoned with NaN
  first; the elementwise kernels against the reference in bf16), and checks that the attention
  kernel replays correctly from a captured CUDA graph after its lengths change;
- times each kernel and the current implementation (``batched_decode`` for decode, the reference
  elsewhere) with ``triton.testing.do_bench`` (median, L2 flushed before each call), and reports
  bandwidth against the device's copy bandwidth measured in the same run (bytes read + written).

Every case runs on its own: a failure is recorded with its traceback and the next case runs. The full
results go to the JSON file named on the command line; a short table is printed last.

``--tune`` instead times every tunable config of each Triton plugin at a few shapes per model, with
``kiln.ops.timing.time_configs`` (the function a plan tuner calls), and prints the winners.

Usage:
  python benchmarks/gpu_kernels.py OUT.json [--models SmolLM2-135M,...] [--budget-s 240]
  python benchmarks/gpu_kernels.py OUT.json --tune [--models ...]
  python benchmarks/gpu_kernels.py OUT.json --dry-run-cpu   (every code path at tiny shapes, interpreted)
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int


MODELS = (
    ModelShape("SmolLM2-135M", 576, 9, 3, 64, 1536),
    ModelShape("Llama-3.2-1B", 2048, 32, 8, 64, 8192),
    ModelShape("Llama-3.1-8B", 4096, 32, 8, 128, 14336),
)
DTYPE = torch.bfloat16
BLOCK_SIZE = 16
DECODE_BATCHES = [1, 8, 32, 128, 256]
DECODE_CONTEXTS = [128, 1024, 4096]
ROW_COUNTS = [1, 64, 256, 2048]
# Packed steps with prefill: (name, seq_lens, q_lens).
PREFILL_STEPS = [
    ("prefill 1x2048", [2048], [2048]),
    ("prefill 16x128", [128] * 16, [128] * 16),
    ("mixed 2x512/2048 + 62 decodes@1024", [2048, 2048] + [1024] * 62, [512, 512] + [1] * 62),
]
# --tune: decode (batch, context) and prefill prompt lengths, rows of the elementwise kernels.
TUNE_DECODE = [(1, 4096), (16, 2048), (64, 1024), (256, 4096)]
TUNE_PREFILL = [[2048], [128] * 16]
TUNE_ROWS = [64, 2048]
WARMUP_MS, REP_MS = 10, 40
DEVICE = torch.device("cuda")


def use_tiny_cpu_shapes() -> None:
    """--dry-run-cpu: the same code paths on the CPU interpreter, at shapes it can run in seconds."""
    global MODELS, DEVICE, WARMUP_MS, REP_MS
    MODELS = (ModelShape("tiny", 64, 6, 2, 16, 96), ModelShape("tiny-d32", 64, 4, 4, 32, 64))
    DEVICE = torch.device("cpu")
    WARMUP_MS, REP_MS = 0, 1
    DECODE_BATCHES[:] = [1, 4]
    DECODE_CONTEXTS[:] = [20, 300]
    ROW_COUNTS[:] = [3]
    PREFILL_STEPS[:] = [("prefill 1x40", [40], [40]), ("mixed", [70, 9, 30], [20, 1, 1])]
    TUNE_DECODE[:] = [(2, 300)]
    TUNE_PREFILL[:] = [[40]]
    TUNE_ROWS[:] = [3]


# ---------------------------------------------------------------- measuring


def bench_ms(fn: Callable[[], Any]) -> float:
    from kiln.ops.timing import time_ms

    return time_ms(fn, DEVICE, WARMUP_MS, REP_MS)


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy of 1 GiB: bytes read + written over the median time."""
    src = torch.randn((256 if DEVICE.type == "cuda" else 1) * 1024 * 1024, device=DEVICE)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def matmul_tflops() -> float:
    n = 8192 if DEVICE.type == "cuda" else 256
    a = torch.randn(n, n, device=DEVICE, dtype=DTYPE)
    b = torch.randn(n, n, device=DEVICE, dtype=DTYPE)
    ms = bench_ms(lambda: a @ b)
    return 2 * n ** 3 / ms / 1e9


def slack() -> float:
    """Allowed bf16 error beyond the current implementation's; the CPU interpreter truncates bf16 (one step more)."""
    return 2e-3 if DEVICE.type == "cuda" else 2 ** -7


def errors(got: torch.Tensor, want: torch.Tensor) -> dict:
    """Relative error in norm, and the largest elementwise error over the largest reference value."""
    got, want = got.double(), want.double()
    diff = (got - want).abs()
    return {
        "rel_err": float(diff.norm() / want.norm().clamp_min(1e-30)),
        "max_rel_err": float(diff.max() / want.abs().max().clamp_min(1e-30)),
        "nan": bool(got.isnan().any()),
        "exact_fraction": float((got == want).double().mean()),
    }


# ---------------------------------------------------------------- cases


@dataclass
class Result:
    kind: str
    model: str
    case: str
    impl: str
    ms: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    bytes: int | None = None
    rel_err: float | None = None
    max_rel_err: float | None = None
    ok: bool | None = None
    note: str = ""


def attention_bytes(meta, m: ModelShape, num_tokens: int) -> int:
    """K/V read once per KV head and sequence, q read, out written (bf16)."""
    kv = sum(meta.seq_lens) * m.kv_heads * m.head_dim * 2 * 2
    return kv + 2 * num_tokens * m.heads * m.head_dim * 2


def attention_flops(meta, m: ModelShape) -> int:
    """Two products over the keys each query sees (causal)."""
    seen = 0
    for i, n in enumerate(meta.seq_lens):
        q = meta.query_start_loc[i + 1] - meta.query_start_loc[i]
        seen += q * (n - q) + q * (q + 1) // 2
    return 4 * seen * m.heads * m.head_dim


def attention_case(m: ModelShape, name: str, seq_lens: list[int], q_lens: list[int], config: dict,
                   window: int | None = None) -> list[Result]:
    from kiln.ops import get_op
    from kiln.ops.reference import paged_attention as reference
    from kiln.ops.sample_inputs import paged_batch
    from kiln.ops.triton_kernels.attention import num_decode_splits, paged_attention

    q, kc, vc, meta = paged_batch(seq_lens, q_lens, num_heads=m.heads, num_kv_heads=m.kv_heads, head_dim=m.head_dim,
                                  block_size=BLOCK_SIZE, dtype=DTYPE, device=DEVICE, table_dtype=torch.int64)
    scale = m.head_dim ** -0.5
    decode = len(q_lens) == sum(q_lens)
    kind = "decode" if decode else "prefill"
    note = ""
    if decode:
        splits = num_decode_splits(len(seq_lens), m.kv_heads, meta.block_tables.shape[1] * BLOCK_SIZE,
                                   q.device, config["max_splits"], config["split_min_tokens"])
        note = f"splits={splits}"
    want = reference(q.float(), kc.float(), vc.float(), meta, scale, window)
    out = torch.full_like(q, float("nan"))
    got = paged_attention(q, kc, vc, meta, scale, window, config, out=out)
    e = errors(got, want)
    # The unowned cache slots hold NaN: the current implementations read (and mask) them, the Triton kernel must not.
    kc.nan_to_num_(0.0)
    vc.nan_to_num_(0.0)
    current_name = "batched_decode" if decode else "reference"
    current = get_op("paged_attention").impls[current_name].fn
    e_cur = errors(current(q, kc, vc, meta, scale, window), want)
    ok = not e["nan"] and e["rel_err"] < 1e-2 and e["rel_err"] <= 1.5 * e_cur["rel_err"] + slack()
    nbytes = attention_bytes(meta, m, q.shape[0])
    flops = attention_flops(meta, m)
    triton_fn = get_op("paged_attention").impls["triton"].with_config(config)
    rows = []
    for impl, fn, err, good in (("triton", triton_fn, e, ok), (current_name, current, e_cur, None)):
        ms = bench_ms(lambda: fn(q, kc, vc, meta, scale, window))
        rows.append(Result(kind, m.name, name, impl, ms, nbytes / ms / 1e6, flops / ms / 1e9, nbytes,
                           err["rel_err"], err["max_rel_err"], good, note))
    return rows


def graph_replay_case(m: ModelShape, config: dict) -> list[Result]:
    """Capture decode and mixed attention in CUDA graphs, change lengths and tables in place, replay."""
    from kiln.ops import get_op
    from kiln.ops.reference import paged_attention as reference
    from kiln.ops.sample_inputs import paged_batch

    fn = get_op("paged_attention").impls["triton"].with_config(config)
    scale = m.head_dim ** -0.5
    rows = []
    for name, first, second in (
        ("graph decode", ([300, 2000, 64, 1], [1] * 4), ([1500, 17, 900, 4000], [1] * 4)),
        ("graph mixed", ([700, 40, 64], [100, 1, 30]), ([131, 300, 64], [3, 99, 29])),
    ):
        shape = dict(num_heads=m.heads, num_kv_heads=m.kv_heads, head_dim=m.head_dim, block_size=BLOCK_SIZE,
                     dtype=DTYPE, device=DEVICE, table_dtype=torch.int64, poison=False)
        q, kc, vc, meta = paged_batch(*first, **shape)
        q2, kc2, vc2, meta2 = paged_batch(*second, **shape)
        # One cache and one table shape for both steps, as a graph's static buffers.
        blocks = max(kc.shape[0], kc2.shape[0])
        width = max(meta.block_tables.shape[1], meta2.block_tables.shape[1])
        k_static = torch.zeros(blocks, *kc.shape[1:], dtype=DTYPE, device=DEVICE)
        v_static = torch.zeros_like(k_static)
        table = torch.zeros(len(first[0]), width, dtype=torch.int64, device=DEVICE)
        k_static[: kc.shape[0]] = kc
        v_static[: vc.shape[0]] = vc
        table[:, : meta.block_tables.shape[1]] = meta.block_tables
        meta.block_tables = table
        fn(q, k_static, v_static, meta, scale)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(q, k_static, v_static, meta, scale)
        k_static.zero_()
        v_static.zero_()
        k_static[: kc2.shape[0]] = kc2
        v_static[: vc2.shape[0]] = vc2
        table.zero_()
        table[:, : meta2.block_tables.shape[1]] = meta2.block_tables
        q.copy_(q2)
        meta.seq_lens_t.copy_(meta2.seq_lens_t)
        meta.query_start_loc_t.copy_(meta2.query_start_loc_t)
        graph.replay()
        want = reference(q2.float(), kc2.float(), vc2.float(), meta2, scale)
        e = errors(out, want)
        rows.append(Result("graph", m.name, name, "triton", rel_err=e["rel_err"], max_rel_err=e["max_rel_err"],
                           ok=not e["nan"] and e["rel_err"] < 1e-2))
    return rows


def elementwise_case(kind: str, m: ModelShape, rows: int, config: dict) -> list[Result]:
    """Triton plugin vs the reference in bf16 on the same inputs; both timed."""
    from kiln.ops import get_op
    from kiln.ops.sample_inputs import norm_batch, rotary_batch, silu_batch

    if kind == "rotary_and_write_kv_cache":
        args = rotary_batch(rows, num_heads=m.heads, num_kv_heads=m.kv_heads, head_dim=m.head_dim,
                            block_size=BLOCK_SIZE, dtype=DTYPE, device=DEVICE)
        qkv, cos_sin, kc, vc, slots, _ = args
        nbytes = (qkv.numel() + cos_sin.numel() + rows * (m.heads + 2 * m.kv_heads) * m.head_dim) * 2 + rows * 8
        # Each implementation writes its own copy of the cache; compared slot by slot after.
        caches = {impl: (kc.clone(), vc.clone()) for impl in ("triton", "reference")}
        outputs = {impl: get_op(kind).impls[impl].fn(qkv, cos_sin, *caches[impl], slots, m.heads)
                   for impl in caches}
        got = torch.cat([outputs["triton"].flatten(), caches["triton"][0].nan_to_num(0).flatten(),
                         caches["triton"][1].nan_to_num(0).flatten()])
        want = torch.cat([outputs["reference"].flatten(), caches["reference"][0].nan_to_num(0).flatten(),
                          caches["reference"][1].nan_to_num(0).flatten()])
    elif kind in ("rms_norm", "add_rms_norm"):
        x, residual, weight, eps = norm_batch(rows, m.hidden, dtype=DTYPE, device=DEVICE)
        args = (x, residual, weight, eps) if kind == "add_rms_norm" else (x, weight, eps)
        nbytes = (x.numel() * (4 if kind == "add_rms_norm" else 2) + weight.numel()) * 2
        got = get_op(kind).impls["triton"].fn(*args)
        want = get_op(kind).reference.fn(*args)
        if kind == "add_rms_norm":
            got, want = torch.cat([t.flatten() for t in got]), torch.cat([t.flatten() for t in want])
    else:
        args = silu_batch(rows, m.intermediate, dtype=DTYPE, device=DEVICE)
        nbytes = args[0].numel() * 2 * 3 // 2
        got = get_op(kind).impls["triton"].fn(*args)
        want = get_op(kind).reference.fn(*args)
    e = errors(got, want)
    # Exact for the rotary kernel; RMSNorm and SiLU within one bf16 step (rsqrt / exp differ in float32 bits).
    exact = kind == "rotary_and_write_kv_cache" and DEVICE.type == "cuda"
    ok = not e["nan"] and (e["max_rel_err"] == 0 if exact else e["max_rel_err"] <= 2 ** -6)
    out = []
    for impl in ("triton", "reference"):
        fn = get_op(kind).impls[impl].with_config(config if impl == "triton" else None)
        ms = bench_ms(lambda: fn(*args))
        row = Result(kind, m.name, f"rows={rows}", impl, ms, nbytes / ms / 1e6, None, nbytes)
        if impl == "triton":
            row.rel_err, row.max_rel_err, row.ok = e["rel_err"], e["max_rel_err"], ok
            row.note = f"exact={e['exact_fraction']:.3f}"
        out.append(row)
    return out


def all_cases(models: list[ModelShape]) -> list[tuple[str, Callable[[], list[Result]]]]:
    """Every case, a first pass of one case per kernel and path for each model before the full sweeps,
    so that a run stopped by its budget still covers every kernel."""
    from kiln.ops import get_op

    default = {op: get_op(op).impls["triton"].configs[0]
               for op in ("paged_attention", "rotary_and_write_kv_cache", "rms_norm", "add_rms_norm", "silu_and_mul")}
    att = default["paged_attention"]
    first, rest = [], []
    for m in models:
        if DEVICE.type == "cuda":
            first.append((f"{m.name} graph replay", lambda m=m: graph_replay_case(m, att)))
        for b in DECODE_BATCHES:
            for ctx in DECODE_CONTEXTS:
                core = (b, ctx) in ((DECODE_BATCHES[0], DECODE_CONTEXTS[-1]), (DECODE_BATCHES[-2], DECODE_CONTEXTS[1]))
                (first if core else rest).append((f"{m.name} decode b={b} ctx={ctx}", lambda m=m, b=b, ctx=ctx:
                                                  attention_case(m, f"b={b} ctx={ctx}", [ctx] * b, [1] * b, att)))
        b, ctx = DECODE_BATCHES[-1], DECODE_CONTEXTS[-1]
        rest.append((f"{m.name} decode b={b} ctx={ctx} window={ctx // 4}", lambda m=m, b=b, ctx=ctx: attention_case(
            m, f"b={b} ctx={ctx} win={ctx // 4}", [ctx] * b, [1] * b, att, ctx // 4)))
        for name, seq_lens, q_lens in PREFILL_STEPS:
            first.append((f"{m.name} {name}",
                          lambda m=m, n=name, s=seq_lens, q=q_lens: attention_case(m, n, s, q, att)))
        for kind in ("rotary_and_write_kv_cache", "add_rms_norm", "rms_norm", "silu_and_mul"):
            for i, rows in enumerate(ROW_COUNTS):
                (first if i == len(ROW_COUNTS) // 2 else rest).append((
                    f"{m.name} {kind} rows={rows}", lambda m=m, k=kind, r=rows: elementwise_case(k, m, r, default[k])))
    return first + rest


# ---------------------------------------------------------------- tuning


def tune(models: list[ModelShape], deadline: float) -> list[dict]:
    """Every config of every Triton plugin at a few shapes per model; the winner of each.

    Shapes not started by ``deadline`` (a perf_counter time) are recorded as skipped.
    """
    from kiln.ops import get_op
    from kiln.ops.sample_inputs import norm_batch, paged_batch, rotary_batch, silu_batch
    from kiln.ops.timing import fastest, time_configs

    found = []
    for m in models:
        heads = dict(num_heads=m.heads, num_kv_heads=m.kv_heads, head_dim=m.head_dim, block_size=BLOCK_SIZE,
                     dtype=DTYPE, device=DEVICE, poison=False)
        shapes: list[tuple[str, str, Callable[[], tuple]]] = []
        for b, ctx in TUNE_DECODE:
            shapes.append(("paged_attention", f"decode b={b} ctx={ctx}",
                           lambda b=b, ctx=ctx: (*paged_batch([ctx] * b, [1] * b, **heads), m.head_dim ** -0.5)))
        for lens in TUNE_PREFILL:
            shapes.append(("paged_attention", f"prefill {len(lens)}x{lens[0]}",
                           lambda lens=lens: (*paged_batch(lens, lens, **heads), m.head_dim ** -0.5)))
        for rows in TUNE_ROWS:
            shapes.append(("rotary_and_write_kv_cache", f"rows={rows}", lambda r=rows: rotary_batch(
                r, num_heads=m.heads, num_kv_heads=m.kv_heads, head_dim=m.head_dim, block_size=BLOCK_SIZE,
                dtype=DTYPE, device=DEVICE)))
            shapes.append(("add_rms_norm", f"rows={rows}",
                           lambda r=rows: norm_batch(r, m.hidden, dtype=DTYPE, device=DEVICE)))
            shapes.append(("silu_and_mul", f"rows={rows}",
                           lambda r=rows: silu_batch(r, m.intermediate, dtype=DTYPE, device=DEVICE)))
        for op, shape, make in shapes:
            if time.perf_counter() > deadline:
                found.append({"model": m.name, "op": op, "shape": shape, "skipped": "over budget"})
                continue
            try:
                args = make()
                results = time_configs(get_op(op).impls["triton"], args, DEVICE,
                                       warmup_ms=WARMUP_MS, rep_ms=REP_MS)
                best = fastest(results)
                default_ms = results[0][1]
                best_ms = min((ms for _, ms, _ in results if ms is not None), default=None)
                found.append({"model": m.name, "op": op, "shape": shape, "best": best, "best_ms": best_ms,
                              "default_ms": default_ms,
                              "results": [{"config": c, "ms": ms, "error": err} for c, ms, err in results]})
            except Exception as e:  # noqa: BLE001 - next shape
                found.append({"model": m.name, "op": op, "shape": shape, "error": f"{type(e).__name__}: {e}",
                              "traceback": traceback.format_exc(limit=6)})
            r = found[-1]
            if "skipped" in r:
                continue
            if "error" in r:
                print(f"TUNE FAIL {m.name} {op} {shape}: {r['error']}", flush=True)
            else:
                default_ms = f"{r['default_ms']:.4f}" if r["default_ms"] is not None else "failed"
                print(f"tune {m.name:<13} {op:<26} {shape:<22} default {default_ms} ms, best {r['best_ms']:.4f} ms "
                      f"with {_diff(get_op(op).impls['triton'].configs[0], r['best'])}", flush=True)
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
    return found


def _diff(default: dict, config: dict | None) -> str:
    if config is None:
        return "nothing (every config failed)"
    changed = {k: v for k, v in config.items() if default.get(k) != v}
    return json.dumps(changed) if changed else "the default"


# ---------------------------------------------------------------- main


def environment() -> dict:
    import triton

    if DEVICE.type != "cuda":
        return {"device": "cpu (dry run)", "torch": torch.__version__, "triton": triton.__version__}
    props = torch.cuda.get_device_properties(0)
    return {"device": torch.cuda.get_device_name(0), "capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count, "memory_gib": props.total_memory / 2 ** 30,
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="where to write the JSON results")
    parser.add_argument("--tune", action="store_true", help="time every config of each plugin instead")
    parser.add_argument("--models", default=",".join(m.name for m in MODELS))
    parser.add_argument("--budget-s", type=float, default=240, help="start no new case after this many seconds")
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="check this script's code paths on the CPU: Triton interpreter, tiny shapes")
    args = parser.parse_args()
    if args.dry_run_cpu:
        import os

        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        import triton_interpreter  # noqa: F401  (its numpy-2.4 fix for the interpreter)

        use_tiny_cpu_shapes()
        args.models = ",".join(m.name for m in MODELS)
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark runs on the GPU machine (benchmarks/compile_kernels.py runs anywhere)")
    names = args.models.split(",")
    models = [m for m in MODELS if m.name in names]
    if len(models) != len(names):
        sys.exit(f"unknown model in {names}; known: {[m.name for m in MODELS]}")
    start = time.perf_counter()
    report: dict[str, Any] = {"environment": environment(), "command": sys.argv}
    print(json.dumps(report["environment"]), flush=True)
    report["copy_gbps"] = copy_bandwidth_gbps()
    report["bf16_matmul_tflops"] = matmul_tflops()
    print(f"copy bandwidth {report['copy_gbps']:.0f} GB/s, bf16 matmul {report['bf16_matmul_tflops']:.0f} TFLOP/s",
          flush=True)
    if args.tune:
        report["tune"] = tune(models, start + args.budget_s)
        report["seconds"] = time.perf_counter() - start
        args.out.write_text(json.dumps(report, indent=1))
        skipped = sum("skipped" in r for r in report["tune"])
        print(f"wrote {args.out} in {report['seconds']:.0f} s; {skipped} shapes skipped (over budget)")
        return
    results: list[Result] = []
    failures: list[dict] = []
    skipped: list[str] = []
    for name, run in all_cases(models):
        if time.perf_counter() - start > args.budget_s:
            skipped.append(name)
            continue
        try:
            rows = run()
            results.extend(rows)
            for r in rows:
                print(_row(r, report["copy_gbps"]), flush=True)
        except Exception as e:  # noqa: BLE001 - record it, go on with the next case
            failures.append({"case": name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
            print(f"FAILED {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        # Written after every case, so a run cut short still leaves its results.
        report.update(results=[asdict(r) for r in results], failures=failures, seconds=time.perf_counter() - start)
        args.out.write_text(json.dumps(report, indent=1))
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    report.update(results=[asdict(r) for r in results], failures=failures, skipped=skipped,
                  seconds=time.perf_counter() - start)
    args.out.write_text(json.dumps(report, indent=1))
    _summary(results, failures, skipped, report)


def _row(r: Result, copy_gbps: float) -> str:
    ms = f"{r.ms * 1000:9.1f}us" if r.ms is not None else " " * 11
    bw = f"{r.gbps:6.0f}GB/s {100 * r.gbps / copy_gbps:3.0f}%" if r.gbps is not None else " " * 15
    tf = f"{r.tflops:5.0f}TF" if r.tflops is not None and r.kind == "prefill" else " " * 7
    err = f"err {r.rel_err:.1e}/{r.max_rel_err:.1e}" if r.rel_err is not None else " " * 20
    ok = {True: "ok", False: "BAD", None: ""}[r.ok]
    return f"{r.kind[:8]:<8} {r.model[:12]:<12} {r.case[:28]:<28} {r.impl[:14]:<14}{ms} {bw} {tf} {err} {ok} {r.note}"


def _summary(results: list[Result], failures: list[dict], skipped: list[str], report: dict) -> None:
    """The short table: per cell 'triton microseconds, speedup over the current implementation, % of copy bandwidth'."""
    copy = report["copy_gbps"]
    print(f"\n==== {report['environment']['device']}: copy {copy:.0f} GB/s, bf16 matmul "
          f"{report['bf16_matmul_tflops']:.0f} TFLOP/s, {report['seconds']:.0f} s ====")
    print("cells: Triton us / speedup vs current (batched_decode for decode, reference otherwise) "
          "/ % of copy bandwidth")
    pairs: dict[tuple, dict[str, Result]] = {}
    for r in results:
        pairs.setdefault((r.kind, r.model, r.case), {})[r.impl] = r

    def cell(kind: str, model: str, case: str, flops: bool = False) -> str:
        impls = pairs.get((kind, model, case))
        if not impls or impls.get("triton") is None or impls["triton"].ms is None:
            return "-"
        t = impls["triton"]
        cur = next((r for i, r in impls.items() if i != "triton"), None)
        speed = f"{cur.ms / t.ms:.2f}x" if cur is not None and cur.ms else "?"
        rate = f"{t.tflops:.0f}TF" if flops else f"{100 * t.gbps / copy:.0f}%"
        return f"{t.ms * 1000:.1f}/{speed}/{rate}" + ("" if t.ok is not False else " BAD")

    models = list(dict.fromkeys(r.model for r in results))
    print("decode attention    " + "".join(f"{f'ctx={c}':>22}" for c in DECODE_CONTEXTS))
    for m in models:
        for b in DECODE_BATCHES:
            cells = "".join(f"{cell('decode', m, f'b={b} ctx={c}'):>22}" for c in DECODE_CONTEXTS)
            print(f"{m[:13]:<13} b={b:<4}{cells}")
    windowed = [(r.model, r.case) for r in results if r.kind == "decode" and "win=" in r.case and r.impl == "triton"]
    for m, case in windowed:
        print(f"{m[:13]:<13} {case}: {cell('decode', m, case)}")
    print("prefill attention (cells end in TFLOP/s)" + "".join(f" | {n}" for n, _, _ in PREFILL_STEPS))
    for m in models:
        print(f"{m[:13]:<13} " + "  ".join(cell("prefill", m, n, flops=True) for n, _, _ in PREFILL_STEPS))
    print("elementwise         " + "".join(f"{f'rows={r}':>20}" for r in ROW_COUNTS))
    for m in models:
        for kind in ("rotary_and_write_kv_cache", "add_rms_norm", "rms_norm", "silu_and_mul"):
            print(f"{m[:8]:<8} {kind[:10]:<10} " + "".join(f"{cell(kind, m, f'rows={r}'):>20}" for r in ROW_COUNTS))
    for r in results:
        if r.kind == "graph":
            print(f"CUDA graph replay {r.model} {r.case}: rel_err {r.rel_err:.1e} {'ok' if r.ok else 'BAD'}")
    checked = [r for r in results if r.ok is not None]
    for kind in dict.fromkeys(r.kind for r in checked):
        errs = [r.rel_err for r in checked if r.kind == kind and r.rel_err is not None]
        print(f"{kind}: worst relative error {max(errs):.1e} over {len(errs)} checks")
    bad = [r for r in checked if r.ok is False]
    for r in bad:
        print(f"BAD {r.kind} {r.model} {r.case}: rel_err {r.rel_err:.2e}, max_rel_err {r.max_rel_err:.2e}")
    print(f"{len(checked)} checks, {len(bad)} outside tolerance, {len(failures)} cases failed, "
          f"{len(skipped)} skipped (over budget)")
    for f in failures:
        last = f["traceback"].strip().splitlines()[-3:]
        print(f"FAILED {f['case']}: {' | '.join(line.strip() for line in last)}"[:600])
    if skipped:
        print("skipped:", ", ".join(skipped[:8]), "..." if len(skipped) > 8 else "")

if __name__ == "__main__":
    main()
