"""Read a Hugging Face model folder (config.json, safetensors shards, tokenizer files)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from kiln.checkpoint.source import SourceModel
from kiln.errors import ConversionError


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and not _is_kiln_checkpoint(path)


def _is_kiln_checkpoint(path: Path) -> bool:
    try:
        return "kiln_checkpoint" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def read_hf_dir(path: str | os.PathLike) -> SourceModel:
    path = Path(path)
    hf_config = _read_json(path / "config.json")
    if not hf_config.get("architectures"):
        raise ConversionError(f"{path / 'config.json'} names no architecture (the 'architectures' key is missing)")
    files = _safetensors_files(path)
    index: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    index[name] = file
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise ConversionError(f"cannot read {file}: {e} (is the file truncated or not safetensors?)") from e
        _check_complete(file)
    tokenizer, tokenizer_config = _read_tokenizer(path)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    return SourceModel(hf_config, tensors, len(index), tokenizer, tokenizer_config, source=str(path))


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise ConversionError(f"{file} is missing")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConversionError(f"{file} is not valid JSON: {e}") from e


def _safetensors_files(path: Path) -> list[Path]:
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = _read_json(index_file).get("weight_map") or {}
        files = sorted({path / f for f in weight_map.values()})
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
        except ValueError as e:
            raise ConversionError(f"{file} has a corrupt safetensors header: {e}") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    size = file.stat().st_size
    if 8 + header_len + end > size:
        raise ConversionError(
            f"{file} is truncated: its header describes {8 + header_len + end} bytes but the file has {size}"
        )


def _read_tokenizer(path: Path) -> tuple[Tokenizer, dict]:
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
    if (path / "special_tokens_map.json").is_file():
        for key, value in _read_json(path / "special_tokens_map.json").items():
            config.setdefault(key, value)
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if isinstance(config.get(key), dict):
            config[key] = config[key].get("content")
    return tokenizer, config
