"""Small host values sent to a step's device without making the host wait for the device.

CUDA runs a copy from pageable host memory only once the stream's earlier work is done ("a stream sync is
performed before the copy is initiated"), so a ``torch.tensor(values, device="cuda")`` or a plain
``.to("cuda")`` of a host tensor in a step's host code waits for the step in flight: the host can then no
longer schedule and prepare the next step while the device runs this one. These two go through pinned memory
and an asynchronous copy instead (torch's pinned-memory allocator keeps the host buffer until the copy has run).
On any other device they are the plain calls.
"""
from __future__ import annotations

from typing import Sequence

import torch


def tensor_on(values: Sequence, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)``, not waiting for a GPU's stream."""
    if torch.device(device).type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def moved_to(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor's copy on ``device``, not waiting for a GPU's stream."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
