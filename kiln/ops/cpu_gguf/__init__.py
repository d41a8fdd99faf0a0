"""Matrix products on the CPU that read GGUF (llama.cpp) block-quantized weights as the file stores them.

``matmul(x, w, fmt, out_features, in_features)`` is ``x @ dequant(w).T`` for a weight of
``out_features`` rows, each row its ``in_features / block`` blocks in ggml's layout, without ever
dequantizing: the activations are quantized to int8 once per call and the kernels take integer dot
products against the weight blocks, as llama.cpp does (``gguf_kernels.cpp`` says how). Decode reads
each weight byte once, so a 4-bit weight costs about a seventh of the memory traffic of float32.
``repack_rows4`` and ``matmul_rows4``: q4_0, q4_1 and q4_k repacked in groups of four rows, which the kernels
read faster.

The kernels are a C++ extension built at first use for the machine's own instruction set
(``kiln.ops.cpp_extension``: AVX-512 VNNI, AVX-VNNI, AVX2, or plain C++ elsewhere; ``KILN_GGUF_MARCH``
builds for another -march). ``available()`` says whether the build worked here; it never raises.
"""
from __future__ import annotations

from pathlib import Path

import torch

from kiln.ops.cpp_extension import CppExtension
from kiln.weight_formats import FORMATS as WEIGHT_FORMATS
from kiln.weight_formats import BlockFormat

FORMATS = ("q4_0", "q4_1", "q8_0", "q4_k", "q5_k", "q6_k")
WIDE_FORMATS = ("q4_0", "q4_1", "q8_0", "q4_k")  # the formats matmul also takes with int16 activations


# The formats' block sizes and bytes are kiln.weight_formats'; this order is the kernels' format index.
BLOCK_FORMATS: dict[str, BlockFormat] = {fmt: WEIGHT_FORMATS[fmt] for fmt in FORMATS}
_SPECS: dict[str, tuple[int, BlockFormat]] = {fmt: (i, BLOCK_FORMATS[fmt]) for i, fmt in enumerate(FORMATS)}
_HERE = Path(__file__).parent
# torch.ops.kiln_gguf.matmul once the extension is loaded (looked up once: the lookup costs as
# much as the checks).
_matmul_op = None
_matmul_rows4_op = None
_SOURCES = ("gguf_kernels.cpp", "gguf_binding.cpp")
_HEADERS = ("gguf_kernels.h", "simd.h")


def _after_load() -> str:
    torch.library.register_fake("kiln_gguf::matmul")(_fake_matmul)
    torch.library.register_fake("kiln_gguf::matmul_rows4")(_fake_matmul_rows4)
    global _matmul_op, _matmul_rows4_op
    _matmul_op = torch.ops.kiln_gguf.matmul
    _matmul_rows4_op = torch.ops.kiln_gguf.matmul_rows4
    return torch.ops.kiln_gguf.isa()


def _fake_matmul(x: torch.Tensor, w: torch.Tensor, fmt: int, out_features: int, in_features: int,
                 act_bits: int) -> torch.Tensor:
    # Shapes for torch.compile's tracing: the op is opaque to it.
    return x.new_empty((x.shape[0], out_features))


