"""llama.cpp's own prompt and decode speed for one GGUF file on this CPU, at batch 1 (or --batch-size B), as JSON.

The reference that kiln's CPU numbers are set against. It drives llama.cpp through llama-cpp-python's
low-level API: each run clears the KV cache, evaluates an INPUT_LEN-token prompt in one llama_decode
call, then OUTPUT_LEN single-token llama_decode calls, each feeding back the greedy (argmax) token, so
exactly OUTPUT_LEN tokens are decoded whatever the model says (no EOS stop; same as llama-bench's
tgN). Speeds come from llama.cpp's own counters (llama_perf_context: t_p_eval_ms / t_eval_ms), so
Python's per-token overhead is not in them; the wall-clock decode rate is reported beside them.
With --batch-size B, B sequences (prompts of their own) are prefilled one after the other, then decoded
together, one llama_decode call of B tokens a step; llama.cpp books a call of several tokens as prompt
evaluation, so the decode rate is wall-clock: B x OUTPUT_LEN tokens over the decode loop's time.
Each run also records the share of all cores that OTHER processes used meanwhile (from /proc/stat);
--max-others-share redoes runs that a busy neighbour disturbed (a 2-thread run on 2 cores is very
sensitive to one: OpenMP threads wait on each other).
Prompt ids are drawn with a fixed seed below min(vocab, 320), so they are real tokens both for real
vocabularies and for the tiny tokenizer of benchmarks/random_model.py's models.

Needs llama-cpp-python (and numpy), e.g. in a venv of its own:
    python3 -m venv /work/llamacpp-venv
    CMAKE_BUILD_PARALLEL_LEVEL=2 /work/llamacpp-venv/bin/pip install "llama-cpp-python==0.3.36" numpy
On the project's VM (Xeon with AMX) the default -march=native build dies with SIGILL in ggml's AMX
matmul (tileloadd); build without AMX, keeping AVX-512, by prefixing that pip command with
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
      -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
      -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"   (one line)
Usage:
    /work/llamacpp-venv/bin/python benchmarks/llamacpp_cpu_decode.py MODEL.gguf \
        [--threads 2] [--batch-size 1] [--input-len 128] [--output-len 128] [--runs 3] [--warmup 1] [--json OUT.json]
        [--max-others-share 0.05] [--verbose]
The first (warmup) run pages the weights in and builds the graphs; it is not counted.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import time

import numpy as np
import llama_cpp as L


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat), or 0.0 where unreadable."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except OSError:
        return 0.0
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("gguf")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--verbose", action="store_true", help="keep llama.cpp's own log on stderr")
    p.add_argument("--max-others-share", type=float, default=1.0,
                   help="redo a run in which other processes took more than this share of all cores' time "
                        "(e.g. 0.05 on a shared machine; default 1.0 = never redo)")
    p.add_argument("--max-attempts", type=int, default=20, help="at most this many runs in all, with redos")
    args = p.parse_args()
    try:  # llama-cpp-python routes llama.cpp's log through this; errors only, unless --verbose
        from llama_cpp._logger import set_verbose
        set_verbose(args.verbose)
    except ImportError:
        pass

    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = L.llama_model_load_from_file(args.gguf.encode(), mparams)
    if not model:
        raise SystemExit(f"could not load {args.gguf}")
    cparams = L.llama_context_default_params()
    B = args.batch_size
    cparams.n_ctx = B * (args.input_len + args.output_len + 8)
    cparams.n_batch = cparams.n_ubatch = max(args.input_len, B, 1)
    cparams.n_seq_max = B
    cparams.n_threads = cparams.n_threads_batch = args.threads
    cparams.no_perf = False  # llama.cpp's default is True: no timings at all
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        raise SystemExit("could not create a llama.cpp context")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))

    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(3, min(n_vocab, 320), size=args.input_len).astype(np.int32)
    prompt_c = (L.llama_token * args.input_len)(*prompt.tolist())
    one = (L.llama_token * 1)()
    batch = L.llama_batch_init(max(args.input_len, B), 0, B)

    def fill(tokens: list[int], positions: list[int], seqs: list[int], logits: list[bool]) -> None:
        batch.n_tokens = len(tokens)
        for i, (t, p, s, lg) in enumerate(zip(tokens, positions, seqs, logits)):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, p, 1, lg
            batch.seq_id[i][0] = s

    def run_batched() -> dict:
        """B sequences: each prompt prefilled alone, then B tokens a llama_decode call."""
        busy0, own0, w0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        for s in range(B):
            ids = rng.integers(3, min(n_vocab, 320), size=args.input_len).tolist()
            fill(ids, list(range(args.input_len)), [s] * args.input_len, [False] * (args.input_len - 1) + [True])
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed on a prompt")
        last = [int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).argmax())] * B
        t0 = time.perf_counter()
        for step in range(args.output_len):
            fill(last, [args.input_len + step] * B, list(range(B)), [True] * B)
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed on a decode step")
            last = [int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())
                    for i in range(B)]
        L.llama_synchronize(ctx)
        wall = time.perf_counter() - t0
        others = (busy_cpu_seconds() - busy0) - (own_cpu_seconds() - own0)
        others_share = max(0.0, others) / ((time.perf_counter() - w0) * (os.cpu_count() or 1))
        rate = round(B * args.output_len / wall, 2)
        return {"decode_tok_s": rate, "decode_wall_tok_s": rate, "others_cpu_share": round(others_share, 3)}

    def run() -> dict:
        if B > 1:
            return run_batched()
        busy0, own0, w0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        L.llama_perf_context_reset(ctx)
        if L.llama_decode(ctx, L.llama_batch_get_one(prompt_c, args.input_len)) != 0:
            raise RuntimeError("llama_decode failed on the prompt")
        t0 = time.perf_counter()
        for _ in range(args.output_len):
            logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            one[0] = int(logits.argmax())
            if L.llama_decode(ctx, L.llama_batch_get_one(one, 1)) != 0:
                raise RuntimeError("llama_decode failed on a decode step")
        L.llama_synchronize(ctx)  # llama.cpp books a decode's time when it is synchronized
        wall = time.perf_counter() - t0
        # Share of all cores' time that other processes took during this run: a run on a busy machine shows.
        others = (busy_cpu_seconds() - busy0) - (own_cpu_seconds() - own0)
        others_share = max(0.0, others) / ((time.perf_counter() - w0) * (os.cpu_count() or 1))
        perf = L.llama_perf_context(ctx)
        return {
            "n_p_eval": perf.n_p_eval, "t_p_eval_ms": round(perf.t_p_eval_ms, 2),
            "n_eval": perf.n_eval, "t_eval_ms": round(perf.t_eval_ms, 2),
            "prompt_tok_s": round(1e3 * perf.n_p_eval / perf.t_p_eval_ms, 2),
            "decode_tok_s": round(1e3 * perf.n_eval / perf.t_eval_ms, 2),
            "decode_wall_tok_s": round(args.output_len / wall, 2),
            "others_cpu_share": round(others_share, 3),
        }

    for _ in range(args.warmup):
        run()
    load_before = os.getloadavg()
    runs, redone = [], []
    while len(runs) < args.runs and len(runs) + len(redone) < args.max_attempts:
        r = run()
        (runs if r["others_cpu_share"] <= args.max_others_share else redone).append(r)
    if not runs:
        raise SystemExit(f"no run with other processes under {args.max_others_share} of the CPU: {redone}")
    load_after = os.getloadavg()

    desc = ctypes.create_string_buffer(256)
    L.llama_model_desc(model, desc, len(desc))
    result = {
        "engine": f"llama.cpp via llama-cpp-python {L.__version__}",
        "gguf": os.path.abspath(args.gguf), "gguf_bytes": os.path.getsize(args.gguf),
        "model": desc.value.decode(errors="replace"), "n_params": L.llama_model_n_params(model),
        "threads": args.threads, "batch_size": B, "input_len": args.input_len, "output_len": args.output_len,
        "warmup": args.warmup, "runs": runs, "redone_runs_busy_machine": redone,
        "prompt_tok_s_median": statistics.median(r["prompt_tok_s"] for r in runs) if B == 1 else None,
        "decode_tok_s_median": statistics.median(r["decode_tok_s"] for r in runs),
        "loadavg_before": load_before, "loadavg_after": load_after,
        "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "system_info": L.llama_print_system_info().decode(errors="replace").strip(),
    }
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
