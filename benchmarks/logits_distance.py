"""How close kiln's logits are to transformers' on a model (random weights included), at every position
of a few prompts: kiln (the engine's dtype) and transformers in the same dtype, each against
transformers in float32 (the exact model). On random weights greedy agreement means nothing (the
logits are nearly flat); this distance is what says the model is computed right.

Usage: python benchmarks/logits_distance.py HF_DIR ENGINE_DIR [OUT.json]
"""
from __future__ import annotations

import json
import random
import sys

import torch
import transformers

from kiln import LLM, SamplingParams
from kiln.runtime.llm_engine import live_core_place
from kiln.runtime.request import Request


def main() -> None:
    hf_dir, engine_dir = sys.argv[1], sys.argv[2]
    # A small KV pool: this process also holds transformers' float32 and same-dtype copies of the model.
    llm = LLM(engine_dir, kv_cache_memory=1 << 30, engine_core=live_core_place(None))  # its runner is read here
    runner = llm.engine.call(lambda core: core.runner)
    device, dtype = runner.device, runner.dtype
    exact = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
    same = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    rng = random.Random(0)
    rows = []
    for i, n in enumerate((16, 64, 200)):
        ids = [rng.randrange(3, 300) for _ in range(n)]
        req = Request(f"p{i}", ids, SamplingParams())
        req.block_ids = list(range(-(-n // runner.block_size)))
        got = runner.all_logits([(req, n)]).float()
        with torch.no_grad():
            ref = exact(torch.tensor([ids], device=device)).logits[0].float()
            hf = same(torch.tensor([ids], device=device)).logits[0].float()
        for p in range(n):
            norm = ref[p].norm()
            rows.append((float((got[p] - ref[p]).norm() / norm), float((hf[p] - ref[p]).norm() / norm),
                         bool(got[p].argmax() == ref[p].argmax()), bool(hf[p].argmax() == ref[p].argmax())))
    kiln_err, hf_err = [r[0] for r in rows], [r[1] for r in rows]
    doc = {"positions": len(rows), "dtype": str(dtype),
           "kiln_vs_exact": {"mean": sum(kiln_err) / len(rows), "max": max(kiln_err)},
           "transformers_vs_exact": {"mean": sum(hf_err) / len(rows), "max": max(hf_err)},
           "kiln_argmax_agreement": sum(r[2] for r in rows) / len(rows),
           "transformers_argmax_agreement": sum(r[3] for r in rows) / len(rows)}
    print(json.dumps(doc, indent=1))
    if len(sys.argv) > 3:
        with open(sys.argv[3], "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
