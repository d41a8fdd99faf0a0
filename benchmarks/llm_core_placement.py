"""``LLM`` with its engine core inline (the CPU default) against the core in a process of its own, in a script
that has already run torch's parallel work on another thread (which, with GNU OpenMP, slows the parallel
work of every other thread: core_thread's note) and in one that has not.

Usage: python benchmarks/llm_core_placement.py ENGINE_OR_MODEL [--batch 8] [--output-len 64] [--warm-other-thread]
Prints decode tokens/s of one batch of greedy requests (after a warmup batch) for each placement.
"""
from __future__ import annotations

import argparse
import threading
import time

import torch

from kiln.runtime import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--warm-other-thread", action="store_true",
                    help="run torch's parallel work on another thread first (a pool of OpenMP workers there)")
    a = ap.parse_args()
    if a.warm_other_thread:
        worker = threading.Thread(target=lambda: [torch.randn(512, 512) @ torch.randn(512, 512) for _ in range(20)])
        worker.start()
        worker.join()
    prompts = [[100 + (i * 13 + j) % 2000 for j in range(64)] for i in range(a.batch)]
    params = SamplingParams(max_tokens=a.output_len, temperature=0, ignore_eos=True)
    for place in ("inline", "process"):
        llm = LLM(a.model, engine_core=place)
        llm.generate(prompts, params)
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        llm.shutdown()
        tokens = sum(len(o.token_ids) for o in outs)
        print(f"{place:8s} {tokens / seconds:8.1f} tok/s  ({a.batch} x {a.output_len} tokens in {seconds:.2f} s)"
              f"{'  after torch work on another thread' if a.warm_other_thread else ''}")


if __name__ == "__main__":
    main()
