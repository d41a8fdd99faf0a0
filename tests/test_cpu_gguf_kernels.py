"""The CPU GGUF kernels (kiln/ops/cpu_gguf) against the gguf package's own dequantization.

Weights are real GGUF blocks: float weights quantized by gguf.quants where the package can
(q4_0, q4_1, q8_0), random but valid blocks for the K-quants. Two checks per case:

- against the float product ``x @ dequant(w).T``. The kernels round each activation to int8 with a
  scale d = max|x| / 127 per group (32 values, or 256 for the K-quants; int16 and 32767 with
  ``act_bits=16``, which q4_0, q4_1 and q4_k take), an error e_k uniform in
  [-d/2, d/2] and independent of the weights, so an output's error has standard deviation
  sigma = sqrt(sum_k w_k^2 d_k^2 / 12), computed per output from the actual groups. The test allows
  6 sigma (plus float32 rounding): a real bug (a wrong nibble, bit or scale) is off by about
  |x| |w| / sqrt(K), a hundred sigma or more;
- against the same product with the activations rounded exactly as documented (numpy, half to
  even): only float32 summation order may differ, so the tolerance is 1e-5 of |x| |w|.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from kiln.ops import cpu_gguf

QTYPES = {"q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q8_0": Q.Q8_0, "q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K}
# Values per activation scale: llama.cpp's Q8_0 for the 32-weight formats, Q8_K for the K-quants.
ACT_GROUP = {"q4_0": 32, "q4_1": 32, "q8_0": 32, "q4_k": 256, "q5_k": 256, "q6_k": 256}
SIGMAS = 6.0
FLOAT_RTOL = 1e-5


def make_weights(fmt: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[n, k / block * block bytes] uint8 of valid GGUF blocks."""
    qtype = QTYPES[fmt]
    if fmt in ("q4_0", "q4_1", "q8_0"):
        return gguf.quants.quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32), qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    nb = n * k // block
    raw = rng.integers(0, 256, size=(nb, size), dtype=np.uint8)  # quants, packed 6-bit scales and mins

    def halves() -> np.ndarray:
        return rng.uniform(1e-3, 2e-2, nb).astype(np.float16).view(np.uint8).reshape(nb, 2)

    if fmt == "q6_k":
        raw[:, 208:210] = halves()  # d; the 16 int8 scales stay random
    else:
        raw[:, 0:2] = halves()  # d
        raw[:, 2:4] = halves()  # dmin
    return raw.reshape(n, -1)


def dequantize(fmt: str, w: np.ndarray, k: int) -> np.ndarray:
    return gguf.quants.dequantize(w, QTYPES[fmt]).reshape(w.shape[0], k).astype(np.float64)


def quantize_activations(x: np.ndarray, group: int, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """``bits``-bit values [M, G, group] and scales [M, G, 1] as the kernels make them, in float32 as they do."""
    top = np.float32(2 ** (bits - 1) - 1)
    g = x.astype(np.float32).reshape(x.shape[0], -1, group)
    amax = np.abs(g).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, top / amax, np.float32(0)).astype(np.float32)
    return np.clip(np.rint(g * inv), -top, top), amax / top


def check(fmt: str, x: np.ndarray, w: np.ndarray, n: int, k: int, act_bits: int = 8, rows4: bool = False) -> None:
    """``rows4``: through the weight repacked in rows of four (``matmul_rows4``) instead of GGUF's layout."""
    deq = dequantize(fmt, w, k)
    if rows4:
        w4 = cpu_gguf.repack_rows4(torch.from_numpy(w), fmt, n, k)
        out = cpu_gguf.matmul_rows4(torch.from_numpy(x), w4, fmt, n, k, act_bits).double().numpy()
    else:
        out = cpu_gguf.matmul(torch.from_numpy(x), torch.from_numpy(w), fmt, n, k, act_bits).double().numpy()
    assert out.shape == (x.shape[0], n)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)[:, None] * np.linalg.norm(deq, axis=1)[None, :]
    group = ACT_GROUP[fmt]
    q, d = quantize_activations(x, group, act_bits)

    exact = x.astype(np.float64) @ deq.T
    w2 = (deq**2).reshape(n, -1, group).sum(axis=-1)  # [N, G]
    sigma = np.sqrt((d[..., 0].astype(np.float64) ** 2 / 12) @ w2.T)
    excess = np.abs(out - exact) - (SIGMAS * sigma + FLOAT_RTOL * norms + 1e-6)
    assert excess.max() <= 0, f"{fmt} off the float product by {np.abs(out - exact).max():.3g} (worst excess {excess.max():.3g})"

    emulated = (q * d).reshape(x.shape).astype(np.float64) @ deq.T
    err = np.abs(out - emulated) - (FLOAT_RTOL * norms + 1e-6)
    assert err.max() <= 0, f"{fmt} off its int{act_bits}-activation emulation by {np.abs(out - emulated).max():.3g}"


