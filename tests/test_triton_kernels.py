"""The Triton plugins against their references, on fresh random inputs at small shapes.

On a CUDA device the kernels are compiled; elsewhere they run in Triton's CPU interpreter
(``triton_interpreter`` sets that up before any kernel is defined).

Tolerances: float32 kernels agree with float32 references to rounding. For bfloat16, attention is
checked against the reference computed in float32 on the same inputs (METHOD: bf16 lands between
1e-3 and 1e-2 in relative norm) and must be no less accurate than the reference run in bfloat16
itself. Elementwise kernels round to bfloat16 where torch does, step by step: the rotary kernel and
the residual sum match exactly on a GPU; RMSNorm and SiLU round twice after an rsqrt or exp that
differs from torch's in the last float32 bits, so within two bfloat16 steps (2^-7 relative each).
Triton 3.6's interpreter truncates float32 -> bfloat16 instead of rounding to nearest, so under it
every rounding may differ by one step.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")
from triton_interpreter import DEVICE  # noqa: E402  (before the kernels are defined)

from kiln.engine import read_engine  # noqa: E402
from kiln.ops import get_op  # noqa: E402
from kiln.ops.reference import add_rms_norm, paged_attention, rms_norm, rotary_and_write_kv_cache  # noqa: E402
from kiln.ops.reference import silu_and_mul  # noqa: E402
from kiln.ops.sample_inputs import norm_batch, paged_batch, rotary_batch, silu_batch  # noqa: E402
from kiln.ops.triton_kernels import attention as attention_kernels  # noqa: E402
from kiln.ops.triton_kernels import gemv as gemv_kernels  # noqa: E402
from kiln.ops.triton_kernels import int4_gemv as int4_kernels  # noqa: E402
from kiln.ops.triton_kernels import rms_norm as rms_norm_kernels  # noqa: E402
from kiln.ops.triton_kernels import rotary_kv_cache as rotary_kernels  # noqa: E402
from kiln.ops.triton_kernels import silu_and_mul as silu_kernels  # noqa: E402
from kiln.ops.triton_kernels.common import interpreting  # noqa: E402
from kiln.ops.packed_linear import op_name  # noqa: E402
from kiln.ops.triton_plugins import (  # noqa: E402
    INT4_LINEAR_CONFIGS, LINEAR_CONFIGS, PAGED_ATTENTION_CONFIGS, RMS_NORM_CONFIGS, ROTARY_KV_CONFIGS,
    SILU_AND_MUL_CONFIGS, triton_linear,
)
from kiln.runtime.model_runner import ModelRunner  # noqa: E402
from kiln.runtime.request import Request  # noqa: E402
from kiln.runtime.sampling_params import SamplingParams  # noqa: E402
from kiln.weight_formats import FORMATS, FOUR_BIT, four_bit_group_size, four_bit_groups, random_packed  # noqa: E402

# Small tiles so that short test sequences still cross several tiles and blocks.
SMALL_ATTENTION = {**PAGED_ATTENTION_CONFIGS[0], "prefill_block_m": 16, "prefill_tile_n": 16, "decode_tile_n": 16}
CASES = {
    "decode": ([1, 17, 40, 64], [1, 1, 1, 1]),
    "prefill": ([23, 40], [23, 40]),
    # A prompt chunk over earlier context, a decode token, a first chunk, a whole prompt.
    "mixed": ([50, 33, 20, 20], [17, 1, 8, 20]),
}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def check_attention(q, kc, vc, meta, window, config, scale=0.3):
    """Run the kernel into a NaN-poisoned output; compare with the reference; return the kernel's error."""
    out = torch.full_like(q, float("nan"))
    got = attention_kernels.paged_attention(q, kc, vc, meta, scale, window, config, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert not got.isnan().any(), "unwritten or poisoned output elements"
    want = paged_attention(q.float(), kc.float(), vc.float(), meta, scale, window)
    err = rel_err(got, want)
    if q.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    else:
        own = rel_err(paged_attention(q, kc, vc, meta, scale, window), want)
        # The interpreter truncates the bf16 output: up to one more bf16 step (2^-7) of error.
        assert err < 1e-2 and err <= 1.5 * own + (2 ** -7 if interpreting() else 2e-3), (err, own)
    return err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(2, 2), (6, 2), (8, 2)], ids=["gqa1", "gqa3", "gqa4"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("block_size,window", [(16, None), (32, 7)])
def test_paged_attention_matches_reference(case, heads, dtype, block_size, window):
    seq_lens, q_lens = CASES[case]
    q, kc, vc, meta = paged_batch(seq_lens, q_lens, num_heads=heads[0], num_kv_heads=heads[1], head_dim=16,
                                  block_size=block_size, dtype=dtype, device=DEVICE,
                                  table_dtype=torch.int64 if case == "decode" else torch.int32)
    if block_size == 32:  # the runner's index dtype; int32 elsewhere
        meta.query_start_loc_t = meta.query_start_loc_t.long()
    check_attention(q, kc, vc, meta, window, SMALL_ATTENTION)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 50])
