"""Matrix products with packed (GGUF block) weights: one op per format, ``linear_q4_0`` ... ``linear_q6_k``.

Each op is ``y = x W^T + b`` with W held in its format (``kiln.weight_formats``); one op per format so
that a model mixing formats (a Q4_K_M file has Q4_K and Q6_K tensors) binds the fastest kernel for each,
timed at load like ``linear``. The reference decodes W once at load into the compute dtype and runs
``F.linear``: correct on any device, with a float weight's memory. The plugins read the packed bytes:

- ``ggml`` (every format; CPU): kiln's own kernels (``kiln/ops/cpu_gguf``), compiled at first use for the
  machine's instruction set, over the blocks as stored; activations go through int8 per block, as in
  llama.cpp. For the 4-bit formats, which ``int4pack`` reads with bfloat16 activations, they are a
  candidate only with ``KILN_INT8_ACTIVATIONS=1``: int8 activations in every projection move a small
  model's answers (SmolLM2-135M, asked for the capital of France, answers "L'Étoile, la Cité, la
  Nation" through them, as llama.cpp does on the same file, and "Paris" through bfloat16 activations).
  One int8-rounded product (an output projection in Q8_0) costs nothing visible.
- ``int4pack`` (q4_0, q4_1, q4_k; CPU): PyTorch's int4 weight-only kernel (``_weight_int4pack_mm_for_cpu``,
  AVX-512 / AVX2), over the weight repacked at load into 4-bit values with a bfloat16 scale and offset per
  32 weights (exact but for rounding the float16 block scales' products to bfloat16). Its activations
  are bfloat16.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from kiln.ops import cpu_gguf
from kiln.ops.registry import plugin, reference
from kiln.weight_formats import FORMATS, FOUR_BIT, BlockFormat, four_bit_groups

GROUP = 32


def op_name(fmt: str) -> str:
    """The op that multiplies by weights of format ``fmt``."""
    return f"linear_{fmt}"


def _register_reference(fmt: BlockFormat) -> None:
    def prepare(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return fmt.dequantize(weight, dtype)

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    linear.__doc__ = f"y = x W^T + b, W a {fmt.name} weight (decoded at load)."
    reference(op_name(fmt.name), prepare=prepare, weight_format=fmt.name)(linear)


def _int4pack_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def _register_int4pack(fmt: BlockFormat) -> None:
    def prepare(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
        q, scale, offset = four_bit_groups(fmt, weight)
        # PyTorch's int4 kernels compute w = (q - 8) * scale + zero, over a multiple of 16 rows.
        zero = offset + 8 * scale
        rows = q.shape[0]
        pad = -rows % 16
        if pad:
            q, scale, zero = (F.pad(t, (0, 0, 0, pad)) for t in (q, scale, zero))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        scales_zeros = torch.stack((scale.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous()
        return packed, scales_zeros, rows

    def linear(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor, int],
               bias: torch.Tensor | None = None) -> torch.Tensor:
        packed, scales_zeros, rows = weight
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, GROUP, scales_zeros)
        y = y[..., :rows].to(x.dtype)
        return y if bias is None else y + bias

    plugin(op_name(fmt.name), "int4pack", supports=_int4pack_supported, prepare=prepare, graph_safe=True)(linear)


INT8_ACTIVATIONS_ENV = "KILN_INT8_ACTIVATIONS"


def _ggml_supported(device: torch.device, dtype: torch.dtype) -> bool:
    # Asked only for a CPU: the first answer builds the kernels (seconds, once per machine).
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and cpu_gguf.available()


def _ggml_supported_beside_int4pack(device: torch.device, dtype: torch.dtype) -> bool:
    allowed = os.environ.get(INT8_ACTIVATIONS_ENV, "0").strip().lower() in ("1", "true", "yes", "on")
    return allowed and _ggml_supported(device, dtype)


def _register_ggml(fmt: BlockFormat) -> None:
    def prepare(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        return weight.contiguous(), fmt.logical_shape(tuple(weight.shape))[1]

    def linear(x: torch.Tensor, weight: tuple[torch.Tensor, int], bias: torch.Tensor | None = None) -> torch.Tensor:
        packed, in_features = weight
        y = cpu_gguf.matmul(x if x.dtype == torch.float32 else x.float(), packed, fmt.name, packed.shape[0],
                            in_features)
        y = y if x.dtype == torch.float32 else y.to(x.dtype)
        return y if bias is None else y + bias

    supports = _ggml_supported_beside_int4pack if fmt.name in FOUR_BIT else _ggml_supported
    plugin(op_name(fmt.name), "ggml", supports=supports, prepare=prepare, graph_safe=True)(linear)


for _fmt in FORMATS.values():
    _register_reference(_fmt)
    _register_ggml(_fmt)
    if _fmt.name in FOUR_BIT:
        _register_int4pack(_fmt)
