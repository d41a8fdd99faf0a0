"""The op registry and every plugin against its op's reference implementation."""
from __future__ import annotations

import os
import platform
import random
import subprocess
import sys

import pytest
import torch

from kiln.ops import REFERENCE, AttentionMetadata, OpTable, all_ops, get_op, plugin
from kiln.ops.reference import paged_attention, write_kv_cache


def random_paged_batch(seq_lens, q_lens, heads=8, heads_kv=2, dim=16, block=4, num_blocks=64, seed=0):
    """Random per-sequence keys and values, scattered into shuffled cache blocks.

    Returns (q, k_cache, v_cache, meta, kv): ``kv`` holds each sequence's keys and values unpaged, as
    they were before they were written to the cache, for an attention that never reads the cache.
    """
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, block, heads_kv, dim, generator=g)  # garbage where no sequence writes
    v_cache = torch.randn(num_blocks, block, heads_kv, dim, generator=g)
    ids = list(range(num_blocks))
    random.Random(seed).shuffle(ids)
    tables, loc, kv = [], [0], []
    for n, q in zip(seq_lens, q_lens):
        need = -(-n // block)
        table, ids = ids[:need], ids[need:]
        k, v = torch.randn(n, heads_kv, dim, generator=g), torch.randn(n, heads_kv, dim, generator=g)
        for pos in range(n):
            k_cache[table[pos // block], pos % block] = k[pos]
            v_cache[table[pos // block], pos % block] = v[pos]
        tables.append(table)
        kv.append((k, v))
        loc.append(loc[-1] + q)
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    meta = AttentionMetadata(slot_mapping=torch.zeros(loc[-1], dtype=torch.long), block_tables=table,
                             query_start_loc=loc, seq_lens=list(seq_lens), block_size=block)
    q = torch.randn(loc[-1], heads, dim, generator=g)
    return q, k_cache, v_cache, meta, kv


def dense_attention(q, kv, meta, scale, window):
    """Causal (optionally windowed) grouped-query attention over each sequence's unpaged keys and values.

    A sequence's queries are its last positions; a query at position p sees keys p - window + 1 .. p.
    """
    out = torch.empty_like(q)
    for i, (k, v) in enumerate(kv):
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        group = q.shape[1] // k.shape[1]
        keys, values = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [L, H, D]
        q_pos = torch.arange(len(k) - (end - start), len(k))[:, None]
        k_pos = torch.arange(len(k))[None, :]
        allowed = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window is not None else True)
        scores = torch.einsum("qhd,khd->hqk", q[start:end], keys) * scale
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, values)
    return out


@pytest.mark.parametrize("window", [None, 5])
def test_reference_paged_attention_matches_dense(window):
    q, kc, vc, meta, kv = random_paged_batch([9, 1, 17, 6], [9, 1, 4, 1])
    got = paged_attention(q, kc, vc, meta, 0.25, window)
    torch.testing.assert_close(got, dense_attention(q, kv, meta, 0.25, window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", [n for n, i in get_op("paged_attention").impls.items()
                                  if n != REFERENCE and i.supports(torch.device("cpu"), torch.float32)])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("case", [([5, 1, 33, 12], [1, 1, 1, 1]), ([7, 20], [7, 3]), ([9, 4, 16], [1, 4, 1])],
                         ids=["decode", "prefill", "mixed"])
def test_paged_attention_plugins_match_dense(impl, window, case):
    """Each plugin against attention over the unpaged keys and values, for decode-only steps and for steps
    with prefill chunks (which a plugin may run itself or hand to the reference)."""
    q, kc, vc, meta, kv = random_paged_batch(*case)
    fn = get_op("paged_attention").impls[impl].fn
    torch.testing.assert_close(fn(q, kc, vc, meta, 0.3, window), dense_attention(q, kv, meta, 0.3, window),
                               rtol=1e-5, atol=1e-5)


def test_every_op_has_a_reference():
    for name, op in all_ops().items():
        assert REFERENCE in op.impls, name


def test_op_table_binds_the_plan_and_falls_back_to_the_reference():
    @plugin("silu_and_mul", "test_cuda_only", supports=lambda device, dtype: device.type == "cuda")
    def cuda_only(x):  # pragma: no cover - never chosen on the CPU
        raise AssertionError

    try:
        table = OpTable({"silu_and_mul": {"impl": "test_cuda_only"}, "paged_attention": {"impl": "batched_decode"}},
                        torch.device("cpu"), torch.float32)
        assert table.choices["silu_and_mul"] == REFERENCE
        assert table.choices["paged_attention"] == "batched_decode"
        assert table.silu_and_mul is get_op("silu_and_mul").reference.fn
        assert table.fallbacks == ["silu_and_mul:test_cuda_only"]
    finally:
        del get_op("silu_and_mul").impls["test_cuda_only"]
    with pytest.raises(AttributeError, match="no op 'nonexistent'"):
        table.nonexistent


@pytest.mark.parametrize("op_name", ["linear", "logits"])
@pytest.mark.parametrize("rows", [1, 3, 8, 16, 37])
# The last two: tiles' and vectors' tails (out features past each build's weight tile of 2, 3 or 4 rows: 203 and 199
# leave 2 and 1 rows of a 3-row tile; in features past 8 or 16 floats).
@pytest.mark.parametrize("out_features,in_features", [(200, 96), (203, 100), (199, 40)])
def test_matmul_plugins_match_reference(op_name, rows, out_features, in_features):
    op = get_op(op_name)
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, in_features, generator=g), torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g)
    extra = (b,) if op_name == "linear" else ()
    want = op.reference.fn(x, w, *extra)
    checked = 0
    for impl in op.impls.values():
        if impl.name == REFERENCE or not impl.supports(torch.device("cpu"), torch.float32):
            continue
        weight = impl.prepare(w, torch.float32) if impl.prepare else w
        torch.testing.assert_close(impl.fn(x, weight, *extra), want, rtol=1e-5, atol=1e-4)
        checked += 1
    assert checked or op_name not in ("linear", "logits") or not torch.backends.mkldnn.is_available()


_OTHER_BUILDS_CHECK = """
import sys, torch
from kiln.ops import cpu_layer_ops
assert cpu_layer_ops.available(), "the extension did not build"
g = torch.Generator().manual_seed(0)
for rows, n, k in [(1, 203, 100), (4, 64, 576), (7, 9, 48), (16, 130, 33)]:
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    torch.testing.assert_close(cpu_layer_ops._kernels().few_rows_linear(x, w), x @ w.T, rtol=1e-5, atol=1e-4)
# The attention's 16-float vector types (two AVX registers, four SSE ones) at both unrolled head sizes, SwiGLU's exp.
from kiln.ops import reference
from kiln.ops.attention_metadata import AttentionMetadata
# Two sequences (a task per token and KV head), then one (a task per query row: the four-key passes and tails).
for dim, heads in [(64, 8), (128, 6)]:
    kc, vc = (torch.randn(6, 16, 2, dim, generator=g) for _ in range(2))
    for starts, lens, tables in [([0, 1, 2], [29, 7], [[3, 1], [5, 0]]), ([0, 1], [30], [[4, 2]])]:
        meta = AttentionMetadata(slot_mapping=torch.zeros(len(lens), dtype=torch.long),
                                 block_tables=torch.tensor(tables), query_start_loc=starts, seq_lens=lens,
                                 block_size=16)
        q = torch.randn(len(lens), heads, dim, generator=g)
        torch.testing.assert_close(cpu_layer_ops.cpu_paged_attention(q, kc, vc, meta, 0.1),
                                   reference.paged_attention(q, kc, vc, meta, 0.1), rtol=1e-5, atol=1e-5)
x = torch.randn(3, 2 * 300, generator=g) * 10
torch.testing.assert_close(cpu_layer_ops.cpu_silu_and_mul(x), reference.silu_and_mul(x), rtol=2e-6, atol=1e-6)
print("ok")
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction sets")
def test_layer_kernels_in_other_instruction_sets():
    """The C++ layer kernels built for AVX2 (8-float vectors) and for plain x86-64 (no SIMD intrinsics): the
    few-rows product, the attention and SwiGLU, each build in its own process (a process holds one build), the
    two builds at once."""
    procs = {march: subprocess.Popen([sys.executable, "-c", _OTHER_BUILDS_CHECK], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "KILN_CPU_MARCH": march, "OMP_NUM_THREADS": "1"})
             for march in ("haswell", "x86-64")}
    try:
        for march, proc in procs.items():
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0 and out.strip().endswith("ok"), f"{march}: {out}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def test_write_kv_cache_puts_each_token_in_its_slot():
    k_cache, v_cache = torch.zeros(6, 4, 2, 8), torch.zeros(6, 4, 2, 8)
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    slots = torch.tensor([23, 0, 9, 4, 13])
    write_kv_cache(k, v, k_cache, v_cache, slots)
    for t, slot in enumerate(slots.tolist()):
        torch.testing.assert_close(k_cache[slot // 4, slot % 4], k[t])
        torch.testing.assert_close(v_cache[slot // 4, slot % 4], v[t])
    assert int((k_cache != 0).any(-1).sum()) == 5 * 2


def test_op_table_binds_a_plan_config_and_ignores_one_it_does_not_know(caplog):
    calls = []

    @plugin("silu_and_mul", "test_tunable", configs=({"block": 64}, {"block": 128}))
    def tunable(x, block=64):
        calls.append(block)
        return get_op("silu_and_mul").reference.fn(x)

    try:
        x = torch.randn(2, 8)
        OpTable({"silu_and_mul": {"impl": "test_tunable", "config": {"block": 128}}},
                torch.device("cpu"), torch.float32).silu_and_mul(x)
        OpTable({"silu_and_mul": {"impl": "test_tunable", "config": {}}},
                torch.device("cpu"), torch.float32).silu_and_mul(x)
        with caplog.at_level("WARNING"):
            table = OpTable({"silu_and_mul": {"impl": "test_tunable", "config": {"tile": 3}}},
                            torch.device("cpu"), torch.float32)
        table.silu_and_mul(x)
        assert calls == [128, 64, 64]
        assert "takes no config keys ['tile']" in caplog.text and "using its default config" in caplog.text
    finally:
        del get_op("silu_and_mul").impls["test_tunable"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_attention_kernel_takes_prompt_chunks_and_half_precision(dtype, monkeypatch):
    """The C++ kernel itself on chunks longer than the plugin gives it (it hands those to SDPA), and on
    bfloat16 caches (float32 arithmetic, one rounding at the end)."""
    from kiln.ops import cpu_layer_ops as cpu_attention

    if not cpu_attention.available():
        pytest.skip("the CPU attention extension could not be built here")
    monkeypatch.setattr(cpu_attention, "MAX_QUERY_TOKENS_PER_SEQ", 10**6)
    q, kc, vc, meta, kv = random_paged_batch([40, 3, 70], [40, 1, 25], heads=6, heads_kv=2)
    want = dense_attention(q, kv, meta, 0.2, None)
    got = cpu_attention.cpu_paged_attention(q.to(dtype), kc.to(dtype), vc.to(dtype), meta, 0.2, None).float()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
    windowed = cpu_attention.cpu_paged_attention(q, kc, vc, meta, 0.2, 7)
    torch.testing.assert_close(windowed, dense_attention(q, kv, meta, 0.2, 7), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim", [64, 128, 40])
@pytest.mark.parametrize("cache", [torch.float32, torch.bfloat16, torch.int8])
def test_cpu_attention_kernel_over_head_sizes_and_groups(dim, cache, monkeypatch):
    """The C++ kernel keeps chunks of query heads in registers for head sizes 64 and 128 (up to 4 and 2 heads a
    chunk) and loops over any other size: every group size from 1 to 8 (chunk tails included), decode and
    prompt rows, a window, and caches read in place (float32) or converted a run at a time."""
    from kiln.ops import cpu_layer_ops as cpu
    from kiln.ops import reference as ref

    if not cpu.available():
        pytest.skip("the CPU kernels could not be built here")
    monkeypatch.setattr(cpu, "MAX_QUERY_TOKENS_PER_SEQ", 10**6)
    for group in range(1, 9):
        q, kc, vc, meta, kv = random_paged_batch([37, 1, 70], [1, 1, 9], heads=2 * group, heads_kv=2, dim=dim,
                                                 block=16, num_blocks=16, seed=group)
        if cache == torch.int8:  # the reference reads the same rounded values
            kc, vc = (ref.to_cache_dtype(c * 20, cache) for c in (kc, vc))
            kv = [tuple(ref.to_cache_dtype(x * 20, cache).float() for x in pair) for pair in kv]
        else:
            kc, vc = kc.to(cache), vc.to(cache)
            kv = [(k.to(cache).float(), v.to(cache).float()) for k, v in kv]
        for window in (None, 20):
            got = cpu.cpu_paged_attention(q, kc, vc, meta, 0.05, window)
            want = dense_attention(q, kv, meta, 0.05, window)  # values up to 127 from the int8 cache
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4 * max(1.0, float(want.abs().max())),
                                       msg=lambda m: f"group {group}, window {window}: {m}")


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_attention_kernel_splits_a_lone_decode_tokens_heads(threads):
    """A step with fewer (token, KV head) pairs than four a thread runs each pair's query rows as separate
    tasks (one row a task with AVX2): one decode token, every group size, head sizes 64 and 128 (the held rows)
    and 40 (the plain loops), lengths whose runs leave 1-3 keys past the four-key passes, and a window."""
    from kiln.ops import cpu_layer_ops as cpu

    if not cpu.available():
        pytest.skip("the CPU kernels could not be built here")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dim in (64, 128, 40):
            for group in range(1, 9):
                for length in (1, 7, 29, 66):
                    q, kc, vc, meta, kv = random_paged_batch([length], [1], heads=2 * group, heads_kv=2, dim=dim,
                                                             block=16, num_blocks=8, seed=group + length)
                    for window in (None, 10):
                        got = cpu.cpu_paged_attention(q, kc, vc, meta, 0.1, window)
                        want = dense_attention(q, kv, meta, 0.1, window)
                        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5,
                                                   msg=lambda m: f"dim {dim}, group {group}, length {length}: {m}")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "fp8"])
def test_cpu_kernels_write_and_read_a_quantized_cache(kv_dtype):
    """The C++ cache write stores keys and values as reference.to_cache_dtype does (rounded, saturated), and the
    attention kernel reads int8 and float8 caches as the reference reads their values."""
    from kiln.ops import cpu_layer_ops as cpu
    from kiln.ops import reference as ref

    if not cpu.available():
        pytest.skip("the CPU kernels could not be built here")
    g = torch.Generator().manual_seed(1)
    tokens, heads, heads_kv, dim = 5, 6, 2, 16
    qkv = torch.randn(tokens, heads + 2 * heads_kv, dim, generator=g) * 150  # past both ranges
    angles = torch.rand(tokens, 1, dim // 2, generator=g).repeat(1, 1, 2) * 6
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=1)
    caches = [torch.zeros(8, 4, heads_kv, dim, dtype=kv_dtype) for _ in range(4)]
    slots = torch.tensor([3, 17, 30, 5, 6])
    q = cpu.cpu_rotary_and_write_kv_cache(qkv, cos_sin, caches[0], caches[1], slots, heads)
    torch.testing.assert_close(q, ref.rotary_and_write_kv_cache(qkv, cos_sin, caches[2], caches[3], slots, heads))
    for got, want in ((caches[0], caches[2]), (caches[1], caches[3])):
        # (float32 rotations may differ in the last bit, so a key may round to the next step)
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -3, atol=1)
    assert float(caches[1].float().abs().max()) == ref.KV_CACHE_MAX[kv_dtype]

    q, kc, vc, meta, _ = random_paged_batch([40, 3, 70], [1, 1, 1], heads=6, heads_kv=2)
    kc, vc = (ref.to_cache_dtype(c * 20, kv_dtype) for c in (kc, vc))
    want = paged_attention(q, kc, vc, meta, 0.05, None)
    torch.testing.assert_close(cpu.cpu_paged_attention(q, kc, vc, meta, 0.05, None), want, rtol=1e-5, atol=1e-4)


def test_cpu_layer_kernels_match_their_references():
    """The C++ plugins of the small ops (one pass a row, float32) against the references, and the keys and
    values they write against the reference's cache writes."""
    from kiln.ops import cpu_layer_ops as cpu
    from kiln.ops import reference as ref

    if not cpu.available():
        pytest.skip("the CPU kernels could not be built here")
    g = torch.Generator().manual_seed(0)
    x, res = torch.randn(5, 96, generator=g), torch.randn(5, 96, generator=g)
    w = torch.rand(96, generator=g) + 0.5
    torch.testing.assert_close(cpu.cpu_rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5))
    for got, want in zip(cpu.cpu_add_rms_norm(x, res, w, 1e-5), ref.add_rms_norm(x, res, w, 1e-5)):
        torch.testing.assert_close(got, want)
    gate_up = torch.randn(3, 2, 80, generator=g)
    torch.testing.assert_close(cpu.cpu_silu_and_mul(gate_up), ref.silu_and_mul(gate_up))
    # The kernel's own exp, over the range and past both ends of its clamp (e^-87 and e^88).
    gate = torch.cat((torch.linspace(-120, 120, 4001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 87.5, -88.5])))
    wide = torch.cat((gate, torch.linspace(-3, 3, gate.numel()))).reshape(1, -1)
    torch.testing.assert_close(cpu.cpu_silu_and_mul(wide), ref.silu_and_mul(wide), rtol=2e-6, atol=1e-30)
    tokens, heads, heads_kv, dim = 4, 6, 2, 16
    qkv = torch.randn(tokens, heads + 2 * heads_kv, dim, generator=g)
    cos_sin = torch.randn(tokens, 2, dim, generator=g)
    caches = [torch.zeros(8, 4, heads_kv, dim) for _ in range(4)]
    slots = torch.tensor([3, 17, 30, 5])
    q = cpu.cpu_rotary_and_write_kv_cache(qkv, cos_sin, caches[0], caches[1], slots, heads)
    want = ref.rotary_and_write_kv_cache(qkv, cos_sin, caches[2], caches[3], slots, heads)
    torch.testing.assert_close(q, want)
    torch.testing.assert_close(caches[0], caches[2])
    torch.testing.assert_close(caches[1], caches[3])
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu.cpu_rotary_and_write_kv_cache(qkv, cos_sin, caches[0], caches[1], torch.tensor([3, 17, 32, 5]), heads)
    # What the kernels do not take goes to the reference: bfloat16 rows, a strided x.
    torch.testing.assert_close(cpu.cpu_rms_norm(x.bfloat16(), w.bfloat16(), 1e-5),
                               ref.rms_norm(x.bfloat16(), w.bfloat16(), 1e-5))
    torch.testing.assert_close(cpu.cpu_silu_and_mul(gate_up[:, :, :40]), ref.silu_and_mul(gate_up[:, :, :40]))
