"""Checkpoint tensors -> engine tensors: fuse projections the plan runs as one, cast to the build dtype,
quantize linear layers' weights (``kiln build --quantize``).

Packed weights (``kiln.weight_formats``) stay packed: a fused projection whose parts share one format is
the parts' rows one after the other, still packed; parts of different formats (a Q4_K_M file's Q4_K
query and Q6_K value projections) stay apart, one tensor each (``...weight_parts.i``), since one tensor
has one format (``MergedColumnLinear`` multiplies by each).
"""
from __future__ import annotations

import logging

import torch

from kiln.errors import BuildError
from kiln.models import ModelConfig, linear_weights, weight_sources
from kiln.weight_formats import FLOAT, INT4_GROUPS, block_format

log = logging.getLogger(__name__)


def engine_tensors(config: ModelConfig, checkpoint: dict[str, torch.Tensor], dtype: torch.dtype,
                   formats: dict[str, str] | None = None, keep_packed: bool = True
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The engine's weights, named as the model's parameters, from a checkpoint's (unfused) tensors, and
    the formats of those that stay packed. ``formats``: the checkpoint's packed tensors;
    ``keep_packed=False`` decodes them all (a float engine)."""
    formats = formats or {}
    out: dict[str, torch.Tensor] = {}
    out_formats: dict[str, str] = {}
    for name, parts in weight_sources(config).items():
        tensors, part_formats = [], []
        for source, shape in parts:
            tensor = _take(checkpoint, source)
            fmt = formats.get(source, FLOAT)
            want = shape if fmt == FLOAT else block_format(fmt).packed_shape(shape)
            if tuple(tensor.shape) != tuple(want):
                raise BuildError(f"tensor {source!r} has shape {tuple(tensor.shape)}, the model needs {tuple(want)}"
                                 + ("" if fmt == FLOAT else f" (packed {fmt})"))
            tensors.append(tensor)
            part_formats.append(fmt)
        if keep_packed and len(set(part_formats)) == 1 and part_formats[0] != FLOAT:
            out[name] = torch.cat(tensors, dim=0) if len(tensors) > 1 else tensors[0].contiguous()
            out_formats[name] = part_formats[0]
        elif keep_packed and len(set(part_formats)) > 1:
            # One tensor has one format: the fused weight is held as its projections, each in its own.
            prefix, _, param = name.rpartition(".")
            for i, (tensor, fmt) in enumerate(zip(tensors, part_formats)):
                part = f"{prefix}.{param}_parts.{i}"
                out[part] = tensor.contiguous() if fmt != FLOAT else tensor.to(dtype).contiguous()
                if fmt != FLOAT:
                    out_formats[part] = fmt
        else:
            floats = [t if fmt == FLOAT else block_format(fmt).dequantize(t) for t, fmt in zip(tensors, part_formats)]
            out[name] = (floats[0] if len(floats) == 1 else torch.cat(floats, dim=0)).to(dtype).contiguous()
    return out, out_formats


def _take(checkpoint: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    try:
        return checkpoint[name]
    except KeyError:
        raise BuildError(f"the checkpoint has no tensor {name!r}") from None


def quantize_linear_weights(config: ModelConfig, tensors: dict[str, torch.Tensor], formats: dict[str, str],
                            target: str, device: torch.device | str = "cpu") -> None:
    """Quantize (in place) every float weight of a linear layer into format ``target`` (round to nearest,
    computed on ``device``), and record its format. A fused projection is quantized as one: every format
    kiln writes scales rows or groups within a row, so that equals quantizing each projection alone.
    Packed weights keep their own format; embeddings and the output head stay float."""
    linear = linear_weights(config)
    for name in list(tensors):
        owner = name.rsplit(".weight_parts.", 1)[0] + ".weight" if ".weight_parts." in name else name
        if owner not in linear or name in formats:
            continue
        fmt = block_format(fitting_format(target, tensors[name].shape[1], name))
        tensors[name] = fmt.quantize(tensors[name].to(device)).cpu()
        formats[name] = fmt.name


def fitting_format(target: str, in_features: int, name: str) -> str:
    """``target``, or for int4 groups that do not divide a row, the largest smaller group that does
    (SmolLM2's 576-wide rows take groups of 64 where 128 were asked)."""
    if not target.startswith("int4_g"):
        return target
    wanted = block_format(target).block
    if in_features % wanted == 0:
        return target
    for group in sorted(INT4_GROUPS, reverse=True):
        if group < wanted and in_features % group == 0:
            log.info("%s: rows of %d weights take int4 groups of %d, not %d", name, in_features, group, wanted)
            return f"int4_g{group}"
    raise BuildError(f"cannot quantize {name} to {target}: its rows of {in_features} weights are no multiple of "
                     f"{min(INT4_GROUPS)}")


def scale_output_rows(tensors: dict[str, torch.Tensor], formats: dict[str, str], module: str,
                      factors: torch.Tensor) -> None:
    """Multiply the output rows of a linear layer (its weight, held whole or in parts, float or packed, and its
    bias) by ``factors``, in place; a part whose factors are all 1 is left as it is. A float weight is multiplied
    in float32 and rounded to its dtype once; a packed one has its scales multiplied (``scale_rows``)."""
    names = [f"{module}.weight"] if f"{module}.weight" in tensors else sorted(
        (n for n in tensors if n.startswith(f"{module}.weight_parts.")), key=lambda n: int(n.rsplit(".", 1)[1]))
    parts = factors.split([tensors[name].shape[0] for name in names])
    if sum(len(p) for p in parts) != len(factors):
        raise ValueError(f"{module} has other output rows than the {len(factors)} factors")
    for name, part in zip(names, parts):
        if bool((part == 1).all()):
            continue
        fmt, tensor = formats.get(name, FLOAT), tensors[name]
        tensors[name] = ((tensor.float() * part.float().reshape(-1, 1)).to(tensor.dtype) if fmt == FLOAT
                         else block_format(fmt).scale_rows(tensor, part))
    bias = tensors.get(f"{module}.bias")
    if bias is not None:
        tensors[f"{module}.bias"] = (bias.float() * factors.float()).to(bias.dtype)
