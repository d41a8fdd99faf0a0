"""Matrix products with packed weights: one op per format (``kiln.weight_formats``), ``linear_q4_0`` ...
``linear_q6_k`` for a GGUF file's blocks, ``linear_int4_g128``, ``linear_int8``, ``linear_fp8`` for kiln's own.

Each op is ``y = x W^T + b`` with W held in its format (``kiln.weight_formats``); one op per format so
that a model mixing formats (a Q4_K_M file has Q4_K and Q6_K tensors) binds the fastest kernel for each,
timed at load like ``linear``. The reference decodes W once at load into the compute dtype and runs
``F.linear``: correct on any device, with a float weight's memory. The plugins read the packed bytes:

- ``ggml`` (every format; CPU): kiln's own kernels (``kiln/ops/cpu_gguf``), compiled at first use for the
  machine's instruction set, over the blocks as stored; activations go through int8 per block, as in
  llama.cpp. Where the same kernels take int16 activations (``ggml_int16``) they are a candidate only with
  ``KILN_INT8_ACTIVATIONS=1``: int8 activations move a small model's answers (SmolLM2-135M, asked for the
  capital of France, answers "L'Étoile, la Marseillaise, ..." through an int8-rounded output projection, as
  llama.cpp does on the same file, and "Paris", as its float32 engine does, through int16 or bfloat16
  activations). q5_k and q6_k (no int16 path yet) take int8 activations by default.
- ``ggml_int16`` (q4_0, q4_1, q8_0, q4_k; CPU): the same kernels with int16 activations, a scale per block:
  15 bits an activation, finer than ``int4pack``'s bfloat16 (tens of times less error in the product), at
  about the int8 path's instructions per weight on a CPU without VNNI. On a CPU without AVX-512 BF16, where
  PyTorch's int4 kernel converts its bfloat16 activations in software, it is also the faster of the two
  (BENCHMARKS: an AVX2-only AMD EPYC box).
- ``ggml_rows4_int16`` and ``ggml_rows4`` (q4_0, q4_1, q4_k; CPU): the weight repacked at load into groups of
  four rows (``cpu_gguf.repack_rows4``; the same bytes, q4_k's 2.8% more), which one load feeds 16 weights of
  each row, against int16 activations (split into two bytes: the int16 kernels' rounding) or int8 ones (opt-in
  as ``ggml``'s). At one activation row on an AVX2-only box 1.1-1.9x faster than ``ggml_int16`` (BENCHMARKS);
  registered before the GGUF-layout kernels, so the plan takes them where both run.
- ``int4pack`` (q4_0, q4_1, q4_k; CPU): PyTorch's int4 weight-only kernel (``_weight_int4pack_mm_for_cpu``,
  AVX-512 / AVX2), over the weight repacked at load into 4-bit values with a bfloat16 scale and offset per
  32 weights (exact but for rounding the float16 block scales' products to bfloat16). Its activations
  are bfloat16. Also kiln's ``int4_g*`` formats, at their group size.
- ``triton`` (the 4-bit formats; CUDA, compute capability 8.0+, float16, bfloat16 or float32): kiln's Triton
  kernels (``kiln/ops/triton_kernels/int4_gemv.py``) over the 4-bit values repacked at load, with float16 scales
  and offsets where they hold them exactly (float32 for q4_k): a GEMV for decode steps of a few rows, a tiled
  product that decodes weight tiles in registers for more, and the weight decoded for cuBLAS for long
  prompt chunks. Its configs: ``INT4_LINEAR_CONFIGS`` (``triton_plugins.py``).
- ``tinygemm`` (the 4-bit formats; CUDA, compute capability 8.0+, bfloat16): PyTorch's int4 weight-only
  CUDA kernel (``_weight_int4pack_mm``) over the same 4-bit values, scales and offsets.
- ``int8pack`` (int8; CPU): PyTorch's int8 weight-only kernel (``_weight_int8pack_mm``) with bfloat16
  activations (its float32 path is scalar: 7-14x slower at one row, 33-37x at eight); a prompt chunk of
  ``INT8PACK_MAX_ROWS`` rows or more multiplies by the weight decoded at that call, in the compute dtype.
- ``scaled_mm`` (fp8; CUDA, compute capability 8.9+, bfloat16): ``torch._scaled_mm`` with the weight's
  per-channel scales and each token's activations rounded to e4m3 with a scale of its own (one Triton
  kernel quantizes the rows; a weight whose sides are not multiples of 16, which it does not take, is
  decoded at load as the reference does). ``linear_fp8``'s reference rounds the activations the same way.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from kiln.ops import cpu_gguf, cpu_layer_ops
from kiln.ops.registry import plugin, reference
from kiln.ops.triton_plugins import INT4_LINEAR_CONFIGS, _on_cuda
from kiln.weight_formats import FORMATS, FOUR_BIT, BlockFormat, RowFormat, four_bit_group_size, four_bit_groups

FP8_MAX = FORMATS["fp8"].max_value  # the largest float8 e4m3 value
FP8_MIN_SCALE = 1e-12  # an all-zero activation row keeps a finite scale


def op_name(fmt: str) -> str:
    """The op that multiplies by weights of format ``fmt``."""
    return f"linear_{fmt}"


def round_to_fp8(x: torch.Tensor) -> torch.Tensor:
    """``x`` with each row rounded to float8 e4m3 at a scale of its own (max |row| -> 448), back in x's dtype:
    what an FP8 matrix product with per-token activation scales multiplies by."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=FP8_MIN_SCALE)
    return ((x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def _register_reference(fmt: BlockFormat | RowFormat) -> None:
    def prepare(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return fmt.dequantize(weight, dtype)

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def linear_w8a8(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(round_to_fp8(x), weight, bias)

    fn = linear_w8a8 if fmt.name == "fp8" else linear
    fn.__doc__ = (f"y = x W^T + b, W a {fmt.name} weight (decoded at load)"
                  + (", x rounded to e4m3 per token." if fmt.name == "fp8" else "."))
    reference(op_name(fmt.name), prepare=prepare, weight_format=fmt.name)(fn)


def _int4pack_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def _int4_groups(fmt: BlockFormat, weight: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The weight's 4-bit values [rows padded to 16, in], and bfloat16 scales and zeros [in / group, rows
    padded, 2] with w = (q - 8) * scale + zero, as PyTorch's int4 kernels read them; and the true rows."""
    q, scale, offset = four_bit_groups(fmt, weight)
    zero = offset + 8 * scale
    rows = q.shape[0]
    pad = -rows % 16
    if pad:
        q, scale, zero = (F.pad(t, (0, 0, 0, pad)) for t in (q, scale, zero))
    scales_zeros = torch.stack((scale.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous()
    return q, scales_zeros, rows


def _register_int4pack(fmt: BlockFormat) -> None:
    group = four_bit_group_size(fmt)

    def prepare(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
        q, scales_zeros, rows = _int4_groups(fmt, weight)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1), scales_zeros, rows

    def linear(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor, int],
               bias: torch.Tensor | None = None) -> torch.Tensor:
        packed, scales_zeros, rows = weight
        y = cpu_layer_ops.int4pack_linear(x, packed, group, scales_zeros, rows)
        if y is None:  # the C++ extension is not here: the same calls from Python
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, group, scales_zeros)
            y = y[..., :rows].to(x.dtype)
        return y if bias is None else y + bias

    plugin(op_name(fmt.name), "int4pack", supports=_int4pack_supported, prepare=prepare, graph_safe=True)(linear)


def _tinygemm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cuda" and dtype == torch.bfloat16 and hasattr(torch.ops.aten, "_weight_int4pack_mm")
            and torch.cuda.get_device_capability(device) >= (8, 0))


TINYGEMM_INNER_K_TILES = 8  # the weight's layout for the kernel: in_features a multiple of 8 x 16


def _register_tinygemm(fmt: BlockFormat) -> None:
    group = four_bit_group_size(fmt)

    def prepare(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
        q, scales_zeros, rows = _int4_groups(fmt, weight)
        if q.shape[1] % (TINYGEMM_INNER_K_TILES * 16):
            raise ValueError(f"the CUDA int4 kernel reads rows of a multiple of {TINYGEMM_INNER_K_TILES * 16} "
                             f"weights, not {q.shape[1]}")
        pairs = (q[:, ::2] << 4) | q[:, 1::2]  # two 4-bit values a byte, the first in the high nibble
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), TINYGEMM_INNER_K_TILES)
        return packed, scales_zeros, rows

    def linear(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor, int],
               bias: torch.Tensor | None = None) -> torch.Tensor:
        packed, scales_zeros, rows = weight
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), packed, group,
                                               scales_zeros)
        y = y[:, :rows].reshape(*lead, rows).to(x.dtype)
        return y if bias is None else y + bias

    plugin(op_name(fmt.name), "tinygemm", supports=_tinygemm_supported, prepare=prepare, graph_safe=True)(linear)


