"""The engine directory: engine.json (config, plan, target, weight manifest, tokenizer facts),
rank{N}.safetensors (weights laid out for the plan) and the tokenizer files. Read, write, validate.

engine.json is checked against ``ENGINE_SCHEMA`` when read: every key the runtime reads must be
there with its type, and the build limits are never filled in from today's defaults. The weight
files are read and checked in ``kiln.engine.weights``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.errors import EngineError
from kiln.models.config import ModelConfig
from kiln.schema import BOOL, INT, NUMBER, STR, DictOf, ListOf, Nullable, Record, record_of, validate
from kiln.weight_formats import FLOAT, QUANTIZED, block_format

# 2: a weight may be packed in a block format (its manifest entry names the format).
FORMAT_VERSION = 2
ENGINE_FILE = "engine.json"
# The tokenizer as a checkpoint and an engine both carry it (the builder copies these files as they are).
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE)
# The dtypes an engine may be built in.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The KV cache's dtypes: a float dtype, or one byte per value (``kiln build --kv-cache-dtype``), whose
# values are keys and values divided by per-layer scales (engine.json's kv_cache_scales: calibrated at build,
# or a quantized checkpoint's).
QUANTIZED_KV_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
KV_CACHE_DTYPES = {**DTYPES, **QUANTIZED_KV_DTYPES}
# The dtypes a weight may have, by safetensors' name; the manifest names them as torch does (dtype_name).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


WEIGHT_DTYPES: dict[str, torch.dtype] = {dtype_name(d): d for d in SAFETENSORS_DTYPES.values()}


def weights_file(rank: int = 0) -> str:
    return f"rank{rank}.safetensors"


@dataclass(frozen=True)
class BuildConfig:
    """Limits and layout fixed at build time. The runtime may use less, never more."""

    dtype: str = "float32"
    # Ceilings: the runtime admits fewer sequences when its KV pool holds fewer (kv_pool.batch_the_pool_holds).
    max_batch_size: int = 256
    max_seq_len: int = 2048
    max_num_tokens: int = 2048
    kv_block_size: int = 16
    kv_cache_dtype: str | None = None  # None: the same as dtype; "fp8" or "int8": quantized (KV_CACHE_DTYPES)
    # The format kiln quantizes the float weights of linear layers into (kiln.weight_formats.QUANTIZED):
    # "int8", "fp8", "int4_g128", ...; None: they stay in dtype. Packed weights (a GGUF file's) keep theirs.
    quantization: str | None = None
    tp_size: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            problems.append(f"kv_cache_dtype {self.kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
        for name in ("max_batch_size", "max_seq_len", "max_num_tokens", "kv_block_size", "tp_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.kv_block_size & (self.kv_block_size - 1):
            problems.append(f"kv_block_size must be a power of two, got {self.kv_block_size}")
        if self.max_num_tokens < self.max_batch_size:
            problems.append(f"max_num_tokens ({self.max_num_tokens}) must be at least max_batch_size "
                            f"({self.max_batch_size}) so that every running request can decode in one step")
        if self.quantization is not None and self.quantization not in QUANTIZED:
            problems.append(f"quantization {self.quantization!r} is not one of {', '.join(QUANTIZED)}")
        if self.tp_size != 1:
            problems.append("tensor parallelism (tp_size > 1) is not supported yet")
        if problems:
            raise EngineError("invalid build config: " + "; ".join(problems))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def kv_torch_dtype(self) -> torch.dtype:
        return KV_CACHE_DTYPES[self.kv_cache_dtype or self.dtype]

    @property
    def kv_cache_quantized(self) -> bool:
        return self.kv_cache_dtype in QUANTIZED_KV_DTYPES

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
    def weight_formats(self) -> dict[str, str]:
        """The packed weights' formats by name (the others are float)."""
        return {t["name"]: t["format"] for t in self.manifest if "format" in t}

    @property
    def tensor_formats(self) -> dict[str, str]:
        """Every weight's format by name, "float" for the float ones."""
        return {t["name"]: t.get("format", FLOAT) for t in self.manifest}

    @property
    def stripped(self) -> bool:
        return bool(self.meta["weights"]["stripped"])

    @property
    def plugins(self) -> list[str]:
        return list(self.meta.get("plugins") or [])

    @property
    def weights_path(self) -> Path:
        return self.path / weights_file(0)


# Token facts a checkpoint records and an engine copies into its tokenizer section.
GENERATION_SCHEMA = Record({"bos_token_id": Nullable(INT), "eos_token_ids": ListOf(INT), "pad_token_id": Nullable(INT)},
                           {"sampling_defaults": Record({}, {"temperature": NUMBER, "top_p": NUMBER, "top_k": INT,
                                                             "min_p": NUMBER, "repetition_penalty": NUMBER},
                                                        closed=True)})
