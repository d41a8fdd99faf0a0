"""kiln's checkpoint: config.json + rank0.safetensors + tokenizer files; written from any reader.

A checkpoint holds the weights as published (unfused, source dtype) under transformers' names, the
architecture as a kiln ``ModelConfig``, the tokenizer, and where the source has them, its FP8 KV cache's
scales (``kv_cache_scales``, which ``kiln build --kv-cache-dtype fp8`` uses). It is the portable input of
``kiln build`` and ``kiln refit``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tqdm import tqdm

from kiln.checkpoint.hf_dir import is_hf_dir, read_hf_dir
from kiln.checkpoint.source import SourceModel
from kiln.engine.format import GENERATION_SCHEMA, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_FILES
from kiln.errors import ConversionError
from kiln.fsutil import staged_dir
from kiln.models import ModelConfig, checkpoint_layout, family
from kiln.schema import INT, NUMBER, STR, DictOf, ListOf, Nullable, Record, record_of, validate
from kiln.weight_formats import block_format

CHECKPOINT_VERSION = 1
WEIGHTS_FILE = "rank0.safetensors"
# Every key of a checkpoint's config.json that kiln reads.
CONFIG_SCHEMA = Record({"kiln_checkpoint": INT, "model": record_of(ModelConfig, all_required=True),
                        "generation": GENERATION_SCHEMA},
                       {"source": Nullable(STR), "weight_formats": DictOf(STR),
                        "kv_cache_scales": Record({"k": ListOf(NUMBER), "v": ListOf(NUMBER)}, closed=True)})
# The sampling defaults a model's generation config may set (what vLLM takes from it too), by type.
SAMPLING_DEFAULTS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repetition_penalty": float}
# Tensors published checkpoints carry that no kiln model needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    # Token facts the runtime needs besides the tokenizer: {"bos_token_id", "eos_token_ids", "pad_token_id"}.
    generation: dict
    # What it was converted from (a Hugging Face folder or GGUF file), for the engine's record.
    source: str | None = None
    # The tensors held packed (uint8 rows of blocks), by name: their format (kiln.weight_formats).
    formats: dict[str, str] = field(default_factory=dict)
    # The source's static FP8 KV cache (k / s_k and v / s_v in float8 e4m3): {"k": [s_k per layer], "v": [s_v per
    # layer]}; None: the source has no quantized KV cache.
    kv_cache_scales: dict[str, list[float]] | None = None

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_FILE

    def tokenizer_config(self) -> dict:
        file = self.path / TOKENIZER_CONFIG_FILE
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConversionError(f"cannot read {file}: {e}") from e
        validate(config, DictOf(), str(file), ConversionError)
        return config

    def load_tensors(self) -> dict[str, torch.Tensor]:
        with safe_open(str(self.weights_file), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}


def open_source(path: str | os.PathLike) -> SourceModel:
    """Read a Hugging Face folder or a GGUF file (by what is at ``path``)."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path} does not exist")
    if is_checkpoint(path):
        raise ConversionError(f"{path} is already a kiln checkpoint: build it with `kiln build {path} -o ENGINE`")
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ConversionError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
        from kiln.checkpoint.gguf_file import read_gguf

        return read_gguf(path)
    if is_hf_dir(path):
        return read_hf_dir(path)
    raise ConversionError(f"{path} is neither a Hugging Face model folder (config.json + safetensors) nor a GGUF file")


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder whose config.json says it is a kiln checkpoint (valid or not)."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return path.is_dir() and isinstance(config, dict) and "kiln_checkpoint" in config


def convert(source_path: str | os.PathLike, out: str | os.PathLike, progress: bool = True) -> Checkpoint:
    """Convert a Hugging Face folder or GGUF file into a kiln checkpoint at ``out``."""
    source = open_source(source_path)
    with staged_dir(out, "checkpoint") as stage:
        write_checkpoint(source, stage, progress)
    return read_checkpoint(out)


def write_checkpoint(source: SourceModel, out: Path, progress: bool = True,
                     save_weights: bool = True) -> dict[str, torch.Tensor]:
    """Write the checkpoint's files at ``out`` and return its tensors (checked against the model's
    layout). ``save_weights=False`` leaves the weights file out: the builder takes the tensors as they
    are instead of writing and reading them back."""
    config = model_config(source)
    try:
        layout = checkpoint_layout(config)
    except ValueError as e:  # a config the model's layers refuse (e.g. a rope scaling kiln lacks)
        raise ConversionError(f"{source.source}: {e}") from None
    kv_cache_scales = source.extra.get("kv_cache_scales")
    if kv_cache_scales is not None:
        _check_kv_cache_scales(kv_cache_scales, config, source.source)
    tensors: dict[str, torch.Tensor] = {}
    bar = tqdm(source.tensors(), total=source.num_tensors, desc="convert", unit="tensor", disable=not progress,
               leave=False)
    for name, tensor in bar:
        if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        if name not in layout:
            raise ConversionError(f"{source.source}: tensor {name!r} is not part of a {config.architecture} model")
        expected = layout[name]
        if name in source.formats:
            try:
                expected = block_format(source.formats[name]).packed_shape(expected)
            except ValueError as e:
                raise ConversionError(f"{source.source}: tensor {name!r}: {e}") from None
        if tuple(tensor.shape) != expected:
            raise ConversionError(
                f"{source.source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected}"
            )
        tensors[name] = tensor.contiguous()
    missing = sorted(set(layout) - set(tensors))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ConversionError(f"{source.source}: missing tensors {', '.join(missing[:5])}{more}")
    if save_weights:
        save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    write_tokenizer(source.tokenizer, source.tokenizer_config, out)
    meta = {
        "kiln_checkpoint": CHECKPOINT_VERSION,
        "model": config.to_dict(),
        "generation": generation_facts(source.hf_config, source.tokenizer, source.tokenizer_config,
                                       source.generation_config),
        "source": source.source,
        **({"weight_formats": {k: v for k, v in sorted(source.formats.items()) if k in tensors}}
           if source.formats else {}),
        **({"kv_cache_scales": kv_cache_scales} if kv_cache_scales is not None else {}),
    }
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return tensors


