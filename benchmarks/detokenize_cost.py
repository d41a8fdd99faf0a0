"""What streaming detokenization costs per token: kiln's IncrementalDetokenizer fed one token at a time, over
2,000 tokens of this repository's README after a 100-token prompt, with a tokenizer.json's tokenizer.

Usage: python benchmarks/detokenize_cost.py TOKENIZER_JSON [--rounds 5]
(e.g. the tokenizer.json that benchmarks/gguf_to_hf.py writes for SmolLM2)
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from tokenizers import Tokenizer

from kiln.runtime.detokenizer import IncrementalDetokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tokenizer", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    tok = Tokenizer.from_file(str(a.tokenizer))
    ids = tok.encode((Path(__file__).resolve().parent.parent / "README.md").read_text()).ids
    prompt, out = ids[:100], ids[100:2100]
    best = float("inf")
    for _ in range(a.rounds):
        start = time.perf_counter()
        detok = IncrementalDetokenizer(tok, prompt)
        text = "".join(detok.add([t]) for t in out) + detok.flush()
        best = min(best, time.perf_counter() - start)
    assert text == tok.decode(out), "the deltas do not add up to the output's text"
    print(f"{best / len(out) * 1e6:.2f} us a token (best of {a.rounds} rounds of {len(out)} tokens)")


if __name__ == "__main__":
    main()
