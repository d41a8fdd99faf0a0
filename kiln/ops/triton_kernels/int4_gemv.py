"""Matrix products with 4-bit weights in groups, y = x W^T (+ b), in Triton: the ``triton`` plugin of
``linear_q4_0``, ``linear_q4_1``, ``linear_q4_k`` and ``linear_int4_g*`` (``kiln/ops/packed_linear.py``).

W is what ``kiln.weight_formats.four_bit_groups`` says: w = scale * q + offset, q in 0..15, one scale and
offset per group of 32 to 256 weights of a row. ``pack`` lays it out once at load:

- ``words``: int32 [out, in / 8]. A row is cut into chunks of 32 weights (every group is a whole number of
  chunks, so a chunk has one scale); chunk c is 4 words, and nibble i (bits 4i..4i+3) of its word j holds
  q[32 c + 4 i + j]. Masking nibble i of a chunk's 4 words gives weights 32 c + 4 i .. + 3 in order (plane
  i), which multiply 4 consecutive activations loaded as one vector; and one thread's 16-byte load brings a
  chunk. (With 8 consecutive weights a word instead, a plane's activations are 8 apart: the GEMV's loads of
  them lose their vectors and Triton 3.6 lays them out apart from the weights, converting every plane
  through shared memory.)
- ``scales``, ``offsets``: [out, in / group], float16 where that holds them exactly (q4_0, q4_1 and
  int4_g*, whose fields are float16), else float32 (q4_k's d * sc: a float16 times a 6-bit integer).

A nibble becomes a float through 2^23's bits: ``q | 0x4B000000`` read as float32 is 2^23 + q exactly, and
one subtraction leaves q (``_plane``): a logic op and an add, where an integer-to-float
conversion runs at a fraction of the FMA rate.

Three paths, by the number of rows (tokens):

- up to ``max_rows`` (decode): ``_int4_gemv_kernel``, the shape of ``gemv.py``'s one-row kernel: a program
  owns ``block_n`` outputs and streams their packed rows once, ``block_k`` weights at a time. Each of a
  word's 8 nibbles is a plane over the tile's words; per word it sums q x over the planes (one FMA per weight
  and row), then per chunk applies the scale and offset once: y = sum over chunks of
  scale * (q . x) + offset * sum(x). All in float32, rounded once at the end. Compiled for sm_90 it issues
  4.2 to 4.9 instructions a weight at one row, by tile (``benchmarks/gpu_int4_gemv.py --sass``), about what
  an H100's schedulers can issue while its memory delivers 4-bit weights (128 a cycle per SM, against ~27
  weights a cycle per SM at 3.35 TB/s and 1.75 GHz): issue, more than memory, is the one-row path's limit.
  A second row costs ~2 more a weight, four rows ~14 in all, against ~7.4 at any row count in the tiled
  product.
- more rows, fewer than ``dequant_rows`` (prompt chunks, decode batches): ``_int4_gemm_kernel``, a tiled
  product on tensor cores that decodes each weight tile in registers (w = scale q + offset, rounded to x's
  dtype as the reference's decoded weight is; the 8 planes put back in order within each thread's
  registers) and never writes it out. The weight is the dot's left operand (``gemm_block_n`` >= 64 outputs
  fill the tensor cores' 64-row side) and the tokens its right (``gemm_block_m``, down to 16), so a few rows
  waste little. Words and activations come in through Triton's pipelined copies; the decoded tile reaches the
  tensor cores through shared memory. (float32 activations take the next path: float32 tiles spill.)
- from ``dequant_rows`` rows on: the weight decoded into a tensor of x's dtype and its full size
  (``_int4_dequant_kernel``, one pass) and multiplied by cuBLAS (``F.linear``). It writes and reads the
  weight at 2 bytes a weight, 4x the packed bytes, which costs little next to a product of thousands of
  rows, where cuBLAS's tiles do the compute-bound work best.

Every path allocates only through PyTorch's caching allocator (the output; the decoded weight), reads
nothing back to the host and launches a fixed grid for a given shape, so CUDA graphs capture it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kiln.ops.triton_kernels.common import dot_in_fp32, interpreting

CHUNK = 32  # weights per 4 words: every 4-bit format's group is a multiple
MAX_GEMV_ROWS = 4  # the GEMV keeps two float32 tiles per row; more rows are the tiled product's
GEMM_MIN_BLOCK_K = 32
DEQUANT_BLOCK_N, DEQUANT_BLOCK_K, DEQUANT_WARPS = 16, 512, 4


@triton.jit
def _or_magic(src, mask: tl.constexpr, ASM: tl.constexpr):
    """(src & mask) | 2^23's bits. NOTE: ``ASM`` (compiled, not interpreted) writes it as one ``lop3``: ptxas
    emits two LOP3 instructions for a mask and an OR with two constants, ~1 more instruction a weight."""
    if ASM:
        return tl.inline_asm_elementwise(f"lop3.b32 $0, $1, {mask}, 1258291200, 0xEA;", "=r,r", [src],
                                         dtype=tl.int32, is_pure=True, pack=1)
    return (src & mask) | 0x4B000000


@triton.jit
def _plane(words, high, i: tl.constexpr, ASM: tl.constexpr):
    """Nibble ``i`` of ``words`` ([BN, W] int32; ``high`` = words >> 16) as float32 q 16^(i % 4), exactly.

    The nibble is masked in place (no shift but one a word for the top half) into the mantissa of 2^23,
    which is then subtracted; the factor 16^(i % 4), a power of two, ``_unit`` takes back from the other
    operand, so products round as q's own would.
    """
    bits = _or_magic(words if i < 4 else high, 0xF << (4 * (i % 4)), ASM)
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _unit(i: tl.constexpr):
    """1 / 16^(i % 4): what multiplies ``_plane(..., i)`` back to q."""
    if i % 4 == 0:
        u: tl.constexpr = 1.0
    elif i % 4 == 1:
        u: tl.constexpr = 0.0625
    elif i % 4 == 2:
        u: tl.constexpr = 0.00390625
    else:
        u: tl.constexpr = 0.000244140625
    return u


@triton.jit
def _decode_tile(words, s, o, ASM: tl.constexpr):
    """Words [BN, W] and each word's scale and offset [BN, W] (float32) -> the weights [BN, 8 W] in order."""
    high = words >> 16
    # 1 / 16^j folded into the scales once a word rather than once a weight.
    s1 = s * _unit(1)
    s2 = s * _unit(2)
    s3 = s * _unit(3)
    p0 = _plane(words, high, 0, ASM) * s + o
    p1 = _plane(words, high, 1, ASM) * s1 + o
    p2 = _plane(words, high, 2, ASM) * s2 + o
    p3 = _plane(words, high, 3, ASM) * s3 + o
    p4 = _plane(words, high, 4, ASM) * s + o
    p5 = _plane(words, high, 5, ASM) * s1 + o
    p6 = _plane(words, high, 6, ASM) * s2 + o
    p7 = _plane(words, high, 7, ASM) * s3 + o
    # [BN, W, 2, 2, 2], element [.., a, b, c] of plane 4a + 2b + c; the planes and a chunk's 4 words are
    # in each thread's registers, so the reordering below moves no data between threads.
    t = tl.join(tl.join(tl.join(p0, p4), tl.join(p2, p6)), tl.join(tl.join(p1, p5), tl.join(p3, p7)))
    BLOCK_N: tl.constexpr = words.shape[0]
    CHUNKS: tl.constexpr = words.shape[1] // 4
    t = tl.permute(tl.reshape(t, [BLOCK_N, CHUNKS, 4, 8]), [0, 1, 3, 2])  # [BN, C, plane, word]
    return tl.reshape(t, [BLOCK_N, CHUNKS * 32])


