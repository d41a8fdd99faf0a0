"""kiln: from published LLM weights to a fast inference engine and server."""
from kiln.version import __version__

_RUNTIME = ("LLM", "AsyncLLM", "SamplingParams", "RequestOutput")
__all__ = [*_RUNTIME, "__version__"]


def __getattr__(name: str):
    # Lazy, so `import kiln` (e.g. for the CLI) does not load torch until it is needed.
    if name in _RUNTIME:
        from kiln import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
