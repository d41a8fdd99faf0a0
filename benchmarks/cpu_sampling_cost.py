"""The sampler's host time per step on the CPU at SmolLM2's vocabulary (49,152), for the usual sampling settings,
at batch 1 and 8: what each sampled token costs beside the forward pass.

Usage: python benchmarks/cpu_sampling_cost.py [--before OLD_SAMPLER.py] [--vocab 49152] [--repeat 100]

With --before (e.g. ``git show REV:kiln/runtime/sampler.py > /tmp/sampler_old.py``), that file's Sampler is
timed beside this tree's, alternating, on the same logits. Logits are random normal times a scale: 3 gives
a peaked row (a top-p 0.9 nucleus of a few hundred tokens), 1 a flat one (thousands).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time

import torch

from kiln.runtime.request import Request, RequestStatus
from kiln.runtime.sampler import Sampler
from kiln.runtime.sampling_params import SamplingParams

SETTINGS = {
    "greedy": dict(temperature=0.0),
    "temperature 0.7": dict(temperature=0.7),
    "temperature 0.2, top-p 0.9 (SmolLM2's card)": dict(temperature=0.2, top_p=0.9),
    "temperature 1.0, top-p 0.95": dict(temperature=1.0, top_p=0.95),
    "temperature 0.7, top-k 50": dict(temperature=0.7, top_k=50),
    "temperature 0.7, min-p 0.05": dict(temperature=0.7, min_p=0.05),
}


def _time(sampler, logits: torch.Tensor, requests: list[Request], repeat: int) -> float:
    for _ in range(5):
        sampler.sample(logits, requests).result()
    start = time.perf_counter()
    for _ in range(repeat):
        sampler.sample(logits, requests).result()
    return (time.perf_counter() - start) / repeat * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", default=None)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeat", type=int, default=100)
    args = ap.parse_args()
    samplers = {"this tree": Sampler(seed=0)}
    if args.before:
        spec = importlib.util.spec_from_file_location("sampler_before", args.before)
        module = importlib.util.module_from_spec(spec)
        sys.modules["sampler_before"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        samplers = {"before": module.Sampler(seed=0), **samplers}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, vocab {args.vocab}; us per sample() "
          f"call, {' / '.join(samplers)}")
    gen = torch.Generator().manual_seed(0)
    for scale in (3.0, 1.0):
        for batch in (1, 8):
            logits = torch.randn(batch, args.vocab, generator=gen) * scale
            for name, params in SETTINGS.items():
                requests = []
                for i in range(batch):
                    r = Request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=16, **params))
                    r.status = RequestStatus.RUNNING
                    requests.append(r)
                times = [_time(s, logits, requests, args.repeat) for s in samplers.values()]
                print(f"scale {scale}, batch {batch}, {name}: " + " / ".join(f"{t:,.0f}" for t in times))


if __name__ == "__main__":
    main()
