"""Running the engine built so far over a text kiln ships, to measure what a build step calibrates on (the KV
cache's scales, ``kv_scales``; int4's activation-aware scales, ``awq``).

The engine is written to the build's stage (its weights as they are at that step, and an engine.json whose
build config is the one given), loaded with ``kiln.runtime.LLM`` and fed the text in chunks of the engine's
max_seq_len - 1 tokens (or fewer where asked), each one request's prefill (one token generated). ``on_load``
(with the core and the text's length in tokens) and ``after_chunk`` (with the core) run on the engine core's
thread, between steps: to attach hooks to the model, or read the KV cache a chunk filled.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import save_file

from kiln.engine import ENGINE_FILE, manifest_of, weights_file, write_engine_json

CALIBRATION_TEXT = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"


def run_text(engine_dir: Path, device: torch.device, on_load: Callable[[Any, int], None] | None = None,
             after_chunk: Callable[[Any], None] | None = None, chunk: int | None = None) -> int:
    """Run the engine at ``engine_dir`` over the calibration text, in requests of ``chunk`` tokens (at most, and
    by default, max_seq_len - 1); the number of tokens it read."""
    from kiln.engine import read_engine
    from kiln.runtime.kv_pool import kv_cache_spec
    from kiln.runtime.llm import LLM
    from kiln.runtime.llm_engine import live_core_place
    from kiln.runtime.sampling_params import SamplingParams

    engine = read_engine(engine_dir)
    spec = kv_cache_spec(engine)
    blocks = -(-engine.build.max_seq_len // spec.block_size) + 1
    llm = LLM(engine, device=str(device), kv_cache_memory=blocks * spec.bytes_per_block, cuda_graphs="off",
              enable_prefix_caching=False, verify_weights=False, engine_core=live_core_place(device))
    try:
        ids = llm.tokenizer.encode(CALIBRATION_TEXT.read_text(encoding="utf-8"))
        if on_load is not None:
            llm.engine.call(lambda core: on_load(core, len(ids)))
        chunk = min(chunk or engine.build.max_seq_len, engine.build.max_seq_len - 1)
        for start in range(0, len(ids), chunk):
            llm.generate([ids[start:start + chunk]], SamplingParams(max_tokens=1))
            if after_chunk is not None:
                llm.engine.call(after_chunk)
    finally:
        llm.shutdown()
    return len(ids)


@contextmanager
def staged_engine(stage: Path, meta: dict, tensors: dict[str, torch.Tensor], formats: dict[str, str],
                  build: dict) -> Iterator[None]:
    """The engine as built so far, in ``stage`` while the block runs (``tensors`` and ``meta`` with build config
    ``build``), for ``run_text``; removed after."""
    save_file(tensors, str(stage / weights_file(0)), metadata={"format": "pt"})
    staged = {**meta, "build": build,
              "weights": {**meta["weights"], "stripped": False, "tensors": manifest_of(tensors, formats)}}
    staged.pop("kv_cache_scales", None)
    try:
        write_engine_json(stage, staged)
        yield
    finally:
        (stage / weights_file(0)).unlink()
        (stage / ENGINE_FILE).unlink(missing_ok=True)
