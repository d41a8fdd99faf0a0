"""Read a GGUF file (llama.cpp's format) into a SourceModel: HF config, HF-named tensors, tokenizer.

Matrices in a block format kiln's kernels read (``kiln.weight_formats``: Q4_0, Q4_1, Q8_0, Q4_K, Q5_K,
Q6_K) stay packed as the file stores them, each with its own type (a Q4_K_M file keeps its Q4_K and
Q6_K tensors apart); other quantized types are decoded to float32, float types kept as they are.
"""
from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField, ReaderTensor
from gguf.quants import dequantize

from kiln.checkpoint.gguf_tokenizer import tokenizer_from_gguf_metadata
from kiln.checkpoint.source import SourceModel
from kiln.errors import ConversionError
from kiln.schema import INT, NUMBER, STR, AnyOf, ListOf, Record, validate
from kiln.weight_formats import BY_GGML_TYPE, BlockFormat

# GGUF architecture (also the HF model_type) -> transformers class.
ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# llama.cpp's converter reorders the rows of Q and K of these into interleaved rotary pairs.
_PERMUTED_ARCHS = {"llama", "mistral"}

_NATIVE_DTYPES: dict[GGMLQuantizationType, torch.dtype] = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
# Precomputed llama3 rope factors: folded into the config's rope_scaling, not a model weight.
_ROPE_FREQS = "rope_freqs.weight"


@dataclass
class _Planned:
    hf_name: str
    tensor: ReaderTensor
    # Heads to undo llama.cpp's rotary row permutation over; None when the rows are as published.
    unpermute_heads: int | None = None

    @property
    def packed(self) -> BlockFormat | None:
        """The block format the tensor is kept in (a matrix in one of kiln's formats), or None: decoded."""
        if len(self.tensor.shape) != 2:
            return None
        return BY_GGML_TYPE.get(int(self.tensor.tensor_type))


def read_gguf(path: str | os.PathLike) -> SourceModel:
    """Read a GGUF file of a supported architecture; tensors are dequantized lazily, one at a time."""
    path = Path(path)
    reader = _open(path)
    metadata = read_metadata(reader, path)
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ConversionError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    validate(metadata, _metadata_schema(arch), f"{path}: GGUF metadata", ConversionError)
    _check_types(reader, path)
    by_name = {t.name: t for t in reader.tensors}
    hf_config = _hf_config(metadata, arch, by_name, path)
    plan = _plan(reader, arch, hf_config, path)
    tokenizer, tokenizer_config = tokenizer_from_gguf_metadata(
        metadata, source=str(path), model_max_length=hf_config["max_position_embeddings"])

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for item in plan:
            yield item.hf_name, _load(item)

    extra = {"gguf_file_type": metadata.get("general.file_type"), "gguf_name": metadata.get("general.name")}
    formats = {item.hf_name: item.packed.name for item in plan if item.packed is not None}
    sampling = {hf: metadata[key] for key, hf in _SAMPLING_KEYS.items() if key in metadata}
    return SourceModel(hf_config, tensors, len(plan), tokenizer, tokenizer_config, source=str(path),
                       extra={k: v for k, v in extra.items() if v is not None}, formats=formats,
                       generation_config=sampling)


# The sampling defaults a GGUF file may carry (llama.cpp's general.sampling.*), by generation_config.json's names.
_SAMPLING_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
                  "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
                  "general.sampling.penalty_repeat": "repetition_penalty"}


