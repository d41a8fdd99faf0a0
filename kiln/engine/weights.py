"""The engine's weights: the manifest engine.json keeps of every tensor (name, shape, dtype, sha256),
and loading ``rank{N}.safetensors`` for the runtime with every tensor checked against it.

Loading reads the file's header itself (the safetensors layout: an 8-byte header length, a JSON
header, then the raw little-endian tensor data) and maps the file as safetensors does, so that each
tensor's bytes are hashed once, where they lie, on a pool of threads (``hashlib`` releases the GIL),
and a corrupt or truncated file is an ``EngineError`` that names the file and the tensor.

Verification runs unless it is turned off, by ``verify=False`` or by the environment variable
``KILN_VERIFY_WEIGHTS=0`` (for very large engines on trusted storage); names, shapes, dtypes and
sizes are checked either way.
"""
from __future__ import annotations

import collections
import hashlib
import json
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from kiln.engine.format import SAFETENSORS_DTYPES, Engine, dtype_name
from kiln.errors import EngineError
from kiln.schema import INT, STR, DictOf, ListOf, Record, validate
from kiln.weight_formats import FLOAT, block_format

VERIFY_ENV = "KILN_VERIFY_WEIGHTS"
_HEADER_SCHEMA = DictOf(Record({"dtype": STR, "shape": ListOf(INT), "data_offsets": ListOf(INT)}))
# Hashes in flight at once: enough to keep the pool busy, few enough that a corrupt tensor stops the
# load soon after it is reached (before the rest of the weights are copied to the device).
_MAX_PENDING = 16


def tensor_checksum(t: torch.Tensor) -> str:
    """sha256 of the tensor's bytes as safetensors stores them (contiguous, little-endian)."""
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def manifest_of(tensors: dict[str, torch.Tensor], formats: dict[str, str] | None = None) -> list[dict]:
    """The manifest of ``tensors``; ``formats`` names the packed ones' formats (kiln.weight_formats)."""
    formats = formats or {}
    out = []
    for name, t in sorted(tensors.items()):
        entry = {"name": name, "shape": list(t.shape), "dtype": dtype_name(t.dtype), "sha256": tensor_checksum(t)}
        if name in formats:
            entry["format"] = formats[name]
            entry["logical_shape"] = list(block_format(formats[name]).logical_shape(tuple(t.shape)))
        out.append(entry)
    return out


def check_against_manifest(manifest: list[dict], tensors: dict[str, torch.Tensor], what: str,
                           formats: dict[str, str] | None = None) -> None:
    """Every name, shape, dtype and format of ``tensors`` must be those of the manifest; raise naming the
    first misfit."""
    _check_layout(manifest, {name: (dtype_name(t.dtype), list(t.shape)) for name, t in tensors.items()}, what)
    formats = formats or {}
    for m in manifest:
        want, got = m.get("format", FLOAT), formats.get(m["name"], FLOAT)
        if want != got:
            raise EngineError(f"{what}: tensor {m['name']!r} is {got}, the engine holds it as {want}")


