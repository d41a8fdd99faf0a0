"""A quantized KV cache (``kiln build --kv-cache-dtype fp8|int8``): the scales folded into the weights change
nothing by themselves, the cache holds one byte a value, and the engines stay near a float cache's.

Quality criteria, on the real SmolLM2 (a tiny random model's flat logits say little): the last-token logits
of the prefixes of a text, the share whose top token is the float32 cache's (teacher-forced greedy
agreement), and the relative error in norm.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import DEVICE, LIVE_CORE
from hf_models import make_hf_model
import tests_support
from tests_support import block_bytes, last_logits, text_prefixes
from kiln.builder import build, refit
from kiln.checkpoint.checkpoint import convert
from kiln.engine import BuildConfig, read_engine
from kiln.engine.inspect import describe, format_text
from kiln.errors import EngineError
from kiln.nn.attention import set_kv_cache_scales
from kiln.ops import REFERENCE
from kiln.ops.packed_linear import op_name
from kiln.runtime import LLM
from kiln.weight_formats import FORMATS, random_packed


def engine_logits(engine, prompts: list[list[int]], scales: dict | None = None) -> torch.Tensor:
    """Teacher-forced last-token logits; ``scales``: multiplied back by the attention layers (as for a
    quantized cache) whatever the cache."""
    if scales is None:
        return tests_support.engine_logits(engine, prompts, DEVICE)
    # (set after load, so no CUDA graph may have captured the layers before)
    llm = LLM(engine, device=DEVICE, engine_core=LIVE_CORE, cuda_graphs="off")
    try:
        llm.engine.call(lambda core: set_kv_cache_scales(core.runner.model, scales))
        return last_logits(llm, prompts)
    finally:
        llm.shutdown()


def with_float_cache(engine, out):
    """A copy of ``engine`` (folded weights and all) that keeps its KV cache in the build dtype."""
    shutil.copytree(engine, out)
    meta = json.loads((out / "engine.json").read_text())
    meta["build"]["kv_cache_dtype"] = None
    del meta["kv_cache_scales"]
    (out / "engine.json").write_text(json.dumps(meta))
    return out


SEQUENCE = torch.randint(3, 300, (40,), generator=torch.Generator().manual_seed(0)).tolist()
PREFIXES = [SEQUENCE[:i] for i in range(4, len(SEQUENCE) + 1, 4)]


@pytest.mark.parametrize("arch,kv,quantization", [("LlamaForCausalLM", "fp8", None),
                                                  ("Qwen2ForCausalLM", "int8", None),
                                                  ("LlamaForCausalLM", "int8", "int4_g64")])
def test_folded_scales_change_nothing_by_themselves(arch, kv, quantization, tmp_path, monkeypatch):
    """With a float cache, an engine whose QKV projection divides keys and values by the scales computes what
    the plain one does (RoPE commutes with the scaling; the attention layer multiplies them back). Qwen2
    folds them into its biases too; int4 groups into their float16 scales."""
    hf = make_hf_model(arch, tmp_path / "hf")
    config = BuildConfig(max_seq_len=128, quantization=quantization)
    plain = build(hf, tmp_path / "plain", config, progress=False)
    quantized = build(hf, tmp_path / "kv", BuildConfig(**{**config.to_dict(), "kv_cache_dtype": kv}), progress=False)
    scales = read_engine(quantized).meta["kv_cache_scales"]
    assert len(scales["k"]) == len(scales["v"]) == 3
    folded = with_float_cache(quantized, tmp_path / "folded")
    if quantization:  # int4 through its reference (decoded at load): a kernel's own layout rounds scales again
        monkeypatch.setenv("KILN_TUNING", "off")
        for engine in (plain, folded):
            meta = json.loads((engine / "engine.json").read_text())
            meta["plan"][op_name(quantization)] = {"impl": REFERENCE}
            (engine / "engine.json").write_text(json.dumps(meta))
    got = engine_logits(folded, PREFIXES, scales)
    want = engine_logits(plain, PREFIXES)
    # fp8's scales are powers of two (exact in float32); int8's round once; int4's float16 scales round once
    # (8e-4 of the key and value rows in norm, 5.6e-3 of the logits, measured).
    bound = 1e-5 if kv == "fp8" else 1e-4 if quantization is None else 1e-2
    assert float(((got - want).norm(dim=-1) / want.norm(dim=-1)).max()) < bound


@pytest.mark.parametrize("kv,worst", [("fp8", 0.3), ("int8", 0.1)])
def test_a_quantized_cache_stays_near_a_float_one(kv, worst, tmp_path):
    """The engine as it runs (its kernels, and on a GPU its CUDA graphs with the scales in them) stays near the
    float cache's logits: on a tiny random model, relative error in norm 0.14 (fp8) and 0.04 (int8) measured."""
    hf = make_hf_model("LlamaForCausalLM", tmp_path / "hf")
    want = engine_logits(build(hf, tmp_path / "f", BuildConfig(max_seq_len=128), progress=False), PREFIXES)
    engine = build(hf, tmp_path / "q", BuildConfig(max_seq_len=128, kv_cache_dtype=kv), progress=False)
    got = engine_logits(engine, PREFIXES)
    error = float(((got - want).norm(dim=-1) / want.norm(dim=-1)).max())
    assert error < worst


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0", "q4_k", "q5_k", "q6_k", "int4_g128", "int8", "fp8"])
def test_every_weight_format_scales_its_rows(fmt):
    f = FORMATS[fmt]
    g = torch.Generator().manual_seed(0)
    packed = random_packed(f, (6, 256), g) if hasattr(f, "block") else f.quantize(torch.randn(6, 256, generator=g))
    # (the KV folding divides by scales below 1: factors of 1 and more, for activations within the cache's range)
    factors = torch.tensor([0.5, 2.0, 300.0, 7.7, 1.0, 0.25])
    got = f.dequantize(f.scale_rows(packed, factors))
    want = f.dequantize(packed) * factors[:, None]
    # float16 scales round once (2^-11 each; a weight d q + m near zero takes both d's and m's rounding)
    assert float(((got - want).norm(dim=1) / want.norm(dim=1)).max()) < 2 ** -9
    if hasattr(f, "block"):  # float16 scales
        with pytest.raises(ValueError, match="overflows"):
            f.scale_rows(packed, torch.full((6,), 1e12))


