"""``kiln bench throughput``, ``latency``, ``perplexity`` and ``serve``: the CLI side of kiln.bench."""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kiln.cli.build_options import add_quantize_options, quantization, quantize_calibration
from kiln.engine.format import BuildConfig
from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.bench.hf_baseline import HFSource
    from kiln.engine import Engine
    from kiln.runtime.llm_engine import LLMEngine
    from kiln.runtime.tokenizer import EngineTokenizer

DEFAULT_NUM_REQUESTS = 64


def add_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("bench", help="measure an engine's throughput or latency (after trtllm-bench), "
                                       "or a running server's")
    benchmarks = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")

    t = benchmarks.add_parser("throughput", help="serve many requests with in-flight batching; tokens/s and latencies")
    _add_model_options(t)
    g = t.add_argument_group("requests")
    g.add_argument("--dataset", default=None,
                   help='JSONL file: one {"prompt": text | "input_ids": [ids], "output_tokens": n} a line')
    g.add_argument("--input-len", type=int, default=None, help="synthetic requests: prompt tokens")
    g.add_argument("--output-len", type=int, default=None, help="synthetic requests: output tokens")
    g.add_argument("--num-requests", type=int, default=None,
                   help=f"synthetic: how many (default {DEFAULT_NUM_REQUESTS}); with --dataset: the first N")
    g.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests/s as Poisson arrivals (default inf: all at once)")
    g.add_argument("--warmup", type=int, default=2, help="requests served before measuring (default 2)")
    g.add_argument("--seed", type=int, default=0, help="for synthetic prompts and arrival times")
    r = t.add_argument_group("runtime")
    r.add_argument("--max-batch-size", type=int, default=None, help="running requests at most (default: the engine's)")
    r.add_argument("--max-num-tokens", type=int, default=None, help="tokens per step at most (default: the engine's)")
    r.add_argument("--engine-core", choices=["auto", "inline", "thread", "process"], default="auto",
                   help="where the engine core steps (default auto: inline on a CPU, a process of its own on a GPU, as "
                        "kiln serve runs it)")
    _add_machine_options(t)
    _add_output_options(t)
    t.set_defaults(run=_throughput, bench_parser=t)

    lat = benchmarks.add_parser("latency",
                                help="one batch of same-length requests at a time; TTFT, TPOT, decode tokens/s")
    _add_model_options(lat)
    g = lat.add_argument_group("requests")
    g.add_argument("--input-len", type=int, required=True, help="prompt tokens")
    g.add_argument("--output-len", type=int, required=True, help="output tokens")
    g.add_argument("--batch-size", type=int, default=1, help="requests submitted together (default 1)")
    g.add_argument("--iterations", type=int, default=5, help="measured batches (default 5)")
    g.add_argument("--warmup", type=int, default=1, help="batches run before measuring (default 1)")
    g.add_argument("--seed", type=int, default=0, help="for the synthetic prompts")
    r = lat.add_argument_group("runtime")
    r.add_argument("--max-num-tokens", type=int, default=None, help="tokens per step at most (default: the engine's)")
    _add_machine_options(lat)
    _add_output_options(lat)
    lat.set_defaults(run=_latency, bench_parser=lat)

    ppl = benchmarks.add_parser("perplexity", help="perplexity on a text (by default kiln's shipped English text), "
                                                   "in windows scored through prompt logprobs")
    _add_model_options(ppl)
    g = ppl.add_argument_group("text")
    g.add_argument("--text", default=None, metavar="FILE",
                   help="a UTF-8 text file (default: kiln's own English text, about 3,700 SmolLM2 tokens)")
    g.add_argument("--window", type=int, default=512,
                   help="tokens per window; windows do not overlap and each is scored on all its tokens after "
                        "the first (default 512)")
    r = ppl.add_argument_group("runtime")
    r.add_argument("--max-num-tokens", type=int, default=None, help="tokens per step at most (default: the engine's)")
    g = ppl.add_argument_group("output")
    g.add_argument("--json", default=None, metavar="OUT",
                   help="also write the numbers as JSON to OUT (-: stdout, and the table goes to stderr)")
    ppl.set_defaults(run=_perplexity, bench_parser=ppl)

    _add_serve_parser(benchmarks)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="an engine, checkpoint, Hugging Face folder or .gguf file (default: the bundled SmolLM2)")
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--kv-cache-memory", type=float, default=None, metavar="GIB",
                   help="KV cache size in GiB (default: twice a full batch at max length, within free memory)")
    p.add_argument("--cuda-graphs", choices=["auto", "on", "recorded", "off"], default="auto",
                   help="step graphs: CUDA graphs of decode and small mixed steps (on), a CPU's recorded decode "
                        "steps (recorded), or none (off); auto: on on a GPU, recorded on a CPU, where the plan "
                        "allows")
    g = p.add_argument_group("build options (when the model must be built first)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, bfloat16 on GPU; a built engine keeps its own")
    g.add_argument("--max-seq-len", type=int, default=None, help="default: the model's limit, at most 4096")
    g.add_argument("--kv-block-size", type=int, default=None, help=f"default {BuildConfig.kv_block_size}")
    add_quantize_options(g)


