"""Ops: the registry of reference implementations and the plugins that replace them."""
from kiln.ops import reference as _reference  # noqa: F401  (registers the reference ops)
from kiln.ops.attention_metadata import AttentionMetadata
from kiln.ops.registry import REFERENCE, Implementation, Op, OpTable, all_ops, get_op, plugin

__all__ = ["AttentionMetadata", "Implementation", "Op", "OpTable", "REFERENCE", "all_ops", "get_op", "plugin"]

# NOTE: plugin order is preference order where several support a target (the plan takes the first),
# so the CUDA-only Triton plugins come before the portable ones.
from kiln.ops import triton_plugins as _triton_plugins  # noqa: E402,F401  (registers the plugins)
from kiln.ops import cpu_layer_ops as _cpu_layer_ops  # noqa: E402,F401  (registers the plugins)
from kiln.ops import batched_decode_attention as _batched_decode_attention  # noqa: E402,F401  (registers the plugin)
from kiln.ops import onednn_linear as _onednn_linear  # noqa: E402,F401  (registers the plugin)
from kiln.ops import packed_linear as _packed_linear  # noqa: E402,F401  (registers the packed-weight ops)
