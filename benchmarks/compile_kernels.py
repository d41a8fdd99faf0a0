"""Compile every Triton kernel launch of the GPU benchmark's shapes for Hopper, on a machine without a GPU.

Each plugin runs on small CPU tensors of the real shapes (strides and dtypes as on the GPU) while
Triton's launch is replaced by an offline compile for sm_90: the same specialization (argument
alignment, divisibility by 16), options and compiler passes a real launch uses, then ``ptxas -v``
on the PTX. Prints per kernel variant: registers, spills, shared memory, and whether the matrix
products use Hopper's wgmma. Costs no GPU time; run it before asking for some.

Usage: python benchmarks/compile_kernels.py [--arch 90] [--all-configs] [--dump DIR]
(--dump writes each variant's PTX and SASS, disassembled with the nvdisasm Triton ships.)
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


@contextlib.contextmanager
def offline_compile(arch: int, reports: list[dict], dump: Path | None = None):
    """Replace Triton kernel launches with compiles for ``sm_<arch>``; append one report per new variant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    seen: set = set()
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kwargs.setdefault("debug", False)
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
        key = (self.fn.__name__, str(signature), str(constexprs), str(attrs), str(options))
        if key in seen:
            return None
        seen.add(key)
        report = {"index": len(reports), "kernel": self.fn.__name__,
                  "grid": tuple(grid) if not callable(grid) else "fn",
                  "constexprs": {self.arg_names[k[0]]: v for k, v in constexprs.items()},
                  "num_warps": options.num_warps, "num_stages": options.num_stages}
        try:
            compiled = triton_compile(ASTSource(self, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
            ptx = compiled.asm["ptx"]
            report["wgmma"] = "wgmma" in ptx
            report["mma_sync"] = "mma.sync" in ptx
            report["shared_bytes"] = compiled.metadata.shared
            report.update(_ptxas_report(ptxas, ptx, arch))
            if dump is not None:
                _dump(dump, f"{len(reports):03d}_{self.fn.__name__}", compiled, ptxas.parent / "nvdisasm")
        except Exception as e:  # noqa: BLE001 - one failing variant must not hide the others
            report["error"] = f"{type(e).__name__}: {str(e)[:4000]}"
            report["traceback"] = traceback.format_exc(limit=4)
        reports.append(report)
        return None

    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original


def _dump(folder: Path, stem: str, compiled, nvdisasm: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.ptx").write_text(compiled.asm["ptx"])
    cubin = folder / f"{stem}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    sass = subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True)
    (folder / f"{stem}.sass").write_text(sass.stdout or sass.stderr)


def _ptxas_report(ptxas: Path, ptx: str, arch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        suffix = "a" if arch >= 90 else ""
        r = subprocess.run([str(ptxas), f"-arch=sm_{arch}{suffix}", "-v", str(src), "-o", os.devnull],
                           capture_output=True, text=True)
    text = r.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill_st = re.search(r"(\d+) bytes spill stores", text)
    spill_ld = re.search(r"(\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    out = {"registers": int(regs.group(1)) if regs else None,
           "spill_bytes": (int(spill_st.group(1)) if spill_st else 0) + (int(spill_ld.group(1)) if spill_ld else 0),
           "stack_bytes": int(stack.group(1)) if stack else 0}
    if r.returncode:
        out["error"] = f"ptxas failed: {text[-2000:]}"
    return out


def launches(configs_per_op: bool) -> None:
    """Call every plugin at the benchmark's shapes (small caches: only strides matter to the compiler)."""
    from gpu_kernels import MODELS
    from kiln.ops import get_op
    from kiln.ops.sample_inputs import norm_batch, paged_batch, rotary_batch, silu_batch

    dev = torch.device("cpu")
    for m in MODELS:
        for dtype in (torch.bfloat16,):
            shape = dict(num_heads=m.heads, num_kv_heads=m.kv_heads, head_dim=m.head_dim, block_size=16,
                         dtype=dtype, device=dev, poison=False)
            attention = get_op("paged_attention").impls["triton"]
            configs = attention.configs if configs_per_op else attention.configs[:1]
            steps = [
                ([64] * 2, [1] * 2, None),  # decode, split-K
                ([64] * 256, [1] * 256, None),  # decode, no split
                ([64, 48], [64, 16], None),  # prefill / mixed
                ([64], [64], None),  # one sequence: Triton specializes integer arguments equal to 1
                ([64] * 2, [1] * 2, 32),  # windowed decode
                ([64, 48], [64, 16], 32),  # windowed prefill
            ]
            for seq_lens, q_lens, window in steps:
                q, kc, vc, meta = paged_batch(seq_lens, q_lens, **shape)
                # Make the block table as wide as a 4096-token context, so split-K engages.
                meta.block_tables = meta.block_tables[:, :1].repeat(1, 256).contiguous()
                for config in configs:
                    attention.with_config(config)(q, kc, vc, meta, m.head_dim ** -0.5, window)
            args = rotary_batch(4, num_heads=m.heads, num_kv_heads=m.kv_heads, head_dim=m.head_dim, block_size=16,
                                dtype=dtype, device=dev)
            impl = get_op("rotary_and_write_kv_cache").impls["triton"]
            for config in impl.configs if configs_per_op else impl.configs[:1]:
                impl.with_config(config)(*args)
            x, residual, weight, eps = norm_batch(4, m.hidden, dtype=dtype, device=dev)
            for op, a in (("rms_norm", (x, weight, eps)), ("add_rms_norm", (x, residual, weight, eps))):
                impl = get_op(op).impls["triton"]
                for config in impl.configs if configs_per_op else impl.configs[:1]:
                    impl.with_config(config)(*a)
            impl = get_op("silu_and_mul").impls["triton"]
            for config in impl.configs if configs_per_op else impl.configs[:1]:
                impl.with_config(config)(*silu_batch(4, m.intermediate, dtype=dtype, device=dev))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--all-configs", action="store_true", help="compile every tunable config, not only defaults")
    parser.add_argument("--dump", type=Path, help="write each variant's PTX, cubin and SASS here")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("unset TRITON_INTERPRET: this compiles the kernels")
    reports: list[dict] = []
    with offline_compile(args.arch, reports, args.dump):
        launches(args.all_configs)
    failed = 0
    for r in reports:
        c = r["constexprs"]
        keys = ("HEAD_DIM", "GROUP", "BLOCK_M", "TILE_N", "DECODE", "NUM_SPLITS", "HAS_WINDOW", "BLOCK", "NUM_HEADS")
        brief = " ".join(f"{k}={c[k]}" for k in keys if k in c)
        if "error" in r:
            failed += 1
            print(f"FAIL {r['kernel']} {brief} warps={r['num_warps']}: {r['error']}\n{r.get('traceback', '')}")
            continue
        mma = "wgmma" if r["wgmma"] else ("mma.sync" if r["mma_sync"] else "-")
        print(f"{r['index']:03d} {r['kernel']:<28} {brief:<70} warps={r['num_warps']} stages={r['num_stages']} "
              f"regs={r['registers']} spill={r['spill_bytes']}B smem={r['shared_bytes']}B mma={mma}")
    print(f"{len(reports)} variants compiled for sm_{args.arch}, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