def _register_triton(fmt: BlockFormat) -> None:
    group = four_bit_group_size(fmt)

    def prepare(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from kiln.ops.triton_kernels.int4_gemv import pack

        return pack(*four_bit_groups(fmt, weight))

    def linear(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               bias: torch.Tensor | None = None, **config) -> torch.Tensor:
        from kiln.ops.triton_kernels.int4_gemv import int4_linear

        return int4_linear(x, weight, bias, group, {**INT4_LINEAR_CONFIGS[0], **config})

    plugin(op_name(fmt.name), "triton", supports=_on_cuda, configs=INT4_LINEAR_CONFIGS, prepare=prepare,
           graph_safe=True)(linear)


# From this many rows on, int8pack decodes the weight at the call and runs the float GEMM: PyTorch's kernel is a
# GEMV at heart, 1.6-1.9x slower than that at 1,024 rows on AVX-512 and on AVX2, level near 128
# (``benchmarks/cpu_packed_rows.py``).
INT8PACK_MAX_ROWS = 128


def _int8pack_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm")


def _register_int8pack(fmt: RowFormat) -> None:
    def prepare(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        values, scales = fmt.split(weight)
        scales = scales.reshape(-1, 1).to(dtype)
        return values.contiguous(), scales.reshape(-1).to(torch.bfloat16), scales

    def linear(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               bias: torch.Tensor | None = None) -> torch.Tensor:
        values, kernel_scales, scales = weight
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] >= INT8PACK_MAX_ROWS:  # a prompt chunk: one float GEMM over the weight decoded here
            y = F.linear(rows, values.to(x.dtype) * scales.to(x.dtype))
        else:
            y = torch.ops.aten._weight_int8pack_mm(rows.to(torch.bfloat16), values, kernel_scales).to(x.dtype)
        y = y.reshape(*x.shape[:-1], values.shape[0])
        return y if bias is None else y + bias

    plugin(op_name(fmt.name), "int8pack", supports=_int8pack_supported, prepare=prepare, graph_safe=True)(linear)


def _scaled_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return (dtype == torch.bfloat16 and _on_cuda(device, dtype) and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) >= (8, 9))


