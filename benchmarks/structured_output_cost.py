"""What a structured output costs per decode step (issue 18), side by side in one process on one engine.

1. End to end: the same batch of requests decoded with and without a constraint (interleaved rounds, the best
   of each), each exactly ``--tokens`` tokens (``ignore_eos``; the constraint is a regex that never completes, ``[a-zA-Z ,.]*``, so its
   requests run as long as the free ones). Reported: output tok/s and ms per step of each, and the
   difference per step.
2. The grammar's own parts per step: llguidance's masks for the batch (``fill_bitmasks``, on the host),
   the masks applied to a batch of logits (``apply_bitmasks``, on the device), and the matchers advanced,
   timed while the matchers walk an answer token by token: a JSON answer of a nested schema, and a
   sentence under the free-text regex (a mask that allows most of the vocabulary costs llguidance more).

First it checks a batch of constrained answers (they parse and fit their schema; a free request beside them).
Usage: python benchmarks/structured_output_cost.py ENGINE [--batch 1 64] [--tokens 64] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from kiln.engine.format import TOKENIZER_FILE
from kiln.runtime import LLM, SamplingParams
from kiln.runtime import structured_output as so
from kiln.runtime.structured_output import StructuredOutput

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string"}, "country": {"enum": ["France", "Italy", "Spain"]},
    "landmarks": {"type": "array", "items": {"type": "string"}},
    "location": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                 "required": ["lat", "lon"]}}, "required": ["city", "country", "location"]}
ANSWER = {"city": "Paris", "country": "France", "landmarks": ["Eiffel Tower", "Louvre", "Notre-Dame de Paris",
                                                                "Arc de Triomphe", "Sacre-Coeur"],
          "location": {"lat": 48.8566, "lon": 2.3522}}

SENTENCE = ("Paris is the capital of France, a city of museums, cafes and bridges along the Seine, where "
            "visitors walk from the Louvre to the Eiffel Tower and on to Montmartre.")


def end_to_end(llm: LLM, batch: int, tokens: int, rounds: int) -> dict:
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": "Write a sentence about Paris."}])
    free = SamplingParams(max_tokens=tokens, temperature=0.7, seed=1, ignore_eos=True)
    text = SamplingParams(max_tokens=tokens, temperature=0.7, seed=1, ignore_eos=True,
                          structured=StructuredOutput("regex", "[a-zA-Z ,.]*"))
    llm.generate([prompt] * batch, [free] * batch)  # warm up both paths
    llm.generate([prompt] * batch, [text] * batch)
    out = {}
    runs: dict[str, list[float]] = {"free": [], "constrained": []}
    for _ in range(rounds):  # interleaved, so that a busy spell of the machine falls on both
        for name, params in (("free", free), ("constrained", text)):
            start = time.perf_counter()
            results = llm.generate([prompt] * batch, [params] * batch)
            runs[name].append(time.perf_counter() - start)
            assert all(len(r.outputs[0].token_ids) == tokens for r in results)
    for name, seconds in runs.items():
        best = min(seconds)
        out[name] = {"seconds": best, "tok_s": batch * tokens / best, "ms_per_step": best / tokens * 1e3,
                     "spread_ms_per_step": (max(seconds) - best) / tokens * 1e3}
    out["added_ms_per_step"] = out["constrained"]["ms_per_step"] - out["free"]["ms_per_step"]
    return out


CHECKED = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                            "size": {"enum": ["S", "M", "L"]},
                                            "count": {"type": "integer", "minimum": 0, "maximum": 99}},
           "required": ["name", "size", "count"], "additionalProperties": False}


def check_answers(llm: LLM, batch: int) -> str:
    """Every answer of a batch under a bounded schema (greedy and sampled) parses and fits it (checked by
    hand: the GPU machine has no jsonschema); a batch with a free request beside them."""
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": "Describe a shirt as JSON."}])
    constraint = StructuredOutput("json", json.dumps(CHECKED), whitespace_flexible=False)
    params = [SamplingParams(max_tokens=80, temperature=0 if i % 2 else 1.0, seed=i, structured=constraint)
              for i in range(batch)] + [SamplingParams(max_tokens=20, temperature=0)]
    outs = llm.generate([prompt] * len(params), params)
    done = 0
    for out in outs[:-1]:
        c = out.outputs[0]
        if c.finish_reason != "stop":
            raise SystemExit(f"a constrained answer did not end: {c.text!r}")
        doc = json.loads(c.text)
        if (set(doc) != {"name", "size", "count"} or doc["size"] not in ("S", "M", "L")
                or not isinstance(doc["count"], int) or not 0 <= doc["count"] <= 99 or len(doc["name"]) > 12):
            raise SystemExit(f"an answer breaks the schema: {c.text!r}")
        done += 1
    return f"{done} of {batch} constrained answers parse and fit the schema"


def parts(llm: LLM, batch: int, device: str, constraint: StructuredOutput, text: str) -> dict:
    core = llm.engine.core
    vocab = core.facts.vocab_size
    grammars = so.Grammars(core.engine.path / TOKENIZER_FILE, vocab, core.engine.tokenizer.get("eos_token_ids"))
    answer = llm.tokenizer.encode(text, add_special_tokens=False)
    matchers = [grammars.matcher(constraint) for _ in range(batch)]
    logits = torch.randn(batch, vocab, device=device)
    rows = list(range(batch))
    fill, apply, accept = [], [], []
    for token in answer:
        t0 = time.perf_counter()
        masks = so.fill_bitmasks(matchers, vocab)
        t1 = time.perf_counter()
        so.apply_bitmasks(logits, rows, masks)
        if logits.device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        for m in matchers:
            so.accept(m, token)
        t3 = time.perf_counter()
        fill.append(t1 - t0)
        apply.append(t2 - t1)
        accept.append(t3 - t2)
    assert all(not m.is_error() for m in matchers)
    us = lambda xs: round(statistics.median(xs) * 1e6, 1)  # noqa: E731
    return {"tokens_walked": len(answer), "fill_us": us(fill), "apply_us": us(apply), "accept_us": us(accept),
            "total_us": round(us(fill) + us(apply) + us(accept), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="end-to-end runs of each, interleaved (best taken)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    args = ap.parse_args()
    llm = LLM(args.engine, device=args.device, max_batch_size=max(args.batch))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    report = {"device": args.device if args.device != "cpu" else cpu, "threads": torch.get_num_threads(), "runs": {}}
    for batch in args.batch:
        print(check_answers(llm, batch))
        run = report["runs"][batch] = {"end_to_end": end_to_end(llm, batch, args.tokens, args.rounds)}
        e = run["end_to_end"]
        print(f"batch {batch}: free {e['free']['tok_s']:.1f} tok/s ({e['free']['ms_per_step']:.2f} ms/step), "
              f"constrained {e['constrained']['tok_s']:.1f} tok/s ({e['constrained']['ms_per_step']:.2f} ms/step), "
              f"{e['added_ms_per_step']:+.2f} ms/step (the slowest run of each: +{e['free']['spread_ms_per_step']:.1f} / "
              f"+{e['constrained']['spread_ms_per_step']:.1f} ms/step)")
        for name, constraint, text in (
                ("json_schema", StructuredOutput("json", json.dumps(SCHEMA), whitespace_flexible=False),
                 json.dumps(ANSWER, separators=(",", ":"))),
                ("regex", StructuredOutput("regex", "[a-zA-Z ,.]*"), SENTENCE)):
            p = run[f"parts_{name}"] = parts(llm, batch, args.device, constraint, text)
            print(f"  {name}: per step, masks {p['fill_us']} us, apply {p['apply_us']} us, "
                  f"accept {p['accept_us']} us")
    print(f"({report['device']}, {report['threads']} threads)")
    llm.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
