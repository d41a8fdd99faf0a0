"""GGUF reading: SmolLM2 against transformers' GGUF loader, tiny written files of every tensor type, bad inputs."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from gguf_helpers import K_QUANTS, write_tiny_gguf
from kiln.checkpoint.gguf_file import read_gguf
from kiln.builder.engine_cache import default_model
from kiln.errors import ConversionError
from kiln.weight_formats import FORMATS, block_format

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Café, naïve, résumé, façade, jalapeño, Ångström, Łódź.",
    "Straße und Größe; über alles; Ärger, Öl, Übung.",
    "日本語のテキストも少し入れておきます。東京は大きい都市です。",
    "中文文本：你好，世界！今天天气很好。",
    "한국어 문장도 있습니다. 안녕하세요!",
    "Emoji: 🙂 🚀 🎉 👩‍💻 🇫🇷 ❤️ 👍🏽 🐍",
    "Combining: e\u0301 a\u0308 n\u0303 o\u0302 \u0301alone",
    "Greek: αβγ δέλτα; Cyrillic: привет мир; Hebrew: שלום; Arabic: مرحبا.",
    "Math: ∑ x² ≤ ∞, ∀ε>0 ∃δ; arrows → ← ↔; x½.",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += x[i];\n}\n",
    "class Foo:\n    \"\"\"Docstring.\"\"\"\n\n    def bar(self) -> None:\n        pass\n",
    "    x    =    y\t\t# aligned\n",
    "a  b   c    d     e      f",
    "\t\ttabs\tand\t\t\ttabs\t",
    "\n\n\nnewlines\n\n\n\n",
    "mixed\r\nline endings\r\n\r\n",
    "   leading and trailing   ",
    " ",
    "Numbers 12345 67890 3.14159 2.71828 1e-9 0xFF 1,000,000 -42",
    "2024-01-15T12:34:56Z version 10.2.3",
    "don't won't I'm you're they've we'll she'd IT'S",
    "https://example.com/path?q=1&r=2#frag",
    "JSON: {\"key\": [1, 2, {\"nested\": null}], \"s\": \"\\u00e9\"}",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<|im_end|><|im_start|> <|im_start|>",
    "",
]

# Fields of a Hugging Face config that kiln reads, compared with transformers' config from the same GGUF.
CONFIG_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
                 "bos_token_id", "eos_token_id", "pad_token_id"]


# --- SmolLM2-135M-Instruct (Q4_1, Q8_0, F32) against transformers -------------------------------------------

@pytest.fixture(scope="module")
def smollm_path() -> Path:
    return default_model()


@pytest.fixture(scope="module")
def smollm(smollm_path):
    return read_gguf(smollm_path)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm_path):
    return transformers.AutoTokenizer.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name)


def test_smollm_tokenizer_matches_transformers(smollm, hf_tokenizer):
    assert len(TEXTS) >= 25
    for text in TEXTS:
        ids = smollm.tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert smollm.tokenizer.encode(text).ids == hf_tokenizer.encode(text), text
        assert smollm.tokenizer.decode(ids, skip_special_tokens=False) == text
        assert hf_tokenizer.decode(ids) == text
    # Special tokens inside text stay whole.
    assert smollm.tokenizer.encode("<|im_start|>user", add_special_tokens=False).ids[0] == 1


def test_smollm_numerals_split_as_llama_cpp(smollm):
    """Known difference from transformers' GGUF tokenizer, on purpose.

    For pre-tokenizer 'smollm' llama.cpp first cuts out every numeral (\\p{N}) and then applies GPT-2's
    split to the pieces, as SmolLM2's own tokenizer.json does (Digits, then ByteLevel). transformers'
    GGUF tokenizer skips the first step, so it differs on a whitespace run before a numeral
    ("=    1": "ĠĠĠ" "Ġ" "1") and on a numeral with a merged leading space (" ½": "Ġ½"). kiln follows
    llama.cpp and the model's own tokenizer.
    """
    def tokens(text: str) -> list[str]:
        return smollm.tokenizer.encode(text, add_special_tokens=False).tokens

    assert tokens("x =    1") == ["x", "Ġ=", "ĠĠĠĠ", "1"]
    assert tokens("a ½") == ["a", "Ġ", "Â½"]  # ½ in the byte alphabet
    assert tokens("v2 12") == ["v", "2", "Ġ", "1", "2"]


def test_smollm_tokenizer_config(smollm, hf_tokenizer):
    config = smollm.tokenizer_config
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert config[key] == getattr(hf_tokenizer, key), key
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert config["chat_template"] == hf_tokenizer.chat_template
    assert config["model_max_length"] == 8192
    assert smollm.tokenizer.get_vocab_size() == len(hf_tokenizer) == 49152


def test_smollm_config_matches_transformers(smollm, smollm_path):
    hf = transformers.AutoConfig.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name)
    config = smollm.hf_config
    for key in CONFIG_FIELDS:
        assert config[key] == getattr(hf, key), key
    rope = getattr(hf, "rope_parameters", None) or {"rope_theta": hf.rope_theta}
    assert config["rope_theta"] == rope["rope_theta"]
    assert config["rope_scaling"] is None and rope.get("rope_type", "default") == "default"
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == hf.model_type == "llama"
    assert config["sliding_window"] is None

    from kiln.checkpoint.checkpoint import model_config
    kiln_config = model_config(smollm)
    assert (kiln_config.num_layers, kiln_config.num_kv_heads, kiln_config.head_dim) == (30, 3, 64)


def test_smollm_tensors_match_transformers(smollm, smollm_path):
    """Names, shapes and values equal transformers' dequantized state dict: this proves the Q/K un-permutation."""
    state = _transformers_state_dict(smollm_path)
    seen = []
    for name, tensor in smollm.tensors():
        assert name in state, name
        tensor = decoded(smollm, name, tensor)
        assert tensor.dtype == torch.float32, name
        assert tuple(tensor.shape) == tuple(state[name].shape), name
        assert float((tensor - state[name]).abs().max()) <= 1e-6, name
        seen.append(name)
    assert len(seen) == len(set(seen)) == smollm.num_tensors == 272
    # The embeddings are tied: transformers lists lm_head as a view of them, the file has no output.weight.
    assert set(state) - set(seen) == {"lm_head.weight"}
    # The file's Q4_1 projections and Q8_0 embeddings stay packed, each in its own format.
    assert set(smollm.formats.values()) == {"q4_1", "q8_0"} and smollm.formats["model.embed_tokens.weight"] == "q8_0"