def _register_scaled_mm(fmt: RowFormat) -> None:
    def prepare(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        values, scales = fmt.split(weight)
        if values.shape[0] % 16 or values.shape[1] % 16:  # _scaled_mm's constraint: the reference's way
            return fmt.dequantize(weight, dtype)
        # [in, out] column-major (the weight's rows as they are) and the scales as a row: what _scaled_mm reads.
        return values.contiguous().t(), scales.reshape(1, -1).contiguous()

    def linear(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor] | torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        from kiln.ops.triton_kernels.fp8_rows import quantize_rows_fp8

        if isinstance(weight, torch.Tensor):  # a shape _scaled_mm does not take, decoded at load
            return F.linear(round_to_fp8(x), weight, bias)
        values_t, scales = weight
        lead = x.shape[:-1]
        xq, x_scales = quantize_rows_fp8(x.reshape(-1, x.shape[-1]), FP8_MAX, FP8_MIN_SCALE)
        y = torch._scaled_mm(xq, values_t, scale_a=x_scales, scale_b=scales, out_dtype=torch.bfloat16)
        y = y.reshape(*lead, values_t.shape[1])
        return y if bias is None else y + bias

    plugin(op_name(fmt.name), "scaled_mm", supports=_scaled_mm_supported, prepare=prepare, graph_safe=True)(linear)


INT8_ACTIVATIONS_ENV = "KILN_INT8_ACTIVATIONS"


def _ggml_supported(device: torch.device, dtype: torch.dtype) -> bool:
    # Asked only for a CPU: the first answer builds the kernels (seconds, once per machine).
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and cpu_gguf.available()


def _ggml_int8_opted_in(device: torch.device, dtype: torch.dtype) -> bool:
    allowed = os.environ.get(INT8_ACTIVATIONS_ENV, "0").strip().lower() in ("1", "true", "yes", "on")
    return allowed and _ggml_supported(device, dtype)


def _register_ggml(fmt: BlockFormat, act_bits: int = 8) -> None:
    def prepare(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        return weight.contiguous(), fmt.logical_shape(tuple(weight.shape))[1]

    def linear(x: torch.Tensor, weight: tuple[torch.Tensor, int], bias: torch.Tensor | None = None) -> torch.Tensor:
        packed, in_features = weight
        y = cpu_gguf.matmul(x if x.dtype == torch.float32 else x.float(), packed, fmt.name, packed.shape[0],
                            in_features, act_bits)
        y = y if x.dtype == torch.float32 else y.to(x.dtype)
        return y if bias is None else y + bias

    if act_bits == 16:
        name, supports = "ggml_int16", _ggml_supported
    else:
        # int8 activations are opt-in where int16 ones serve the format (see the module's docstring).
        name, supports = "ggml", _ggml_int8_opted_in if fmt.name in cpu_gguf.WIDE_FORMATS else _ggml_supported
    plugin(op_name(fmt.name), name, supports=supports, prepare=prepare, graph_safe=True)(linear)


def _register_ggml_rows4(fmt: BlockFormat, act_bits: int) -> None:
    def prepare(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int, int]:
        out_features, in_features = fmt.logical_shape(tuple(weight.shape))
        packed = cpu_gguf.repack_rows4(weight.contiguous(), fmt.name, out_features, in_features)
        return packed, out_features, in_features

    def linear(x: torch.Tensor, weight: tuple[torch.Tensor, int, int],
               bias: torch.Tensor | None = None) -> torch.Tensor:
        packed, out_features, in_features = weight
        lead = x.shape[:-1]
        rows = x.reshape(-1, in_features)
        y = cpu_gguf.matmul_rows4(rows if rows.dtype == torch.float32 else rows.float(), packed, fmt.name,
                                  out_features, in_features, act_bits)
        y = y.reshape(*lead, out_features)
        y = y if x.dtype == torch.float32 else y.to(x.dtype)
        return y if bias is None else y + bias

    name, supports = ("ggml_rows4_int16", _ggml_supported) if act_bits == 16 else ("ggml_rows4", _ggml_int8_opted_in)
    plugin(op_name(fmt.name), name, supports=supports, prepare=prepare, graph_safe=True)(linear)


for _fmt in FORMATS.values():
    _register_reference(_fmt)
    if _fmt.name in FOUR_BIT:  # first: the plan takes the first plugin that supports the target
        _register_triton(_fmt)
    if _fmt.name in cpu_gguf.ROWS4_FORMATS:  # before the GGUF-layout kernels: faster where both run (BENCHMARKS)
        _register_ggml_rows4(_fmt, act_bits=8)
    if _fmt.name in cpu_gguf.FORMATS:
        _register_ggml(_fmt)
    if _fmt.name in cpu_gguf.ROWS4_FORMATS:
        _register_ggml_rows4(_fmt, act_bits=16)
    if _fmt.name in cpu_gguf.WIDE_FORMATS:
        _register_ggml(_fmt, act_bits=16)
    if _fmt.name in FOUR_BIT:
        _register_int4pack(_fmt)
        _register_tinygemm(_fmt)
_register_int8pack(FORMATS["int8"])
_register_scaled_mm(FORMATS["fp8"])
