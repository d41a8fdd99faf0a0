"""A CPU decode step's forward run eagerly (the model's Python) against its recorded op calls replayed
(``kiln.runtime.recorded_step``) from C++ and by its Python loop, on the same padded step buffers, in
alternating rounds in one process.

Usage: python benchmarks/cpu_recorded_step.py MODEL_OR_ENGINE [--batch 1 8] [--context 192] [--steps 50]
           [--rounds 5] [--threads N] [--json OUT]

Per batch size: a decode step of B sequences, each with ``--context`` tokens in the KV cache (blocks of the
pool, whatever they hold), is prepared once at the recorded shape, recorded, then timed eagerly, replayed from C++ and replayed in Python, ``--steps`` forwards a
round, rounds alternating; printed are the median round of each (ms a forward), the ratio to eager, and the
calls a step replays. The outputs are compared (they must be equal: the same kernels on the same inputs).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kiln.builder.engine_cache import engine_for
from kiln.runtime import LLM, SamplingParams
from kiln.runtime.recorded_step import record
from kiln.runtime.request import Request
from kiln.runtime.step_inputs import StepShape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--context", type=int, default=192)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = engine_for(args.model, None, "cpu")
    llm = LLM(engine, device="cpu", cuda_graphs="recorded", engine_core="inline",
              max_batch_size=max(args.batch))
    llm.generate(["warm up"], SamplingParams(max_tokens=2, temperature=0))
    runner = llm.engine.call(lambda core: core.runner)
    graphs, found, bs = runner.graphs, [], runner.block_size
    width = next(s.width for s in graphs.decode_shapes if s.width * bs >= args.context)
    for b in args.batch:
        batch, per = [], -(-args.context // bs)
        if b * per > runner.num_blocks:
            raise SystemExit(f"{b} sequences of {args.context} tokens need {b * per} KV blocks; the pool has "
                             f"{runner.num_blocks}")
        for i in range(b):
            req = Request(f"bench-{i}", [0] * args.context, SamplingParams(max_tokens=1))
            req.block_ids = list(range(i * per, (i + 1) * per))
            req.num_computed_tokens = args.context - 1
            batch.append((req, 1))
        step = runner.inputs.prepare(batch, pad_to=StepShape(b, b, width))
        with torch.inference_mode():
            recording, _ = record(lambda: graphs.forward(step))
            assert recording.program is not None, "the recording was not compiled to a C++ program"
            reference = graphs.forward(step)
            same = torch.equal(reference, recording.replay()) and torch.equal(reference, recording.replay_in_python())
            eager, replayed, in_python = [], [], []
            for _ in range(args.rounds):
                for times, run in ((eager, lambda: graphs.forward(step)), (replayed, recording.replay),
                                   (in_python, recording.replay_in_python)):
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        run()
                    times.append((time.perf_counter() - start) / args.steps * 1e3)
        row = {"batch": b, "context": args.context, "calls": len(recording.calls),
               "eager_ms": statistics.median(eager), "replayed_ms": statistics.median(replayed),
               "python_loop_ms": statistics.median(in_python), "eager_rounds_ms": eager,
               "replayed_rounds_ms": replayed, "python_loop_rounds_ms": in_python, "equal_outputs": same,
               "threads": torch.get_num_threads()}
        found.append(row)
        print(f"batch {b}, context {row['context']}, {row['calls']} calls, {row['threads']} threads: eager "
              f"{row['eager_ms']:.2f} ms, replayed {row['replayed_ms']:.2f} ms "
              f"({row['eager_ms'] / row['replayed_ms']:.2f}x), Python loop {row['python_loop_ms']:.2f} ms "
              f"({row['eager_ms'] / row['python_loop_ms']:.2f}x); outputs equal: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "results": found}, f, indent=2)


if __name__ == "__main__":
    main()
