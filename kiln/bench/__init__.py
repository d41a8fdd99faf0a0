"""Benchmarks: of an engine (``kiln bench throughput`` / ``kiln bench latency``, after trtllm-bench) and of a
running server (``kiln bench serve``, after vLLM's benchmark_serving).

``dataset`` makes the requests, ``measure`` drives the engine and times it, ``hf_baseline`` runs the
same prompts through transformers, ``clients`` speaks the serving protocols and ``serve`` drives a
server with them, ``report`` prints the tables and writes the JSON.
"""
