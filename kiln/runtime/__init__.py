"""The runtime: load an engine and generate (``LLM``), or serve requests as they come (``AsyncLLM``)."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "kiln.runtime.llm",
    "AsyncLLM": "kiln.runtime.async_llm",
    "SamplingParams": "kiln.runtime.sampling_params",
    "CompletionOutput": "kiln.runtime.outputs",
    "EngineStats": "kiln.runtime.outputs",
    "RequestMetrics": "kiln.runtime.outputs",
    "RequestOutput": "kiln.runtime.outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    # Lazy, so that importing one runtime module does not pull in the whole executor.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kiln.runtime' has no attribute {name!r}")
