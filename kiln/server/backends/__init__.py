"""The backends the server can run, by name (the config's ``backend``) and by ``platform``.

The interface a backend implements is written down in ``kiln.server.backends.base``.
"""
from __future__ import annotations

from pathlib import Path

from kiln.server.backends.base import Backend
from kiln.server.backends.kiln import KilnBackend
from kiln.server.backends.onnxruntime import OnnxRuntimeBackend
from kiln.server.backends.python import PythonBackend
from kiln.server.backends.pytorch import PyTorchBackend
from kiln.server.ensemble import EnsembleBackend
from kiln.server.errors import ServerError

BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (OnnxRuntimeBackend, PyTorchBackend, PythonBackend,
                                                          KilnBackend, EnsembleBackend)}


def register(backend: type[Backend]) -> None:
    """Add a backend (a test's own, for example)."""
    BACKENDS[backend.name] = backend


def detect(folder: Path, backend: str = "", platform: str = "") -> type[Backend] | None:
    """The backend that recognizes ``folder``'s files (among those the config allows, if it names one)."""
    for b in BACKENDS.values():
        if (not backend or b.name == backend) and (not platform or platform in b.platforms) and b.detect(folder):
            return b
    return None


def resolve(backend: str, platform: str, version_dir: Path | None, model: str) -> type[Backend]:
    """The backend a config names, by ``backend`` or ``platform``, or else the one that recognizes the files."""
    if backend:
        if backend not in BACKENDS:
            raise ServerError.invalid(
                f"model '{model}' names backend '{backend}'; this server has {', '.join(sorted(BACKENDS))}")
        found = BACKENDS[backend]
        if platform and found.platforms and platform not in found.platforms:
            raise ServerError.invalid(
                f"model '{model}': platform '{platform}' does not belong to backend '{backend}' "
                f"(expected {', '.join(found.platforms)})")
        return found
    if platform:
        for b in BACKENDS.values():
            if platform in b.platforms:
                return b
        known = sorted(p for b in BACKENDS.values() for p in b.platforms)
        raise ServerError.invalid(
            f"unexpected platform type '{platform}' for model '{model}'; known: {', '.join(known)}")
    found = detect(version_dir, backend, platform) if version_dir is not None else None
    if found is not None:
        return found
    raise ServerError.invalid(
        f"model '{model}' names no backend or platform, and no backend recognizes the files in its latest "
        f"version folder (looked for: {', '.join(b.default_model_filename or b.name for b in BACKENDS.values())})")
