"""Weight formats: how a weight tensor's bytes are laid out, when they are not a plain float tensor.

A quantized weight is a format, not a dtype. The formats here are GGUF's block formats (llama.cpp's
``ggml-quants``), kept as the file stores them: each row of an ``[out, in]`` weight is ``in / block``
consecutive blocks of ``type_size`` bytes, so the packed tensor is uint8 ``[out, in / block * type_size]``.
Rows are independent, so rows may be permuted, split or concatenated without decoding.

Each format can decode its rows to float (``dequantize``, plain torch on any device): that is the
reference every kernel that reads the format is checked against (its values are what the gguf
package's numpy ``dequantize`` gives, bit for bit in float32).

Layouts (llama.cpp's; ``d``, ``dmin``, ``m`` are float16):

- ``q4_0``: 32 weights: d, 16 bytes of 4-bit q (low nibbles first 16, high nibbles last 16); w = d (q - 8).
- ``q4_1``: 32 weights: d, m, 16 bytes of 4-bit q; w = d q + m.
- ``q8_0``: 32 weights: d, 32 int8 q; w = d q.
- ``q4_k``: 256 weights in 8 sub-blocks of 32: d, dmin, 12 bytes of 6-bit sub-block scales and mins,
  128 bytes of 4-bit q; w = d sc q - dmin m.
- ``q5_k``: as ``q4_k`` plus 32 bytes holding each q's fifth bit.
- ``q6_k``: 256 weights in 16 sub-blocks of 16: 128 bytes of low 4 bits, 64 bytes of high 2 bits,
  16 int8 scales, d; w = d sc (q - 32).

kiln's own quantized formats (``kiln build --quantize``), which kiln also writes (``quantize``), and into which
it reads compressed-tensors checkpoints (``kiln.checkpoint.hf_quantized``):

- ``int4_g32`` ... ``int4_g256``: ``q4_1``'s layout over groups of 32 to 256 weights: d, m, then the 4-bit
  q; w = d q + m, rounded to nearest from each group's minimum and maximum (``int4_g32`` is ``q4_1``'s
  bytes, as llama.cpp's reference quantizer writes them).
- ``int8``: per output channel: a float32 scale s, then the row's int8 q; w = s q (symmetric; kiln's quantizer
  takes s = max |w| / 127).
- ``fp8``: per output channel: a float32 scale s, then the row's float8 e4m3 values e; w = s e
  (s = max |w| / 448). Its op also rounds the activations to e4m3, per token (W8A8, dynamic scales).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

FLOAT = "float"  # a plain tensor of the engine's dtype: no format of its own


@dataclass(frozen=True, slots=True)
class BlockFormat:
    name: str
    ggml_type: int | None  # gguf.GGMLQuantizationType's value (None: a format of kiln's own)
    block: int  # weights per block
    type_size: int  # bytes per block
    _decode: Callable[[torch.Tensor], torch.Tensor]  # [n, type_size] uint8 -> [n, block] float32
    # Where in a block its float16 scales sit (d, and m or dmin where it has one): w is linear in them together.
    scale_offsets: tuple[int, ...]
    _encode: Callable[[torch.Tensor], torch.Tensor] | None = None  # [n, block] float32 -> [n, type_size] uint8

    @property
    def bytes_per_weight(self) -> float:
        return self.type_size / self.block

    @property
    def can_quantize(self) -> bool:
        return self._encode is not None

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (float [out, in]) in this format, on its device (round to nearest)."""
        if self._encode is None:
            raise ValueError(f"kiln reads {self.name} weights but does not write them")
        rows, row_bytes = self.packed_shape(tuple(weight.shape))
        blocks = self._encode(weight.float().reshape(-1, self.block))
        return blocks.reshape(rows, row_bytes)

    def packed_shape(self, shape: tuple[int, ...] | list[int]) -> tuple[int, int]:
        """The uint8 shape that holds a float weight of ``shape`` ([out, in]) in this format."""
        out_features, in_features = shape
        if in_features % self.block:
            raise ValueError(f"{self.name} packs rows of a multiple of {self.block} weights, not {in_features}")
        return out_features, in_features // self.block * self.type_size

    def logical_shape(self, packed: tuple[int, ...] | list[int]) -> tuple[int, int]:
        """The float [out, in] shape a packed uint8 [out, row bytes] tensor holds."""
        rows, row_bytes = packed
        if row_bytes % self.type_size:
            raise ValueError(f"{self.name} rows are whole blocks of {self.type_size} bytes, not {row_bytes} bytes")
        return rows, row_bytes // self.type_size * self.block

    def scale_rows(self, packed: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """``packed`` (uint8 [out, row bytes]) with row i's weights times ``factors[i]``: each block's float16
        scales multiplied (rounded to float16 once), its quants untouched. (Factors that push scales below
        float16's normal range, 6.1e-5, cost them precision.)"""
        blocks = packed.reshape(packed.shape[0], -1, self.type_size).clone()
        for offset in self.scale_offsets:
            field = blocks[..., offset:offset + 2].contiguous().view(torch.float16).float()
            scaled = field * factors.float().reshape(-1, 1, 1)
            if not torch.isfinite(scaled.to(torch.float16)).all():
                raise ValueError(f"scaling {self.name} rows by up to {float(factors.abs().max()):g} overflows "
                                 "their float16 scales")
            blocks[..., offset:offset + 2] = scaled.to(torch.float16).view(torch.uint8)
        return blocks.reshape(packed.shape)

    def dequantize(self, packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``packed`` (uint8 [..., row bytes]) holds, on its device, as ``dtype``."""
        if packed.dtype != torch.uint8 or packed.shape[-1] % self.type_size:
            raise ValueError(f"a {self.name} tensor is uint8 rows of whole {self.type_size}-byte blocks; got "
                             f"{packed.dtype} {list(packed.shape)}")
        lead = packed.shape[:-1]
        blocks = packed.reshape(-1, self.type_size)
        values = self._decode(blocks) if blocks.shape[0] else blocks.new_zeros((0, self.block), dtype=torch.float32)
        return values.reshape(*lead, -1).to(dtype)


INT4_GROUPS = (32, 64, 128, 256)
SCALE_BYTES = 4  # a row format's float32 scale


@dataclass(frozen=True, slots=True)
class RowFormat:
    """A weight scaled per output channel: each row is its float32 scale, then one byte per weight
    (``element``: int8 or float8 e4m3) with w = scale * value."""
    name: str
    element: torch.dtype
    max_value: float  # the largest magnitude ``element`` holds: max |w| of a row maps to it

    bytes_per_weight = 1.0  # (and 4 bytes a row for its scale)
    can_quantize = True

    def packed_shape(self, shape: tuple[int, ...] | list[int]) -> tuple[int, int]:
        out_features, in_features = shape
        return out_features, SCALE_BYTES + in_features

    def logical_shape(self, packed: tuple[int, ...] | list[int]) -> tuple[int, int]:
        rows, row_bytes = packed
        if row_bytes <= SCALE_BYTES:
            raise ValueError(f"{self.name} rows are a {SCALE_BYTES}-byte scale and the weights, not {row_bytes} bytes")
        return rows, row_bytes - SCALE_BYTES

    def split(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The values ([..., in] of ``element``) and the float32 scales ([..., 1]) of a packed weight."""
        if packed.dtype != torch.uint8 or packed.shape[-1] <= SCALE_BYTES:
            raise ValueError(f"a {self.name} tensor is uint8 rows of a scale and the weights; got "
                             f"{packed.dtype} {list(packed.shape)}")
        scales = packed[..., :SCALE_BYTES].contiguous().view(torch.float32)
        return packed[..., SCALE_BYTES:].contiguous().view(self.element), scales

    def scale_rows(self, packed: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """``packed`` with row i's weights times ``factors[i]`` (its float32 scale multiplied)."""
        values, scales = self.split(packed)
        scaled = (scales * factors.float().reshape(-1, 1)).contiguous()
        return torch.cat((scaled.view(torch.uint8), values.view(torch.uint8)), dim=-1)

    def dequantize(self, packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        values, scales = self.split(packed)
        return (values.float() * scales).to(dtype)

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (float [out, in]) in this format, on its device (round to nearest)."""
        weight = weight.float()
        amax = weight.abs().amax(dim=-1, keepdim=True)
        scales = torch.where(amax > 0, amax / self.max_value, torch.ones_like(amax))
        scaled = (weight / scales).clamp(-self.max_value, self.max_value)
        values = scaled.round().to(self.element) if not self.element.is_floating_point else scaled.to(self.element)
        return torch.cat((scales.view(torch.uint8), values.view(torch.uint8)), dim=-1)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte ``start`` of each block, as float32 [n, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[n, b] bytes -> [n, 2b]: the low nibbles of all b bytes, then their high nibbles."""
    return torch.cat((q & 0x0F, q >> 4), dim=-1)


def _decode_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * (_nibbles(blocks[:, 2:]).float() - 8)


def _decode_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * _nibbles(blocks[:, 4:]).float() + _f16(blocks, 2)


def _as_f16_bytes(values: torch.Tensor) -> torch.Tensor:
    """float [n, 1] -> their float16 bytes [n, 2]."""
    return values.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _encode_q4_1(weights: torch.Tensor) -> torch.Tensor:
    """Groups [n, g] -> d, m, the 4-bit q: llama.cpp's ``quantize_row_q4_1_ref`` (q = trunc((w - m) / d + 0.5))."""
    low = weights.amin(dim=-1, keepdim=True)
    high = weights.amax(dim=-1, keepdim=True)
    d = (high - low) / 15
    inverse = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = ((weights - low) * inverse + 0.5).to(torch.int32).clamp(0, 15).to(torch.uint8)
    half = weights.shape[-1] // 2
    return torch.cat((_as_f16_bytes(d), _as_f16_bytes(low), q[:, :half] | (q[:, half:] << 4)), dim=-1)


def _decode_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * blocks[:, 2:].contiguous().view(torch.int8).float()


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins of a K-quant super-block, from its 12 bytes ([n, 12] -> two [n, 8])."""
    low, high, extra = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat((low & 63, (extra & 0x0F) | ((low >> 6) << 4)), dim=-1)
    mn = torch.cat((high & 63, (extra >> 4) | ((high >> 6) << 4)), dim=-1)
    return sc.float(), mn.float()


def _k_quants(q: torch.Tensor) -> torch.Tensor:
    """[n, 128] bytes -> [n, 8, 32] four-bit values: each 32-byte chunk gives two sub-blocks (low, high nibbles)."""
    chunks = q.reshape(-1, 4, 1, 32)
    return torch.cat((chunks & 0x0F, chunks >> 4), dim=2).reshape(-1, 8, 32)


def _decode_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _k_scales(blocks[:, 4:16])
    q = _k_quants(blocks[:, 16:144]).float()
    return ((d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)).reshape(-1, 256)


def _decode_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _k_scales(blocks[:, 4:16])
    qh = blocks[:, 16:48]  # bit j of byte l: the fifth bit of weight l of sub-block j
    shifts = torch.arange(8, device=blocks.device, dtype=torch.uint8).reshape(1, 8, 1)
    fifth = ((qh.unsqueeze(1) >> shifts) & 1) << 4
    q = (_k_quants(blocks[:, 48:176]) | fifth).float()
    return ((d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)).reshape(-1, 256)


def _decode_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    ql, qh = blocks[:, 0:128], blocks[:, 128:192]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(blocks, 208)
    # Two halves of 128 weights; in each, four runs of 32 from (ql low, ql high) nibbles and qh's bit pairs.
    ql = ql.reshape(-1, 2, 2, 32)  # [n, half, which 32 bytes, 32]
    qh = qh.reshape(-1, 2, 1, 32)
    low = torch.cat((ql & 0x0F, ql >> 4), dim=2)  # [n, half, 4, 32]: runs 0..3 of each half
    # (arange, not a tensor from a list: no host-to-device copy, so a CUDA graph can capture it)
    shifts = torch.arange(0, 8, 2, device=blocks.device, dtype=torch.uint8).reshape(1, 1, 4, 1)
    high = ((qh >> shifts) & 3) << 4
    q = (low | high).float() - 32  # [n, 2, 4, 32]
    # Each run of 32 has two scales, one per 16 weights: scales[8 half + 2 run + (l >= 16)].
    s = scales.reshape(-1, 2, 4, 2, 1)
    w = d.reshape(-1, 1, 1, 1, 1) * s * q.reshape(-1, 2, 4, 2, 16)
    return w.reshape(-1, 256)


FORMATS: dict[str, BlockFormat | RowFormat] = {f.name: f for f in (
    BlockFormat("q4_0", 2, 32, 18, _decode_q4_0, (0,)),
    BlockFormat("q4_1", 3, 32, 20, _decode_q4_1, (0, 2), _encode_q4_1),
    BlockFormat("q8_0", 8, 32, 34, _decode_q8_0, (0,)),
    BlockFormat("q4_k", 12, 256, 144, _decode_q4_k, (0, 2)),
    BlockFormat("q5_k", 13, 256, 176, _decode_q5_k, (0, 2)),
    BlockFormat("q6_k", 14, 256, 210, _decode_q6_k, (208,)),
    *(BlockFormat(f"int4_g{g}", None, g, 4 + g // 2, _decode_q4_1, (0, 2), _encode_q4_1) for g in INT4_GROUPS),
    RowFormat("int8", torch.int8, 127.0),
    RowFormat("fp8", torch.float8_e4m3fn, 448.0),
)}
BY_GGML_TYPE: dict[int, BlockFormat] = {f.ggml_type: f for f in FORMATS.values()
                                        if isinstance(f, BlockFormat) and f.ggml_type is not None}


# The formats kiln quantizes float weights into (BuildConfig.quantization).
QUANTIZED = (*(f"int4_g{g}" for g in INT4_GROUPS), "int8", "fp8")


def quantized_format(kind: str, group_size: int | None = None) -> str:
    """The format ``kiln build --quantize kind [--group-size N]`` writes: int4 in groups (128 by default);
    int8 and fp8 scaled per output channel."""
    if kind == "int4":
        group = group_size or 128
        if group not in INT4_GROUPS:
            raise ValueError(f"int4 groups are {', '.join(map(str, INT4_GROUPS))} weights, not {group}")
        return f"int4_g{group}"
    if kind in ("int8", "fp8"):
        if group_size is not None:
            raise ValueError(f"{kind} weights are scaled per output channel: a group size is for int4")
        return kind
    raise ValueError(f"unknown quantization {kind!r}; kiln quantizes to int8, int4 or fp8")


def block_format(name: str) -> BlockFormat | RowFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown weight format {name!r}; kiln reads {FLOAT}, {', '.join(FORMATS)}") from None


def random_packed(fmt: BlockFormat, shape: tuple[int, int], generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """A packed weight of float ``shape`` [out, in] with random quants and scales of a trained model's size
    (values about N(0, 1/in)), valid in every field: for tests and for timing kernels."""
    if fmt.can_quantize:
        weight = torch.randn(shape, generator=generator) / shape[1] ** 0.5
        return fmt.quantize(weight).to(device)
    rows, row_bytes = fmt.packed_shape(shape)
    blocks = torch.randint(0, 256, (rows * row_bytes // fmt.type_size, fmt.type_size), dtype=torch.uint8,
                           generator=generator)
    n = blocks.shape[0]
    scale = 1.0 / (shape[1] ** 0.5)

    def put_f16(offset: int, values: torch.Tensor) -> None:
        blocks[:, offset:offset + 2] = values.to(torch.float16).reshape(n, 1).view(torch.uint8)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    if fmt.name in ("q4_0", "q8_0"):
        put_f16(0, uniform(0.5, 1.5) * scale / (4 if fmt.name == "q4_0" else 64))
    elif fmt.name == "q4_1":
        put_f16(0, uniform(0.5, 1.5) * scale / 4)
        put_f16(2, -uniform(0.5, 1.5) * scale * 2)
    elif fmt.name in ("q4_k", "q5_k"):
        levels = 8 if fmt.name == "q4_k" else 16  # the quants' midpoint
        put_f16(0, uniform(0.5, 1.5) * scale / (levels * 32))
        put_f16(2, uniform(0.5, 1.5) * scale / 32)
    else:  # q6_k: positive int8 scales
        blocks[:, 192:208] = torch.randint(1, 64, (n, 16), dtype=torch.uint8, generator=generator)
        put_f16(208, uniform(0.5, 1.5) * scale / (32 * 32))
    return blocks.reshape(rows, row_bytes).to(device)


FOUR_BIT = ("q4_0", "q4_1", "q4_k", *(f"int4_g{g}" for g in INT4_GROUPS))


def four_bit_group_size(fmt: BlockFormat) -> int:
    """The weights that share a scale and an offset in a 4-bit format."""
    return 32 if fmt.ggml_type is not None else fmt.block


def four_bit_groups(fmt: BlockFormat, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 4-bit format's weight as (q, scale, offset): uint8 quants [out, in] in 0..15, and float32
    [out, in / group] (``four_bit_group_size``), with w = scale * q + offset exactly (for kernels that read
    4-bit groups)."""
    if fmt.name not in FOUR_BIT:
        raise ValueError(f"{fmt.name} is not a 4-bit format ({', '.join(FOUR_BIT)})")
    rows = packed.shape[0]
    blocks = packed.reshape(-1, fmt.type_size)
    if fmt.name == "q4_k":
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        sc, mn = _k_scales(blocks[:, 4:16])
        q = _k_quants(blocks[:, 16:144])
        scale, offset = d * sc, -(dmin * mn)
    else:
        q = _nibbles(blocks[:, fmt.type_size - fmt.block // 2:])
        d = _f16(blocks, 0)
        scale = d
        offset = -8 * d if fmt.name == "q4_0" else _f16(blocks, 2)
    return q.reshape(rows, -1), scale.reshape(rows, -1), offset.reshape(rows, -1)
