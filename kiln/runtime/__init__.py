"""The runtime: load an engine and generate (``LLM``), or serve requests as they come (``AsyncLLM``).

An engine core (``engine_core``: scheduler, KV cache, model runner, sampler) turns requests of token
ids into new token ids in a process of its own (``core_process``, for ``AsyncLLM`` and the server), a
thread (``core_thread``) or the caller's thread; the front end (``input_processor``, ``output_processor``)
checks requests and turns token ids into text in the caller's process.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "kiln.runtime.llm",
    "AsyncLLM": "kiln.runtime.async_llm",
    "LLMEngine": "kiln.runtime.llm_engine",
    "RuntimeConfig": "kiln.runtime.config",
    "SamplingParams": "kiln.runtime.sampling_params",
    "CompletionOutput": "kiln.runtime.outputs",
    "EngineStats": "kiln.runtime.outputs",
    "RequestFailed": "kiln.runtime.outputs",
    "RequestMetrics": "kiln.runtime.outputs",
    "RequestOutput": "kiln.runtime.outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    # Lazy, so that importing one runtime module does not pull in the whole engine core.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kiln.runtime' has no attribute {name!r}")
