"""The ``kiln`` backend: kiln engines served as Triton models (``backend``), with TensorRT-LLM's tensor
names (``tensors``), over one ``AsyncLLM`` per instance (``served_llm``)."""
from kiln.server.backends.kiln.backend import KilnBackend

__all__ = ["KilnBackend"]