def test_a_quantized_cache_holds_one_byte_a_value_and_records_its_scales(tmp_path):
    hf = make_hf_model("LlamaForCausalLM", tmp_path / "hf")
    float_engine = build(hf, tmp_path / "f", BuildConfig(max_seq_len=128), progress=False)
    engine = build(hf, tmp_path / "e", BuildConfig(max_seq_len=128, kv_cache_dtype="int8"), progress=False)
    assert block_bytes(engine) * 4 == block_bytes(float_engine)
    d = describe(read_engine(engine))
    assert d["kv_cache_bytes_per_token"] * 4 == d["float_kv_cache_bytes_per_token"]
    assert "int8" in format_text(d) and "scaled per layer (calibrated at build" in format_text(d)
    # Refit folds the recorded scales into the new weights as the build did: the same weights, the same bytes.
    before = load_file(engine / "rank0.safetensors")
    refit(engine, convert(hf, tmp_path / "ckpt").path)
    after = load_file(engine / "rank0.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # An engine.json whose quantized cache lacks its scales, or has the wrong number, is refused.
    meta = json.loads((engine / "engine.json").read_text())
    for broken, message in (({k: v for k, v in meta.items() if k != "kv_cache_scales"}, "needs kv_cache_scales"),
                            ({**meta, "kv_cache_scales": {"k": [1.0], "v": [1.0]}}, "each of the 3 layers")):
        (engine / "engine.json").write_text(json.dumps(broken))
        with pytest.raises(EngineError, match=message):
            read_engine(engine)


# kv: (least top-token agreement, largest relative logits error); measured 0.95/0.18 (fp8), 0.95/0.11 (int8).
@pytest.mark.parametrize("kv,least,worst", [("fp8", 0.85, 0.35), ("int8", 0.85, 0.25)])
def test_smollm2_with_a_quantized_cache_keeps_its_top_tokens(kv, least, worst, smollm2_engine, tmp_path):
    from kiln.builder.engine_cache import default_model

    prefixes = text_prefixes(smollm2_engine)
    want = engine_logits(smollm2_engine, prefixes)
    engine = build(default_model(), tmp_path / kv, BuildConfig(max_seq_len=512, kv_cache_dtype=kv),
                   progress=False, keep_packed=False)
    got = engine_logits(engine, prefixes)
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    error = float(((got - want).norm(dim=-1) / want.norm(dim=-1)).max())
    assert agree >= least and error < worst, (agree, error)
