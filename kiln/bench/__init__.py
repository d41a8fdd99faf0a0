"""Benchmarks of an engine (``kiln bench throughput`` / ``kiln bench latency``), after trtllm-bench.

``dataset`` makes the requests, ``measure`` drives the engine and times it, ``hf_baseline`` runs the
same prompts through transformers, ``report`` prints the table and writes the JSON.
"""