def _fake_matmul_rows4(x: torch.Tensor, w4: torch.Tensor, fmt: int, out_features: int, in_features: int,
                       act_bits: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


_EXTENSION = CppExtension("kiln_gguf", _HERE, _SOURCES, _HEADERS, "KILN_GGUF_MARCH", _after_load,
                          "GGUF CPU kernels")
_load = _EXTENSION.load


def available() -> bool:
    """True when the extension compiled and loaded on this machine (builds it on first call)."""
    return _load() is not None


def isa() -> str | None:
    """Which instruction set the loaded kernels use, or None when unavailable."""
    return _load()


def _check_x(x: torch.Tensor, in_features: int) -> None:
    if x.dtype != torch.float32 or not x.is_cpu or x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(
            f"x must be a CPU float32 tensor [M, {in_features}], got {x.dtype} {tuple(x.shape)} on {x.device}")


def _check_weight(w: torch.Tensor, fmt: str, out_features: int, in_features: int) -> None:
    bf = BLOCK_FORMATS[fmt]
    row_bytes = in_features // bf.block * bf.type_size
    if w.dtype != torch.uint8 or not w.is_cpu or w.shape != (out_features, row_bytes):
        raise ValueError(
            f"{fmt} weight for {out_features}x{in_features} must be a CPU uint8 tensor [{out_features}, {row_bytes}], "
            f"got {w.dtype} {tuple(w.shape)} on {w.device}"
        )


def matmul(x: torch.Tensor, w: torch.Tensor, fmt: str, out_features: int, in_features: int,
           act_bits: int = 8) -> torch.Tensor:
    """``x @ dequant(w).T``: x [M, K] float32, w [N, K / block * block bytes] uint8 in GGUF's row layout.

    Returns [M, N] float32. The activations go through ``act_bits``-bit integers (a scale per 32 values, or
    per 256 for the K-quants), so results differ from the float product by that rounding: with 8 bits
    (every format) as llama.cpp's do; with 16 (``WIDE_FORMATS`` only) by about 1/256 of that, finer than
    bfloat16 activations.
    """
    # NOTE: a decode step makes hundreds of these calls, so the checks stick to cheap attributes
    # (x.device builds an object; x.is_cpu does not).
    spec = _SPECS.get(fmt)
    if spec is None:
        raise ValueError(f"unknown GGUF format {fmt!r}; expected one of {', '.join(FORMATS)}")
    index, bf = spec
    if act_bits != 8 and (act_bits != 16 or fmt not in WIDE_FORMATS):
        raise ValueError(f"{fmt}: activations of {act_bits} bits; 8 for every format, 16 for "
                         f"{', '.join(WIDE_FORMATS)}")
    if in_features <= 0 or in_features % bf.block:
        raise ValueError(f"{fmt}: in_features must be a positive multiple of {bf.block}, got {in_features}")
    _check_x(x, in_features)
    _check_weight(w, fmt, out_features, in_features)
    op = _matmul_op
    if op is None:
        if _load() is None:
            raise RuntimeError("the GGUF CPU kernels could not be built here; check available() first")
        op = _matmul_op
    return op(x if x.is_contiguous() else x.contiguous(), w if w.is_contiguous() else w.contiguous(), index,
              out_features, in_features, act_bits)


# Weights repacked in groups of four rows (gguf_kernels.cpp says how, at matmul_rows4): each format's bytes per
# four-row group and block (q4_0, q4_1: GGUF's 4 x 18, 4 x 20; q4_k: 592 against 4 x 144).
ROWS4_BLOCK_BYTES = {"q4_0": 72, "q4_1": 80, "q4_k": 592}
ROWS4_FORMATS = tuple(ROWS4_BLOCK_BYTES)


def rows4_bytes(fmt: str, out_features: int, in_features: int) -> int:
    return (out_features + 3) // 4 * (in_features // BLOCK_FORMATS[fmt].block) * ROWS4_BLOCK_BYTES[fmt]


def repack_rows4(w: torch.Tensor, fmt: str, out_features: int, in_features: int) -> torch.Tensor:
    """A ``fmt`` weight [out_features, row bytes] in GGUF's layout, repacked for ``matmul_rows4`` (1-D uint8)."""
    if fmt not in ROWS4_FORMATS:
        raise ValueError(f"{fmt}: the rows-of-four layout is for {', '.join(ROWS4_FORMATS)} only")
    _check_weight(w, fmt, out_features, in_features)
    if _load() is None:
        raise RuntimeError("the GGUF CPU kernels could not be built here; check available() first")
    return torch.ops.kiln_gguf.repack_rows4(w.contiguous(), _SPECS[fmt][0], out_features, in_features)


def matmul_rows4(x: torch.Tensor, w4: torch.Tensor, fmt: str, out_features: int, in_features: int,
                 act_bits: int = 8) -> torch.Tensor:
    """``matmul`` over a weight ``repack_rows4`` made: x [M, K] float32 -> [M, N] float32, with int8 or int16
    activations (``act_bits`` 8 or 16; the same rounding as ``matmul``'s)."""
    if fmt not in ROWS4_FORMATS:
        raise ValueError(f"{fmt}: the rows-of-four layout is for {', '.join(ROWS4_FORMATS)} only")
    if act_bits not in (8, 16):
        raise ValueError(f"activations of {act_bits} bits; 8 or 16")
    block = BLOCK_FORMATS[fmt].block
    if in_features <= 0 or in_features % block:
        raise ValueError(f"{fmt}: in_features must be a positive multiple of {block}, got {in_features}")
    _check_x(x, in_features)
    size = rows4_bytes(fmt, out_features, in_features)
    if w4.dtype != torch.uint8 or not w4.is_cpu or w4.shape != (size,):
        raise ValueError(f"w4 must be repack_rows4's CPU uint8 tensor of {size} bytes for {fmt} "
                         f"{out_features}x{in_features}, got {w4.dtype} {tuple(w4.shape)} on {w4.device}")
    op = _matmul_rows4_op
    if op is None:
        if _load() is None:
            raise RuntimeError("the GGUF CPU kernels could not be built here; check available() first")
        op = _matmul_rows4_op
    return op(x if x.is_contiguous() else x.contiguous(), w4, _SPECS[fmt][0], out_features, in_features, act_bits)
