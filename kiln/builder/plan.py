"""Choosing the implementation of each op for the target device."""
from __future__ import annotations

import torch

from kiln.ops import REFERENCE, all_ops


def choose_plan(device: torch.device, dtype: torch.dtype) -> dict[str, dict]:
    """For each op, the first plugin that supports the target, else the reference implementation.

    NOTE: on a CPU the runtime times the ops that have a choice again at load, on the machine it
    runs on (``kiln/runtime/tuned_plan.py``); a GPU build can time its candidates here with the
    same tuner (``kiln/ops/tuning.py``).
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

