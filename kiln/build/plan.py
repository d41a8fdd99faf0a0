"""Choosing the implementation of each op for the target device, and describing that target."""
from __future__ import annotations

import importlib.metadata
import platform

import torch

from kiln.ops import REFERENCE, all_ops


def target_of(device: torch.device) -> dict:
    """What the plan was chosen for. A different target at load time means re-checking the plan."""
    target = {"device_type": device.type, "torch": torch.__version__, "triton": _version("triton")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        target.update(name=props.name, compute_capability=f"{props.major}.{props.minor}",
                      memory_bytes=props.total_memory)
    else:
        target.update(name=platform.processor() or platform.machine(), compute_capability=None)
    return target


def choose_plan(device: torch.device, dtype: torch.dtype) -> dict[str, dict]:
    """For each op, the first plugin that supports the target, else the reference implementation.

    NOTE: when an op has several plugins with tunable configs, this is where they are timed on the
    target; today every op has at most one candidate per device, so nothing needs timing.
    """
    plan = {}
    for name, op in sorted(all_ops().items()):
        chosen = REFERENCE
        for impl in op.impls.values():
            if impl.name != REFERENCE and impl.supports(device, dtype):
                chosen = impl.name
                break
        plan[name] = {"impl": chosen, "config": {}}
    return plan


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
