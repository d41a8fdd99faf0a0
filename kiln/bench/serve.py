"""``kiln bench serve``: an online benchmark of a running server, after vLLM's ``benchmark_serving``.

Requests go out over HTTP (``clients``: OpenAI completions or chat, or Triton's ``generate_stream``) at
Poisson arrivals of a given rate, or all at once, and at most ``max_concurrency`` at a time. Each
request's stream is timed as a client sees it:

- TTFT: from sending the request (once a ``max_concurrency`` slot is free, as vLLM's benchmark times
  it) to the first event that carries output;
- ITL: each gap between two such events (one token each on kiln and vLLM; a server that sends several
  tokens an event shows fewer, longer gaps);
- TPOT: (end to end - TTFT) / (output tokens - 1), for requests of two tokens or more;
- end to end: from sending it to the end of its stream.

Output tokens are counted as vLLM's benchmark counts them: the server's own count where the protocol
gives it (OpenAI's ``usage``; the ``output_ids`` of a Triton model that returns them), else by
tokenizing the text with the benchmark's tokenizer; ``--count-tokens`` can ask for the tokenizer or
for one token an event instead. The report says which counted each request. A failed request is
counted with its error and never stops the run.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import platform
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from kiln.bench.clients import PROTOCOLS, RequestRecord, describe_server, send
from kiln.bench.dataset import Dataset, length_stats, value_stats
from kiln.bench.measure import arrival_offsets, summarize_ms
from kiln.errors import KilnError
from kiln.runtime.tokenizer import EngineTokenizer

COUNT_MODES = ("auto", "tokenizer", "chunks")


@dataclass(frozen=True, slots=True)
class Prompt:
    text: str
    input_len: int  # tokens, by the benchmark's tokenizer, as a completions server would encode it
    output_len: int  # tokens asked for


@dataclass(frozen=True, slots=True)
class ServeConfig:
    url: str  # the server's base URL: scheme, host and port
    backend: str  # a key of clients.PROTOCOLS
    model: str | None = None  # None: the first model an OpenAI server lists
    endpoint: str | None = None  # None: the backend's own path
    request_rate: float = math.inf  # requests/s as Poisson arrivals; inf: all at once
    max_concurrency: int | None = None  # requests in flight at most
    warmup: int = 1
    seed: int = 0
    exact_lengths: bool = True  # ask for ignore_eos / min tokens so outputs have the asked length
    extra_body: dict = field(default_factory=dict)  # merged into every request's JSON
    timeout_s: float = 600.0  # one request, from sending it to the end of its stream
    count_tokens: str = "auto"
    progress: bool = True
    label: str | None = None  # names the server in the table (e.g. kiln, llama.cpp)


# ----- the tokenizer and the prompts -----
def load_tokenizer(spec: str | None) -> tuple[EngineTokenizer, int, str]:
    """The benchmark's tokenizer, the model's vocabulary size and where they came from.

    ``spec``: an engine folder, a Hugging Face folder (its ``tokenizer.json`` and configs; no weights
    needed), or anything ``kiln run`` takes (built once into the engine cache); None: the bundled
    SmolLM2 engine.
    """
    from kiln.builder.engine_cache import engine_for
    from kiln.engine import Engine, read_engine
    from kiln.engine.format import ENGINE_FILE
    from kiln.models import ModelConfig

    path = Path(spec) if spec else None
    if path is not None and not (path / ENGINE_FILE).is_file() and (path / "tokenizer.json").is_file():
        from kiln.checkpoint.checkpoint import generation_facts
        from kiln.checkpoint.hf_dir import read_tokenizer

        tokenizer, config = read_tokenizer(path)
        hf_config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        facts = {**generation_facts(hf_config, tokenizer, config), "add_bos_token": bool(config.get("add_bos_token")),
                 "bos_token": config.get("bos_token"), "eos_token": config.get("eos_token"),
                 "chat_template": config.get("chat_template")}
        # EngineTokenizer reads only the tokenizer facts and the folder's tokenizer.json.
        tok = EngineTokenizer(Engine(path, {"tokenizer": facts}))
        return tok, hf_config.get("vocab_size") or tok.vocab_size, str(path.resolve())
    # engine_for reports a build on stdout, which --json - keeps for the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        engine_dir = engine_for(spec)
    engine = read_engine(engine_dir, need_weights=False)
    return EngineTokenizer(engine), ModelConfig.from_dict(engine.model).vocab_size, str(Path(engine_dir).resolve())


def as_text(ids: Sequence[int], tokenizer: EngineTokenizer, exact_len: int | None = None) -> Prompt:
    """Token ids as prompt text (special tokens kept, a BOS that encoding adds left out).

    With ``exact_len``, text that re-encodes to more tokens (random ids merge and split when decoded
    and encoded again) is cut back to ``exact_len`` tokens, as vLLM's random dataset does.
    """
    ids = list(ids)
    if tokenizer.add_bos_token and ids and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    if exact_len is not None:
        for _ in range(4):
            again = tokenizer.encode(text, add_special_tokens=False)
            if len(again) <= exact_len:
                break
            # A cut inside a character's bytes decodes to U+FFFD, which would encode longer again.
            text = tokenizer.decode(again[:exact_len], skip_special_tokens=False).rstrip("\ufffd")
    return Prompt(text, len(tokenizer.encode(text)), 0)


def prompts_of(dataset: Dataset, tokenizer: EngineTokenizer, exact: bool) -> tuple[list[Prompt], dict]:
    """The dataset's requests as text prompts, and its description with the lengths of those texts."""
    prompts = []
    for r in dataset.requests:
        p = as_text(r.prompt_ids, tokenizer, r.input_len if exact else None)
        prompts.append(Prompt(p.text, p.input_len, r.output_len))
    stats = length_stats([p.input_len for p in prompts], [p.output_len for p in prompts])
    return prompts, {**dataset.description, **stats}