# Every key of engine.json that kiln reads; a missing or mistyped one is an error naming its path.
ENGINE_SCHEMA = Record(
    {
        "format_version": INT,
        "model": record_of(ModelConfig, all_required=True),
        "build": record_of(BuildConfig, all_required=True),
        "plan": DictOf(Record({"impl": STR}, {"config": DictOf()})),
        "target": Record({"device_type": STR}, {"name": Nullable(STR), "compute_capability": Nullable(STR),
                                                 "torch": Nullable(STR), "triton": Nullable(STR),
                                                 "memory_bytes": Nullable(INT)}),
        # A packed weight's entry has its format (kiln.weight_formats) and the float shape it holds; its
        # shape and dtype are those of the packed bytes as stored.
        "weights": Record({"stripped": BOOL, "tensors": ListOf(Record(
            {"name": STR, "shape": ListOf(INT), "dtype": STR, "sha256": STR},
            {"format": STR, "logical_shape": ListOf(INT)}))}, {"files": ListOf(STR)}),
        "tokenizer": Record({**GENERATION_SCHEMA.required, "add_bos_token": BOOL, "chat_template": Nullable(STR)},
                            {"bos_token": Nullable(STR), "eos_token": Nullable(STR), "files": ListOf(STR),
                             **GENERATION_SCHEMA.optional}),
    },
    {"kiln_version": Nullable(STR), "created": STR, "source": Nullable(DictOf()),
     # The user's plugin files the engine carries (relative paths), imported before its plan is bound.
     "plugins": ListOf(STR),
     # A quantized KV cache's scales, a key scale and a value scale per layer (kiln.builder.kv_scales).
     "kv_cache_scales": Record({"k": ListOf(NUMBER), "v": ListOf(NUMBER)}),
     # int4's activation-aware scales (kiln.builder.awq): the file that holds them, its sha256, and how they
     # were chosen; refit folds them into new weights.
     "awq": Record({"file": STR, "sha256": STR},
                   {"calibration_tokens": INT, "sample_rows": INT, "alphas": DictOf(NUMBER),
                    "error_vs_round_to_nearest": DictOf(NUMBER)})},
)


def _check_packed_entry(tensor: dict, what: str) -> None:
    try:
        fmt = block_format(tensor["format"])
    except ValueError as e:
        raise EngineError(f"{what}: {e}") from None
    logical = tensor.get("logical_shape")
    try:
        fits = (tensor["dtype"] == "uint8" and logical is not None and len(logical) == 2
                and list(fmt.logical_shape(tensor["shape"])) == logical)
    except ValueError:
        fits = False
    if not fits:
        raise EngineError(f"{what}: shape {tensor['shape']} ({tensor['dtype']}) does not hold a {fmt.name} weight "
                          f"of logical_shape {logical}")


def _check_kv_cache_scales(scales: dict | None, build: BuildConfig, model: ModelConfig, what: str) -> None:
    """A quantized KV cache has a key and a value scale per layer, positive and finite; a float one has none."""
    if not build.kv_cache_quantized:
        if scales is not None:
            raise EngineError(f"{what}: kv_cache_scales are for a quantized KV cache, not {build.kv_torch_dtype}")
        return
    if scales is None:
        raise EngineError(f"{what}: a {build.kv_cache_dtype} KV cache needs kv_cache_scales")
    fits = len(scales["k"]) == len(scales["v"]) == model.num_layers
    if not fits or not all(0 < s < float("inf") for s in (*scales["k"], *scales["v"])):
        raise EngineError(f"{what}: kv_cache_scales must hold a positive key and value scale for each of the "
                          f"{model.num_layers} layers")


def write_engine_json(directory: Path, meta: dict) -> None:
    """Write engine.json, after checking it against the schema that reading it will check."""
    what = f"{ENGINE_FILE} to be written in {directory}"
    validate(meta, ENGINE_SCHEMA, what, EngineError)
    _check_kv_cache_scales(meta.get("kv_cache_scales"), BuildConfig(**meta["build"]),
                           ModelConfig.from_dict(meta["model"]), what)
    (directory / ENGINE_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_engine(path: str | os.PathLike, need_weights: bool = True) -> Engine:
    """Read and validate an engine folder's engine.json and tokenizer files (and, with ``need_weights``,
    that its weights file is there; ``kiln.engine.weights`` checks what is in it)."""
    path = Path(path)
    file = path / ENGINE_FILE
    if not file.is_file():
        raise EngineError(f"{path} is not a kiln engine (no {ENGINE_FILE})")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise EngineError(f"{file} is not valid JSON: {e}") from e
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise EngineError(f"{file} has format version {version!r}; this kiln reads versions up to {FORMAT_VERSION}")
    validate(meta, ENGINE_SCHEMA, str(file), EngineError)
    try:
        build = BuildConfig(**meta["build"])
        model = ModelConfig.from_dict(meta["model"])
    except (EngineError, ValueError, ArithmeticError) as e:
        raise EngineError(f"{file}: {e}") from None
    _check_kv_cache_scales(meta.get("kv_cache_scales"), build, model, str(file))
    for i, tensor in enumerate(meta["weights"]["tensors"]):
        if tensor["dtype"] not in WEIGHT_DTYPES:
            raise EngineError(f"{file}: weights.tensors[{i}].dtype {tensor['dtype']!r} is not one of "
                              f"{', '.join(WEIGHT_DTYPES)}")
        if "format" in tensor:
            _check_packed_entry(tensor, f"{file}: weights.tensors[{i}] ({tensor['name']})")
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
