"""The device an engine's plan was chosen for, described the same way at build, load and benchmark."""
from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "cpu"
    return str(device)


def target_of(device: torch.device) -> dict:
    """What a plan is chosen for; a different target at load time means re-checking the plan."""
    target = {"device_type": device.type, "name": device_name(device), "compute_capability": None,
              "torch": torch.__version__, "triton": package_version("triton")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        target.update(compute_capability=f"{props.major}.{props.minor}", memory_bytes=props.total_memory)
    return target


def package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