def warmup_prompts(prompts: Sequence[Prompt], count: int, token_ids: Sequence[int], tokenizer: EngineTokenizer,
                   seed: int) -> list[Prompt]:
    """``count`` prompts of random tokens with the lengths of the first measured ones, so that
    warming up leaves no prefix in the server's cache for a measured request to find."""
    rng = random.Random(f"warmup-{seed}")
    out = []
    for i in range(count):
        p = prompts[i % len(prompts)]
        w = as_text(rng.choices(token_ids, k=p.input_len), tokenizer, p.input_len)
        out.append(Prompt(w.text, w.input_len, p.output_len))
    return out


# ----- the run -----
@dataclass(slots=True)
class ServeRun:
    server: dict
    records: list[RequestRecord]
    duration_s: float
    peak_concurrency: int


def run_serve(config: ServeConfig, prompts: Sequence[Prompt], warmup: Sequence[Prompt] = ()) -> ServeRun:
    if not prompts:
        raise KilnError("the benchmark needs at least one request")
    return asyncio.run(_run(config, list(prompts), list(warmup)))


async def _run(config: ServeConfig, prompts: list[Prompt], warmup: list[Prompt]) -> ServeRun:
    import aiohttp
    from tqdm import tqdm

    protocol = PROTOCOLS[config.backend]
    base = config.url.rstrip("/")
    # The connector's limit would queue requests unseen by the timer: concurrency is ours to limit.
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        model, info = await describe_server(session, base, protocol, config.model)
        url = base + (config.endpoint or protocol.endpoint(model))
        server = {"url": base, "backend": config.backend, "endpoint": url, "model": model, "label": config.label,
                  **info}
        limit = asyncio.Semaphore(config.max_concurrency or len(prompts) + len(warmup))

        def body(p: Prompt) -> dict:
            return {**protocol.payload(model, p.text, p.output_len, config.exact_lengths), **config.extra_body}

        async def one(i: int, p: Prompt) -> RequestRecord:
            async with limit:
                return await send(session, url, body(p), protocol, RequestRecord(i, p.input_len, p.output_len))

        warm = await asyncio.gather(*(one(i, p) for i, p in enumerate(warmup)))
        failed = [r for r in warm if not r.ok]
        if warm and len(failed) == len(warm):
            # Every warm-up request failing means every measured one would: say why instead.
            raise KilnError(f"the warm-up requests to {url} failed: {failed[0].error}")

        offsets = arrival_offsets(len(prompts), config.request_rate, config.seed)
        records = [RequestRecord(i, p.input_len, p.output_len) for i, p in enumerate(prompts)]
        in_flight = peak = 0
        bar = tqdm(total=len(prompts), desc=config.label or "requests", unit="req", disable=not config.progress,
                   file=sys.stderr, dynamic_ncols=True)
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def timed(i: int) -> None:
            nonlocal in_flight, peak
            await asyncio.sleep(max(start + offsets[i] - loop.time(), 0.0))
            async with limit:
                in_flight += 1
                peak = max(peak, in_flight)
                try:
                    await send(session, url, body(prompts[i]), protocol, records[i])
                finally:
                    in_flight -= 1
            bar.update(1)

        try:
            await asyncio.gather(*(timed(i) for i in range(len(prompts))))
        finally:
            bar.close()
        duration = loop.time() - start
    return ServeRun(server, records, duration, peak)


