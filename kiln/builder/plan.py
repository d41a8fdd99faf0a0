"""Choosing the implementation of each op for the target device."""
from __future__ import annotations

import torch

from kiln.engine import BuildConfig
from kiln.models import ModelConfig
from kiln.ops import REFERENCE, all_ops, get_op
from kiln.ops.user_plugins import belongs


def preferred_impl(op: str, device: torch.device, dtype: torch.dtype, plugins: set[str] = frozenset()) -> str:
    """The op's first plugin (in registration order) that supports the target, else its reference;
    a user's plugin only from the modules ``plugins`` (``user_plugins.belongs``)."""
    for impl in get_op(op).impls.values():
        if impl.name != REFERENCE and impl.supports(device, dtype) and belongs(impl, plugins):
            return impl.name
    return REFERENCE


def choose_plan(device: torch.device, model: ModelConfig, build: BuildConfig,
                tune: bool | None = None, plugins: set[str] = frozenset()) -> dict[str, dict]:
    """For each op, its implementation and config on ``device``.

    With ``tune`` (None: on a GPU) the ops with a choice are timed at the engine's shapes and the
    fastest is recorded with the times (``autotune``). Otherwise each op takes its preferred
    implementation; on a CPU the runtime times the ops whose best kernel differs between CPUs (the
    matrix products) again at load, on the machine it runs on (``kiln/runtime/tuned_plan.py``).
    """
    dtype = build.torch_dtype

    def preferred(op: str) -> str:
        return preferred_impl(op, device, dtype, plugins)

    if tune or (tune is None and device.type == "cuda"):
        from kiln.builder.autotune import tune_plan

        return tune_plan(model, build, device, preferred, plugins)
    return {name: {"impl": preferred(name), "config": {}} for name in sorted(all_ops())}