def _add_machine_options(p: argparse.ArgumentParser) -> None:
    from kiln.bench.neighbours import DESCRIPTION

    g = p.add_argument_group("machine")
    g.add_argument("--busy-neighbours", type=int, default=0, metavar="N",
                   help=f"keep N other processes busy during the whole run, kiln's and transformers' ({DESCRIPTION})")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", default=None, metavar="OUT",
                   help="also write the numbers as JSON to OUT (-: stdout, and the table goes to stderr)")
    g.add_argument("--compare-hf", action="store_true",
                   help="run the same prompts through transformers' generate and compare")


# ----- the benchmarks -----
def _throughput(args: argparse.Namespace) -> None:
    from kiln.bench.dataset import load_jsonl, ordinary_token_ids, synthetic
    from kiln.bench.hf_baseline import HFBaseline, hf_throughput, token_match
    from kiln.bench.measure import run_throughput
    from kiln.bench.neighbours import busy_neighbours
    from kiln.bench.report import emit
    from kiln.runtime.config import RuntimeConfig
    from kiln.runtime.llm_engine import LLMEngine

    _require_positive(args, "max_batch_size", "max_num_tokens", "num_requests", "input_len", "output_len")
    _require_at_least_zero(args, "warmup", "busy_neighbours")
    if not args.request_rate > 0:
        raise KilnError(f"--request-rate must be positive, got {args.request_rate}")
    if args.dataset and (args.input_len is not None or args.output_len is not None):
        raise KilnError("give either --dataset or --input-len/--output-len, not both")
    if not args.dataset and (args.input_len is None or args.output_len is None):
        raise KilnError("give --dataset, or --input-len and --output-len for synthetic requests")
    engine_dir, engine = _engine(args, args.max_batch_size)
    source = _hf_source(engine) if args.compare_hf else None
    # The requests before the weights, so that a bad dataset fails at once.
    tokenizer, vocab_size = _tokenizer(engine)
    if args.dataset:
        dataset = load_jsonl(args.dataset, tokenizer.encode, vocab_size, limit=args.num_requests)
    else:
        dataset = synthetic(args.input_len, args.output_len, args.num_requests or DEFAULT_NUM_REQUESTS, args.seed,
                            ordinary_token_ids(tokenizer, vocab_size))
    _release(args.device)
    with busy_neighbours(args.busy_neighbours):
        llm = LLMEngine(str(engine_dir), RuntimeConfig(device=args.device, max_batch_size=args.max_batch_size,
                                                       max_num_tokens=args.max_num_tokens,
                                                       kv_cache_memory=_kv_bytes(args),
                                                       cuda_graphs=args.cuda_graphs,
                                                       engine_core=args.engine_core))
        result = run_throughput(llm, dataset, args.request_rate, args.warmup, args.seed)
        settings = {"request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
                    "warmup": args.warmup, "seed": args.seed, "busy_neighbours": args.busy_neighbours}
        doc = _document(args, llm, engine, dataset.description, settings, result.to_dict())
        if source is not None:
            batch_size = llm.limits.max_batch_size
            device, dtype = llm.device, engine.build.torch_dtype
            llm.shutdown()
            del llm
            _release(device)
            baseline = HFBaseline(source, device, dtype)
            hf = hf_throughput(baseline, [(r.prompt_ids, r.output_len) for r in dataset.requests], batch_size)
            doc["hf"] = {
                "source": str(source), "transformers": baseline.version, "batch_size": hf.batch_size,
                "num_batches": hf.num_batches, "duration_s": hf.duration_s, "output_throughput": hf.output_throughput,
                "kiln_output_throughput": result.output_throughput,
                "ratio": result.output_throughput / hf.output_throughput,
                "token_match": token_match(result.output_token_ids, hf.output_token_ids),
            }
    emit(doc, args.json)


