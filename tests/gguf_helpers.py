"""Write tiny GGUF files for tests: a small llama/mistral/qwen2 with chosen tensor types and tokenizer metadata.

``write_tiny_gguf(path, ...)`` writes a file the way llama.cpp's converter would (Q and K rows of
llama/mistral permuted to interleaved rotary order, norms in F32, tokenizer metadata) and returns
what was written in Hugging Face layout, so tests can check a reader against it.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from hf_models import CORPUS, TINY_CHAT_TEMPLATE

# Tensor types the gguf package can quantize; the others are written as raw random blocks.
QUANTIZABLE = {Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}
K_QUANTS = {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
BYTE_LEVEL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<think>"]
CHAT_TEMPLATE = TINY_CHAT_TEMPLATE


@dataclass
class TinyGGUF:
    path: Path
    arch: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rms_eps: float
    tie: bool
    # HF name -> (GGUF type, data in Hugging Face row order as stored: raw block bytes for block types).
    stored: dict[str, tuple[Q, np.ndarray]] = field(default_factory=dict)
    # HF name -> float32 values before they were stored (absent for random raw blocks).
    originals: dict[str, np.ndarray] = field(default_factory=dict)
    # HF name -> GGUF name.
    gguf_names: dict[str, str] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)


def write_tiny_gguf(
    path: str | Path,
    *,
    arch: str = "llama",
    qtype: Q = Q.F32,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    tie: bool = True,
    tokenizer: str | None = "gpt2",
    pre: str = "smollm",
    add_space_prefix: bool = True,
    types: dict[str, Q] | None = None,
    metadata: dict[str, Any] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    context_length: int = 256,
    rope_theta: float = 10000.0,
    seed: int = 0,
) -> TinyGGUF:
    """Write a tiny model; 2-D weights in ``qtype`` (``types`` overrides per GGUF tensor name), norms in F32.

    ``tokenizer``: "gpt2" (byte-level BPE), "llama" (SentencePiece-style with scores) or None (no tokenizer
    metadata). ``metadata`` adds or replaces key/values (``{arch}`` in a key is replaced by the architecture).
    ``extra_tensors`` are written as F32 under their GGUF names.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    tok_meta = _tokenizer_metadata(tokenizer, pre, add_space_prefix) if tokenizer else {}
    tokens = tok_meta.get("tokenizer.ggml.tokens", [])
    vocab = len(tokens) or 300
    head_dim = hidden // heads
    model = TinyGGUF(path, arch, hidden, layers, heads, kv_heads, head_dim, intermediate, vocab, context_length,
                     rope_theta, 1e-5, tie, tokens=list(tokens))

    # GGUF name -> (Hugging Face name, shape as transformers has it).
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {
        "token_embd.weight": ("model.embed_tokens.weight", (vocab, hidden)),
    }
    for i in range(layers):
        p, g = f"model.layers.{i}.", f"blk.{i}."
        shapes.update({
            g + "attn_norm.weight": (p + "input_layernorm.weight", (hidden,)),
            g + "attn_q.weight": (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
            g + "attn_k.weight": (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            g + "attn_v.weight": (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            g + "attn_output.weight": (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
            g + "ffn_norm.weight": (p + "post_attention_layernorm.weight", (hidden,)),
            g + "ffn_gate.weight": (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            g + "ffn_up.weight": (p + "mlp.up_proj.weight", (intermediate, hidden)),
            g + "ffn_down.weight": (p + "mlp.down_proj.weight", (hidden, intermediate)),
        })
        if arch == "qwen2":
            shapes.update({
                g + "attn_q.bias": (p + "self_attn.q_proj.bias", (heads * head_dim,)),
                g + "attn_k.bias": (p + "self_attn.k_proj.bias", (kv_heads * head_dim,)),
                g + "attn_v.bias": (p + "self_attn.v_proj.bias", (kv_heads * head_dim,)),
            })
    shapes["output_norm.weight"] = ("model.norm.weight", (hidden,))
    if not tie:
        shapes["output.weight"] = ("lm_head.weight", (vocab, hidden))

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(context_length)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(model.rms_eps)
    writer.add_rope_freq_base(rope_theta)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    meta = dict(tok_meta)
    meta.update({k.replace("{arch}", arch): v for k, v in (metadata or {}).items()})
    for key, value in meta.items():
        _add_kv(writer, key, value)

    for gguf_name, (hf_name, shape) in shapes.items():
        ttype = (types or {}).get(gguf_name, qtype if len(shape) == 2 else Q.F32)
        values = (rng.standard_normal(shape) * (0.02 if len(shape) == 2 else 1.0)).astype(np.float32)
        if len(shape) == 1 and gguf_name.endswith("norm.weight"):
            values = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        data, original = encode(values, ttype, rng)
        model.stored[hf_name] = (ttype, data)
        model.gguf_names[hf_name] = gguf_name
        if original is not None:
            model.originals[hf_name] = original
        if arch in ("llama", "mistral") and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            data = permute_rows(data, heads if ".attn_q." in gguf_name else kv_heads)
        writer.add_tensor(gguf_name, data, raw_dtype=None if ttype in (Q.F32, Q.F16) else ttype)
    for gguf_name, values in (extra_tensors or {}).items():
        writer.add_tensor(gguf_name, np.asarray(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def encode(values: np.ndarray, ttype: Q, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """``values`` stored as ``ttype``: (stored data, the float values it stands for, or None for random blocks)."""
    if ttype == Q.F32:
        return values, values
    if ttype == Q.F16:
        return values.astype(np.float16), values
    if ttype in QUANTIZABLE:
        return gguf.quants.quantize(values, ttype), values
    return random_blocks(ttype, values.shape, rng), None


def random_blocks(ttype: Q, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Raw blocks of ``ttype`` for a tensor of ``shape``: random bits, with small finite f16 super-block scales.

    For the K-quants the f16 fields are set (d ~ 1e-3, dmin ~ 1e-3) so values stay small and finite; other
    types get pure random bytes (fine for tests that only need the type refused).
    """
    block, size = gguf.GGML_QUANT_SIZES[ttype]
    rows, cols = (1, shape[0]) if len(shape) == 1 else shape
    assert cols % block == 0, f"{ttype.name} needs rows of a multiple of {block} values, not {cols}"
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)

    def f16(count: int) -> np.ndarray:
        return (rng.uniform(0.5e-3, 2e-3, size=(rows, cols // block, count))).astype(np.float16).view(np.uint8)

    if ttype in (Q.Q4_K, Q.Q5_K):  # d, dmin first
        raw[..., 0:4] = f16(2)
    elif ttype == Q.Q6_K:  # d last
        raw[..., size - 2:] = f16(1)
    elif ttype == Q.Q2_K:  # d, dmin last
        raw[..., size - 4:] = f16(2)
    elif ttype == Q.Q3_K:  # d last
        raw[..., size - 2:] = f16(1)
    out = raw.reshape(rows, cols // block * size)
    return out.reshape(-1) if len(shape) == 1 else out


def permute_rows(data: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter order for Q/K rows: per head, rotate-half rows (h, i) become interleaved (i, h)."""
    rows = data.shape[0]
    return data.reshape(heads, 2, rows // heads // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def _add_kv(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))  # ints as INT32, floats as FLOAT32, strings as STRING
    else:
        raise TypeError(f"cannot write {key}={value!r}")


def _tokenizer_metadata(kind: str, pre: str, add_space_prefix: bool) -> dict[str, Any]:
    if kind == "gpt2":
        tokens, merges, types = byte_level_vocab()
        return {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": tokens.index("<|im_start|>"),
            "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
            "tokenizer.ggml.unknown_token_id": tokens.index("<|endoftext|>"),
            "tokenizer.ggml.padding_token_id": tokens.index("<|endoftext|>"),
            "tokenizer.ggml.add_bos_token": False,
            "tokenizer.chat_template": CHAT_TEMPLATE,
        }
    if kind == "llama":
        tokens, scores, types = sentencepiece_vocab()
        return {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_eos_token": False,
            "tokenizer.ggml.add_space_prefix": add_space_prefix,
        }
    raise ValueError(f"unknown tokenizer kind {kind!r}")


@functools.cache
def byte_level_vocab() -> tuple[list[str], list[str], list[int]]:
    """A trained GPT-2-style byte-level BPE as GGUF stores it: tokens, "a b" merges, token types."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=BYTE_LEVEL_SPECIALS + USER_DEFINED,
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in BYTE_LEVEL_SPECIALS else 4 if t in USER_DEFINED else 1 for t in tokens]
    return tokens, merges, types


@functools.cache
def sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary as llama.cpp stores it: <unk> <s> </s>, 256 byte tokens, scored pieces."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False)
    tok.train_from_iterator(["Hello world, hello there.", "The quick brown fox jumps over the lazy dog.",
                             "def add(a, b):\n    return a + b", "Numbers 12345 and 67890."] * 10, trainer)
    pieces = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return tokens, scores, types