@triton.jit
def _load_words(w_ptr, s_ptr, o_ptr, rows, stride_wn, stride_sn, k0, col, K, GROUP: tl.constexpr,
                EVEN_K: tl.constexpr):
    """One tile: words [BN, W] from weight k0 on, and each word's scale and offset [BN, W] in float32 (0 past K)."""
    word = k0 // 8 + col
    group = (k0 // 32 + col // 4) // (GROUP // 32)
    w_ptrs = w_ptr + rows[:, None] * stride_wn + word[None, :]
    s_ptrs = s_ptr + rows[:, None] * stride_sn + group[None, :]
    o_ptrs = o_ptr + rows[:, None] * stride_sn + group[None, :]
    if EVEN_K:
        words = tl.load(w_ptrs)
        s = tl.load(s_ptrs)
        o = tl.load(o_ptrs)
    else:
        valid = (word < K // 8)[None, :]
        words = tl.load(w_ptrs, mask=valid, other=0)
        s = tl.load(s_ptrs, mask=valid, other=0.0)
        o = tl.load(o_ptrs, mask=valid, other=0.0)
    return words, s.to(tl.float32), o.to(tl.float32)


@triton.jit
def _load_x(x_ptr, m: tl.constexpr, stride_xm, k, M, K, BLOCK_N: tl.constexpr, EVEN_K: tl.constexpr):
    """Row ``m``'s activations at ``k`` [W] as float32, in the weight tile's shape [BN, W] (the same for every
    output).

    NOTE: in the tile's shape so that Triton gives them the tile's layout (a [W] load gets one of its own and a
    conversion through shared memory, with a barrier, at every plane); and unmasked, so that each thread loads
    and converts its activations once for all its outputs (Triton does so for a masked broadcast once per
    element). A row past M reads row M - 1 (its result is not stored); past K, weight K - 1 (whose weights
    are 0)."""
    if not EVEN_K:
        k = tl.minimum(k, K - 1)
    ptrs = x_ptr + tl.minimum(m, M - 1) * stride_xm + k
    return tl.load(tl.broadcast_to(ptrs[None, :], [BLOCK_N, k.shape[0]])).to(tl.float32)


@triton.jit
def _chunk_x_sum(x_ptr, m: tl.constexpr, stride_xm, k0, M, K, CHUNKS: tl.constexpr, EVEN_K: tl.constexpr):
    """Row ``m``'s sums of activations over each chunk from k0 on [C] (the offsets' factors)."""
    k = k0 + 32 * tl.arange(0, CHUNKS)[:, None] + tl.arange(0, 32)[None, :]
    ptrs = x_ptr + tl.minimum(m, M - 1) * stride_xm + k
    x = tl.load(ptrs) if EVEN_K else tl.load(ptrs, mask=k < K, other=0.0)
    return tl.sum(x.to(tl.float32), 1)


@triton.jit
def _chunk_sum(t, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr):
    """[BN, W] -> [BN, C]: the sums over each chunk's 4 words."""
    return tl.sum(tl.reshape(t, [BLOCK_N, CHUNKS, 4]), 2)


@triton.jit
def _store_row(y_ptr, b_ptr, acc, m: tl.constexpr, stride_ym, n, n_valid, M, HAS_BIAS: tl.constexpr):
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=n_valid, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=n_valid & (m < M))


@triton.jit
def _int4_gemv_kernel(
    y_ptr, x_ptr, w_ptr, s_ptr, o_ptr, b_ptr, M, N, K, stride_ym, stride_xm, stride_wn, stride_sn,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, ASM: tl.constexpr,
):
    WORDS: tl.constexpr = BLOCK_K // 8
    CHUNKS: tl.constexpr = BLOCK_K // 32
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = n < N
    # Outputs past N read row N-1 again (in bounds, unmasked loads) and are not stored.
    rows = tl.minimum(n, N - 1).to(tl.int64)
    col = tl.arange(0, WORDS)
    # Each word's first weight from the tile's start: runs of 4 consecutive weights (told to the compiler, so
    # that it loads 4 activations at a time).
    col_k = tl.max_contiguous(tl.multiple_of(32 * (col // 4) + col % 4, 4), 4)
    chunk = tl.arange(0, CHUNKS)
    s_rows = s_ptr + rows[:, None] * stride_sn
    o_rows = o_ptr + rows[:, None] * stride_sn
    # Two-dimensional tiles only, each row's accumulators apart: Triton 3.6 gives 3-D and 4-D tiles layouts
    # that it converts through shared memory at every step.
    acc0 = tl.zeros([BLOCK_N, CHUNKS], tl.float32)
    acc1 = tl.zeros([BLOCK_N, CHUNKS], tl.float32)
    acc2 = tl.zeros([BLOCK_N, CHUNKS], tl.float32)
    acc3 = tl.zeros([BLOCK_N, CHUNKS], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w_ptrs = w_ptr + rows[:, None] * stride_wn + (k0 // 8 + col)[None, :]
        if EVEN_K:
            words = tl.load(w_ptrs)
        else:
            words = tl.load(w_ptrs, mask=(k0 // 8 + col < K // 8)[None, :], other=0)
        # One scale and offset a chunk: [BN, C].
        group = (k0 // 32 + chunk) // (GROUP // 32)
        if EVEN_K:
            s = tl.load(s_rows + group[None, :])
            o = tl.load(o_rows + group[None, :])
        else:
            valid = (k0 // 32 + chunk < K // 32)[None, :]
            s = tl.load(s_rows + group[None, :], mask=valid, other=0.0)
            o = tl.load(o_rows + group[None, :], mask=valid, other=0.0)
        s = s.to(tl.float32)
        o = o.to(tl.float32)
        high = words >> 16
        # Per word: q . x over its 8 nibbles.
        qx0 = tl.zeros([BLOCK_N, WORDS], tl.float32)
        qx1 = tl.zeros([BLOCK_N, WORDS], tl.float32)
        qx2 = tl.zeros([BLOCK_N, WORDS], tl.float32)
        qx3 = tl.zeros([BLOCK_N, WORDS], tl.float32)
        for i in tl.static_range(8):
            q = _plane(words, high, i, ASM)
            k = k0 + 4 * i + col_k
            qx0 += q * (_load_x(x_ptr, 0, stride_xm, k, M, K, BLOCK_N, EVEN_K) * _unit(i))
            if BLOCK_M > 1:
                qx1 += q * (_load_x(x_ptr, 1, stride_xm, k, M, K, BLOCK_N, EVEN_K) * _unit(i))
            if BLOCK_M > 2:
                qx2 += q * (_load_x(x_ptr, 2, stride_xm, k, M, K, BLOCK_N, EVEN_K) * _unit(i))
                qx3 += q * (_load_x(x_ptr, 3, stride_xm, k, M, K, BLOCK_N, EVEN_K) * _unit(i))
        acc0 += (_chunk_sum(qx0, BLOCK_N, CHUNKS) * s
                 + o * _chunk_x_sum(x_ptr, 0, stride_xm, k0, M, K, CHUNKS, EVEN_K)[None, :])
        if BLOCK_M > 1:
            acc1 += (_chunk_sum(qx1, BLOCK_N, CHUNKS) * s
                     + o * _chunk_x_sum(x_ptr, 1, stride_xm, k0, M, K, CHUNKS, EVEN_K)[None, :])
        if BLOCK_M > 2:
            acc2 += (_chunk_sum(qx2, BLOCK_N, CHUNKS) * s
                     + o * _chunk_x_sum(x_ptr, 2, stride_xm, k0, M, K, CHUNKS, EVEN_K)[None, :])
            acc3 += (_chunk_sum(qx3, BLOCK_N, CHUNKS) * s
                     + o * _chunk_x_sum(x_ptr, 3, stride_xm, k0, M, K, CHUNKS, EVEN_K)[None, :])
    _store_row(y_ptr, b_ptr, acc0, 0, stride_ym, n, n_valid, M, HAS_BIAS)
    if BLOCK_M > 1:
        _store_row(y_ptr, b_ptr, acc1, 1, stride_ym, n, n_valid, M, HAS_BIAS)
    if BLOCK_M > 2:
        _store_row(y_ptr, b_ptr, acc2, 2, stride_ym, n, n_valid, M, HAS_BIAS)
        _store_row(y_ptr, b_ptr, acc3, 3, stride_ym, n, n_valid, M, HAS_BIAS)


@triton.jit
def _int4_gemm_kernel(
    y_ptr, x_ptr, w_ptr, s_ptr, o_ptr, b_ptr, M, N, K, stride_ym, stride_xm, stride_wn, stride_sn,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr, ASM: tl.constexpr,
):
    # Row blocks vary fastest: the programs that share a weight tile run together, so it comes from
    # memory once and from L2 for the others.
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_valid = m < M
    n_valid = n < N
    rows = tl.minimum(n, N - 1).to(tl.int64)
    tokens = tl.minimum(m, M - 1).to(tl.int64)
    col = tl.arange(0, BLOCK_K // 8)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        words, s, o = _load_words(w_ptr, s_ptr, o_ptr, rows, stride_wn, stride_sn, k0, col, K, GROUP, EVEN_K)
        # Decoded and rounded to x's dtype, as the reference's decoded weight is.
        w = _decode_tile(words, s, o, ASM).to(x_ptr.dtype.element_ty)
        x_ptrs = x_ptr + tokens[:, None] * stride_xm + (k0 + kk)[None, :]
        x = tl.load(x_ptrs) if EVEN_K else tl.load(x_ptrs, mask=(k0 + kk < K)[None, :], other=0.0)
        if DOT_FP32:  # (bfloat16 values are exact in tf32)
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(w, tl.trans(x), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_valid, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + m[None, :].to(tl.int64) * stride_ym + n[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=n_valid[:, None] & m_valid[None, :])


@triton.jit
def _int4_dequant_kernel(
    out_ptr, w_ptr, s_ptr, o_ptr, N, K, stride_on, stride_wn, stride_sn,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, ASM: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rows = tl.minimum(n, N - 1).to(tl.int64)
    words, s, o = _load_words(w_ptr, s_ptr, o_ptr, rows, stride_wn, stride_sn, k0, tl.arange(0, BLOCK_K // 8), K,
                              GROUP, EVEN_K)
    w = _decode_tile(words, s, o, ASM).to(out_ptr.dtype.element_ty)
    k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * stride_on + k[None, :], w, mask=(n < N)[:, None] & (k < K)[None, :])


def pack(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(words, scales, offsets), the kernels' layout (module docstring), from ``four_bit_groups``' q [out, in]
    (uint8, 0..15) and float32 scale and offset [out, in / group], on their device."""
    rows, k_in = q.shape
    if k_in % CHUNK:
        raise ValueError(f"4-bit rows are whole chunks of {CHUNK} weights, not {k_in}")
    planes = q.reshape(rows, k_in // CHUNK, 8, 4)  # [row, chunk, nibble i, word j]
    words = torch.zeros((rows, k_in // CHUNK, 4), dtype=torch.int32, device=q.device)
    for i in range(8):
        plane = planes[:, :, i, :].to(torch.int32)
        if i == 7:  # the top nibble as a signed one, so that its shifted value fits an int32
            plane = plane - 16 * (plane >= 8).to(torch.int32)
        words += plane * (1 << 4 * i)
    words = words.reshape(rows, k_in // 8)
    half_scale, half_offset = scale.to(torch.float16), offset.to(torch.float16)
    if torch.equal(half_scale.float(), scale) and torch.equal(half_offset.float(), offset):
        return words, half_scale.contiguous(), half_offset.contiguous()
    return words, scale.float().contiguous(), offset.float().contiguous()


def _shape(weight: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[int, int]:
    words = weight[0]
    return words.shape[0], words.shape[1] * 8


def dequantize(weight: tuple[torch.Tensor, torch.Tensor, torch.Tensor], group: int, dtype: torch.dtype
               ) -> torch.Tensor:
    """The float weight [out, in] that ``pack``'s layout holds, as ``dtype`` (a new tensor)."""
    words, scales, offsets = weight
    n_out, k_in = _shape(weight)
    out = torch.empty((n_out, k_in), dtype=dtype, device=words.device)
    block_k = min(DEQUANT_BLOCK_K, max(CHUNK, triton.next_power_of_2(k_in)))
    _int4_dequant_kernel[(triton.cdiv(n_out, DEQUANT_BLOCK_N), triton.cdiv(k_in, block_k))](
        out, words, scales, offsets, n_out, k_in, out.stride(0), words.stride(0), scales.stride(0),
        GROUP=group, BLOCK_N=DEQUANT_BLOCK_N, BLOCK_K=block_k, EVEN_K=k_in % block_k == 0, ASM=not interpreting(),
        num_warps=DEQUANT_WARPS,
    )
    return out


GEMV_KEYS = ("block_n", "block_k", "warps", "stages")  # the config keys each path reads
GEMM_KEYS = ("gemm_block_m", "gemm_block_n", "gemm_block_k", "gemm_warps", "gemm_stages")


def path(rows: int, dtype: torch.dtype, config: dict) -> str:
    """Which kernel ``int4_linear`` runs for ``rows`` rows of ``dtype``: "gemv", "gemm" or "dequant"."""
    if rows <= config["max_rows"]:
        return "gemv"
    # float32 activations: the tiled product's float32 tiles spill registers; cuBLAS takes them.
    if rows >= config["dequant_rows"] or dtype == torch.float32:
        return "dequant"
    return "gemm"


def int4_linear(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor, torch.Tensor], bias: torch.Tensor | None,
                group: int, config: dict) -> torch.Tensor:
    """x [..., in] @ W^T (+ bias [out]), W in ``pack``'s layout with ``group`` weights a scale.

    ``config`` (every key; ``INT4_LINEAR_CONFIGS`` in ``triton_plugins.py``): ``max_rows`` (at most
    ``MAX_GEMV_ROWS``) and ``GEMV_KEYS`` for the GEMV; ``GEMM_KEYS`` for the tiled product; ``dequant_rows``,
    the rows from which the weight is decoded for cuBLAS (``path``).
    """
    words, scales, offsets = weight
    n_out, k_in = _shape(weight)
    if x.shape[-1] != k_in:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {k_in}")
    if group % CHUNK or scales.shape[-1] * group != k_in:
        raise ValueError(f"groups of {group} do not fit {scales.shape[-1]} scales a row of {k_in} weights")
    if config["max_rows"] > MAX_GEMV_ROWS:
        raise ValueError(f"the 4-bit GEMV takes at most {MAX_GEMV_ROWS} rows, not max_rows={config['max_rows']}")
    x2 = x.reshape(-1, k_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    kernel = path(rows, x.dtype, config)
    if kernel == "dequant":
        return F.linear(x2, dequantize(weight, group, x.dtype), bias).view(*x.shape[:-1], n_out)
    y = torch.empty((rows, n_out), dtype=x.dtype, device=x.device)
    if rows == 0:
        return y.view(*x.shape[:-1], n_out)
    args = (y, x2, words, scales, offsets, bias if bias is not None else y, rows, n_out, k_in, y.stride(0),
            x2.stride(0), words.stride(0), scales.stride(0))
    if kernel == "gemv":
        block_m = triton.next_power_of_2(rows)
        block_n = config["block_n"]
        # Each row's accumulators are a tile of their own: halving the tile a row keeps the registers. Rows that
        # the tile does not divide take a smaller one (down to 256) that does, or the fewest partial weights.
        block_k = max(CHUNK, min(config["block_k"] // block_m, triton.next_power_of_2(k_in)))
        while block_k > 256 and k_in % block_k:
            block_k //= 2
        _int4_gemv_kernel[(triton.cdiv(n_out, block_n),)](
            *args, GROUP=group, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, EVEN_K=k_in % block_k == 0, ASM=not interpreting(), num_warps=config["warps"],
            num_stages=config["stages"],
        )
    else:
        block_m = min(config["gemm_block_m"], max(16, triton.next_power_of_2(rows)))
        block_n = config["gemm_block_n"]
        block_k = min(config["gemm_block_k"], max(GEMM_MIN_BLOCK_K, triton.next_power_of_2(k_in)))
        _int4_gemm_kernel[(triton.cdiv(rows, block_m), triton.cdiv(n_out, block_n))](
            *args, GROUP=group, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            EVEN_K=k_in % block_k == 0, DOT_FP32=dot_in_fp32(x.dtype), ASM=not interpreting(),
            num_warps=config["gemm_warps"], num_stages=config["gemm_stages"],
        )
    return y.view(*x.shape[:-1], n_out)