def _latency(args: argparse.Namespace) -> None:
    from kiln.bench.dataset import ordinary_token_ids, synthetic
    from kiln.bench.hf_baseline import HFBaseline, hf_decode, token_match
    from kiln.bench.measure import run_latency
    from kiln.bench.neighbours import busy_neighbours
    from kiln.bench.report import emit
    from kiln.runtime.config import RuntimeConfig
    from kiln.runtime.llm_engine import LLMEngine

    _require_positive(args, "input_len", "output_len", "batch_size", "iterations", "max_num_tokens")
    _require_at_least_zero(args, "warmup", "busy_neighbours")
    b = args.batch_size
    engine_dir, engine = _engine(args, b)
    source = _hf_source(engine) if args.compare_hf else None
    tokenizer, vocab_size = _tokenizer(engine)
    # Fresh prompts for every batch, so no batch finds another's prefix anywhere.
    data = synthetic(args.input_len, args.output_len, b * (args.warmup + args.iterations), args.seed,
                     ordinary_token_ids(tokenizer, vocab_size))
    prompts = [r.prompt_ids for r in data.requests]
    batches = [prompts[i:i + b] for i in range(0, len(prompts), b)]
    warmup, measured = batches[:args.warmup], batches[args.warmup:]
    _release(args.device)
    with busy_neighbours(args.busy_neighbours):
        llm = LLMEngine(str(engine_dir), RuntimeConfig(device=args.device, max_batch_size=b,
                                                       max_num_tokens=args.max_num_tokens,
                                                       kv_cache_memory=_kv_bytes(args),
                                                       cuda_graphs=args.cuda_graphs))
        if llm.limits.max_batch_size < b:
            llm.shutdown()
            raise KilnError(f"engine {engine_dir} runs at most {llm.limits.max_batch_size} requests at "
                            f"once, fewer than --batch-size {b}; build it with a larger --max-batch-size")
        result = run_latency(llm, measured, args.output_len, warmup)
        description = dict(data.description, num_requests=b * args.iterations)
        settings = {"batch_size": b, "iterations": args.iterations, "warmup": args.warmup, "seed": args.seed,
                    "busy_neighbours": args.busy_neighbours}
        doc = _document(args, llm, engine, description, settings, result.to_dict())
        from kiln.bench.roofline import decode_limit

        doc["limit"] = decode_limit(engine, llm.device)
        if source is not None:
            device, dtype = llm.device, engine.build.torch_dtype
            llm.shutdown()
            del llm
            _release(device)
            baseline = HFBaseline(source, device, dtype)
            hf = hf_decode(baseline, measured, args.output_len)
            kiln_rate, hf_rate = result.decode_tokens_per_s, hf.decode_tokens_per_s
            doc["hf"] = {
                "source": str(source), "transformers": baseline.version, "batch_size": b,
                "decode_tokens_per_s": hf_rate,
                "decode_tokens_per_s_per_iteration": hf.decode_tokens_per_s_per_iteration,
                "kiln_decode_tokens_per_s": kiln_rate,
                "ratio": kiln_rate / hf_rate if kiln_rate is not None and hf_rate else None,
                "token_match": token_match([s for it in result.output_token_ids for s in it],
                                           [s for it in hf.output_token_ids for s in it]),
            }
    emit(doc, args.json)


