"""``kiln refit``: new weights into an existing engine without a rebuild, after checking every tensor."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from kiln.builder import awq, kv_scales
from kiln.builder.transforms import engine_tensors, quantize_linear_weights
from kiln.checkpoint.checkpoint import read_checkpoint
from kiln.engine import check_against_manifest, manifest_of, read_engine, weights_file, write_engine_json
from kiln.errors import BuildError, EngineError
from kiln.fsutil import staged_dir
from kiln.ops.user_plugins import PLUGIN_DIR
from kiln.models import ModelConfig


def refit(engine_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Put the checkpoint's weights into the engine (in place, or into a copy at ``out``).

    Every name, shape, dtype and format is checked before anything is written; on any mismatch the
    engine is left as it was. A packed checkpoint (a GGUF file's blocks) refits a float engine decoded; a
    quantized engine (``kiln build --quantize``) takes float weights quantized as its build did (int4 after the
    activation-aware scales its build chose, ``awq``), and one with a quantized KV cache takes the scales its
    build calibrated (``kv_scales``), folded in again.
    """
    engine = read_engine(engine_dir, need_weights=False)
    checkpoint = read_checkpoint(checkpoint_dir)
    config = ModelConfig.from_dict(engine.model)
    if checkpoint.config != config:
        diff = [k for k, v in config.to_dict().items() if checkpoint.config.to_dict().get(k) != v]
        raise BuildError(f"checkpoint {checkpoint.path} is a different model than engine {engine.path} "
                         f"(config differs in {', '.join(diff)})")
    try:
        # A float engine takes a packed checkpoint's weights decoded; a packed one takes them as they are.
        tensors, formats = engine_tensors(config, checkpoint.load_tensors(), engine.build.torch_dtype,
                                          checkpoint.formats, keep_packed=bool(engine.weight_formats))
        if "awq" in engine.meta:  # the build's activation-aware scales, folded in before rounding as it did
            awq.fold(config, tensors, formats, awq.recorded(engine.path, engine.meta["awq"]))
        if engine.build.quantization:  # float weights are quantized on the way, as the build did
            quantize_linear_weights(config, tensors, formats, engine.build.quantization)
        if engine.build.kv_cache_quantized:  # the build's KV cache scales, folded in as the build did
            kv_scales.fold(config, tensors, formats, engine.meta["kv_cache_scales"])
        check_against_manifest(engine.manifest, tensors, f"refit of {engine.path} from {checkpoint.path}", formats)
    except (EngineError, ValueError) as e:
        raise BuildError(str(e)) from None
    meta = dict(engine.meta)
    meta["weights"] = {**meta["weights"], "stripped": False, "tensors": manifest_of(tensors, formats)}
    target = Path(out) if out is not None else engine.path
    with staged_dir(target, "refit", overwrite=out is None) as stage:
        for item in engine.path.iterdir():
            if item.name not in (weights_file(0), "engine.json") and item.is_file():
                shutil.copyfile(item, stage / item.name)
            elif item.is_dir() and item.name == PLUGIN_DIR:
                shutil.copytree(item, stage / item.name)
        save_file(tensors, str(stage / weights_file(0)), metadata={"format": "pt"})
        write_engine_json(stage, meta)
    return target
