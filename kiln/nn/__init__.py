"""The model definition API: layers that model families are written with."""
from kiln.nn.attention import Attention
from kiln.nn.context import ForwardContext, forward_context, get_forward_context
from kiln.nn.layers import Embedding, GatedMLP, RMSNorm, rotary_table
from kiln.nn.linear import ColumnLinear, MergedColumnLinear, QKVLinear, RowLinear
from kiln.nn.mapping import Mapping

__all__ = [
    "Attention", "ColumnLinear", "Embedding", "ForwardContext", "GatedMLP", "Mapping", "MergedColumnLinear",
    "QKVLinear", "RMSNorm", "RowLinear", "forward_context", "get_forward_context", "rotary_table",
]