def read_metadata(reader: GGUFReader, path: Path | str = "") -> dict[str, Any]:
    """Every key/value of the file as plain Python values (arrays as lists), without the GGUF.* header fields."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = _field_value(field)
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise ConversionError(f"{path}: cannot decode GGUF metadata {key!r}: {e}") from e
    return out


def _metadata_schema(arch: str) -> Record:
    """The model metadata kiln reads, with its types (all optional here; ``_hf_config`` says what it needs)."""
    # Some files give one value per layer.
    count = AnyOf((INT, ListOf(INT)), "an integer (or a list of one per layer)")
    number = AnyOf((NUMBER, ListOf(NUMBER)), "a number (or a list of one per layer)")
    counts = ("context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
              "expert_count", "attention.head_count", "attention.head_count_kv", "attention.key_length",
              "attention.value_length", "attention.sliding_window", "rope.dimension_count",
              "rope.scaling.original_context_length")
    numbers = ("rope.freq_base", "attention.layer_norm_rms_epsilon", "rope.scaling.factor", "rope.scale_linear")
    return Record({}, {**{f"{arch}.{k}": count for k in counts}, **{f"{arch}.{k}": number for k in numbers},
                       f"{arch}.rope.scaling.type": STR})


def supported_tensor_types() -> list[str]:
    """Names of the GGUF tensor types kiln reads: the float types and every one the gguf package dequantizes."""
    return [t.name for t in GGMLQuantizationType if _readable(t)]


def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise ConversionError(f"{path} does not exist or is not a file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ConversionError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader fails with whatever numpy raises on short or garbled data
        raise ConversionError(f"{path}: cannot read the GGUF header ({type(e).__name__}: {e}); the file "
                              f"({size} bytes) is truncated or corrupt") from e
    if reader.byte_order != "I":
        raise ConversionError(f"{path} is a big-endian GGUF file; kiln reads only little-endian ones")
    for t in reader.tensors:
        end = t.data_offset + int(t.n_bytes)
        if end > size or t.data.nbytes != t.n_bytes:
            raise ConversionError(f"{path} is truncated: tensor {t.name!r} ends at byte {end} but the file has "
                                  f"{size} bytes")
    return reader


def _field_value(field: ReaderField) -> Any:
    kind = field.types[0] if field.types else None
    if kind == GGUFValueType.ARRAY:
        if len(field.types) < 2:  # an empty array records no item type
            return []
        item = field.types[1]
        if item == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        if item == GGUFValueType.ARRAY:
            return None  # nested arrays: nothing kiln reads uses them
        values = np.concatenate([field.parts[i] for i in field.data])
        return values.tolist()
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8")
    value = field.parts[-1][0]
    return bool(value) if kind == GGUFValueType.BOOL else value.item()


@functools.cache
def _readable(qtype: GGMLQuantizationType) -> bool:
    if qtype in _NATIVE_DTYPES:
        return True
    if qtype not in GGML_QUANT_SIZES:
        return False
    # The gguf package declares every type but dequantizes only some: ask it with one zero block.
    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
    except Exception:
        return False
    return True


def _check_types(reader: GGUFReader, path: Path) -> None:
    """Refuse the whole file up front, so that no output is written from a file kiln cannot finish."""
    for t in reader.tensors:
        if not _readable(t.tensor_type):
            raise ConversionError(f"{path}: tensor {t.name!r} has GGUF type {t.tensor_type.name}, which kiln cannot "
                                  f"read; supported: {', '.join(supported_tensor_types())}")


def _hf_config(meta: dict[str, Any], arch: str, tensors: dict[str, ReaderTensor], path: Path) -> dict:
    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, list):  # some files give a per-layer list; kiln's models need one value
            if not value or len(set(value)) != 1:
                raise ConversionError(f"{path}: {arch}.{key} varies per layer ({value[:8]}...); kiln needs one value")
            value = value[0]
        return value

    def need(key: str) -> Any:
        value = get(key)
        if value is None:
            raise ConversionError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    if get("expert_count"):
        raise ConversionError(f"{path}: mixture-of-experts GGUF ({arch}.expert_count={get('expert_count')}) is not "
                              "supported")
    def size(key: str, default: Any = None) -> int:
        value = int(need(key) if default is None else get(key, default))
        if value < 1:
            raise ConversionError(f"{path}: GGUF metadata {arch}.{key} must be at least 1, got {value}")
        return value

    hidden = size("embedding_length")
    heads = size("attention.head_count")
    kv_heads = size("attention.head_count_kv", heads)
    head_dim = int(get("attention.key_length") or hidden // heads)
    value_dim = get("attention.value_length")
    if value_dim is not None and int(value_dim) != head_dim:
        raise ConversionError(f"{path}: value head size {value_dim} differs from key head size {head_dim}")
    rope_dim = get("rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ConversionError(f"{path}: rotary embedding covers {rope_dim} of {head_dim} head dimensions "
                              "(partial rotary is not supported)")
    theta = float(get("rope.freq_base", 10000.0))
    context = size("context_length")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    embed = tensors.get("token_embd.weight")
    vocab = get("vocab_size") or (int(embed.shape[1]) if embed is not None and len(embed.shape) == 2 else len(tokens))

    eos = meta.get("tokenizer.ggml.eos_token_id")
    # llama.cpp also stops at end-of-turn/message tokens, which an HF config lists among the EOS ids.
    ends = [i for i in (eos, meta.get("tokenizer.ggml.eot_token_id"), meta.get("tokenizer.ggml.eom_token_id"))
            if i is not None]
    ends = list(dict.fromkeys(ends))
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": size("feed_forward_length"),
        "num_hidden_layers": size("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(meta, arch, tensors, head_dim, theta, path),
        "max_position_embeddings": context,
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": ends[0] if len(ends) == 1 else (ends or None),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        # Absent means none: GGUF says so explicitly when a model windows its attention.
        "sliding_window": get("attention.sliding_window"),
    }
    if arch in _PERMUTED_ARCHS and "blk.0.attn_q.bias" in tensors:
        config["attention_bias"] = True
    return config


def _rope_scaling(meta: dict[str, Any], arch: str, tensors: dict[str, ReaderTensor], head_dim: int, theta: float,
                  path: Path) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if kind is None and meta.get(f"{arch}.rope.scale_linear") is not None:  # the key older converters wrote
        kind, factor = "linear", meta[f"{arch}.rope.scale_linear"]
    freqs = tensors.get(_ROPE_FREQS)
    if freqs is not None:
        if kind not in (None, "none"):
            raise ConversionError(f"{path}: both {_ROPE_FREQS} and {arch}.rope.scaling.type={kind!r}; kiln cannot "
                                  "combine them")
        return llama3_scaling_from_factors(_load(_Planned(_ROPE_FREQS, freqs)).double().numpy(), head_dim, theta,
                                           original, str(path))
    if kind in (None, "none") or (kind == "linear" and (factor is None or float(factor) == 1.0)):
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor) if factor is not None else None}
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def llama3_scaling_from_factors(factors: np.ndarray, head_dim: int, theta: float, original: int | None,
                                source: str = "") -> dict | None:
    """The llama3 ``rope_scaling`` that llama.cpp's ``rope_freqs`` factors were computed from.

    llama.cpp stores llama3 scaling as one divisor per rotary frequency: 1 above the high-frequency
    band, ``factor`` below the low one, a smooth blend in between. The blend is linear in
    1/wavelength, so two points of it give the band edges; with a fixed original context length (the
    file's, else Llama 3's 8192) they give low_freq_factor and high_freq_factor.
    """
    factors = np.asarray(factors, dtype=np.float64)
    if factors.shape != (head_dim // 2,):
        raise ConversionError(f"{source}: {_ROPE_FREQS} has {factors.size} values, expected {head_dim // 2}")
    if np.allclose(factors, 1.0):
        return None
    factor = float(factors.max())
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    old = int(original or 8192)
    tol = 1e-4 * factor
    medium = (factors > 1 + tol) & (factors < factor - tol)
    # smooth = (old / wavelen - low) / (high - low), and 1 / divisor = (1 - smooth) / factor + smooth.
    smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
    x = old / wavelen[medium]
    if medium.sum() >= 2:
        slope, intercept = np.polyfit(x, smooth, 1)
        low = -intercept / slope
        high = low + 1 / slope
    elif medium.sum() == 1:
        low = 1.0
        high = low + (x[0] - low) / smooth[0]
    else:
        low, high = 1.0, 4.0
    # The fit carries float noise; published configs use round numbers (1.0, 4.0).
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": round(float(low), 6),
               "high_freq_factor": round(float(high), 6), "original_max_position_embeddings": old}
    if not np.allclose(llama3_factors(scaling, wavelen), factors, rtol=1e-3, atol=1e-4):
        raise ConversionError(f"{source}: {_ROPE_FREQS} holds rotary factors that are not llama3-style scaling; "
                              "kiln cannot express them")
    return scaling


def llama3_factors(scaling: dict, wavelen: np.ndarray) -> np.ndarray:
    """Divisor of each rotary frequency under llama3 scaling (as llama.cpp's rope_freqs stores them)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    smooth = (old / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, blended))


def _plan(reader: GGUFReader, arch: str, hf_config: dict, path: Path) -> list[_Planned]:
    heads, kv_heads = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    layers = hf_config["num_hidden_layers"]
    plan: list[_Planned] = []
    unknown: list[str] = []
    for t in reader.tensors:
        if t.name == _ROPE_FREQS:
            continue
        hf_name = _GLOBAL_NAMES.get(t.name)
        unpermute = None
        m = _LAYER_RE.fullmatch(t.name)
        if hf_name is None and m and m.group(2) in _LAYER_NAMES and int(m.group(1)) < layers:
            hf_name = f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
            if arch in _PERMUTED_ARCHS and m.group(2).startswith("attn_q."):
                unpermute = heads
            elif arch in _PERMUTED_ARCHS and m.group(2).startswith("attn_k."):
                unpermute = kv_heads
        if hf_name is None:
            unknown.append(t.name)
            continue
        rows = int(t.shape[-1])
        if unpermute is not None and rows % (2 * unpermute):
            raise ConversionError(f"{path}: tensor {t.name!r} has {rows} rows, not a multiple of 2 x {unpermute} heads")
        plan.append(_Planned(hf_name, t, unpermute))
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ConversionError(f"{path}: tensors kiln does not know for a {arch} model: {', '.join(unknown[:5])}{more}")
    return plan


def _load(item: _Planned) -> torch.Tensor:
    t = item.tensor
    # GGUF lists dimensions innermost first; torch wants them outermost first.
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    qtype = t.tensor_type
    fmt = item.packed
    if fmt is not None:  # kept as the file stores it: uint8 rows of blocks (row permutations need no decoding)
        tensor = torch.from_numpy(np.array(t.data, dtype=np.uint8, copy=True)).reshape(fmt.packed_shape(shape))
    elif qtype == GGMLQuantizationType.BF16:
        raw = np.ascontiguousarray(t.data).view(np.int16).copy()
        tensor = torch.from_numpy(raw).view(torch.bfloat16)
    elif qtype in _NATIVE_DTYPES:
        tensor = torch.from_numpy(np.array(t.data, copy=True))
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(dequantize(t.data, qtype), dtype=np.float32))
    if fmt is None:
        tensor = tensor.reshape(shape)
    if item.unpermute_heads is not None:
        tensor = _unpermute_rows(tensor, item.unpermute_heads)
    return tensor


def _unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's rotary reordering: per head, rows (pair i, half h) go back to rotate-half order (h, i)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()