def test_decode_split_k_matches_reference(dtype, window):
    seq_lens = [70, 3, 129, 96]
    q, kc, vc, meta = paged_batch(seq_lens, [1] * 4, num_heads=8, num_kv_heads=2, head_dim=16, block_size=16,
                                  dtype=dtype, device=DEVICE)
    config = {**SMALL_ATTENTION, "max_splits": 4, "split_min_tokens": 16}
    # 4 sequences × 2 KV heads leave a GPU's SMs idle, so the split path runs (with 4 parts, some
    # empty for the short sequence).
    width = meta.block_tables.shape[1] * 16
    assert attention_kernels.num_decode_splits(4, 2, width, q.device, 4, 16) == 4
    check_attention(q, kc, vc, meta, window, config)


def test_split_heuristic_follows_sm_count_and_context():
    cuda_like = torch.device("cpu")  # the interpreter's stand-in counts 132 SMs
    sms = attention_kernels.sm_count(cuda_like)
    assert attention_kernels.num_decode_splits(sms, 1, 4096, cuda_like, 16, 256) == 1  # SMs already busy
    assert attention_kernels.num_decode_splits(1, 8, 4096, cuda_like, 16, 256) == 16
    assert attention_kernels.num_decode_splits(1, 8, 512, cuda_like, 16, 256) == 2  # short contexts
    assert attention_kernels.num_decode_splits(1, 8, 4096, cuda_like, 1, 256) == 1  # split-K off


@pytest.mark.parametrize("head_dim,dtype", [(64, torch.float16), (24, torch.float32), (128, torch.bfloat16)])
def test_paged_attention_head_sizes(head_dim, dtype):
    """SmolLM2's 64, a size that is no power of two (padded tiles), Llama's 128."""
    q, kc, vc, meta = paged_batch([20, 37, 5], [6, 1, 5], num_heads=3, num_kv_heads=1, head_dim=head_dim,
                                  block_size=16, dtype=dtype, device=DEVICE)
    check_attention(q, kc, vc, meta, None, SMALL_ATTENTION, scale=head_dim ** -0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_one_long_prompt(dtype):
    """One sequence: several query blocks of one prompt (and Triton specializes an argument equal to 1)."""
    q, kc, vc, meta = paged_batch([45], [45], num_heads=8, num_kv_heads=2, head_dim=16, block_size=16,
                                  dtype=dtype, device=DEVICE)
    check_attention(q, kc, vc, meta, None, SMALL_ATTENTION)


@pytest.mark.parametrize("case", ["decode", "mixed"])
def test_paged_attention_reads_lengths_only_from_device_tensors(case):
    """What a replayed CUDA graph needs: the host lists may hold anything."""
    seq_lens, q_lens = CASES[case]
    q, kc, vc, meta = paged_batch(seq_lens, q_lens, num_heads=4, num_kv_heads=2, head_dim=16, block_size=16,
                                  dtype=torch.float32, device=DEVICE)
    want = paged_attention(q, kc, vc, meta, 0.3, None)
    meta.seq_lens = [999] * len(seq_lens)
    meta.query_start_loc = [0] * (len(seq_lens) + 1)
    meta.max_seq_len = 0
    fn = get_op("paged_attention").impls["triton"].with_config(SMALL_ATTENTION)
    torch.testing.assert_close(fn(q, kc, vc, meta, 0.3), want, rtol=1e-4, atol=1e-5)


def test_paged_attention_plugin_without_device_metadata_builds_it_once_per_step():
    q, kc, vc, meta = paged_batch(*CASES["mixed"], num_heads=4, num_kv_heads=2, head_dim=16, block_size=16,
                                  dtype=torch.float32, device=DEVICE)
    meta.seq_lens_t = meta.query_start_loc_t = None
    impl = get_op("paged_attention").impls["triton"]
    torch.testing.assert_close(impl.fn(q, kc, vc, meta, 0.3, 7), paged_attention(q, kc, vc, meta, 0.3, 7),
                               rtol=1e-4, atol=1e-5)
    assert {"seq_lens_t", "query_start_loc_t"} <= set(meta.scratch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, 4, 2, 16, 16), (37, 9, 3, 64, 32), (3, 20, 4, 24, 16)],
                         ids=["small", "smollm2", "many_heads"])
