"""The CPU GGUF kernels (kiln/ops/cpu_gguf) at SmolLM2-135M's and Llama-3.2-1B's linear shapes: time per
call and effective weight bandwidth, beside torch's float32 F.linear and its int4 weight-only kernel; the
formats that also take int16 activations (cpu_gguf.WIDE_FORMATS) twice, int8 ("q4_k") and int16 ("q4_k int16"),
and q4_0, q4_1, q4_k also repacked in rows of four (cpu_gguf.matmul_rows4: "q4_k rows4", "q4_k rows4 int16").

    python benchmarks/cpu_gguf_kernels.py [--threads 2] [--rows 1 8] [--set-mb 512] [--formats q4_0 ...]

Each implementation rotates over copies of its weight that together make up --set-mb, so that the
weights stream from memory as a whole model's do, not from cache; a cell is the median call over
several passes (time slices lost to other processes drop out). GB/s is weight bytes read per second:
the format's bytes (q4_0: 18 per 32 weights), 4 per weight for float32, and for the int4 kernel its
packed nibbles plus bfloat16 scales and zeros per 32. The machine's copy bandwidth
(bytes read plus bytes written per second, one large torch copy) is the ceiling to compare with.
K-quants need K to be a multiple of 256, so SmolLM2's K=576 shapes have none (GGUF files store
those tensors in another type).
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from kiln.engine.target import device_name
from kiln.ops import cpu_gguf


@dataclass(frozen=True, slots=True)
class Shape:
    model: str
    k: int  # in_features
    n: int  # out_features


SHAPES = [
    Shape("SmolLM2-135M", 576, 576),
    Shape("SmolLM2-135M", 576, 1728),
    Shape("SmolLM2-135M", 576, 3072),
    Shape("SmolLM2-135M", 1536, 576),
    Shape("SmolLM2-135M", 576, 49152),
    Shape("Llama-3.2-1B", 2048, 6144),
    Shape("Llama-3.2-1B", 2048, 16384),
    Shape("Llama-3.2-1B", 8192, 2048),
]
INT4_GROUP = 32


@dataclass(slots=True)
class Candidate:
    name: str
    weights: list[torch.Tensor]
    nbytes: int  # bytes one call reads from its weight
    call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, weight) -> y


def copy_bandwidth(mb: int = 512) -> float:
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * src.numel() * 4 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def copies(weight: torch.Tensor, nbytes: int, set_mb: int) -> list[torch.Tensor]:
    count = max(1, set_mb * 2**20 // max(nbytes, 1))
    return [weight] + [weight.clone() for _ in range(count - 1)]


def random_blocks(fmt: str, n: int, k: int) -> torch.Tensor:
    """Random quants with small positive fp16 scales where ggml keeps them: valid blocks to time."""
    bf = cpu_gguf.BLOCK_FORMATS[fmt]
    nb = k // bf.block
    w = torch.randint(0, 256, (n, nb, bf.type_size), dtype=torch.uint8)

    def halves() -> torch.Tensor:
        return (torch.rand(n, nb) * 0.02 + 1e-3).to(torch.float16).view(torch.uint8).view(n, nb, 2)

    if fmt == "q6_k":
        w[..., 208:210] = halves()
    else:
        w[..., 0:2] = halves()
    if fmt in ("q4_1", "q4_k", "q5_k"):
        w[..., 2:4] = halves()
    return w.reshape(n, -1)


def candidates(shape: Shape, formats: list[str], set_mb: int) -> list[Candidate]:
    k, n = shape.k, shape.n
    out = []
    w32 = torch.randn(n, k)
    out.append(Candidate("fp32 F.linear", copies(w32, w32.numel() * 4, set_mb), w32.numel() * 4, lambda x, w: F.linear(x, w)))
    if k % INT4_GROUP == 0:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
        scales_zeros = (torch.rand(k // INT4_GROUP, n, 2) * 0.02).to(torch.bfloat16)
        nbytes = packed.numel() * packed.element_size() + scales_zeros.numel() * 2

        def int4(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor = scales_zeros) -> torch.Tensor:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), w, INT4_GROUP, sz)

        out.append(Candidate("int4pack bf16", copies(packed, nbytes, set_mb), nbytes, int4))
    for fmt in formats:
        if k % cpu_gguf.BLOCK_FORMATS[fmt].block:
            out.append(Candidate(fmt, [], 0, lambda x, w: x))
            continue
        w = random_blocks(fmt, n, k)
        weights = copies(w, w.numel(), set_mb)
        for bits in (8, 16) if fmt in cpu_gguf.WIDE_FORMATS else (8,):

            def gguf(x: torch.Tensor, w: torch.Tensor, fmt: str = fmt, bits: int = bits) -> torch.Tensor:
                return cpu_gguf.matmul(x, w, fmt, n, k, bits)

            out.append(Candidate(fmt if bits == 8 else f"{fmt} int16", weights, w.numel(), gguf))
        if fmt in cpu_gguf.ROWS4_FORMATS:
            w4 = cpu_gguf.repack_rows4(w, fmt, n, k)
            weights4 = copies(w4, w4.numel(), set_mb)
            for bits in (8, 16):

                def rows4(x: torch.Tensor, w: torch.Tensor, fmt: str = fmt, bits: int = bits) -> torch.Tensor:
                    return cpu_gguf.matmul_rows4(x, w, fmt, n, k, bits)

                out.append(Candidate(f"{fmt} rows4" + (" int16" if bits == 16 else ""), weights4, w4.numel(), rows4))
    return out


def time_per_call(c: Candidate, x: torch.Tensor, min_seconds: float = 0.25, min_passes: int = 3) -> float:
    """Median call over passes across all copies: robust to a thread of the call losing its core
    to another process for a time slice, which stalls the whole parallel region."""
    for w in c.weights:
        c.call(x, w)
    times: list[float] = []
    spent, passes = 0.0, 0
    while passes < min_passes or spent < min_seconds:
        for w in c.weights:
            t = time.perf_counter()
            c.call(x, w)
            times.append(time.perf_counter() - t)
        spent, passes = spent + sum(times[-len(c.weights):]), passes + 1
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="activation rows per call (M)")
    p.add_argument("--set-mb", type=int, default=512, help="MB of weight copies each implementation rotates over")
    p.add_argument("--formats", nargs="+", default=list(cpu_gguf.FORMATS), choices=cpu_gguf.FORMATS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_gguf.available():
        raise SystemExit("the GGUF CPU kernels could not be built on this machine")
    print(f"{device_name(torch.device('cpu'))}; kernels: {cpu_gguf.isa()}; torch {torch.__version__}; {args.threads} threads")
    print(f"copy bandwidth: {copy_bandwidth():.1f} GB/s (read + written)")
    print("cells: microseconds per call / effective weight GB/s\n")
    results: dict[tuple[Shape, int], list[tuple[str, float | None, int]]] = {}
    names: list[str] = []
    for shape in SHAPES:
        cands = candidates(shape, args.formats, args.set_mb)
        names = [c.name for c in cands]
        for m in args.rows:
            x = torch.randn(m, shape.k)
            results[(shape, m)] = [(c.name, time_per_call(c, x) if c.weights else None, c.nbytes) for c in cands]
        del cands
    for m in args.rows:
        print(f"M = {m}")
        print("| model | K x N | " + " | ".join(names) + " |")
        print("|---|---|" + "---|" * len(names))
        for shape in SHAPES:
            cells = []
            for _, t, nbytes in results[(shape, m)]:
                cells.append("n/a" if t is None else f"{t * 1e6:.0f} / {nbytes / t / 1e9:.1f}")
            print(f"| {shape.model} | {shape.k}x{shape.n} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
