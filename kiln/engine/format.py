"""The engine directory: engine.json (config, plan, target, weight manifest, tokenizer facts),
rank{N}.safetensors (weights laid out for the plan) and the tokenizer files. Read, write, validate.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.errors import EngineError

FORMAT_VERSION = 1
ENGINE_FILE = "engine.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weights_file(rank: int = 0) -> str:
    return f"rank{rank}.safetensors"


@dataclass(frozen=True)
class BuildConfig:
    """Limits and layout fixed at build time. The runtime may use less, never more."""

    dtype: str = "float32"
    max_batch_size: int = 8
    max_seq_len: int = 2048
    max_num_tokens: int = 512
    kv_block_size: int = 16
    kv_cache_dtype: str | None = None  # None: the same as dtype
    quantization: str | None = None
    tp_size: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in DTYPES:
            problems.append(f"kv_cache_dtype {self.kv_cache_dtype!r} is not one of {', '.join(DTYPES)}")
        for name in ("max_batch_size", "max_seq_len", "max_num_tokens", "kv_block_size", "tp_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.kv_block_size & (self.kv_block_size - 1):
            problems.append(f"kv_block_size must be a power of two, got {self.kv_block_size}")
        if self.max_num_tokens < self.max_batch_size:
            problems.append(f"max_num_tokens ({self.max_num_tokens}) must be at least max_batch_size "
                            f"({self.max_batch_size}) so that every running request can decode in one step")
        if self.quantization is not None:
            problems.append(f"quantization {self.quantization!r} is not supported yet")
        if self.tp_size != 1:
            problems.append("tensor parallelism (tp_size > 1) is not supported yet")
        if problems:
            raise EngineError("invalid build config: " + "; ".join(problems))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def kv_torch_dtype(self) -> torch.dtype:
        return DTYPES[self.kv_cache_dtype or self.dtype]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Engine:
    path: Path
    meta: dict

    @property
    def build(self) -> BuildConfig:
        return BuildConfig(**self.meta["build"])

    @property
    def model(self) -> dict:
        return self.meta["model"]

    @property
    def plan(self) -> dict[str, dict]:
        return self.meta["plan"]

    @property
    def target(self) -> dict:
        return self.meta["target"]

    @property
    def tokenizer(self) -> dict:
        return self.meta["tokenizer"]

    @property
    def manifest(self) -> list[dict]:
        return self.meta["weights"]["tensors"]

    @property
    def stripped(self) -> bool:
        return bool(self.meta["weights"]["stripped"])

    @property
    def weights_path(self) -> Path:
        return self.path / weights_file(0)


def tensor_checksum(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def manifest_of(tensors: dict[str, torch.Tensor]) -> list[dict]:
    return [
        {"name": name, "shape": list(t.shape), "dtype": dtype_name(t.dtype), "sha256": tensor_checksum(t)}
        for name, t in sorted(tensors.items())
    ]


def check_against_manifest(manifest: list[dict], tensors: dict[str, torch.Tensor], what: str) -> None:
    """Every name, shape and dtype of ``tensors`` must be those of the manifest; raise naming the first misfit."""
    expected = {m["name"]: m for m in manifest}
    for name in sorted(set(expected) - set(tensors)):
        raise EngineError(f"{what}: tensor {name!r} is missing")
    for name in sorted(set(tensors) - set(expected)):
        raise EngineError(f"{what}: tensor {name!r} is not part of this engine")
    for name, m in sorted(expected.items()):
        t = tensors[name]
        if list(t.shape) != m["shape"]:
            raise EngineError(f"{what}: tensor {name!r} has shape {list(t.shape)}, the engine needs {m['shape']}")
        if dtype_name(t.dtype) != m["dtype"]:
            raise EngineError(f"{what}: tensor {name!r} has dtype {dtype_name(t.dtype)}, the engine needs {m['dtype']}")


def write_engine_json(directory: Path, meta: dict) -> None:
    (directory / ENGINE_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_engine(path: str | os.PathLike, need_weights: bool = True) -> Engine:
    path = Path(path)
    file = path / ENGINE_FILE
    if not file.is_file():
        raise EngineError(f"{path} is not a kiln engine (no {ENGINE_FILE})")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise EngineError(f"{file} is not valid JSON: {e}") from e
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise EngineError(f"{file} has format version {version!r}; this kiln reads versions up to {FORMAT_VERSION}")
    for key in ("model", "build", "plan", "target", "weights", "tokenizer"):
        if key not in meta:
            raise EngineError(f"{file} lacks the {key!r} section")
    engine = Engine(path, meta)
    for name in TOKENIZER_FILES:
        if not (path / name).is_file():
            raise EngineError(f"engine {path} is missing its tokenizer file {name}")
    if need_weights:
        if engine.stripped:
            raise EngineError(f"engine {path} was built without weights; fill it with "
                              f"`kiln refit {path} --checkpoint CHECKPOINT` first")
        if not engine.weights_path.is_file():
            raise EngineError(f"engine {path} is missing {engine.weights_path.name}")
    return engine