# ----- the numbers -----
def output_tokens(record: RequestRecord, tokenizer: EngineTokenizer, mode: str) -> tuple[int, str]:
    """How many tokens ``record`` received, and what counted them."""
    if mode == "auto":
        if record.usage is not None and isinstance(record.usage.get("completion_tokens"), int):
            return record.usage["completion_tokens"], "usage"
        if record.server_tokens is not None:
            return record.server_tokens, "output_ids"
    if mode == "chunks":
        return len(record.chunk_times), "chunks"
    return len(tokenizer.encode(record.text, add_special_tokens=False)), "tokenizer"


def input_tokens(record: RequestRecord, mode: str) -> int:
    if mode == "auto" and record.usage is not None and isinstance(record.usage.get("prompt_tokens"), int):
        return record.usage["prompt_tokens"]
    return record.prompt_len


def summarize(run: ServeRun, tokenizer: EngineTokenizer, mode: str) -> tuple[dict, list[dict]]:
    """The aggregate results, and one line per request."""
    done = [r for r in run.records if r.ok]
    counted = {r.index: output_tokens(r, tokenizer, mode) for r in done}
    out_lens = {i: n for i, (n, _) in counted.items()}
    in_lens = {r.index: input_tokens(r, mode) for r in done}
    total_in, total_out = sum(in_lens.values()), sum(out_lens.values())
    duration = run.duration_s
    tpot = [(r.e2e - r.ttft) / (out_lens[r.index] - 1) for r in done if out_lens[r.index] > 1]
    asked = [r.output_len for r in done]
    errors = Counter(r.error for r in run.records if not r.ok)
    results = {
        "num_requests": len(run.records),
        "completed": len(done),
        "failed": len(run.records) - len(done),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "ttft_ms": summarize_ms([r.ttft for r in done]),
        "tpot_ms": summarize_ms(tpot),
        "itl_ms": summarize_ms([gap for r in done for gap in r.itl]),
        "e2e_latency_ms": summarize_ms([r.e2e for r in done]),
        "output_len": {
            **(value_stats(list(out_lens.values())) if done else {"min": None, "mean": None, "max": None}),
            "asked_mean": round(sum(asked) / len(asked), 2) if asked else None,
            "not_as_asked": sum(out_lens[r.index] != r.output_len for r in done),
        },
        "output_tokens_counted_by": dict(Counter(method for _, method in counted.values())),
        # As the server gave them (OpenAI); a Triton stream carries none.
        "finish_reasons": dict(Counter(r.finish_reason for r in done if r.finish_reason is not None)),
        "peak_concurrency": run.peak_concurrency,
        "errors": [{"error": e, "requests": n} for e, n in errors.most_common()],
    }
    per_request = [{
        "input_len": in_lens.get(r.index, r.prompt_len), "output_len": out_lens.get(r.index),
        "asked_output_len": r.output_len,
        "ttft_ms": r.ttft * 1000 if r.ok else None, "e2e_ms": r.e2e * 1000 if r.ok else None,
        "finish_reason": r.finish_reason, "error": r.error,
    } for r in run.records]
    return results, per_request


def document(command: str, config: ServeConfig, run: ServeRun, dataset: dict, tokenizer: EngineTokenizer,
             tokenizer_source: str) -> dict:
    """The JSON a run writes (and the table prints from)."""
    import torch

    from kiln.engine.target import device_name
    from kiln.version import __version__

    results, per_request = summarize(run, tokenizer, config.count_tokens)
    return {
        "benchmark": "serve",
        "command": command,
        "client": {"machine": device_name(torch.device("cpu")), "python": platform.python_version(),
                   "kiln": __version__},
        "server": run.server,
        "dataset": dataset,
        "settings": {
            "request_rate": "inf" if math.isinf(config.request_rate) else config.request_rate,
            "max_concurrency": config.max_concurrency, "warmup": config.warmup, "seed": config.seed,
            "exact_lengths": config.exact_lengths, "extra_body": config.extra_body, "timeout_s": config.timeout_s,
            "count_tokens": config.count_tokens, "tokenizer": tokenizer_source,
        },
        "results": results,
        "requests": per_request,
    }
