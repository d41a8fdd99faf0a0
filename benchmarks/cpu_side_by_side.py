"""Decode tokens/s of kiln's CPU variants and transformers, side by side in one process, beside N busy neighbours.

    python benchmarks/cpu_side_by_side.py [--busy-neighbours N] [--batch-size B] [--output-len T] VARIANT...

A VARIANT is one of
    kiln                 kiln as it ships: ops timed at load, thread count chosen per step
    kiln:IMPL:THREADS    linear and logits bound to IMPL (onednn, reference), torch fixed at THREADS
    hf:THREADS           transformers' generate with torch at THREADS

on the bundled SmolLM2 engine in float32, 128-token prompts, one warmup batch then two measured ones
(decode tokens/s as ``kiln bench latency`` reports them). The figures in BENCHMARKS.md's CPU section
("why a busy neighbour took decode ...") come from this script.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from kiln.bench.dataset import ordinary_token_ids, synthetic
from kiln.bench.hf_baseline import HFBaseline, hf_decode, hf_source
from kiln.bench.measure import run_latency
from kiln.bench.neighbours import busy_neighbours
from kiln.builder.engine_cache import engine_for
from kiln.engine import read_engine
from kiln.models import ModelConfig
from kiln.ops import OpTable
from kiln.runtime import model_runner
from kiln.runtime.cpu_threads import ThreadGovernor
from kiln.runtime.config import RuntimeConfig
from kiln.runtime.llm_engine import LLMEngine
from kiln.runtime.tokenizer import EngineTokenizer


def kiln_rates(engine_dir: Path, variant: str, batches: list, output_len: int, batch_size: int) -> tuple[list, str]:
    _, impl, threads = (variant.split(":") + ["", ""])[:3]
    if impl:
        def fixed_table(engine, device, dtype):  # the engine's plan with linear/logits forced, nothing timed
            plan = {name: dict(entry) for name, entry in engine.plan.items()}
            plan["linear"]["impl"] = plan["logits"]["impl"] = impl
            return OpTable(plan, device, dtype), []

        model_runner.load_op_table, shipped = fixed_table, model_runner.load_op_table
    try:
        llm = LLMEngine(str(engine_dir), RuntimeConfig(device="cpu", max_batch_size=batch_size))
    finally:
        if impl:
            model_runner.load_op_table = shipped
    runner = llm.call(lambda core: core.runner)
    if threads:
        torch.set_num_threads(int(threads))
        runner.threads = ThreadGovernor(1)  # one count to choose from: leaves torch's alone
    result = run_latency(llm, batches[1:], output_len, batches[:1])
    llm.shutdown()
    steps = runner.threads.summary()["steps_by_threads"] if not threads else {}
    return result.decode_tokens_per_s_per_iteration, f"{runner.ops.choices['linear']}, steps by threads {steps}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variants", nargs="+")
    p.add_argument("--busy-neighbours", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--output-len", type=int, default=128)
    args = p.parse_args()
    engine_dir = engine_for(None, "float32")
    engine = read_engine(engine_dir)
    tokenizer = EngineTokenizer(engine)
    vocab = ModelConfig.from_dict(engine.model).vocab_size
    data = synthetic(128, args.output_len, args.batch_size * 3, 0, ordinary_token_ids(tokenizer, vocab))
    prompts = [r.prompt_ids for r in data.requests]
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    default_threads = torch.get_num_threads()
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.busy_neighbours} busy neighbours, "
          f"batch {args.batch_size}, {args.output_len} new tokens")
    with busy_neighbours(args.busy_neighbours):
        for variant in args.variants:
            torch.set_num_threads(default_threads)
            if variant.startswith("hf"):
                torch.set_num_threads(int(variant.split(":")[1]))
                baseline = HFBaseline(hf_source(engine), torch.device("cpu"), torch.float32)
                rates, note = hf_decode(baseline, batches[1:], args.output_len).decode_tokens_per_s_per_iteration, ""
                del baseline
            elif variant.startswith("kiln"):
                rates, note = kiln_rates(engine_dir, variant, batches, args.output_len, args.batch_size)
            else:
                raise SystemExit(f"unknown variant {variant!r}: kiln, kiln:IMPL:THREADS or hf:THREADS")
            print(f"{variant:22} decode tok/s " + " ".join(f"{r:6.1f}" for r in rates) + f"   {note}", flush=True)


if __name__ == "__main__":
    main()
