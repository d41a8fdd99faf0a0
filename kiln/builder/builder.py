"""``kiln build``: a checkpoint (or a Hugging Face folder / GGUF file, converted on the way) -> an engine."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from kiln.builder import awq, kv_scales
from kiln.builder.calibration import staged_engine
from kiln.builder.plan import choose_plan
from kiln.builder.transforms import engine_tensors, quantize_linear_weights
from kiln.checkpoint.checkpoint import Checkpoint, is_checkpoint, open_source, read_checkpoint, write_checkpoint
from kiln.engine import FORMAT_VERSION, TOKENIZER_FILES, BuildConfig, manifest_of, weights_file, write_engine_json
from kiln.engine.target import target_of
from kiln.errors import BuildError
from kiln.fsutil import staged_dir
from kiln.models import ModelConfig
from kiln.ops.user_plugins import PLUGIN_DIR, load_plugin_file
from kiln.version import __version__


def build(
    source: str | os.PathLike,
    out: str | os.PathLike,
    config: BuildConfig | None = None,
    strip_weights: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    tune: bool | None = None,
    plugins: list[str | os.PathLike] = (),
    keep_packed: bool = True,
    quantize_calibration: str = awq.DEFAULT_METHOD,
) -> Path:
    """Build the engine at ``out``; nothing is left there unless the build succeeds.

    Packed weights (a GGUF file's blocks) stay packed, each in its format; ``keep_packed=False`` decodes
    them into the build dtype instead. ``config.quantization`` quantizes the linear layers' float weights;
    into int4, after activation-aware scaling (``awq``) unless ``quantize_calibration`` is "none".

    The ops with a choice of kernels are timed at the engine's shapes (``tune``; None: on a GPU).
    ``plugins`` are the user's plugin files: imported first (their plugins are candidates too) and
    carried by the engine.
    """
    config = config or BuildConfig()
    if quantize_calibration not in awq.METHODS:
        raise BuildError(f"quantize_calibration {quantize_calibration!r} is not one of {', '.join(awq.METHODS)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out)
    modules = {load_plugin_file(file) for file in plugins}
    with staged_dir(out, "engine") as stage:
        if is_checkpoint(source):
            checkpoint = read_checkpoint(source)
            source_tensors = checkpoint.load_tensors()
        else:
            # Converted on the way: the checkpoint's small files are written, its tensors stay in memory.
            (stage / ".checkpoint").mkdir()
            source_tensors = write_checkpoint(open_source(source), stage / ".checkpoint", progress, save_weights=False)
            checkpoint = read_checkpoint(stage / ".checkpoint", need_weights=False)
        _check_limits(checkpoint, config)
        steps = tqdm(total=4, desc="build", disable=not progress, leave=False)
        steps.set_postfix_str("plan ops")
        plan = choose_plan(device, checkpoint.config, config, tune=tune, plugins=modules)
        steps.update()
        steps.set_postfix_str("fuse and cast weights")
        tensors, formats = engine_tensors(checkpoint.config, source_tensors, config.torch_dtype, checkpoint.formats,
                                          keep_packed)
        del source_tensors
        meta = {
            "format_version": FORMAT_VERSION,
            "kiln_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": _source_record(source, checkpoint),
            "model": checkpoint.config.to_dict(),
            "build": config.to_dict(),
            "plan": plan,
            "target": target_of(device),
            "weights": {"files": [weights_file(0)], "stripped": strip_weights},
            "tokenizer": tokenizer_facts(checkpoint),
        }
        for name in TOKENIZER_FILES:
            shutil.copyfile(checkpoint.path / name, stage / name)
        carried = []
        for file in plugins:
            (stage / PLUGIN_DIR).mkdir(exist_ok=True)
            rel = f"{PLUGIN_DIR}/{Path(file).name}"
            if rel in carried:
                raise BuildError(f"two plugin files are named {Path(file).name}")
            shutil.copyfile(file, stage / rel)
            carried.append(rel)
        if carried:
            meta["plugins"] = carried
        if config.quantization:
            chosen = awq.foldable(checkpoint.config, tensors, formats)
            if awq.applies(quantize_calibration, config.quantization) and chosen:
                steps.set_postfix_str(f"calibrate {config.quantization}'s activation-aware scales")
                meta["awq"] = _scale_for_int4(stage, meta, checkpoint.config, tensors, formats, chosen, device)
            steps.set_postfix_str(f"quantize to {config.quantization}")
            quantize_linear_weights(checkpoint.config, tensors, formats, config.quantization, device)
        steps.update()
        stored_kv = kv_scales.stored_scales(checkpoint.kv_cache_scales, config)  # the checkpoint's FP8 cache's
        if config.kv_cache_quantized:
            steps.set_postfix_str(f"calibrate the {config.kv_cache_dtype} KV cache" if stored_kv is None
                                  else "the checkpoint's KV cache scales")
            meta["kv_cache_scales"] = stored_kv or _calibrate_kv_cache(stage, meta, tensors, formats, device)
            try:
                kv_scales.fold(checkpoint.config, tensors, formats, meta["kv_cache_scales"])
            except ValueError as e:
                raise BuildError(f"cannot fold the KV cache's scales into the weights: {e}") from None
        steps.set_postfix_str("write weights")
        if not strip_weights:
            save_file(tensors, str(stage / weights_file(0)), metadata={"format": "pt"})
        steps.update()
        steps.set_postfix_str("checksums")
        meta["weights"]["tensors"] = manifest_of(tensors, formats)
        write_engine_json(stage, meta)
        steps.update()
        steps.close()
        shutil.rmtree(stage / ".checkpoint", ignore_errors=True)
    return out


def _scale_for_int4(stage: Path, meta: dict, model: ModelConfig, tensors: dict[str, torch.Tensor],
                    formats: dict[str, str], chosen: list[awq.Group], device: torch.device) -> dict:
    """Choose the activation-aware scales of ``chosen`` layers (``awq``) by running the float engine as built so
    far, fold them into the weights (in place), write them beside the weights; engine.json's entry for them."""
    float_build = {**meta["build"], "quantization": None, "kv_cache_dtype": None}
    with staged_engine(stage, meta, tensors, formats, float_build):
        acts = awq.calibrate(stage, [g.consumer for g in chosen], device)
    choices = awq.choose(tensors, acts, chosen, meta["build"]["quantization"], device)
    awq.fold(model, tensors, formats, {name: c.scales for name, c in choices.items()})
    return awq.write(stage, choices, acts)


def _calibrate_kv_cache(stage: Path, meta: dict, tensors: dict[str, torch.Tensor], formats: dict[str, str],
                        device: torch.device) -> dict:
    """The quantized KV cache's scales, from running the engine as built so far with a float cache (its
    weights and engine.json written to ``stage`` for that, and removed after)."""
    with staged_engine(stage, meta, tensors, formats, {**meta["build"], "kv_cache_dtype": None}):
        return kv_scales.calibrate(stage, BuildConfig(**meta["build"]), device)


def _check_limits(checkpoint: Checkpoint, config: BuildConfig) -> None:
    max_pos = checkpoint.config.max_position_embeddings
    if config.max_seq_len > max_pos:
        raise BuildError(f"max_seq_len {config.max_seq_len} exceeds the model's max_position_embeddings ({max_pos})")


def _source_record(source: str | os.PathLike, checkpoint: Checkpoint) -> dict:
    return {"path": str(Path(source).resolve()), "original": checkpoint.source}


def tokenizer_facts(checkpoint: Checkpoint) -> dict:
    config = checkpoint.tokenizer_config()
    return {
        "files": list(TOKENIZER_FILES),
        **checkpoint.generation,
        "bos_token": config.get("bos_token"),
        "eos_token": config.get("eos_token"),
        "add_bos_token": bool(config.get("add_bos_token", False)),
        "chat_template": config.get("chat_template"),
    }
