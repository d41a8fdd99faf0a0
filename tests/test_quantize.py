"""Quantized engines (``kiln build --quantize int8|int4|fp8``): kiln's formats against llama.cpp's quantizer
and their round-to-nearest bounds, each kernel against its op's reference, engines that compute exactly
what their decoded weights do, and how far quantized engines move from float32.

Quality criteria (tiny random models have nearly flat logits, so a small change flips the top token
far more often than in a trained model; measured on this file's model, bounds about twice the error):
the last-token logits of 45 prefixes of one sequence, relative error in norm, and the share of
prefixes whose top token is float32's (teacher-forced greedy agreement). On SmolLM2 (a trained model)
int8 keeps the top token on at least 90% of the prefixes of a text (measured 97.8%).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file, save_file

from conftest import DEVICE
from hf_models import make_hf_model
import tests_support
from tests_support import text_prefixes
from kiln.builder import build, refit
from kiln.checkpoint.checkpoint import convert
from kiln.cli.main import main
from kiln.engine import BuildConfig, read_engine
from kiln.engine.inspect import describe, format_text
from kiln.errors import EngineError
from kiln.ops import REFERENCE, get_op
from kiln.ops.packed_linear import FP8_MAX, FP8_MIN_SCALE, INT8PACK_MAX_ROWS, op_name, round_to_fp8
from kiln.runtime import LLM, SamplingParams
from kiln.weight_formats import FORMATS, QUANTIZED, block_format, quantized_format, random_packed

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_int4_in_groups_of_32_is_llama_cpp_q4_1_byte_for_byte():
    w = torch.randn(48, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    ours = block_format("int4_g32").quantize(w).numpy()
    assert np.array_equal(ours, quantize(w.numpy(), Q.Q4_1))
    assert np.array_equal(block_format("int4_g32").dequantize(torch.from_numpy(ours)).numpy(),
                          dequantize(ours, Q.Q4_1))


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_round_to_nearest_stays_within_half_a_step(fmt):
    f = FORMATS[fmt]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(33, 512, generator=g) * torch.rand(33, 1, generator=g)
    w[5] = 0  # an all-zero row keeps a finite scale
    packed = f.quantize(w)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == f.packed_shape((33, 512))
    assert f.logical_shape(tuple(packed.shape)) == (33, 512)
    back = f.dequantize(packed)
    assert torch.isfinite(back).all() and not back[5].any()
    error = (back - w).abs()
    if fmt.startswith("int4"):
        groups = w.reshape(33, -1, f.block)
        step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(f.block, dim=1)
        # half a step, plus the float16 rounding of the group's scale and minimum
        assert (error <= step / 2 + 15 * step * 2**-11 + w.abs().amax() * 2**-11 + 1e-7).all()
    elif fmt == "int8":
        step = w.abs().amax(-1, keepdim=True) / 127
        assert (error <= step / 2 + 1e-6).all()
    else:  # e4m3: 3 mantissa bits; below 2^-6 of the scale, subnormal steps of 2^-9
        scale = w.abs().amax(-1, keepdim=True) / 448
        assert (error <= torch.maximum(w.abs() * 2**-4, scale * 2**-10) + 1e-7).all()


def test_quantize_options_name_a_format_or_say_what_is_wrong():
    assert quantized_format("int4") == "int4_g128"
    assert quantized_format("int4", 32) == "int4_g32"
    assert quantized_format("fp8") == "fp8"
    with pytest.raises(ValueError, match="32, 64, 128, 256"):
        quantized_format("int4", 48)
    with pytest.raises(ValueError, match="per output channel"):
        quantized_format("int8", 64)
    with pytest.raises(EngineError, match="quantization 'int3'"):
        BuildConfig(quantization="int3")
    assert main(["build", "nowhere", "-o", "x", "--quantize", "int8", "--group-size", "64"]) == 1


@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("rows", [1, 8, INT8PACK_MAX_ROWS])
def test_every_kernel_of_a_quantized_format_matches_its_reference(fmt, rows):
    f = FORMATS[fmt]
    op = get_op(op_name(fmt))
    g = torch.Generator().manual_seed(rows)
    device = torch.device(DEVICE)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    ran = []
    for out_features, in_features in ((96, 256), (200, 512)):
        w = f.quantize(torch.randn(out_features, in_features, generator=g) / in_features ** 0.5).to(device)
        x = torch.randn(rows, in_features, generator=g).to(device, dtype)
        bias = torch.randn(out_features, generator=g).to(device, dtype)
        weight = f.dequantize(w).to(device)
        # The op's meaning: W8A8 for fp8 (activations rounded to e4m3 per token), weight-only otherwise.
        want = (round_to_fp8(x.float()) if fmt == "fp8" else x.float()) @ weight.T + bias.float()
        for impl in op.impls.values():
            if not impl.supports(device, dtype):
                continue
            got = impl.fn(x, impl.prepare(w, dtype) if impl.prepare else w, bias).float()
            error = float((got - want).norm() / want.norm())
            # float32: rounding; bfloat16 activations or outputs: about 2^-8 relative. int8pack's activations
            # are bfloat16 for a decode step's rows; a prompt chunk's product is float32's.
            exact = impl.name == REFERENCE or (impl.name == "int8pack" and rows >= INT8PACK_MAX_ROWS)
            tolerance = 1e-5 if dtype == torch.float32 and exact else 1.5e-2
            assert error < tolerance, (impl.name, error)
            ran.append(impl.name)
    assert REFERENCE in ran


@pytest.mark.skipif(DEVICE != "cpu", reason="PyTorch's int4 CPU kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4pack_computes_the_same_through_the_cpp_call_and_from_python(dtype, monkeypatch):
    from kiln.ops import cpu_layer_ops

    impl = get_op(op_name("q4_1")).impls["int4pack"]
    if not impl.supports(torch.device("cpu"), dtype) or not cpu_layer_ops.available():
        pytest.skip("no int4 CPU kernel or no C++ extension here")
    g = torch.Generator().manual_seed(0)
    w = random_packed(FORMATS["q4_1"], (200, 256), generator=g)  # 200 rows: padded to 208 for the kernel
    x = torch.randn(3, 256, generator=g).to(dtype)
    weight = impl.prepare(w, dtype)
    through_cpp = impl.fn(x, weight)
    monkeypatch.setattr(cpu_layer_ops, "int4pack_linear", lambda *args: None)
    from_python = impl.fn(x, weight)
    assert through_cpp.dtype == from_python.dtype == dtype and through_cpp.shape == (3, 200)
    assert torch.equal(through_cpp, from_python)


def test_the_fp8_row_kernel_rounds_as_the_reference():
    pytest.importorskip("triton")
    from triton_interpreter import DEVICE as KERNEL_DEVICE

    from kiln.ops.triton_kernels.fp8_rows import quantize_rows_fp8

    g = torch.Generator().manual_seed(2)
    x = (torch.randn(6, 3000, generator=g) * torch.rand(6, 1, generator=g) * 10).to(KERNEL_DEVICE)
    x[2] = 0
    values, scales = quantize_rows_fp8(x, FP8_MAX, FP8_MIN_SCALE, block=512)
    assert values.dtype == torch.float8_e4m3fn and scales.shape == (6, 1)
    assert torch.equal(scales[:, 0], (x.abs().amax(-1) / 448).clamp(min=1e-12))
    # NOTE: Triton 3.6's interpreter converts some float32 values to e4m3 wrongly (-10.36 / 0.078 becomes
    # -5.18 / 0.078), so on the CPU only the scales are checked; the values on the GPU.
    if KERNEL_DEVICE.type == "cuda":
        assert torch.equal(values.float() * scales, round_to_fp8(x))


# ----- engines -----
@pytest.fixture(scope="module")
def float_logits(tiny_llama, tmp_path_factory):
    engine = build(tiny_llama, tmp_path_factory.mktemp("quant-float") / "e", BuildConfig(max_seq_len=128),
                   progress=False)
    return engine_logits(engine, PREFIXES)


SEQUENCE = torch.randint(3, 300, (48,), generator=torch.Generator().manual_seed(0)).tolist()
PREFIXES = [SEQUENCE[:i] for i in range(4, len(SEQUENCE) + 1)]


def engine_logits(engine, prompts: list[list[int]]) -> torch.Tensor:
    return tests_support.engine_logits(engine, prompts, DEVICE)


def with_weights_decoded(hf_dir, out_dir, fmt: str):
    """A copy of a Hugging Face folder whose linear weights are what ``fmt`` keeps of them (quantized and
    decoded): every format here scales rows or groups within a row, so this equals what the build keeps
    of the fused projections."""
    shutil.copytree(hf_dir, out_dir)
    tensors = load_file(hf_dir / "model.safetensors")
    f = block_format(fmt)
    for name, t in tensors.items():
        if name.split(".")[-2] in LINEAR:
            tensors[name] = f.dequantize(f.quantize(t))
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


@pytest.mark.parametrize("fmt", ["int8", "int4_g64"])
def test_a_quantized_engine_computes_what_its_decoded_weights_do(fmt, tiny_llama, tmp_path, monkeypatch):
    """With each op's reference, a quantized engine and a float engine of the same weights decoded agree
    to float32 rounding: the quantized path keeps, fuses and binds the weights as it should."""
    monkeypatch.setenv("KILN_TUNING", "off")  # the plan as recorded: the references
    engine = build(tiny_llama, tmp_path / "q", BuildConfig(max_seq_len=128, quantization=fmt), progress=False,
                   tune=False, quantize_calibration="none")
    meta = json.loads((engine / "engine.json").read_text())
    meta["plan"][op_name(fmt)] = {"impl": REFERENCE}
    (engine / "engine.json").write_text(json.dumps(meta))
    decoded = build(with_weights_decoded(tiny_llama, tmp_path / "hf-decoded", fmt), tmp_path / "f",
                    BuildConfig(max_seq_len=128), progress=False)
    prompts = PREFIXES[::10]
    got, want = engine_logits(engine, prompts), engine_logits(decoded, prompts)
    # float32 rounding; on a GPU the products of differently laid out weights sum in other orders (2e-4 seen)
    assert float(((got - want).norm(dim=-1) / want.norm(dim=-1)).max()) < (1e-4 if DEVICE == "cpu" else 1e-3)


# fmt: (largest relative logits error, least top-token agreement); measured 0.035/0.91, 0.175/0.71,
# 0.43/0.47 and 0.52/0.47 on this model (int4 with its default activation-aware scales; rounding to nearest:
# 0.43/0.42 and 0.52/0.47; tests/test_awq.py compares the two).
QUALITY = {"int8": (0.07, 0.8), "fp8": (0.3, 0.55), "int4_g32": (0.8, 0.3), "int4_g128": (0.9, 0.3)}


@pytest.mark.parametrize("fmt", QUALITY)
def test_quantized_engines_stay_near_float32(fmt, tiny_llama, float_logits, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_TUNING", "on")  # the kernels the machine would run
    engine = build(tiny_llama, tmp_path / "e", BuildConfig(max_seq_len=128, quantization=fmt), progress=False)
    got = engine_logits(engine, PREFIXES)
    error = float(((got - float_logits).norm(dim=-1) / float_logits.norm(dim=-1)).max())
    agree = float((got.argmax(-1) == float_logits.argmax(-1)).float().mean())
    worst, least = QUALITY[fmt]
    assert error < worst and agree >= least, (error, agree)


def test_a_quantized_engine_records_its_formats_and_refits_float_weights(tiny_llama, tmp_path):
    hf = make_hf_model("LlamaForCausalLM", tmp_path / "hf-320", hidden_size=320, intermediate_size=512)
    # Built on the CPU, where refit quantizes too: the same bytes (a GPU may round a few quants differently).
    engine = build(hf, tmp_path / "e", BuildConfig(max_seq_len=128, quantization="int4_g128"), progress=False,
                   device="cpu")
    e = read_engine(engine)
    assert e.build.quantization == "int4_g128"
    formats = e.tensor_formats
    layer = "model.layers.0."
    # Rows of 320 weights take groups of 64 (128 does not divide them); down's rows of 512 take 128.
    assert formats[layer + "self_attn.qkv_proj.weight"] == "int4_g64"
    assert formats[layer + "mlp.down_proj.weight"] == "int4_g128"
    assert formats["model.embed_tokens.weight"] == formats["lm_head.weight"] == "float"
    assert formats[layer + "input_layernorm.weight"] == "float"
    d = describe(e)
    assert {"int4_g64", "int4_g128"} <= set(d["weight_formats"])
    assert d["weight_bytes"] < 0.6 * d["float_weight_bytes"]
    assert "int4_g64" in format_text(d) and "to int4_g128 at build" in format_text(d)
    # Refit takes float weights and quantizes them as the build did.
    before = load_file(engine / "rank0.safetensors")
    refit(engine, convert(hf, tmp_path / "ckpt").path)
    after = load_file(engine / "rank0.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    llm = LLM(engine, device=DEVICE)
    out = llm.generate([[1, 5, 9]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
    llm.shutdown()


def test_smollm2_int8_keeps_its_top_tokens(smollm2_engine, tmp_path):
    from kiln.builder.engine_cache import default_model

    prefixes = text_prefixes(smollm2_engine)
    want = engine_logits(smollm2_engine, prefixes)
    int8 = build(default_model(), tmp_path / "int8", BuildConfig(max_seq_len=256, quantization="int8"),
                 progress=False, keep_packed=False)
    got = engine_logits(int8, prefixes)
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.9