@pytest.fixture(scope="module")
def portable_checks(request) -> dict[str, subprocess.Popen]:
    """The AVX2 and scalar builds, checked in their own processes (a process holds one build).

    Started before the native build so that the three compiles overlap on a cold cache.
    """
    procs: dict[str, subprocess.Popen] = {}
    if any(item.name == "test_portable_builds" for item in request.session.items):
        for march, isa in _portable_variants().items():
            procs[march] = subprocess.Popen(
                [sys.executable, "-c", _PORTABLE_CHECK, str(Path(__file__).parent), isa],
                env={**os.environ, "KILN_GGUF_MARCH": march, "OMP_NUM_THREADS": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module", autouse=True)
def kernels(portable_checks) -> None:
    # A fixture, not a module-level call, so that importing this file (as the portable checks'
    # processes do) builds nothing.
    if not cpu_gguf.available():
        pytest.skip("the GGUF CPU kernels could not be built here")


def test_block_sizes_match_gguf():
    for fmt, qtype in QTYPES.items():
        bf = cpu_gguf.BLOCK_FORMATS[fmt]
        assert (bf.block, bf.type_size) == gguf.GGML_QUANT_SIZES[qtype]
    assert tuple(QTYPES) == cpu_gguf.FORMATS


@pytest.mark.parametrize("fmt", cpu_gguf.FORMATS)
@pytest.mark.parametrize("k", [256, 512, 2048])
@pytest.mark.parametrize("n", [1, 7, 64, 300])
def test_matmul_matches_dequantized_product(fmt: str, k: int, n: int):
    rng = np.random.default_rng([k, n, cpu_gguf.FORMATS.index(fmt)])
    w = make_weights(fmt, n, k, rng)
    for m in (1, 3, 8):
        check(fmt, rng.standard_normal((m, k)).astype(np.float32), w, n, k)


@pytest.mark.parametrize("fmt", cpu_gguf.WIDE_FORMATS)
@pytest.mark.parametrize("k", [256, 2048])
@pytest.mark.parametrize("n", [7, 64])
def test_int16_activations_match_dequantized_product(fmt: str, k: int, n: int):
    rng = np.random.default_rng([k, n, cpu_gguf.FORMATS.index(fmt), 16])
    w = make_weights(fmt, n, k, rng)
    for m in (1, 3, 8):
        check(fmt, rng.standard_normal((m, k)).astype(np.float32), w, n, k, act_bits=16)


@pytest.mark.parametrize("fmt", cpu_gguf.ROWS4_FORMATS)
@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("k", [256, 2048])
@pytest.mark.parametrize("n", [1, 6, 64, 301])
def test_rows_of_four_match_dequantized_product(fmt: str, act_bits: int, k: int, n: int):
    # n = 1, 6, 301: a last group of four with rows past the weight's end (zero rows the output leaves out).
    rng = np.random.default_rng([k, n, act_bits, cpu_gguf.FORMATS.index(fmt), 4])
    w = make_weights(fmt, n, k, rng)
    for m in (1, 2, 5, 9):  # one row (q4_k's own code path), partial and whole tiles of activation rows
        check(fmt, rng.standard_normal((m, k)).astype(np.float32), w, n, k, act_bits, rows4=True)


@pytest.mark.parametrize("fmt", cpu_gguf.ROWS4_FORMATS)
def test_rows_of_four_give_the_gguf_layout_kernels_results(fmt: str):
    """Same rounding of the activations, so the same products up to float32 summation order."""
    rng = np.random.default_rng(12)
    k, n = 1024, 37
    w = torch.from_numpy(make_weights(fmt, n, k, rng))
    w4 = cpu_gguf.repack_rows4(w, fmt, n, k)
    assert w4.shape == (cpu_gguf.rows4_bytes(fmt, n, k),)
    # GGUF's bytes, rounded up to whole groups of four rows (and q4_k's 592 bytes against 4 x 144)
    assert w4.numel() == 40 * w.numel() // 37 * (592 if fmt == "q4_k" else 576) // 576
    x = torch.from_numpy(rng.standard_normal((6, k)).astype(np.float32))
    for bits in (8, 16):
        want = cpu_gguf.matmul(x, w, fmt, n, k, bits)
        torch.testing.assert_close(cpu_gguf.matmul_rows4(x, w4, fmt, n, k, bits), want, rtol=1e-5,
                                   atol=1e-5 * float(want.abs().max()))


def test_rows_of_four_bad_arguments_raise_value_error():
    w = torch.from_numpy(make_weights("q4_k", 8, 256, np.random.default_rng(0)))
    x = torch.randn(2, 256)
    with pytest.raises(ValueError, match="for q4_0, q4_1, q4_k only"):
        cpu_gguf.repack_rows4(torch.zeros(8, 34 * 8, dtype=torch.uint8), "q8_0", 8, 256)
    with pytest.raises(ValueError, match="must be a CPU uint8 tensor"):
        cpu_gguf.repack_rows4(w, "q4_k", 9, 256)
    w4 = cpu_gguf.repack_rows4(w, "q4_k", 8, 256)
    with pytest.raises(ValueError, match="repack_rows4's CPU uint8 tensor"):
        cpu_gguf.matmul_rows4(x, w4, "q4_k", 12, 256)  # a weight of another shape
    with pytest.raises(ValueError, match="repack_rows4's CPU uint8 tensor"):
        cpu_gguf.matmul_rows4(x, w4, "q4_1", 8, 256)  # of another format
    with pytest.raises(ValueError, match="repack_rows4's CPU uint8 tensor"):
        cpu_gguf.matmul_rows4(x, w, "q4_k", 8, 256)  # GGUF's layout itself
    with pytest.raises(ValueError, match="x must be"):
        cpu_gguf.matmul_rows4(x.double(), w4, "q4_k", 8, 256)
    with pytest.raises(ValueError, match="activations of 4 bits"):
        cpu_gguf.matmul_rows4(x, w4, "q4_k", 8, 256, 4)
    with pytest.raises(RuntimeError, match="no rows-of-four layout"):
        torch.ops.kiln_gguf.matmul_rows4(x, w4, cpu_gguf.FORMATS.index("q6_k"), 8, 256, 8)
    assert cpu_gguf.matmul_rows4(torch.zeros(0, 256), w4, "q4_k", 8, 256).shape == (0, 8)


def test_the_kernels_take_int16_for_exactly_the_wide_formats():
    """WIDE_FORMATS (Python's check) and the C++ binding's takes_act_bits say the same."""
    rng = np.random.default_rng(2)
    x = torch.randn(1, 256)
    for index, fmt in enumerate(cpu_gguf.FORMATS):
        w = torch.from_numpy(make_weights(fmt, 4, 256, rng))
        if fmt in cpu_gguf.WIDE_FORMATS:
            assert torch.ops.kiln_gguf.matmul(x, w, index, 4, 256, 16).shape == (1, 4)
        else:
            with pytest.raises(RuntimeError, match="activations of 16 bits"):
                torch.ops.kiln_gguf.matmul(x, w, index, 4, 256, 16)


def test_int16_activations_are_finer_than_bfloat16():
    """The reason ggml_int16 competes with int4pack by default: its error is well under that of bfloat16
    activations (what PyTorch's int4 kernel takes) on the same weights."""
    rng = np.random.default_rng(5)
    k, n = 2048, 64
    for fmt in cpu_gguf.WIDE_FORMATS:
        w = make_weights(fmt, n, k, rng)
        x = torch.from_numpy(rng.standard_normal((4, k)).astype(np.float32))
        deq = torch.from_numpy(dequantize(fmt, w, k))
        exact = x.double() @ deq.T
        int16 = cpu_gguf.matmul(x, torch.from_numpy(w), fmt, n, k, 16).double()
        bf16 = x.bfloat16().double() @ deq.T
        assert (int16 - exact).norm() < 0.05 * (bf16 - exact).norm(), fmt


@pytest.mark.parametrize("fmt, act_bits, rows4", [(f, 8, False) for f in cpu_gguf.FORMATS]
                         + [(f, 16, False) for f in cpu_gguf.WIDE_FORMATS]
                         + [(f, b, True) for f in cpu_gguf.ROWS4_FORMATS for b in (8, 16)])
def test_many_rows_and_edge_activations(fmt: str, act_bits: int, rows4: bool):
    # More rows than one register tile, odd output counts, and activation groups that are all zero,
    # tiny, or huge.
    rng = np.random.default_rng(7)
    k, n = 512, 37
    w = make_weights(fmt, n, k, rng)
    x = rng.standard_normal((19, k)).astype(np.float32)
    x[1] = 0.0
    x[2, :256] = 0.0
    x[3] *= 1e-30
    x[4] *= 1e20
    check(fmt, x, w, n, k, act_bits, rows4)


def test_threads_do_not_change_results():
    rng = np.random.default_rng(3)
    k, n = 512, 301
    w = torch.from_numpy(make_weights("q4_k", n, k, rng))
    x = torch.from_numpy(rng.standard_normal((5, k)).astype(np.float32))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_gguf.matmul(x, w, "q4_k", n, k)
        torch.set_num_threads(max(2, before))
        many = cpu_gguf.matmul(x, w, "q4_k", n, k)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one, many, rtol=1e-6, atol=1e-5)


def test_empty_batch():
    w = torch.from_numpy(make_weights("q8_0", 4, 64, np.random.default_rng(0)))
    assert cpu_gguf.matmul(torch.zeros(0, 64), w, "q8_0", 4, 64).shape == (0, 4)


def test_bad_arguments_raise_value_error():
    w = torch.from_numpy(make_weights("q4_0", 8, 256, np.random.default_rng(0)))
    x = torch.randn(2, 256)
    with pytest.raises(ValueError, match="unknown GGUF format"):
        cpu_gguf.matmul(x, w, "q3_k", 8, 256)
    with pytest.raises(ValueError, match="multiple of 256"):
        cpu_gguf.matmul(torch.randn(2, 96), torch.zeros(8, 96 // 256 * 144, dtype=torch.uint8), "q4_k", 8, 96)
    with pytest.raises(ValueError, match="must be a CPU uint8 tensor"):
        cpu_gguf.matmul(x, w, "q4_0", 9, 256)  # out_features disagrees with w
    with pytest.raises(ValueError, match="must be a CPU uint8 tensor"):
        cpu_gguf.matmul(x, w, "q4_1", 8, 256)  # q4_1 rows are longer
    with pytest.raises(ValueError, match="must be a CPU uint8 tensor"):
        cpu_gguf.matmul(x, w.float(), "q4_0", 8, 256)
    with pytest.raises(ValueError, match="x must be"):
        cpu_gguf.matmul(torch.randn(2, 128), w, "q4_0", 8, 256)
    with pytest.raises(ValueError, match="x must be"):
        cpu_gguf.matmul(x.double(), w, "q4_0", 8, 256)
    with pytest.raises(ValueError, match="x must be"):
        cpu_gguf.matmul(x[0], w, "q4_0", 8, 256)
    with pytest.raises(ValueError, match="activations of 16 bits"):
        cpu_gguf.matmul(x, torch.zeros(8, 256 // 256 * 210, dtype=torch.uint8), "q6_k", 8, 256, 16)
    with pytest.raises(ValueError, match="activations of 4 bits"):
        cpu_gguf.matmul(x, w, "q4_0", 8, 256, 4)


_PORTABLE_CHECK = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import test_cpu_gguf_kernels as t
from kiln.ops import cpu_gguf
assert cpu_gguf.isa() == sys.argv[2], cpu_gguf.isa()
rng = np.random.default_rng(11)
for fmt in cpu_gguf.FORMATS:
    for k, n in ((256, 7), (512, 64)):
        w = t.make_weights(fmt, n, k, rng)
        for m in (1, 3, 9):
            for bits in ((8, 16) if fmt in cpu_gguf.WIDE_FORMATS else (8,)):
                t.check(fmt, rng.standard_normal((m, k)).astype(np.float32), w, n, k, bits)
            for bits in ((8, 16) if fmt in cpu_gguf.ROWS4_FORMATS else ()):
                t.check(fmt, rng.standard_normal((m, k)).astype(np.float32), w, n, k, bits, rows4=True)
print("ok")
"""


def _cpu_has(*flags: str) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(flags) <= set(line.split())


def _portable_variants() -> dict[str, str]:
    """-march value -> the ISA path that build takes, for the variants this CPU can run."""
    variants = {}
    if _cpu_has("sse2"):
        variants["x86-64"] = "scalar"
    if _cpu_has("avx2", "fma", "f16c"):
        variants["haswell"] = "avx2"
    return variants


def test_portable_builds(portable_checks):
    if not portable_checks:
        pytest.skip("not an x86-64 machine")
    for march, proc in portable_checks.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0 and output.strip().endswith("ok"), f"{march}:\n{output[-3000:]}"