def test_rotary_and_write_kv_cache_matches_reference(shape, dtype):
    tokens, heads, kv_heads, head_dim, block_size = shape
    qkv, cos_sin, kc, vc, slots, _ = rotary_batch(tokens, num_heads=heads, num_kv_heads=kv_heads,
                                                  head_dim=head_dim, block_size=block_size, dtype=dtype,
                                                  device=DEVICE)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    want = rotary_and_write_kv_cache(qkv, cos_sin, kc_ref, vc_ref, slots, heads)
    q_out = torch.full((tokens, heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    got = rotary_kernels.rotary_and_write_kv_cache(qkv, cos_sin, kc, vc, slots, heads, ROTARY_KV_CONFIGS[0],
                                                   q_out=q_out)
    assert not got.isnan().any()
    exact = dtype != torch.bfloat16 or not interpreting()
    tol = {"rtol": 0, "atol": 0} if exact else bf16_tol(2)
    torch.testing.assert_close(got, want, **tol)
    # Slots no token owns stay NaN in both; the written ones agree.
    torch.testing.assert_close(kc, kc_ref, equal_nan=True, **tol)
    torch.testing.assert_close(vc, vc_ref, equal_nan=True, rtol=0, atol=0)
    assert int((~kc.isnan()).all(-1).sum()) == tokens * kv_heads


@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_write_stores_a_quantized_cache_as_the_reference(kv_dtype, dtype):
    """Keys and values land as reference.to_cache_dtype stores them: rounded, and saturated where they
    exceed the cache's range (the scaled inputs reach past 127 and 448)."""
    qkv, cos_sin, kc, vc, slots, _ = rotary_batch(37, num_heads=9, num_kv_heads=3, head_dim=64, block_size=16,
                                                  dtype=dtype, device=DEVICE, kv_dtype=kv_dtype)
    qkv = qkv * 150
    kc_ref, vc_ref = kc.clone(), vc.clone()
    want = rotary_and_write_kv_cache(qkv, cos_sin, kc_ref, vc_ref, slots, 9)
    got = rotary_kernels.rotary_and_write_kv_cache(qkv, cos_sin, kc, vc, slots, 9, ROTARY_KV_CONFIGS[0])
    # bf16 under the interpreter: two bf16 steps of the inputs' scale (150) for the rotated values, and so
    # a rotated key may land a step or two of the cache away.
    exact = dtype != torch.bfloat16 or not interpreting()
    exactly = {"rtol": 0, "atol": 0}
    torch.testing.assert_close(got, want, **(exactly if exact else {"rtol": 2 ** -6, "atol": 150 * 2 ** -5}))
    k_tol = exactly if exact else {"rtol": 2 ** -6 if kv_dtype == torch.int8 else 2 ** -2, "atol": 150 * 2 ** -5}
    torch.testing.assert_close(kc.float(), kc_ref.float(), equal_nan=True, **k_tol)
    torch.testing.assert_close(vc.float(), vc_ref.float(), equal_nan=True, **exactly)
    written = vc.view(-1, 3, 64)[slots].float()
    assert float(written.abs().max()) == (127 if kv_dtype == torch.int8 else 448)


@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "fp8"])
@pytest.mark.parametrize("case", ["decode", "mixed"])
def test_paged_attention_reads_a_quantized_cache(kv_dtype, case):
    q, kc, vc, meta = paged_batch(*CASES[case], num_heads=6, num_kv_heads=2, head_dim=16, block_size=16,
                                  dtype=torch.bfloat16, kv_dtype=kv_dtype, device=DEVICE)
    check_attention(q, kc, vc, meta, None, SMALL_ATTENTION, scale=0.02 if kv_dtype == torch.int8 else 0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(1, 576), (7, 96)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_matches_reference(rows, hidden, dtype, with_residual):
    x, residual, weight, eps = norm_batch(rows, hidden, dtype=dtype, device=DEVICE)
    out = torch.full_like(x, float("nan"))
    summed = torch.full_like(x, float("nan"))
    got, got_sum = rms_norm_kernels.rms_norm(x, residual if with_residual else None, weight, eps,
                                             RMS_NORM_CONFIGS[0], out=out, summed=summed)
    if with_residual:
        want, want_sum = add_rms_norm(x, residual, weight, eps)
        exact = dtype == torch.float32 or not interpreting()
        torch.testing.assert_close(got_sum, want_sum, **({"rtol": 0, "atol": 0} if exact else bf16_tol(1)))
    else:
        want = rms_norm(x, weight, eps)
        assert got_sum is None
    assert not got.isnan().any()
    # Summation order and rsqrt differ from torch's in the last float32 bits: the normalised value can
    # round one bf16 step apart, and the product with the weight one more.
    torch.testing.assert_close(got, want, **({"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else bf16_tol(2)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n,block", [(3, 100, 64), (2, 384, 1024)])
def test_silu_and_mul_matches_reference(rows, n, block, dtype):
    (x,) = silu_batch(rows, n, dtype=dtype, device=DEVICE)
    out = torch.full((rows, n), float("nan"), dtype=dtype, device=DEVICE)
    got = silu_kernels.silu_and_mul(x, {**SILU_AND_MUL_CONFIGS[0], "block": block}, out=out)
    assert not got.isnan().any()
    # exp differs from torch's in the last float32 bits: silu can round one bf16 step apart, then the product.
    torch.testing.assert_close(got, silu_and_mul(x), **({"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32
                                                        else bf16_tol(2)))


# Small tiles, so that the test shapes cross several tiles, odd K leaves a partial last tile, and odd N a
# partial last block of outputs.
SMALL_GEMV = {**LINEAR_CONFIGS[0], "block_n": 8, "block_k": 32, "dot_block_n": 16, "dot_block_k": 32}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,k,n", [(1, 96, 40), (1, 100, 37), (3, 96, 40), (16, 70, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_reference(rows, k, n, dtype, bias):
    g = torch.Generator(device=DEVICE).manual_seed(rows * 1000 + k + n)
    x = torch.randn(rows, k, generator=g, device=DEVICE).to(dtype)
    w = (torch.randn(n, k, generator=g, device=DEVICE) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g, device=DEVICE).to(dtype) if bias else None
    got = gemv_kernels.gemv(x, w, b, SMALL_GEMV)
    want = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.shape == (rows, n) and got.dtype == dtype
    # float32 sums in another order; bfloat16 rounds the float32 sum once, as cuBLAS does (the
    # interpreter truncates: one more step).
    torch.testing.assert_close(got.float(), want, **({"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32
                                                     else bf16_tol(2)))


def test_linear_plugin_takes_few_rows_and_leaves_more_to_the_reference():
    x = torch.randn(2, 3, 48, device=DEVICE)  # 6 rows, leading dimensions kept
    w = torch.randn(24, 48, device=DEVICE)
    want = torch.nn.functional.linear(x, w)
    for max_rows in (1, 16):  # the reference path, then the kernel
        got = triton_linear(x, w, None, **{**SMALL_GEMV, "max_rows": max_rows})
        assert got.shape == (2, 3, 24)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="at most 16 rows"):
        gemv_kernels.gemv(torch.randn(17, 48, device=DEVICE), w, None, SMALL_GEMV)


def int4_case(fmt: str, shape: str, seed: int) -> tuple[torch.Tensor, dict, int, int]:
    """A random packed weight of ``fmt`` [37, k] and small tiles that fit it: rows of 3 blocks are one and
    a half K tiles ("odd"), rows of 4 two whole tiles ("even"); 37 outputs leave a partial last block of 32
    (and 40 rows one of 32 tokens). Few programs and tiles: the interpreter takes ~0.1 s for each."""
    f = FORMATS[fmt]
    group = four_bit_group_size(f)
    k = (3 if shape == "odd" else 4) * f.block
    config = {**INT4_LINEAR_CONFIGS[0], "block_n": 32, "block_k": 2 * f.block, "gemm_block_n": 32,
              "gemm_block_m": 32, "gemm_block_k": max(128, 2 * f.block), "dequant_rows": 10 ** 9}
    w = random_packed(f, (37, k), torch.Generator().manual_seed(seed)).to(DEVICE)
    return w, config, group, k


@pytest.mark.parametrize("fmt", FOUR_BIT)
def test_int4_layout_holds_the_formats_weights(fmt):
    w, _, group, k = int4_case(fmt, "odd", 0)
    words, scales, offsets = int4_kernels.pack(*four_bit_groups(FORMATS[fmt], w))
    assert words.dtype == torch.int32 and words.shape == (37, k // 8)
    # float16 holds the float16 fields of q4_0, q4_1 and int4_g* exactly; q4_k's products need float32.
    assert scales.dtype == offsets.dtype == (torch.float32 if fmt == "q4_k" else torch.float16)
    got = int4_kernels.dequantize((words, scales, offsets), group, torch.float32)
    # Exact but for a fused multiply-add's one rounding where the reference rounds twice (on a GPU).
    torch.testing.assert_close(got, FORMATS[fmt].dequantize(w), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt", FOUR_BIT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,bias", [("odd", True), ("even", False)])
def test_int4_linear_matches_the_ops_reference(fmt, dtype, shape, bias):
    """1 to 4 rows through the GEMV, 40 through the tiled product and through the decoded weight and cuBLAS."""
    w, config, group, k = int4_case(fmt, shape, 1)
    ref = get_op(op_name(fmt)).reference
    g = torch.Generator(device=DEVICE).manual_seed(2)
    packed = int4_kernels.pack(*four_bit_groups(FORMATS[fmt], w))
    b = torch.randn(37, generator=g, device=DEVICE).to(dtype) if bias else None
    for rows, dequant_rows in ((1, None), (2, None), (3, None), (4, None), (40, None), (40, 40)):
        x = torch.randn(rows, k, generator=g, device=DEVICE).to(dtype)
        got = int4_kernels.int4_linear(x, packed, b, group, {**config, **({"dequant_rows": dequant_rows}
                                                                         if dequant_rows else {})})
        want = ref.fn(x.float(), ref.prepare(w, torch.float32), None if b is None else b.float())
        assert got.shape == (rows, 37) and got.dtype == dtype
        # float32: sums in another order. bfloat16: the GEMV multiplies the exact weights and rounds its
        # float32 sum once; the tiled product and cuBLAS multiply the weights rounded to bfloat16 as the
        # reference's decoded weight is (a relative 2^-9 each, in a sum of random signs), and round once.
        # The interpreter truncates where a GPU rounds: one step more.
        torch.testing.assert_close(got.float(), want, **({"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32
                                                         else bf16_tol(2)), msg=lambda m: f"{rows} rows: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_plugin_keeps_leading_dimensions_and_routes_rows_by_config(dtype):
    fmt = "int4_g64"
    w, config, group, k = int4_case(fmt, "odd", 3)
    impl = get_op(op_name(fmt)).impls["triton"]
    packed = impl.prepare(w, dtype)
    ref = get_op(op_name(fmt)).reference
    for lead in ((1,), (2, 3), (0,)):
        x = torch.randn(*lead, k, device=DEVICE).to(dtype)
        want = ref.fn(x.float(), ref.prepare(w, torch.float32))
        # One row through the GEMV; six through the tiled product, then through the decoded weight; none.
        for max_rows, dequant_rows in ((4, 10 ** 9), (1, 10 ** 9), (2, 3)):
            got = impl.with_config({**config, "max_rows": max_rows, "dequant_rows": dequant_rows})(x, packed)
            assert got.shape == (*lead, 37) and got.dtype == dtype
            # (float16 rounds 8 times finer than bfloat16)
            torch.testing.assert_close(got.float(), want, **bf16_tol(2))
    with pytest.raises(ValueError, match="at most 4 rows"):
        impl.fn(x, packed, None, **{**config, "max_rows": 8})
    with pytest.raises(ValueError, match="features"):
        impl.fn(torch.randn(1, k + 32, device=DEVICE), packed)


def bf16_tol(roundings: int) -> dict:
    """Within ``roundings`` bfloat16 steps, relative (and absolute, for results near zero)."""
    return {"rtol": roundings * 2 ** -7, "atol": roundings * 2 ** -6}


@pytest.mark.parametrize("op", ["paged_attention", "rotary_and_write_kv_cache", "rms_norm", "add_rms_norm",
                                "silu_and_mul", "linear", "logits", *(op_name(f) for f in FOUR_BIT)])
def test_plugins_are_cuda_only_graph_safe_and_declare_full_configs(op):
    impl = get_op(op).impls["triton"]
    assert not impl.supports(torch.device("cpu"), torch.float32)
    assert impl.graph_safe
    keys = set(impl.configs[0])
    assert keys and all(set(c) == keys for c in impl.configs)
    with pytest.raises(ValueError, match="takes no config keys"):
        impl.with_config({"no_such_key": 1})
    # The plan takes the first plugin that supports the target: on CUDA, Triton before the portable ones.
    names = list(get_op(op).impls)
    assert all(names.index("triton") < i for i, n in enumerate(names) if n not in ("reference", "triton"))


def test_model_through_triton_plugins_matches_reference_ops(engine_dir):
    """The layers call the plugins as they call the references: a chunked prompt gives the same logits.

    Mistral's tiny model has a sliding window shorter than the prompt; otherwise it is Llama.
    """
    runner = ModelRunner(read_engine(engine_dir("mistral")), DEVICE, cuda_graphs="off")
    runner.allocate_kv_cache(16)
    ids = list(range(3, 40))

    def prompt_logits(impl: str) -> torch.Tensor:
        # Every layer calls the runner's one table: rebinding its entries swaps the implementations.
        for op in ("paged_attention", "rotary_and_write_kv_cache", "rms_norm", "add_rms_norm", "silu_and_mul",
                   "linear", "logits"):
            setattr(runner.ops, op, get_op(op).impls[impl].fn)
        req = Request("r", ids, SamplingParams())
        req.block_ids = [9, 2, 14, 5, 11, 0, 7][: math.ceil(len(ids) / runner.block_size)]
        rows = []
        for n in (13, 1, 16, 7):
            rows.append(runner.all_logits([(req, n)]))
            req.num_computed_tokens += n
        return torch.cat(rows)

    torch.testing.assert_close(prompt_logits("triton"), prompt_logits("reference"), rtol=1e-4, atol=1e-4)