def verification_enabled(verify: bool = True) -> bool:
    """``verify``, unless the environment turns verification off with ``KILN_VERIFY_WEIGHTS=0``."""
    value = os.environ.get(VERIFY_ENV, "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value not in ("", "1", "true", "yes", "on"):
        raise EngineError(f"{VERIFY_ENV}={os.environ[VERIFY_ENV]!r}: expected 1 (verify weights) or 0 (do not)")
    return verify


def load_weights(engine: Engine, device: str | torch.device = "cpu", verify: bool = True) -> dict[str, torch.Tensor]:
    """The engine's weights on ``device``, each checked against the manifest in engine.json.

    Names, shapes, dtypes and the file's extent are always checked; with ``verify`` (and unless
    ``KILN_VERIFY_WEIGHTS=0``) so is every tensor's sha256. Raises ``EngineError`` naming the file
    (and the tensor) on any misfit; nothing is returned from a file that does not match.
    """
    device = torch.device(device)
    tensors: dict[str, torch.Tensor] = {}
    for entry, data in _read_tensors(engine, verification_enabled(verify)):
        if data.storage_offset() % entry.dtype.itemsize:
            data = data.clone()  # a tensor the writer did not align: viewing it as its dtype needs a copy
        tensor = data.view(entry.dtype).reshape(entry.shape)
        tensors[entry.name] = tensor if device.type == "cpu" else tensor.to(device)
    return tensors


def verify_weights(engine: Engine) -> tuple[int, int]:
    """Check every tensor of the engine's weights file against the manifest, sha256 included, whatever
    the environment says; return (tensors, bytes) checked. Raises ``EngineError`` on a misfit."""
    count = nbytes = 0
    for entry, _ in _read_tensors(engine, verify=True):
        count += 1
        nbytes += entry.nbytes
    return count, nbytes


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int


def _read_tensors(engine: Engine, verify: bool) -> Iterator[tuple[_Entry, torch.Tensor]]:
    """Each tensor's bytes (a uint8 tensor over a private map of the file), in file order; raises once any
    checksum misfits.

    NOTE: a checksum is checked up to ``_MAX_PENDING`` tensors after its tensor was yielded, and the
    last ones after the final yield: a caller must finish the iteration before it uses what it got.
    """
    path = engine.weights_path
    if not path.is_file():
        raise EngineError(f"engine {engine.path} is missing {path.name}")
    expected = {m["name"]: m["sha256"] for m in engine.manifest}
    entries, size = _read_header(path, engine.manifest)
    try:
        # NOTE: shared=False maps the file copy-on-write, as safetensors does: nothing is read until used,
        # pages are shared with the page cache, and nothing written to a tensor reaches the file.
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    except RuntimeError as e:
        raise EngineError(f"cannot map {path}: {e}") from e
    whole = torch.asarray(storage, dtype=torch.uint8)  # a view of the map, no copy
    pending: collections.deque[tuple[_Entry, Future[str]]] = collections.deque()

    def check(entry: _Entry, digest: str) -> None:
        if digest != expected[entry.name]:
            raise EngineError(f"{path} is corrupt: tensor {entry.name!r} does not match its sha256 in "
                              f"engine.json (rebuild the engine, or refit its weights)")

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        try:
            for entry in entries:
                data = whole[entry.start:entry.start + entry.nbytes]
                if verify:
                    pending.append((entry, pool.submit(_sha256, data)))
                    while len(pending) > _MAX_PENDING:
                        done, digest = pending.popleft()
                        check(done, digest.result())
                yield entry, data
            while pending:
                done, digest = pending.popleft()
                check(done, digest.result())
        finally:
            for _, digest in pending:
                digest.cancel()


def _sha256(data: torch.Tensor) -> str:
    return hashlib.sha256(data.numpy()).hexdigest()


def _read_header(path: Path, manifest: list[dict]) -> tuple[list[_Entry], int]:
    """The tensors the file's header describes, checked against the manifest and the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= size - 8:
            raise EngineError(f"{path} is truncated or not a safetensors file (its {size} bytes do not hold the "
                              f"header it announces)")
        try:
            header = json.loads(f.read(length))
        except ValueError as e:
            raise EngineError(f"{path} has a corrupt safetensors header: {e}") from e
    if isinstance(header, dict):
        header.pop("__metadata__", None)
    validate(header, _HEADER_SCHEMA, f"{path}: safetensors header", EngineError)
    entries: list[_Entry] = []
    layout: dict[str, tuple[str, list[int]]] = {}
    data_start = 8 + length
    for name, info in header.items():
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise EngineError(f"{path}: tensor {name!r} has safetensors dtype {info['dtype']!r}, which kiln does "
                              f"not read")
        offsets, shape = info["data_offsets"], tuple(info["shape"])
        nbytes = math.prod(shape) * dtype.itemsize
        if len(offsets) != 2 or offsets[1] - offsets[0] != nbytes or offsets[0] < 0:
            raise EngineError(f"{path}: tensor {name!r} has data offsets {offsets} that do not hold its "
                              f"{nbytes} bytes; the header is corrupt")
        if data_start + offsets[1] > size:
            raise EngineError(f"{path} is truncated: tensor {name!r} ends at byte {data_start + offsets[1]} but "
                              f"the file has {size} bytes")
        layout[name] = (dtype_name(dtype), list(shape))
        entries.append(_Entry(name, dtype, shape, data_start + offsets[0], nbytes))
    _check_layout(manifest, layout, str(path))
    return sorted(entries, key=lambda e: e.start), size


def _check_layout(manifest: list[dict], layout: dict[str, tuple[str, list[int]]], what: str) -> None:
    expected = {m["name"]: m for m in manifest}
    for name in sorted(set(expected) - set(layout)):
        raise EngineError(f"{what}: tensor {name!r} is missing")
    for name in sorted(set(layout) - set(expected)):
        raise EngineError(f"{what}: tensor {name!r} is not part of this engine")
    for name, m in sorted(expected.items()):
        dtype, shape = layout[name]
        if shape != m["shape"]:
            raise EngineError(f"{what}: tensor {name!r} has shape {shape}, the engine needs {m['shape']}")
        if dtype != m["dtype"]:
            raise EngineError(f"{what}: tensor {name!r} has dtype {dtype}, the engine needs {m['dtype']}")
