"""``StepInputs.prepare`` alone on the CPU for a decode step: µs per call at batch 1, 64 and 256 (contexts of
200 tokens in blocks of 16; the best of five rounds), what a step's input building costs the host without the
rest of the engine.

Usage: PYTHONPATH=. python benchmarks/step_prepare.py [--repeat 300]
(Set PYTHONPATH to another checkout, e.g. a `git worktree` of an older commit, to time that one.)
"""
from __future__ import annotations

import argparse
import time

import torch

from kiln.runtime.request import Request, RequestStatus
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.step_inputs import StepInputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=300)
    args = p.parse_args()
    for batch_size in (1, 64, 256):
        inputs = StepInputs(2048, 256, 4096, 16, torch.device("cpu"))
        batch = []
        for i in range(batch_size):
            req = Request(f"r{i}", list(range(1, 200)), SamplingParams())
            req.status = RequestStatus.RUNNING
            req.block_ids = list(range(i * 14 + 1, i * 14 + 14))
            req.num_computed_tokens = 199
            req.token_ids.append(5)
            batch.append((req, 1))
        for _ in range(200):
            inputs.prepare(batch)
        timings = []
        for _ in range(5):  # the best of five rounds: a busy neighbour only ever adds time
            start = time.perf_counter()
            for _ in range(args.repeat):
                inputs.prepare(batch)
            timings.append((time.perf_counter() - start) / args.repeat * 1e6)
        print(f"batch {batch_size}: {min(timings):.1f} us per prepare (best of 5 rounds of {args.repeat})")


if __name__ == "__main__":
    main()