def decoded(source, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A source tensor as floats: a packed one decoded from its block format."""
    fmt = source.formats.get(name)
    return tensor if fmt is None else block_format(fmt).dequantize(tensor)


def _transformers_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.state_dict()


# --- Tiny written files: every tensor type --------------------------------------------------------------------

def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    return blocks[:, offset:offset + 2].copy().view(np.float16).astype(np.float32)


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit (scale, min) pairs packed in 12 bytes (ggml's get_scale_min_k4)."""
    sc = np.empty((scales.shape[0], 8), np.float32)
    mn = np.empty((scales.shape[0], 8), np.float32)
    for j in range(8):
        if j < 4:
            sc[:, j] = scales[:, j] & 63
            mn[:, j] = scales[:, j + 4] & 63
        else:
            sc[:, j] = (scales[:, j + 4] & 0xF) | ((scales[:, j - 4] >> 6) << 4)
            mn[:, j] = (scales[:, j + 4] >> 4) | ((scales[:, j] >> 6) << 4)
    return sc, mn


def _q3_k_scales(scales: np.ndarray) -> np.ndarray:
    """The sixteen 6-bit scales packed in 12 bytes: low 4 bits in bytes 0-7 (low nibbles for scales 0-7,
    high nibbles for 8-15), high 2 bits in bytes 8-11 (byte 8 + k % 4, bits 2 * (k // 4)); stored + 32."""
    out = np.empty((scales.shape[0], 16), np.float32)
    for k in range(16):
        low = scales[:, k] & 0xF if k < 8 else scales[:, k - 8] >> 4
        high = (scales[:, 8 + k % 4] >> (2 * (k // 4))) & 3
        out[:, k] = (low | (high << 4)).astype(np.float32) - 32
    return out


def reference_dequantize(data: np.ndarray, ttype: Q, shape: tuple[int, ...]) -> np.ndarray:
    """Dequantize from ggml's block layouts (ggml-common.h, dequantize_row_* in ggml-quants.c), written here
    so that the reader (which calls the gguf package) is not checked against itself."""
    if ttype == Q.F32:
        return data.astype(np.float32).reshape(shape)
    if ttype == Q.F16:
        return data.astype(np.float32).reshape(shape)
    if ttype == Q.BF16:
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    block, size = gguf.GGML_QUANT_SIZES[ttype]
    b = np.ascontiguousarray(data).reshape(-1, size)
    n = b.shape[0]
    y = np.empty((n, block), np.float32)
    if ttype == Q.Q8_0:  # d, 32 x int8
        y[:] = _f16(b, 0) * b[:, 2:34].view(np.int8)
    elif ttype == Q.Q4_0:  # d, 16 bytes: low nibbles are values 0-15, high nibbles 16-31, offset 8
        qs = b[:, 2:18]
        y[:] = (np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.float32) - 8) * _f16(b, 0)
    elif ttype == Q.Q4_1:  # d, m, 16 bytes of nibbles
        qs = b[:, 4:20]
        y[:] = np.concatenate([qs & 0xF, qs >> 4], axis=1) * _f16(b, 0) + _f16(b, 2)
    elif ttype in (Q.Q5_0, Q.Q5_1):  # d, (Q5_1: m), qh (32 fifth bits, value j's is bit j), 16 bytes of nibbles
        start = 4 if ttype == Q.Q5_1 else 2
        qh = b[:, start:start + 4].copy().view("<u4")  # [n, 1]
        qs = b[:, start + 4:start + 20]
        fifth = (qh >> np.arange(32, dtype=np.uint32)) & 1
        q = (np.concatenate([qs & 0xF, qs >> 4], axis=1) | (fifth << 4)).astype(np.float32)
        y[:] = q * _f16(b, 0) + _f16(b, 2) if ttype == Q.Q5_1 else (q - 16) * _f16(b, 0)
    elif ttype == Q.Q2_K:  # scales[16] (low nibble scale, high nibble min), qs[64], d, dmin
        sc, qs, d, dmin = b[:, 0:16], b[:, 16:80], _f16(b, 80), _f16(b, 82)
        # Value 128c + 32j + 16h + l: sub-block 8c + 2j + h, 2 bits at shift 2j of qs[32c + 16h + l].
        for c in range(2):
            for j in range(4):
                for h in range(2):
                    sub, start = 8 * c + 2 * j + h, 128 * c + 32 * j + 16 * h
                    q = ((qs[:, 32 * c + 16 * h:32 * c + 16 * h + 16] >> (2 * j)) & 3).astype(np.float32)
                    y[:, start:start + 16] = d * (sc[:, sub:sub + 1] & 0xF) * q - dmin * (sc[:, sub:sub + 1] >> 4)
    elif ttype == Q.Q3_K:  # hmask[32], qs[64], scales[12], d
        hmask, qs, scales, d = b[:, 0:32], b[:, 32:96], _q3_k_scales(b[:, 96:108]), _f16(b, 108)
        # Value 128c + 32j + 16h + l: scale 8c + 2j + h, low 2 bits at shift 2j of qs[32c + 16h + l], and 4
        # subtracted unless bit 4c + j of hmask[16h + l] is set.
        for c in range(2):
            for j in range(4):
                for h in range(2):
                    sub, start = 8 * c + 2 * j + h, 128 * c + 32 * j + 16 * h
                    low = (qs[:, 32 * c + 16 * h:32 * c + 16 * h + 16] >> (2 * j)) & 3
                    high = (hmask[:, 16 * h:16 * h + 16] >> (4 * c + j)) & 1
                    q = low.astype(np.float32) - 4 * (1 - high.astype(np.float32))
                    y[:, start:start + 16] = d * scales[:, sub:sub + 1] * q
    elif ttype in (Q.Q4_K, Q.Q5_K):  # d, dmin, scales[12], (Q5_K: qh[32]), qs[128]
        d, dmin = _f16(b, 0), _f16(b, 2)
        sc, mn = _scale_min_k4(b[:, 4:16])
        qh, qs = (b[:, 16:48], b[:, 48:176]) if ttype == Q.Q5_K else (None, b[:, 16:144])
        for j in range(4):  # 64 values per step: low nibbles with sub-block 2j, high nibbles with 2j + 1
            q = qs[:, 32 * j:32 * j + 32]
            lo, hi = (q & 0xF).astype(np.float32), (q >> 4).astype(np.float32)
            if qh is not None:  # the fifth bit of each value
                lo += 16 * ((qh & (1 << (2 * j))) != 0)
                hi += 16 * ((qh & (2 << (2 * j))) != 0)
            for sub, vals in ((2 * j, lo), (2 * j + 1, hi)):
                y[:, 32 * sub:32 * sub + 32] = (d * sc[:, sub:sub + 1]) * vals - dmin * mn[:, sub:sub + 1]
    elif ttype == Q.Q6_K:  # ql[128], qh[64], scales[16] (int8), d
        ql, qh, sc, d = b[:, 0:128], b[:, 128:192], b[:, 192:208].view(np.int8).astype(np.float32), _f16(b, 208)
        groups = np.arange(32) // 16
        for half in range(2):  # 128 values each
            low, high = ql[:, 64 * half:64 * half + 64], qh[:, 32 * half:32 * half + 32]
            s = sc[:, 8 * half:8 * half + 8]
            parts = [
                (low[:, :32] & 0xF) | (((high >> 0) & 3) << 4),
                (low[:, 32:] & 0xF) | (((high >> 2) & 3) << 4),
                (low[:, :32] >> 4) | (((high >> 4) & 3) << 4),
                (low[:, 32:] >> 4) | (((high >> 6) & 3) << 4),
            ]
            for k, q in enumerate(parts):
                start = 128 * half + 32 * k
                y[:, start:start + 32] = d * s[:, groups + 2 * k] * (q.astype(np.float32) - 32)
    else:
        raise NotImplementedError(f"no reference dequantization for {ttype.name}")
    return y.reshape(shape)


def _blocks(*fields: bytes) -> np.ndarray:
    return np.frombuffer(b"".join(fields), dtype=np.uint8)[None, :]


def test_reference_dequantize_on_hand_built_k_blocks():
    """The test's own Q2_K / Q3_K decoding on blocks whose values follow from the format by hand."""
    f16 = lambda x: np.float16(x).tobytes()  # noqa: E731
    quants = bytes([0b11_10_01_00]) * 64  # at shift 2j every byte holds j
    # Q2_K: every sub-block scale 1, min 2; d 0.5, dmin 0.25: value 0.5 * j - 0.5 for the 32 values of step j.
    q2 = reference_dequantize(_blocks(bytes([0x21]) * 16, quants, f16(0.5), f16(0.25)), Q.Q2_K, (256,))
    np.testing.assert_array_equal(q2, np.tile(np.repeat([-0.5, 0.0, 0.5, 1.0], 32), 2))
    # Q3_K: every 6-bit scale 33 (low nibbles 1, high bits 0b10), so scale 1; d 2; hmask bits 0-3 set (the
    # first 128 values keep their low bits), bits 4-7 clear (the last 128 lose 4).
    scales = bytes([0x11]) * 8 + bytes([0b10_10_10_10]) * 4
    q3 = reference_dequantize(_blocks(bytes([0x0F]) * 32, quants, scales, f16(2.0)), Q.Q3_K, (256,))
    np.testing.assert_array_equal(q3, np.concatenate([np.repeat([0, 2, 4, 6], 32), np.repeat([-8, -6, -4, -2], 32)]))
    # Scale k = 32 + k - 8 (low nibble, high bits) for k = 0..15: sub-block k is scaled by k - 8.
    stored = [32 + k - 8 for k in range(16)]
    packed = bytearray(12)
    for k, v in enumerate(stored):
        packed[k % 8] |= (v & 0xF) << (0 if k < 8 else 4)
        packed[8 + k % 4] |= (v >> 4) << (2 * (k // 4))
    q3 = reference_dequantize(_blocks(bytes([0xFF]) * 32, bytes(64), bytes(packed), f16(1.0)), Q.Q3_K, (256,))
    np.testing.assert_array_equal(q3, np.zeros(256))  # low bits 0 and high bits set: every value is 0
    q3 = reference_dequantize(_blocks(bytes(32), bytes(64), bytes(packed), f16(1.0)), Q.Q3_K, (256,))
    np.testing.assert_array_equal(q3, np.repeat([-4.0 * (k - 8) for k in range(16)], 16))


# Per-block bound on |stored - original| for the types the gguf package quantizes, in units of
# the block's largest magnitude (amax) or range: the rounding step of each format, with 10% slack.
def _error_bound(values: np.ndarray, ttype: Q) -> np.ndarray:
    if ttype == Q.BF16:
        return np.abs(values) * 2.0 ** -8
    blocks = values.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    spread = blocks.max(axis=1, keepdims=True) - blocks.min(axis=1, keepdims=True)
    step = {Q.Q8_0: amax / 127, Q.Q4_0: amax / 8, Q.Q5_0: amax / 16, Q.Q4_1: spread / 15, Q.Q5_1: spread / 31}[ttype]
    return np.broadcast_to(1.1 * step + 1e-7, blocks.shape).reshape(values.shape)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                                   Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q2_K, Q.Q3_K], ids=lambda q: q.name)
def test_tensor_types(tmp_path, qtype):
    k_quant = qtype in K_QUANTS
    # K-quants pack 256 values per block, so every row needs a multiple of 256 values.
    written = write_tiny_gguf(tmp_path / "tiny.gguf", qtype=qtype, hidden=256 if k_quant else 64,
                              intermediate=256 if k_quant else 128)
    source = read_gguf(written.path)
    got = dict(source.tensors())
    assert set(got) == set(written.stored) and source.num_tensors == len(got)
    native = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
    for name, (ttype, data) in written.stored.items():
        # Kept packed: the format's bytes as the file holds them (rows in Hugging Face order).
        assert (name in source.formats) == (ttype.name.lower() in FORMATS and got[name].dim() == 2), name
        tensor = decoded(source, name, got[name])
        shape = tuple(tensor.shape)
        assert tensor.dtype == native.get(ttype, torch.float32), name
        expected = reference_dequantize(data, ttype, shape)
        assert shape == expected.shape, name
        assert np.allclose(tensor.float().numpy(), expected, rtol=1e-5, atol=1e-6), name
        if name in written.originals and ttype not in (Q.F32, Q.F16):
            error = np.abs(tensor.float().numpy() - written.originals[name])
            assert (error <= _error_bound(written.originals[name], ttype)).all(), name
        elif ttype in (Q.F32, Q.F16):
            assert np.array_equal(tensor.numpy(), written.originals[name].astype(data.dtype)), name
    # At least the Q/K projections really were quantized in this type (and un-permuted).
    assert written.stored["model.layers.0.self_attn.q_proj.weight"][0] == qtype


def test_llama_qk_unpermuted_and_matches_transformers(tmp_path):
    written = write_tiny_gguf(tmp_path / "tiny.gguf", qtype=Q.F32, heads=4, kv_heads=2)
    source = read_gguf(written.path)
    got = dict(source.tensors())
    q = "model.layers.1.self_attn.q_proj.weight"
    k = "model.layers.1.self_attn.k_proj.weight"
    # The file holds the rows permuted; the reader hands back the Hugging Face order.
    assert torch.equal(got[q], torch.from_numpy(written.originals[q]))
    assert torch.equal(got[k], torch.from_numpy(written.originals[k]))
    state = _transformers_state_dict(written.path)
    for name, tensor in got.items():
        assert torch.equal(tensor, state[name]), name


def test_qwen2_biases_not_permuted(tmp_path):
    written = write_tiny_gguf(tmp_path / "qwen.gguf", arch="qwen2", pre="qwen2", qtype=Q.F16, tie=False)
    source = read_gguf(written.path)
    assert source.hf_config["architectures"] == ["Qwen2ForCausalLM"]
    assert source.hf_config["tie_word_embeddings"] is False
    got = dict(source.tensors())
    assert "lm_head.weight" in got and "model.layers.0.self_attn.q_proj.bias" in got
    for name, (_, data) in written.stored.items():
        assert np.array_equal(got[name].numpy(), data), name


def test_mistral_arch_and_sliding_window(tmp_path):
    written = write_tiny_gguf(tmp_path / "mistral.gguf", arch="mistral", qtype=Q.Q8_0,
                              metadata={"{arch}.attention.sliding_window": 16})
    source = read_gguf(written.path)
    assert source.hf_config["architectures"] == ["MistralForCausalLM"]
    assert source.hf_config["sliding_window"] == 16
    got = dict(source.tensors())
    q = "model.layers.0.self_attn.q_proj.weight"
    values = decoded(source, q, got[q])
    assert np.array_equal(values.numpy(), reference_dequantize(written.stored[q][1], Q.Q8_0, tuple(values.shape)))


def test_converts_to_kiln_checkpoint(tmp_path):
    from kiln.checkpoint.checkpoint import convert

    written = write_tiny_gguf(tmp_path / "tiny.gguf", qtype=Q.Q8_0)
    checkpoint = convert(written.path, tmp_path / "ckpt", progress=False)
    assert checkpoint.config.num_layers == 2 and checkpoint.config.tie_word_embeddings
    assert checkpoint.generation["eos_token_ids"] == [written.tokens.index("<|im_end|>")]


# --- Config: rope scaling ---------------------------------------------------------------------------------------

def test_linear_rope_scaling(tmp_path):
    written = write_tiny_gguf(tmp_path / "tiny.gguf", metadata={"{arch}.rope.scaling.type": "linear",
                                                                "{arch}.rope.scaling.factor": 4.0})
    assert read_gguf(written.path).hf_config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    """llama.cpp stores Llama 3.1's scaling as per-frequency divisors; kiln recovers the parameters."""
    from kiln.nn.layers import rotary_table

    head_dim, theta = 128, 500000.0
    factor, low, high, old = 8.0, 1.0, 4.0, 8192
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    divisors = []
    for freq in inv_freq:  # as llama.cpp's convert_hf_to_gguf.py computes rope_freqs
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            divisors.append(1.0)
        elif wavelen > old / low:
            divisors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    written = write_tiny_gguf(tmp_path / "tiny.gguf", hidden=256, heads=2, kv_heads=1, rope_theta=theta,
                              extra_tensors={"rope_freqs.weight": np.array(divisors, np.float32)})
    source = read_gguf(written.path)
    scaling = source.hf_config["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["original_max_position_embeddings"] == old
    assert scaling["factor"] == pytest.approx(factor, rel=1e-6)
    assert scaling["low_freq_factor"] == pytest.approx(low, rel=1e-3)
    assert scaling["high_freq_factor"] == pytest.approx(high, rel=1e-3)
    assert "rope_freqs.weight" not in dict(source.tensors())
    got = rotary_table(head_dim, 4096, theta, scaling)
    freqs = torch.outer(torch.arange(4096).double(), torch.from_numpy(inv_freq / np.array(divisors)))
    want = torch.stack((torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()), dim=1)
    assert torch.allclose(got.double(), want, atol=2e-3)


# --- Tokenizers of tiny files -------------------------------------------------------------------------------------

_TINY_TEXTS = ["Hello world", " hello  there\n\tx", "日本語 😀 café", "<s>hi</s> <unk> x",
               "def add(a, b):\n    return", "<|im_start|>user\n12345<|im_end|>", "<think>why</think>",
               "don't 3.14", "", "   "]


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2", "gpt2", "no-such-pre"])
def test_byte_level_tokenizer_matches_transformers(tmp_path, pre, caplog):
    written = write_tiny_gguf(tmp_path / "tiny.gguf", pre=pre)
    with caplog.at_level(logging.WARNING, logger="kiln.checkpoint.gguf_tokenizer"):
        source = read_gguf(written.path)
    assert ("unknown pre-tokenizer" in caplog.text) == (pre == "no-such-pre")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in _TINY_TEXTS:
        ids = source.tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert source.tokenizer.decode(ids, skip_special_tokens=False) == text
    assert source.tokenizer_config["chat_template"] == hf.chat_template
    # A user-defined token stays whole but is not special; control tokens are special.
    think = written.tokens.index("<think>")
    assert source.tokenizer.encode("<think>", add_special_tokens=False).ids == [think]
    assert source.tokenizer.decode([think, written.tokens.index("<|im_end|>")]) == "<think>"


def test_byte_level_pre_tokenizer_splits_digits_for_smollm(tmp_path):
    written = write_tiny_gguf(tmp_path / "tiny.gguf", pre="smollm")
    pieces = [p for p, _ in read_gguf(written.path).tokenizer.pre_tokenizer.pre_tokenize_str("ab 123")]
    assert pieces == ["ab", "Ġ", "1", "2", "3"]


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    written = write_tiny_gguf(tmp_path / "spm.gguf", tokenizer="llama")
    source = read_gguf(written.path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in _TINY_TEXTS:
        ids = source.tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == hf.encode(text, add_special_tokens=False), text
        # add_bos_token is set: BOS goes first, as transformers does.
        assert source.tokenizer.encode(text).ids == hf.encode(text), text
        assert source.tokenizer.decode(ids, skip_special_tokens=False) == hf.decode(ids), text
    config = source.tokenizer_config
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert config["add_bos_token"] is True and config["pad_token"] is None
    # Characters outside the vocabulary fall back to byte tokens.
    assert source.tokenizer.encode("日", add_special_tokens=False).tokens[-3:] == ["<0xE6>", "<0x97>", "<0xA5>"]


def test_sentencepiece_without_space_prefix(tmp_path):
    """add_space_prefix=false is honoured as llama.cpp does (transformers' GGUF tokenizer ignores the flag)."""
    written = write_tiny_gguf(tmp_path / "spm.gguf", tokenizer="llama", add_space_prefix=False)
    tok = read_gguf(written.path).tokenizer
    assert not tok.encode("Hello world", add_special_tokens=False).tokens[0].startswith("\u2581")
    for text in _TINY_TEXTS:
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


# --- Bad inputs -------------------------------------------------------------------------------------------------

def test_unsupported_tensor_type_refused_up_front(tmp_path):
    # Q8_K exists in ggml but the gguf package cannot dequantize it.
    written = write_tiny_gguf(tmp_path / "bad.gguf", hidden=256, intermediate=256,
                              types={"blk.0.attn_q.weight": Q.Q8_K})
    with pytest.raises(ConversionError, match=r"tensor 'blk\.0\.attn_q\.weight' has GGUF type Q8_K, which kiln "
                                              r"cannot read; supported: F32, F16.*Q4_K"):
        read_gguf(written.path)


def test_truncated_file(tmp_path):
    written = write_tiny_gguf(tmp_path / "tiny.gguf")
    data = written.path.read_bytes()
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:1000])
    with pytest.raises(ConversionError, match="truncated") as e:
        read_gguf(head)
    assert str(head) in str(e.value)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-100])
    with pytest.raises(ConversionError, match="truncated"):
        read_gguf(cut)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("this is not a model\n")
    with pytest.raises(ConversionError, match="not a GGUF file"):
        read_gguf(bad)
    with pytest.raises(ConversionError, match="does not exist"):
        read_gguf(tmp_path / "missing.gguf")


def test_unknown_architecture(tmp_path):
    written = write_tiny_gguf(tmp_path / "xyz.gguf", arch="xyz")
    with pytest.raises(ConversionError, match=r"unsupported GGUF architecture 'xyz'; supported: llama, mistral, qwen2"):
        read_gguf(written.path)


def test_no_tokenizer(tmp_path):
    written = write_tiny_gguf(tmp_path / "notok.gguf", tokenizer=None)
    with pytest.raises(ConversionError, match="has no tokenizer"):
        read_gguf(written.path)


def test_unknown_tensor_and_missing_metadata(tmp_path):
    written = write_tiny_gguf(tmp_path / "extra.gguf", extra_tensors={"blk.0.attn_sinks.weight": np.zeros(4)})
    with pytest.raises(ConversionError, match="blk.0.attn_sinks.weight"):
        read_gguf(written.path)
    written = write_tiny_gguf(tmp_path / "partial.gguf", metadata={"{arch}.rope.dimension_count": 8})
    with pytest.raises(ConversionError, match="partial rotary"):
        read_gguf(written.path)


@pytest.mark.parametrize("key, value, expected", [
    ("{arch}.context_length", "abc",
     'GGUF metadata: llama.context_length must be an integer (or a list of one per layer), got "abc"'),
    ("{arch}.attention.layer_norm_rms_epsilon", "small", "layer_norm_rms_epsilon must be a number"),
    ("{arch}.attention.head_count", 0, "GGUF metadata llama.attention.head_count must be at least 1, got 0"),
    ("tokenizer.ggml.tokens", 5, "GGUF metadata: tokenizer.ggml.tokens must be a list, got 5"),
    ("tokenizer.ggml.eos_token_id", "2", 'tokenizer.ggml.eos_token_id must be an integer, got "2"'),
    ("general.architecture", [1, 2], "unsupported GGUF architecture [1, 2]"),
    ("{arch}.rope.scaling.type", "yarn", "unsupported rope scaling type 'yarn'"),
])
def test_mistyped_metadata_is_a_conversion_error_naming_the_key(tmp_path, key, value, expected):
    from kiln.checkpoint.checkpoint import convert

    written = write_tiny_gguf(tmp_path / "m.gguf", metadata={key: value})
    with pytest.raises(ConversionError) as e:
        convert(written.path, tmp_path / "ckpt", progress=False)
    assert expected in str(e.value) and str(written.path) in str(e.value)
    assert not (tmp_path / "ckpt").exists()


def test_helpers_write_files_transformers_reads(tmp_path):
    """The helper's files are valid GGUF by the reference reader too (the CLI tests reuse them)."""
    written = write_tiny_gguf(tmp_path / "tiny.gguf", qtype=Q.Q4_0)
    reader = gguf.GGUFReader(written.path)
    assert {t.name for t in reader.tensors} == set(written.gguf_names.values())
    assert os.path.getsize(written.path) > 0
