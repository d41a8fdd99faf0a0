"""Read a Hugging Face model folder (config.json, safetensors shards, tokenizer files); quantized weights
(a compressed-tensors ``quantization_config``) stay packed (``kiln.checkpoint.hf_quantized``)."""
from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from kiln.checkpoint.hf_quantized import read_quantization
from kiln.checkpoint.source import SourceModel
from kiln.errors import ConversionError
from kiln.models import FAMILIES
from kiln.schema import BOOL, COUNT, INT, NUMBER, STR, AnyOf, DictOf, ListOf, Nullable, Record, validate

# The keys of a transformers config.json that kiln's families read, with their JSON types; other keys
# are ignored. Those every supported family needs are required.
HF_CONFIG_SCHEMA = Record(
    {"architectures": ListOf(STR), "vocab_size": COUNT, "hidden_size": COUNT, "intermediate_size": COUNT,
     "num_hidden_layers": COUNT, "num_attention_heads": COUNT},
    {"num_key_value_heads": Nullable(COUNT), "head_dim": Nullable(COUNT), "rms_norm_eps": NUMBER,
     "rope_theta": NUMBER, "rope_scaling": Nullable(DictOf()), "rope_parameters": Nullable(DictOf()),
     "max_position_embeddings": COUNT, "tie_word_embeddings": BOOL, "attention_bias": BOOL,
     "sliding_window": Nullable(INT), "use_sliding_window": BOOL, "max_window_layers": INT,
     "layer_types": Nullable(ListOf(STR)), "hidden_act": STR, "bos_token_id": Nullable(INT),
     "eos_token_id": Nullable(AnyOf((INT, ListOf(INT)), "an integer or a list of integers")),
     "pad_token_id": Nullable(INT)},
)


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_hf_dir(path: str | os.PathLike) -> SourceModel:
    path = Path(path)
    file = path / "config.json"
    hf_config = _read_json(file)
    # The architecture first: another family's config lacks this one's keys, and that is not the problem.
    validate(hf_config, Record({"architectures": ListOf(STR)}), str(file), ConversionError)
    if not hf_config["architectures"]:
        raise ConversionError(f"{file} names no architecture (architectures is empty)")
    if hf_config["architectures"][0] not in FAMILIES:
        raise ConversionError(f"{file}: unsupported architecture {hf_config['architectures'][0]!r}; kiln supports "
                              f"{', '.join(sorted(FAMILIES))}")
    validate(hf_config, HF_CONFIG_SCHEMA, str(file), ConversionError)
    files = _safetensors_files(path)
    index: dict[str, Path] = {}
    shapes: dict[str, list[int]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    index[name] = file
                    shapes[name] = f.get_slice(name).get_shape()
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise ConversionError(f"cannot read {file}: {e} (is the file truncated or not safetensors?)") from e
        _check_complete(file)
    quantized = read_quantization(hf_config, shapes, str(path))
    tokenizer, tokenizer_config = read_tokenizer(path)
    # A quantized module's tensors (which may lie in different shards) become its one packed weight.
    names = [name for name in index if name not in quantized.parts] + list(quantized.formats)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        with ExitStack() as stack:
            opened = {file: stack.enter_context(safe_open(str(file), framework="pt")) for file in files}

            def get(name: str) -> torch.Tensor:
                return opened[index[name]].get_tensor(name)

            for name in names:
                yield name, quantized.load(name, get) if name in quantized.formats else get(name)

    extra = {}
    if quantized.kv_scales:
        def get_one(name: str) -> torch.Tensor:
            with safe_open(str(index[name]), framework="pt") as f:
                return f.get_tensor(name)

        extra["kv_cache_scales"] = quantized.kv_cache_scales(get_one)
    generation = path / "generation_config.json"
    return SourceModel(hf_config, tensors, len(names), tokenizer, tokenizer_config, source=str(path), extra=extra,
                       formats=quantized.formats,
                       generation_config=_read_json(generation) if generation.is_file() else {})


def _read_json(file: Path) -> dict:
    """A JSON object from ``file``; anything else is a ConversionError naming the file."""
    if not file.is_file():
        raise ConversionError(f"{file} is missing")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{file} is not valid JSON: {e}") from e
    validate(data, DictOf(), str(file), ConversionError)
    return data


def _safetensors_files(path: Path) -> list[Path]:
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        index = _read_json(index_file)
        validate(index, Record({"weight_map": DictOf(STR)}), str(index_file), ConversionError)
        files = sorted({path / f for f in index["weight_map"].values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConversionError(f"{index_file} lists shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(other)}: only safetensors weights are read)" if other else ""
        raise ConversionError(f"no .safetensors weights in {path}{hint}")
    return files


def _check_complete(file: Path) -> None:
    """A truncated file can still have a readable header: compare the header's extent with the size."""
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, MemoryError) as e:
            raise ConversionError(f"{file} has a corrupt safetensors header: {e}") from e
    if isinstance(header, dict):
        header.pop("__metadata__", None)
    validate(header, DictOf(Record({"data_offsets": ListOf(INT)})), f"{file}: safetensors header", ConversionError)
    end = max((v["data_offsets"][-1] for v in header.values() if v["data_offsets"]), default=0)
    size = file.stat().st_size
    if 8 + header_len + end > size:
        raise ConversionError(
            f"{file} is truncated: its header describes {8 + header_len + end} bytes but the file has {size}"
        )


def read_tokenizer(path: Path) -> tuple[Tokenizer, dict]:
    file = path / "tokenizer.json"
    if not file.is_file():
        raise ConversionError(
            f"{path} has no tokenizer.json; kiln needs the fast tokenizer file next to the weights "
            "(save it with transformers' tokenizer.save_pretrained)"
        )
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:
        raise ConversionError(f"cannot load {file}: {e}") from e
    config = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    template_file = path / "chat_template.jinja"
    if template_file.is_file():
        config["chat_template"] = template_file.read_text(encoding="utf-8")
    elif (path / "chat_template.json").is_file():
        config["chat_template"] = _read_json(path / "chat_template.json").get("chat_template")
    config["chat_template"] = _default_template(config.get("chat_template"), path)
    if (path / "special_tokens_map.json").is_file():
        for key, value in _read_json(path / "special_tokens_map.json").items():
            config.setdefault(key, value)
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if isinstance(config.get(key), dict):
            config[key] = config[key].get("content")
        if config.get(key) is not None and not isinstance(config[key], str):
            raise ConversionError(f"{path}: the tokenizer's {key} must be a string, got {config[key]!r}")
    return tokenizer, config


def _default_template(template: object, path: Path) -> str | None:
    """The chat template; of several named ones (a list of {name, template}), the one named "default",
    which is the one transformers applies when none is named."""
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ConversionError(f"{path}: the tokenizer's chat_template is neither a string nor a list of named "
                          f"templates with a 'default' one")