def _perplexity(args: argparse.Namespace) -> None:
    from kiln.bench.perplexity import DEFAULT_TEXT, run_perplexity, windows
    from kiln.bench.report import emit
    from kiln.runtime.config import RuntimeConfig
    from kiln.runtime.llm_engine import LLMEngine

    _require_positive(args, "max_num_tokens")
    path = Path(args.text) if args.text else DEFAULT_TEXT
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KilnError(f"cannot read the text {path}: {e}") from None
    engine_dir, engine = _engine(args, None)
    tokenizer, _ = _tokenizer(engine)
    ids = tokenizer.encode(text, add_special_tokens=False)
    windows(ids, args.window)  # a window too short, or a text too short, fails before the weights load
    _release(args.device)
    llm = LLMEngine(str(engine_dir), RuntimeConfig(device=args.device, max_num_tokens=args.max_num_tokens,
                                                   kv_cache_memory=_kv_bytes(args), cuda_graphs=args.cuda_graphs))
    try:
        result = run_perplexity(llm, ids, args.window)
        dataset = {"kind": "text", "path": str(path.resolve()), "num_tokens": len(ids)}
        doc = _document(args, llm, engine, dataset, {"window": args.window}, result.to_dict())
    finally:
        llm.shutdown()
    emit(doc, args.json)


# ----- helpers -----
def _engine(args: argparse.Namespace, batch: int | None) -> tuple[Path, Engine]:
    """The engine folder for ``args.model`` (built and cached if need be, for at least ``batch`` requests
    at once) and its description."""
    from kiln.builder.engine_cache import engine_for
    from kiln.engine import read_engine

    build_batch = max(batch or 0, BuildConfig.max_batch_size)
    asked = quantization(args)
    # engine_for reports a build on stdout, which --json - keeps for the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        engine_dir = Path(engine_for(args.model, args.dtype, args.device, max_batch_size=build_batch,
                                     max_seq_len=args.max_seq_len, kv_block_size=args.kv_block_size,
                                     max_num_tokens=max(args.max_num_tokens or BuildConfig.max_num_tokens,
                                                        build_batch), quantization=asked,
                                     kv_cache_dtype=args.kv_cache_dtype,
                                     quantize_calibration=quantize_calibration(args)))
    engine = read_engine(engine_dir)
    if args.dtype is not None and engine.build.dtype != args.dtype:
        raise KilnError(f"engine {engine_dir} holds {engine.build.dtype} weights, not --dtype {args.dtype}; "
                        f"benchmark it without --dtype, or build another engine")
    if asked is not None and engine.build.quantization != asked:
        raise KilnError(f"engine {engine_dir} was built with quantization {engine.build.quantization}, not {asked}; "
                        f"benchmark it without --quantize, or build another engine")
    if args.kv_cache_dtype is not None and engine.build.kv_cache_dtype != args.kv_cache_dtype:
        raise KilnError(f"engine {engine_dir} has a {engine.build.kv_torch_dtype} KV cache, not --kv-cache-dtype "
                        f"{args.kv_cache_dtype}; benchmark it without --kv-cache-dtype, or build another engine")
    return engine_dir, engine


def _hf_source(engine: Engine) -> HFSource:
    """Where transformers will load the model from; checked, with transformers itself, before kiln runs."""
    from kiln.bench.hf_baseline import hf_source, require_transformers

    source = hf_source(engine)
    require_transformers()
    return source


def _tokenizer(engine: Engine) -> tuple[EngineTokenizer, int]:
    from kiln.models import ModelConfig
    from kiln.runtime.tokenizer import EngineTokenizer

    return EngineTokenizer(engine), ModelConfig.from_dict(engine.model).vocab_size


