"""The runtime: load an engine and generate (``LLM``), or serve requests as they come (``AsyncLLM``)."""
from kiln.runtime.llm import LLM
from kiln.runtime.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from kiln.runtime.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineStats", "RequestMetrics", "RequestOutput", "SamplingParams"]
