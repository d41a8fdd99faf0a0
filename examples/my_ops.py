"""A user's own plugin for kiln: SwiGLU (``silu_and_mul``) with one temporary instead of two.

``kiln build MODEL -o ENGINE --plugins examples/my_ops.py --tune on`` imports this file, times
``one_buffer`` against kiln's own implementations of the op at the engine's shapes, records the
fastest in the plan, and copies this file into the engine, which imports it whenever it is loaded.
"""
import torch
import torch.nn.functional as F

from kiln.ops import plugin


@plugin("silu_and_mul", "one_buffer")
def silu_and_mul_one_buffer(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up on a fused [gate | up] projection; the product is taken in place."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)