def _document(args: argparse.Namespace, llm: LLMEngine, engine: Engine, dataset: dict, settings: dict,
              results: dict) -> dict:
    from kiln.bench.report import environment

    limits = llm.limits
    source = engine.meta.get("source") or {}
    ran = llm.call(_plan_ran)
    return {
        "benchmark": args.benchmark,
        "command": _command_line(args),
        "environment": environment(llm.device, engine.build.dtype),
        "engine": {
            "path": str(Path(engine.path).resolve()),
            "source": source.get("original") or source.get("path"),
            "architecture": engine.model.get("architecture"),
            "max_batch_size": limits.max_batch_size, "max_num_tokens": limits.max_num_tokens,
            "max_seq_len": limits.max_seq_len, "kv_block_size": engine.build.kv_block_size,
        },
        # The plan as built, what ran (chosen at load on a CPU: kiln/runtime/tuned_plan.py) and how.
        "plan": {"built": {op: entry.get("impl") for op, entry in (engine.plan or {}).items()},
                 "ran": ran["ran"], "chosen_at_load": ran["chosen_at_load"]},
        "threads": ran["threads"],
        "dataset": dataset,
        "settings": settings,
        "results": results,
        "hf": None,
    }


def _plan_ran(core) -> dict:
    """What the core's runner ran and how (a module-level function: a core in a process of its own takes only
    one that pickles, and sends back plain values)."""
    runner = core.runner
    return {"ran": dict(runner.ops.choices), "chosen_at_load": [c.to_dict() for c in runner.tuning],
            "threads": runner.threads.summary()}


def _command_line(args: argparse.Namespace) -> str:
    """The command that repeats this run: the benchmark, then every option that is not its default."""
    parts = ["kiln", "bench", args.benchmark]
    for action in args.bench_parser._actions:
        if action.dest in ("help", argparse.SUPPRESS):
            continue
        value = getattr(args, action.dest, None)
        if not action.option_strings:
            if value is not None:
                parts.append(str(value))
        elif value != action.default:
            flag = action.option_strings[-1]
            parts += [flag] if isinstance(action, argparse._StoreTrueAction) else [flag, str(value)]
    return shlex.join(parts)


def _kv_bytes(args: argparse.Namespace) -> int | None:
    if args.kv_cache_memory is None:
        return None
    if not args.kv_cache_memory > 0:
        raise KilnError(f"--kv-cache-memory must be positive, got {args.kv_cache_memory}")
    return int(args.kv_cache_memory * (1 << 30))


def _release(device: torch.device | str | None) -> None:
    """Hand cached GPU memory back to the driver.

    The engine sizes its KV pool from the driver's free memory, which counts what torch's caching
    allocator still holds (an earlier engine in this process) as taken; and transformers must find
    room after kiln's engine is gone.
    """
    gc.collect()
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.empty_cache()