def _check_kv_cache_scales(scales: dict, config: ModelConfig, what: str) -> None:
    """One positive, finite key scale and value scale per layer."""
    fits = all(len(scales[which]) == config.num_layers for which in ("k", "v"))
    if not fits or not all(0 < s < float("inf") for s in (*scales["k"], *scales["v"])):
        raise ConversionError(f"{what}: kv_cache_scales must hold a positive, finite key and value scale for each of "
                              f"the {config.num_layers} layers")


def model_config(source: SourceModel) -> ModelConfig:
    arch = source.hf_config["architectures"][0]
    try:
        fam = family(arch)
    except KeyError as e:
        raise ConversionError(f"{source.source}: {e.args[0]}") from None
    try:
        return fam.config_from_hf(source.hf_config)
    except KeyError as e:
        raise ConversionError(f"{source.source}: the {arch} config lacks {e.args[0]!r}") from None
    except (ValueError, ArithmeticError) as e:
        raise ConversionError(f"{source.source}: cannot read the {arch} config: {e}") from None


def write_tokenizer(tokenizer: Tokenizer, tokenizer_config: dict, out: Path) -> None:
    tokenizer.save(str(out / TOKENIZER_FILE))
    keep = ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template", "add_bos_token", "add_eos_token",
            "model_max_length", "clean_up_tokenization_spaces")
    config = {k: tokenizer_config[k] for k in keep if tokenizer_config.get(k) is not None}
    (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def generation_facts(hf_config: dict, tokenizer: Tokenizer, tokenizer_config: dict,
                     generation_config: dict | None = None) -> dict:
    """BOS, EOS (all of them: the config's, the tokenizer's and the generation config's) and pad ids, and the
    model's own sampling defaults (``sampling_defaults``: those of SAMPLING_DEFAULTS its generation config
    sets; none where it sets none)."""

    def token_id(key: str) -> int | None:
        token = tokenizer_config.get(key)
        return tokenizer.token_to_id(token) if isinstance(token, str) else None

    generation_config = generation_config or {}
    eos_ids: set[int] = set()
    for eos in (hf_config.get("eos_token_id"), generation_config.get("eos_token_id")):
        eos_ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if token_id("eos_token") is not None:
        eos_ids.add(token_id("eos_token"))
    bos = token_id("bos_token")
    facts = {
        "bos_token_id": bos if bos is not None else hf_config.get("bos_token_id"),
        "eos_token_ids": sorted(t for t in eos_ids if isinstance(t, int) and not isinstance(t, bool)),
        "pad_token_id": token_id("pad_token") if token_id("pad_token") is not None else hf_config.get("pad_token_id"),
    }
    defaults = {}
    for name, kind in SAMPLING_DEFAULTS.items():
        value = generation_config.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            defaults[name] = kind(value)
    if defaults:
        facts["sampling_defaults"] = defaults
    return facts


def read_checkpoint(path: str | os.PathLike, need_weights: bool = True) -> Checkpoint:
    path = Path(path)
    if not is_checkpoint(path):
        raise ConversionError(f"{path} is not a kiln checkpoint (no config.json with 'kiln_checkpoint')")
    file = path / "config.json"
    meta = json.loads(file.read_text(encoding="utf-8"))
    version = meta["kiln_checkpoint"]
    if not isinstance(version, int) or isinstance(version, bool) or version > CHECKPOINT_VERSION:
        raise ConversionError(f"{file} has checkpoint format {version!r}; this kiln reads up to {CHECKPOINT_VERSION}")
    validate(meta, CONFIG_SCHEMA, str(file), ConversionError)
    try:
        config = ModelConfig.from_dict(meta["model"])
    except (ValueError, ArithmeticError) as e:
        raise ConversionError(f"{file}: {e}") from None
    for name in ((WEIGHTS_FILE,) if need_weights else ()) + tuple(TOKENIZER_FILES):
        if not (path / name).is_file():
            raise ConversionError(f"checkpoint {path} is missing {name}")
    formats = dict(meta.get("weight_formats") or {})
    for name, fmt in formats.items():
        try:
            block_format(fmt)
        except ValueError as e:
            raise ConversionError(f"{file}: weight_formats[{name!r}]: {e}") from None
    kv_cache_scales = meta.get("kv_cache_scales")
    if kv_cache_scales is not None:
        _check_kv_cache_scales(kv_cache_scales, config, str(file))
        kv_cache_scales = {which: [float(s) for s in kv_cache_scales[which]] for which in ("k", "v")}
    return Checkpoint(path, config, meta["generation"], meta.get("source"), formats, kv_cache_scales)
