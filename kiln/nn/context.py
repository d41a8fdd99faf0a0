"""Per-step state the layers read (attention layout, KV cache), set through a scoped context."""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator

import torch

from kiln.ops.attention_metadata import AttentionMetadata


@dataclass(slots=True)
class ForwardContext:
    attn: AttentionMetadata
    # One (k_cache, v_cache) pair per layer, each [num_blocks, block_size, num_kv_heads, head_dim].
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]


_current: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar("kiln_forward_context", default=None)


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def get_forward_context() -> ForwardContext:
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError("a model forward ran outside `with forward_context(...)`; the runner sets it")
    return ctx
