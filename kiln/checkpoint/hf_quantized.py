"""Hugging Face checkpoints quantized in the compressed-tensors format (config.json ``quantization_config``
with ``quant_method: "compressed-tensors"``), as llm-compressor writes them and RedHatAI (neuralmagic)
publishes Llama's FP8, W4A16 and W8A8 checkpoints, read into kiln's weight formats (``kiln.weight_formats``)
without going through float.

Each quantized module (its ``weight`` or ``weight_packed``, ``weight_scale``, ...) becomes one packed tensor
under the module's ``.weight`` name:

- float8 e4m3 weights scaled per output channel (FP8_DYNAMIC) or per tensor (static FP8): ``fp8``, each row
  its float32 scale (a tensor's one scale on every row) and the e4m3 bytes as stored.
- 8-bit integers per output channel or tensor, symmetric (W8A8 int-quantized, W8A16 pack-quantized):
  ``int8``, each row its float32 scale and the int8 values.
- 4-bit integers, symmetric or with zero points, in groups (W4A16, by GPTQ or round to nearest), per
  channel or per tensor: ``int4_g{G}``, G the largest of kiln's groups (32 to 256) that divides the
  checkpoint's group (a row, for channel and tensor scales), whose scale and zero point each kiln group
  repeats. The checkpoint's w = s (q - z), q and z stored unsigned in 0..15 (symmetric: z = 8), is kiln's
  w = d q + m with d = s, m = -s z, and q's nibbles as stored. d and m are float16. d is exact for float16
  scales and for bfloat16 ones in float16's normal range (as published checkpoints store them), and so is m
  in symmetric groups (m = -8 s); a zero point's m = -s z can need more significant bits than float16's 11
  and is then rounded to nearest, as is a scale float16 cannot hold: a weight moves by at most
  2^-11 (|d q| + |m|), under 1.5% of one quantization step.

A static FP8 KV cache (``kv_cache_scheme``: float8 e4m3 keys and values, one static scale per tensor, as
llm-compressor calibrates it and vLLM applies it to the post-RoPE keys, k_fp8 = k / k_scale) is read as the
checkpoint's KV cache scales: each layer's ``self_attn.k_scale`` and ``v_scale`` (float32, bfloat16 or float16
as stored, each exactly as a float) become ``{"k": [...], "v": [...]}`` (``SourceModel.extra["kv_cache_scales"]``,
then the kiln checkpoint's ``kv_cache_scales``), which ``kiln build --kv-cache-dtype fp8`` uses instead of
calibrating its own; a build with another cache (int8, or none: the build dtype) does not use them
(``kiln.builder.kv_scales``).

The activations are the ops' own business: kiln's fp8 op rounds them to e4m3 per token with scales of their
own, as FP8_DYNAMIC does; its int8 and int4 ops keep them float (bfloat16 in some int4 kernels). A scheme's
other activation quantization is not reproduced: a static FP8 scheme's ``input_scale`` is not read, and a W8A8
scheme's int8 activations are not rounded.

Refused with a ConversionError naming what kiln cannot hold as stored: other quantization methods
(block-wise FP8 ``quant_method: "fp8"``, AutoGPTQ and AutoAWQ folders, bitsandbytes), sparse or rotated
(``transform_config``) checkpoints, quantized KV caches but static FP8 per tensor (int8, per head, dynamic, with
zero points), bit widths but 4 and 8, 4-bit floats, 8-bit integers in groups or with zero points, FP8 in groups
or blocks, dynamic weight scales, and activation-ordered groups (a ``weight_g_idx`` that is not the contiguous
grouping).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from kiln.errors import ConversionError
from kiln.schema import BOOL, INT, STR, AnyOf, DictOf, ListOf, Nullable, Record, validate
from kiln.weight_formats import INT4_GROUPS, SCALE_BYTES

METHOD = "compressed-tensors"
# The ways compressed-tensors stores a quantized weight that kiln reads (``mixed-precision``: each group its own).
_STORAGE = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized")
# A module's tensors besides its weight: what its weight is made of, and the activation scales kiln does not read.
_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "input_scale",
          "input_zero_point")
_SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Where a static FP8 KV cache's scales are stored (llm-compressor's names; vLLM reads the same).
_KV_SCALES = ("model.layers.{}.self_attn.k_scale", "model.layers.{}.self_attn.v_scale")

_ARGS = Record({}, {"num_bits": INT, "type": STR, "symmetric": BOOL, "strategy": Nullable(STR),
                    "group_size": Nullable(INT), "dynamic": AnyOf((BOOL, STR), "true, false or a string")})
_SCHEME = Record({"targets": ListOf(STR)}, {"weights": Nullable(_ARGS), "format": Nullable(STR)})
_CONFIG = Record({"quant_method": STR}, {"config_groups": DictOf(_SCHEME), "format": Nullable(STR),
                                         "sparsity_config": Nullable(DictOf()),
                                         "transform_config": Nullable(DictOf()), "kv_cache_scheme": Nullable(DictOf())})


@dataclass(frozen=True)
class _Weights:
    """One config group's weight quantization (compressed-tensors' ``QuantizationArgs``, defaults filled)."""
    storage: str
    type: str
    num_bits: int
    strategy: str
    symmetric: bool
    group_size: int | None


@dataclass(frozen=True)
class _Module:
    weights: _Weights
    stored: frozenset[str]  # the module's tensors in the checkpoint ("weight_scale", ...)


@dataclass
class QuantizedWeights:
    """A checkpoint's quantized modules, as kiln's packed weights, and its static FP8 KV cache's scales."""
    # Every packed weight ("model.layers.0.self_attn.q_proj.weight"): its kiln format.
    formats: dict[str, str] = field(default_factory=dict)
    # The stored tensors that make up the packed weights, that kiln drops (input scales), or that are the KV
    # cache's scales.
    parts: set[str] = field(default_factory=set)
    modules: dict[str, _Module] = field(default_factory=dict)
    source: str = ""
    # Per layer, the names of its KV cache's key and value scale tensors; empty: the cache is not quantized.
    kv_scales: list[tuple[str, str]] = field(default_factory=list)

    def kv_cache_scales(self, get: Callable[[str], torch.Tensor]) -> dict | None:
        """The KV cache's scales as kiln records them, {"k": [per layer], "v": [per layer]} (floats, each the
        stored scale exactly), from the stored tensors (``get``: by name); None without a quantized KV cache."""
        if not self.kv_scales:
            return None
        scales: dict[str, list[float]] = {"k": [], "v": []}
        for names in self.kv_scales:
            for which, name in zip(("k", "v"), names):
                tensor = get(name)
                if tensor.dtype not in _SCALE_DTYPES:
                    raise ConversionError(f"{self.source}: {name} is {tensor.dtype}; kiln reads float32, float16 "
                                          "and bfloat16 scales")
                value = float(tensor.double().reshape(-1)[0])  # every float16 / bfloat16 / float32 is a double
                if not 0 < value < float("inf"):
                    raise ConversionError(f"{self.source}: {name} is {value}; a KV cache scale must be positive "
                                          "and finite")
                scales[which].append(value)
        return scales

    def load(self, name: str, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The packed weight ``name`` (a key of ``formats``), from its stored tensors (``get``: by name)."""
        module = name.removesuffix(".weight")
        try:
            return _pack(module, self.modules[module], self.formats[name], get)
        except ValueError as e:
            raise ConversionError(f"{self.source}: {module}: {e}") from None


def read_quantization(hf_config: dict, shapes: dict[str, list[int]], source: str) -> QuantizedWeights:
    """What a config.json's ``quantization_config`` makes of the tensors of ``shapes`` (every stored
    tensor's shape, by name): each module with a ``weight_scale`` is quantized, by the config group that
    targets it; an empty QuantizedWeights for a checkpoint without a quantization_config. Anything kiln cannot
    hold exactly as stored is refused here, before any tensor is read, but for what only the values show
    (activation-ordered groups, scales float16 cannot hold)."""
    config = hf_config.get("quantization_config")
    if config is None:
        return QuantizedWeights(source=source)
    where = f"{source}: quantization_config"
    validate(config, Record({"quant_method": STR}), where, ConversionError)
    method = config["quant_method"]
    if method == "fp8" and config.get("weight_block_size"):
        raise ConversionError(f"{where}: block-wise FP8 (weight_block_size {config['weight_block_size']}) has a scale "
                              "per block of weights; kiln's fp8 format scales whole rows")
    if method != METHOD:
        raise ConversionError(f"{where}: quant_method {method!r} is not read by kiln; it reads {METHOD!r} checkpoints "
                              "(llm-compressor's), or quantizes float weights itself (kiln build --quantize)")
    validate(config, _CONFIG, where, ConversionError)
    for key, what in (("sparsity_config", "sparse weights"), ("transform_config", "rotated (transformed) weights")):
        if config.get(key):
            raise ConversionError(f"{where}: {key} describes {what}, which kiln does not read")
    schemes = {name: _weights(name, group, config.get("format"), where)
               for name, group in (config.get("config_groups") or {}).items() if group.get("weights")}
    targets = [(target, name) for name, group in (config.get("config_groups") or {}).items() if name in schemes
               for target in group["targets"]]
    out = QuantizedWeights(source=source)
    if config.get("kv_cache_scheme"):
        out.kv_scales = _kv_cache(config["kv_cache_scheme"], hf_config["num_hidden_layers"], shapes, where)
        out.parts |= {name for names in out.kv_scales for name in names}
    for module in sorted(name.removesuffix(".weight_scale") for name in shapes if name.endswith(".weight_scale")):
        group = _group_of(module, targets)
        if group is None:
            raise ConversionError(f"{source}: {module} holds quantized weights but no config group of "
                                  "quantization_config targets it")
        stored = frozenset(p for p in ("weight", *_PARTS) if f"{module}.{p}" in shapes)
        try:
            fmt = _format(module, schemes[group], stored, shapes)
        except ValueError as e:
            raise ConversionError(f"{source}: {module} (config group {group!r}): {e}") from None
        out.modules[module] = _Module(schemes[group], stored)
        out.formats[f"{module}.weight"] = fmt
        out.parts |= {f"{module}.{p}" for p in stored}
    return out


def _weights(name: str, group: dict, default_storage: str | None, where: str) -> _Weights:
    """A config group's weight scheme, if kiln can hold it; else a ConversionError saying why."""
    args = group["weights"]
    storage = group.get("format") or default_storage
    group_size = args.get("group_size")
    strategy = args.get("strategy") or ("tensor" if group_size is None else "channel" if group_size == -1 else "group")
    w = _Weights(storage, args.get("type", "int"), args.get("num_bits", 8), strategy, args.get("symmetric", True),
                 group_size)
    kind = f"{w.num_bits}-bit {w.type} weights"
    row_format = {("int", 8): "int8", ("float", 8): "fp8"}.get((w.type, w.num_bits))
    problem = None
    if w.storage not in _STORAGE:
        problem = f"weights stored as {w.storage!r}; kiln reads {', '.join(_STORAGE)}"
    elif args.get("dynamic"):
        problem = "dynamic weight scales (computed at run time) are not stored; kiln needs them"
    elif row_format is None and (w.type, w.num_bits) != ("int", 4):
        problem = f"{kind}: kiln reads 4-bit integers, 8-bit integers and 8-bit floats (e4m3)"
    elif row_format is not None and not w.symmetric:
        problem = f"{kind} with zero points: kiln's {row_format} format is symmetric"
    elif row_format is not None and w.strategy not in ("channel", "tensor"):
        problem = f"{kind} per {w.strategy}: kiln's {row_format} format scales whole rows"
    elif w.strategy not in ("group", "channel", "tensor"):
        problem = f"{kind} per {w.strategy}: kiln's int4 formats scale groups within a row"
    elif w.strategy == "group" and (w.group_size is None or w.group_size < 1):
        problem = f"strategy 'group' needs a positive group_size, got {w.group_size}"
    if problem:
        raise ConversionError(f"{where}.config_groups.{name}: {problem}")
    return w


def _kv_cache(args: dict, num_layers: int, shapes: dict[str, list[int]], where: str) -> list[tuple[str, str]]:
    """Per layer, the names of a static FP8 KV cache's key and value scales (``kv_cache_scheme``: compressed-tensors'
    ``QuantizationArgs``, defaults filled); anything else is a ConversionError saying why."""
    where = f"{where}.kv_cache_scheme"
    validate(args, _ARGS, where, ConversionError)
    group_size = args.get("group_size")
    strategy = args.get("strategy") or ("tensor" if group_size is None else "channel" if group_size == -1 else "group")
    kind = f"a KV cache of {args.get('num_bits', 8)}-bit {args.get('type', 'int')} keys and values"
    problem = None
    if (args.get("type", "int"), args.get("num_bits", 8)) != ("float", 8):
        problem = f"{kind}: kiln reads static FP8 (float8 e4m3) KV cache scales"
    elif not args.get("symmetric", True):
        problem = f"{kind} with zero points: kiln's KV cache is symmetric"
    elif args.get("dynamic"):
        problem = f"{kind} with dynamic scales (computed at run time): kiln's KV cache needs stored ones"
    elif strategy != "tensor":
        problem = f"{kind} per {strategy}: kiln's KV cache has one key scale and one value scale per layer"
    if problem:
        raise ConversionError(f"{where}: {problem}")
    key, value = _KV_SCALES
    names = [(key.format(layer), value.format(layer)) for layer in range(num_layers)]
    for name in (name for pair in names for name in pair):
        if name not in shapes:
            raise ConversionError(f"{where} describes a static FP8 KV cache, but {name} is missing")
        if shapes[name] not in ([], [1]):
            raise ConversionError(f"{where}: {name} has shape {shapes[name]}, not the one scale of a tensor")
    return names


def _match(module: str, target: str) -> bool:
    """compressed-tensors' rule: a name, a "re:" pattern matched at the name's start, or a module class (a
    quantized module of kiln's models is an Embedding or a Linear)."""
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module or target == ("Embedding" if module.endswith("embed_tokens") else "Linear")


def _group_of(module: str, targets: list[tuple[str, str]]) -> str | None:
    """The config group whose target matches ``module`` first in compressed-tensors' order: exact names,
    then patterns (each sorted), then classes."""
    ranked = sorted(targets, key=lambda t: (t[0].startswith("re:"), t[0]))
    names = [group for target, group in ranked
             if (target == module or target.startswith("re:")) and _match(module, target)]
    classes = [group for target, group in ranked if not target.startswith("re:") and _match(module, target)]
    return (names + classes + [None])[0]


def _format(module: str, w: _Weights, stored: frozenset[str], shapes: dict[str, list[int]]) -> str:
    """The kiln format of a module's weight, from its scheme and the stored shapes."""
    need = {"weight_packed", "weight_shape"} if w.storage == "pack-quantized" else {"weight"}
    if w.num_bits == 4 and not w.symmetric:
        need.add("weight_zero_point")
    if not need <= stored:
        raise ValueError(f"its group stores weights {w.storage}{'' if w.symmetric else ' with zero points'}, "
                         f"but {', '.join(sorted(need - stored))} is missing")
    if w.storage == "pack-quantized":
        rows, words = shapes[f"{module}.weight_packed"]
        columns = words * 32 // w.num_bits
    else:
        rows, columns = shapes[f"{module}.weight"]
    group = w.group_size if w.strategy == "group" else columns
    if columns % group:
        raise ValueError(f"rows of {columns} weights are no whole number of groups of {group}")
    fmt = "fp8" if w.type == "float" else "int8" if w.num_bits == 8 else None
    if fmt is None:
        fitting = [g for g in INT4_GROUPS if group % g == 0]
        if not fitting:
            raise ValueError(f"4-bit groups of {group} weights: kiln's int4 groups are "
                             f"{', '.join(map(str, INT4_GROUPS))} weights (or a multiple of one)")
        fmt = f"int4_g{max(fitting)}"
    scale = shapes[f"{module}.weight_scale"]
    want = {"group": [rows, columns // group], "channel": [rows, 1], "tensor": [1]}[w.strategy]
    if scale != want and not (w.strategy == "tensor" and scale == []):
        raise ValueError(f"weight_scale has shape {scale}, a {w.strategy} scale needs {want}")
    return fmt


def _pack(module: str, m: _Module, fmt: str, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    w = m.weights
    scale = get(f"{module}.weight_scale")
    if scale.dtype not in _SCALE_DTYPES:
        raise ValueError(f"weight_scale is {scale.dtype}; kiln reads float32, float16 and bfloat16 scales")
    if w.type == "float":
        values = get(f"{module}.weight")
        if values.dtype != torch.float8_e4m3fn:
            raise ValueError(f"an FP8 weight stored as {values.dtype}, not float8_e4m3fn")
        return _rows(scale, values)
    q = _integers(module, w, get)  # signed, as compressed-tensors quantizes: -2^(b-1) .. 2^(b-1) - 1
    if "weight_g_idx" in m.stored:
        _check_groups(w, get(f"{module}.weight_g_idx"), q.shape[1])
    if w.num_bits == 8:
        return _rows(scale, q.to(torch.int8))
    if q.min() < -8 or q.max() > 7:
        raise ValueError(f"4-bit weights with values from {int(q.min())} to {int(q.max())}, not -8 to 7")
    zero = None if w.symmetric else _zero_points(module, w, scale.shape, q.shape[0], get)
    return _int4_blocks(q, scale, zero, int(fmt.removeprefix("int4_g")))


def _rows(scale: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A row format's bytes: each row's float32 scale, then its one-byte values."""
    scales = scale.float().reshape(-1, 1).expand(values.shape[0], 1).contiguous()
    return torch.cat((scales.view(torch.uint8).reshape(-1, SCALE_BYTES), values.view(torch.uint8)), dim=1)


def _integers(module: str, w: _Weights, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The weight's integers [out, in] (int16, signed as compressed-tensors quantizes them)."""
    if w.storage == "pack-quantized":
        packed = get(f"{module}.weight_packed")
        rows, columns = (int(d) for d in get(f"{module}.weight_shape").tolist())
        if packed.dtype != torch.int32 or tuple(packed.shape) != (rows, columns * w.num_bits // 32):
            raise ValueError(f"weight_packed is {packed.dtype} {list(packed.shape)}, not the int32 "
                             f"[{rows}, {columns * w.num_bits // 32}] of a [{rows}, {columns}] weight")
        return _unpack(packed, w.num_bits)[:, :columns].to(torch.int16) - (1 << (w.num_bits - 1))
    values = get(f"{module}.weight")
    if values.dtype != torch.int8:
        raise ValueError(f"an integer weight stored as {values.dtype}, not int8 (saved without compression?)")
    return values.to(torch.int16)


def _unpack(packed: torch.Tensor, num_bits: int) -> torch.Tensor:
    """compressed-tensors' int32 packing, for 4 or 8 bits: value i of a row is bits [i b, i b + b) of the row's
    words read as one little-endian bit string (stored unsigned: the value plus 2^(b-1)). As bytes: 8-bit
    values are the bytes, 4-bit ones each byte's low nibble, then its high one."""
    raw = packed.contiguous().view(torch.uint8)
    if num_bits == 8:
        return raw
    return torch.stack((raw & 0x0F, raw >> 4), dim=-1).reshape(raw.shape[0], -1)


def _zero_points(module: str, w: _Weights, scale_shape: torch.Size, rows: int,
                 get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The zero points, one a scale, unsigned (0..15: the value plus 8)."""
    zero = get(f"{module}.weight_zero_point")
    if w.storage == "pack-quantized" and w.strategy != "tensor":
        # Packed along the output channels: [rows * 4 / 32, groups] int32.
        groups = scale_shape[-1]
        if zero.dtype != torch.int32 or tuple(zero.shape) != (-(-rows * 4 // 32), groups):
            raise ValueError(f"weight_zero_point is {zero.dtype} {list(zero.shape)}, not the packed int32 "
                             f"[{-(-rows * 4 // 32)}, {groups}] of {rows} rows' zero points")
        return _unpack(zero.T, 4)[:, :rows].T.to(torch.int16)
    if zero.numel() != scale_shape.numel() or zero.is_floating_point():
        raise ValueError(f"weight_zero_point is {zero.dtype} {list(zero.shape)}; the scales are {list(scale_shape)}")
    return zero.to(torch.int16) + 8


def _check_groups(w: _Weights, g_idx: torch.Tensor, columns: int) -> None:
    """A ``weight_g_idx`` (GPTQ's activation order) must give column i to group i // group_size: groups of
    other columns cannot be rows of kiln's blocks."""
    if w.strategy != "group" or not torch.equal(g_idx.long(), torch.arange(columns) // w.group_size):
        raise ValueError("its weight_g_idx groups the columns out of order (activation order); kiln's int4 "
                         "groups are runs of consecutive columns")


def _int4_blocks(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int) -> torch.Tensor:
    """``int4_g{group}`` bytes of w = scale (q - zero), q signed [out, in], zero unsigned (None: 8)."""
    rows, columns = q.shape
    scale = scale.float().reshape(scale.shape[0] if scale.dim() == 2 else 1, -1)  # a tensor's scale: [1, 1]
    zero = torch.full_like(scale, 8) if zero is None else zero.reshape(scale.shape).to(scale.dtype)
    scale, zero = scale.expand(rows, -1), zero.expand(rows, -1)
    # The checkpoint's scale and zero point of each of kiln's groups.
    per = columns // group // scale.shape[1]
    scale, zero = scale.repeat_interleave(per, dim=1), zero.repeat_interleave(per, dim=1)
    d, m = scale.to(torch.float16), (-scale * zero).to(torch.float16)
    if not (torch.isfinite(d).all() and torch.isfinite(m).all()) or ((d == 0) & (scale != 0)).any():
        raise ValueError("its scales or offsets lie outside float16's range, which kiln's int4 formats store them in")
    nibbles = (q + 8).to(torch.uint8).reshape(-1, group)
    half = group // 2
    blocks = torch.cat((d.reshape(-1, 1).view(torch.uint8), m.reshape(-1, 1).view(torch.uint8),
                        nibbles[:, :half] | (nibbles[:, half:] << 4)), dim=1)
    return blocks.reshape(rows, -1)