def _require_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise KilnError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _require_at_least_zero(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value < 0:
            raise KilnError(f"--{name.replace('_', '-')} must be at least 0, got {value}")


# ----- serve: a running server, over HTTP -----
def _add_serve_parser(benchmarks: argparse._SubParsersAction) -> None:
    from kiln.bench.clients import BACKENDS
    from kiln.bench.serve import COUNT_MODES

    s = benchmarks.add_parser("serve", help="a running server (OpenAI or Triton generate_stream): TTFT, TPOT, "
                                            "inter-token latency, requests and tokens/s")
    g = s.add_argument_group("server")
    g.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    g.add_argument("--backend", choices=BACKENDS, default="openai-completions",
                   help="the protocol (default openai-completions)")
    g.add_argument("--model", default=None,
                   help="the model's name on the server (default with OpenAI: the first it lists)")
    g.add_argument("--endpoint", default=None, help="the request path, if not the backend's usual one")
    g.add_argument("--label", default=None, help="a name for the server in the table and JSON (e.g. kiln)")
    g.add_argument("--extra-body", default=None, metavar="JSON", help="fields added to every request's JSON body")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (default 600)")
    g = s.add_argument_group("requests")
    g.add_argument("--dataset", default=None,
                   help='JSONL file: one {"prompt": text | "input_ids": [ids], "output_tokens": n} a line')
    g.add_argument("--input-len", type=int, default=None, help="synthetic requests: prompt tokens")
    g.add_argument("--output-len", type=int, default=None, help="synthetic requests: output tokens")
    g.add_argument("--num-requests", "--num-prompts", dest="num_prompts", type=int, default=None,
                   help=f"synthetic: how many (default {DEFAULT_NUM_REQUESTS}); with --dataset: the first N")
    g.add_argument("--tokenizer", default=None,
                   help="engine or Hugging Face folder whose tokenizer makes the prompts and counts tokens "
                        "(default: the bundled SmolLM2 engine)")
    g.add_argument("--no-ignore-eos", action="store_true",
                   help="let outputs end at an end token (default: ask for exact lengths with ignore_eos / "
                        "min_tokens / min_length)")
    g.add_argument("--count-tokens", choices=COUNT_MODES, default="auto",
                   help="output tokens: auto = the server's count where the protocol gives it, else the "
                        "tokenizer's; tokenizer; chunks = one per streamed event")
    g = s.add_argument_group("load")
    g.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests/s as Poisson arrivals (default inf: all at once)")
    g.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no limit)")
    g.add_argument("--warmup", type=int, default=1, help="requests sent before measuring (default 1)")
    g.add_argument("--seed", type=int, default=0, help="for synthetic prompts and arrival times")
    g = s.add_argument_group("output")
    g.add_argument("--json", default=None, metavar="OUT",
                   help="also write the numbers as JSON to OUT (-: stdout, and the table goes to stderr)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(run=_serve, bench_parser=s)


def _serve(args: argparse.Namespace) -> int:
    import json

    from kiln.bench.dataset import load_jsonl, ordinary_token_ids, synthetic
    from kiln.bench.report import emit
    from kiln.bench.serve import ServeConfig, document, load_tokenizer, prompts_of, run_serve, warmup_prompts

    _require_positive(args, "num_prompts", "input_len", "output_len", "max_concurrency")
    _require_at_least_zero(args, "warmup")
    if not args.url.startswith(("http://", "https://")):
        raise KilnError(f"--url must start with http:// or https://, got {args.url!r}")
    if not args.request_rate > 0:
        raise KilnError(f"--request-rate must be positive, got {args.request_rate}")
    if not args.timeout > 0:
        raise KilnError(f"--timeout must be positive, got {args.timeout}")
    if args.dataset and (args.input_len is not None or args.output_len is not None):
        raise KilnError("give either --dataset or --input-len/--output-len, not both")
    if not args.dataset and (args.input_len is None or args.output_len is None):
        raise KilnError("give --dataset, or --input-len and --output-len for synthetic requests")
    try:
        extra = json.loads(args.extra_body) if args.extra_body else {}
    except ValueError as e:
        raise KilnError(f"--extra-body is not valid JSON: {e}") from None
    if not isinstance(extra, dict):
        raise KilnError("--extra-body must be a JSON object")
    exact = not args.no_ignore_eos
    tokenizer, vocab_size, tokenizer_source = load_tokenizer(args.tokenizer)
    ordinary = ordinary_token_ids(tokenizer, vocab_size)
    if args.dataset:
        data = load_jsonl(args.dataset, tokenizer.encode, vocab_size, limit=args.num_prompts)
    else:
        data = synthetic(args.input_len, args.output_len, args.num_prompts or DEFAULT_NUM_REQUESTS, args.seed,
                         ordinary)
    prompts, description = prompts_of(data, tokenizer, exact)
    config = ServeConfig(url=args.url, backend=args.backend, model=args.model, endpoint=args.endpoint,
                         request_rate=args.request_rate, max_concurrency=args.max_concurrency, warmup=args.warmup,
                         seed=args.seed, exact_lengths=exact, extra_body=extra, timeout_s=args.timeout,
                         count_tokens=args.count_tokens, progress=not args.no_progress, label=args.label)
    run = run_serve(config, prompts, warmup_prompts(prompts, args.warmup, ordinary, tokenizer, args.seed))
    doc = document(_command_line(args), config, run, description, tokenizer, tokenizer_source)
    emit(doc, args.json)
    # A run in which no request completed measured nothing: say so in the exit status too.
    return 0 if doc["results"]["completed"] else 1
