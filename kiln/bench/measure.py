"""Drive an engine (``LLMEngine``) over benchmark requests and measure throughput and latency."""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field, fields
from typing import Callable, Sequence

import torch

from kiln.bench.dataset import BenchRequest, Dataset
from kiln.errors import KilnError
from kiln.runtime.step_clock import per_step_ms
from kiln.runtime.llm_engine import LLMEngine
from kiln.runtime.outputs import EngineStats, RequestOutput
from kiln.runtime.sampling_params import SamplingParams


def clock(device: torch.device) -> float:
    """``time.monotonic()`` (the engine's clock) once the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.monotonic()


def greedy(output_len: int) -> SamplingParams:
    # ignore_eos with max_tokens: every request generates exactly output_len tokens.
    return SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The p-th percentile by linear interpolation between closest ranks (numpy's default)."""
    k = (len(sorted_values) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def summarize_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/mean/min/max in milliseconds; None for each when there are no values."""
    keys = ("p50", "p90", "p99", "mean", "min", "max")
    if not seconds:
        return dict.fromkeys(keys)
    v = sorted(s * 1000 for s in seconds)
    return {"p50": percentile(v, 50), "p90": percentile(v, 90), "p99": percentile(v, 99),
            "mean": sum(v) / len(v), "min": v[0], "max": v[-1]}


def check_fits(engine: LLMEngine, requests: Sequence[BenchRequest]) -> None:
    """Refuse, before anything runs, a request that the engine could never serve whole."""
    limit = engine.max_seq_len
    for i, r in enumerate(requests):
        if r.input_len + r.output_len > limit:
            raise KilnError(f"{r.where(i)}: {r.input_len} prompt + {r.output_len} output tokens exceed the "
                            f"engine's max_seq_len={limit}; shorten it or build the engine with a larger --max-seq-len")


def drain(engine: LLMEngine, ids: set[str], on_started: Callable[[], None] | None = None
          ) -> dict[str, RequestOutput]:
    """Step the engine until the requests ``ids`` finish; their final outputs (KilnError if one failed).
    ``on_started`` is called once, as soon as every one of them has its first token."""
    done: dict[str, RequestOutput] = {}
    waiting = set(ids) if on_started is not None else set()
    while len(done) < len(ids):
        for out in engine.step(timeout=1.0):
            _check(out)
            if out.request_id not in ids:
                continue
            if waiting and out.token_ids:
                waiting.discard(out.request_id)
                if not waiting:
                    on_started()
            if out.finished:
                done[out.request_id] = out
    return done


def _check(out: RequestOutput) -> None:
    if out.error is not None:
        raise KilnError(f"benchmark request {out.request_id} failed: {out.error}")


def _reset_prefix_cache(core) -> bool:
    return core.block_manager.reset_prefix_cache()


def _fresh_prefix_cache(engine: LLMEngine) -> None:
    # Warmup (or an earlier iteration) must not hand the measured requests cached prefixes. (A module-level
    # function: a core in a process of its own takes only one that pickles.)
    if not engine.call(_reset_prefix_cache):
        raise RuntimeError("the prefix cache cannot be reset while requests hold KV blocks")


def _first_token_time(out: RequestOutput) -> float:
    m = out.metrics
    return m.arrival_time + m.time_to_first_token


def _finish_time(out: RequestOutput) -> float:
    m = out.metrics
    return m.arrival_time + m.e2e_latency


@dataclass(slots=True)
class ThroughputResult:
    num_requests: int
    total_input_tokens: int
    total_output_tokens: int
    duration_s: float
    request_throughput: float  # requests/s
    output_throughput: float  # output tokens/s
    total_token_throughput: float  # (input + output) tokens/s
    ttft_ms: dict[str, float | None]
    tpot_ms: dict[str, float | None]
    e2e_latency_ms: dict[str, float | None]
    kv_blocks_total: int
    kv_blocks_peak_used: int
    prefix_cache_hit_rate: float
    num_preemptions: int
    num_steps: int
    host_ms_per_step: dict[str, float]  # per phase (runtime/step_clock.py)
    # Generated ids in request order, for checking the transformers baseline; not reported.
    output_token_ids: list[list[int]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "output_token_ids"}


def arrival_offsets(n: int, request_rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request arrives: all at 0, or a Poisson process of ``request_rate``."""
    if math.isinf(request_rate):
        return [0.0] * n
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(n):
        offsets.append(t)
        t += rng.expovariate(request_rate)
    return offsets


def run_throughput(engine: LLMEngine, dataset: Dataset, request_rate: float = math.inf, warmup: int = 0,
                   seed: int = 0) -> ThroughputResult:
    """Serve every request of ``dataset`` through ``engine``; each is submitted at its arrival time while
    the engine core steps in its own thread, as a server's requests would be.

    Latencies count from each request's scheduled arrival, so a request that arrives during a step
    is charged the rest of that step, as a client would be.
    """
    requests = dataset.requests
    check_fits(engine, requests)
    if warmup:
        ids = {engine.add_request(requests[i % len(requests)].prompt_ids,
                                  greedy(requests[i % len(requests)].output_len), f"warmup-{i}")
               for i in range(warmup)}
        drain(engine, ids)
    _fresh_prefix_cache(engine)
    before = engine.stats()
    offsets = arrival_offsets(len(requests), request_rate, seed)
    arrival: dict[str, float] = {}
    done: dict[str, RequestOutput] = {}
    peak_used = 0
    added = 0
    start = clock(engine.device)
    while added < len(requests) or engine.has_unfinished():
        now = time.monotonic()
        while added < len(requests) and start + offsets[added] <= now:
            r = requests[added]
            rid = engine.add_request(r.prompt_ids, greedy(r.output_len), f"bench-{added}",
                                     arrival_time=start + offsets[added])
            arrival[rid] = start + offsets[added]
            added += 1
        wait = start + offsets[added] - time.monotonic() if added < len(requests) else 1.0
        for out in engine.step(timeout=max(wait, 0.0)):
            _check(out)
            if out.finished:
                done[out.request_id] = out
        # The core's figures after its latest step: requests finished in it gave their blocks back.
        peak_used = max(peak_used, engine.stats().kv_blocks_used)
    end = clock(engine.device)
    after = engine.stats()

    outs = [done[f"bench-{i}"] for i in range(len(requests))]
    ttft = [_first_token_time(o) - arrival[o.request_id] for o in outs]
    e2e = [_finish_time(o) - arrival[o.request_id] for o in outs]
    tpot = [o.metrics.time_per_output_token for o in outs if o.metrics.time_per_output_token is not None]
    total_in = sum(o.metrics.num_prompt_tokens for o in outs)
    total_out = sum(o.metrics.num_generated_tokens for o in outs)
    duration = end - start
    return ThroughputResult(
        num_requests=len(outs), total_input_tokens=total_in, total_output_tokens=total_out, duration_s=duration,
        request_throughput=len(outs) / duration, output_throughput=total_out / duration,
        total_token_throughput=(total_in + total_out) / duration,
        ttft_ms=summarize_ms(ttft), tpot_ms=summarize_ms(tpot), e2e_latency_ms=summarize_ms(e2e),
        kv_blocks_total=after.kv_blocks_total, kv_blocks_peak_used=peak_used,
        prefix_cache_hit_rate=after.prefix_cache_hit_rate,
        num_preemptions=after.num_preemptions - before.num_preemptions,
        num_steps=after.steps - before.steps,
        host_ms_per_step=per_step_ms(before.step_seconds, after.step_seconds, after.steps - before.steps),
        output_token_ids=[list(o.token_ids) for o in outs],
    )


@dataclass(slots=True)
class LatencyResult:
    batch_size: int
    input_len: int
    output_len: int
    iterations: int
    ttft_ms: dict[str, float | None]
    tpot_ms: dict[str, float | None]
    e2e_latency_ms: dict[str, float | None]  # submit -> the batch's last token, per iteration
    # B * (output_len - 1) / (the batch's first token -> its last token), mean over iterations.
    decode_tokens_per_s: float | None
    decode_tokens_per_s_per_iteration: list[float | None]
    host_ms_per_step: dict[str, float]  # per phase (runtime/step_clock.py), over the timed iterations
    # The same over the decode steps alone: those after every sequence of the batch had its first token (a
    # long prefill's steps, where a launch can wait on a full device queue, left out).
    host_ms_per_decode_step: dict[str, float]
    # Generated ids of each iteration's batch, for checking the transformers baseline; not reported.
    output_token_ids: list[list[list[int]]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "output_token_ids"}


def decode_rate(batch_size: int, output_len: int, seconds: float) -> float | None:
    """Tokens/s of the decode phase: every sequence's tokens after its first, over ``seconds``."""
    if output_len < 2 or seconds <= 0:
        return None
    return batch_size * (output_len - 1) / seconds


def run_latency(engine: LLMEngine, batches: Sequence[Sequence[list[int]]], output_len: int,
                warmup: Sequence[Sequence[list[int]]] = ()) -> LatencyResult:
    """Submit each batch of same-length prompts together and run it to the end, one batch at a time."""
    if not batches:
        raise KilnError("the latency benchmark needs at least one iteration")
    batch_size, input_len = len(batches[0]), len(batches[0][0])
    check_fits(engine, [BenchRequest(p, output_len) for p in batches[0]])
    for i, batch in enumerate(warmup):
        _fresh_prefix_cache(engine)
        drain(engine, {engine.add_request(p, greedy(output_len), f"warmup-{i}-{j}") for j, p in enumerate(batch)})
    ttft: list[float] = []
    tpot: list[float] = []
    e2e: list[float] = []
    rates: list[float | None] = []
    tokens: list[list[list[int]]] = []
    decode_seconds: dict[str, float] = {}
    decode_steps = 0
    before = engine.stats()
    for i, batch in enumerate(batches):
        _fresh_prefix_cache(engine)
        ids = [f"iter-{i}-{j}" for j in range(len(batch))]
        started: list[EngineStats] = []
        start = clock(engine.device)
        for rid, prompt in zip(ids, batch):
            engine.add_request(prompt, greedy(output_len), rid, arrival_time=start)
        done = drain(engine, set(ids), on_started=lambda: started.append(engine.stats()))
        if started:
            mid, end = started[0], engine.stats()
            decode_steps += end.steps - mid.steps
            for name, seconds in end.step_seconds.items():
                decode_seconds[name] = decode_seconds.get(name, 0.0) + seconds - mid.step_seconds.get(name, 0.0)
        outs = [done[rid] for rid in ids]
        firsts = [_first_token_time(o) for o in outs]
        lasts = [_finish_time(o) for o in outs]
        ttft.extend(t - start for t in firsts)
        tpot.extend(o.metrics.time_per_output_token for o in outs if o.metrics.time_per_output_token is not None)
        e2e.append(max(lasts) - start)
        rates.append(decode_rate(len(batch), output_len, max(lasts) - min(firsts)))
        tokens.append([list(o.token_ids) for o in outs])
    measured = [r for r in rates if r is not None]
    after = engine.stats()
    return LatencyResult(
        batch_size=batch_size, input_len=input_len, output_len=output_len, iterations=len(batches),
        ttft_ms=summarize_ms(ttft), tpot_ms=summarize_ms(tpot), e2e_latency_ms=summarize_ms(e2e),
        decode_tokens_per_s=sum(measured) / len(measured) if measured else None,
        decode_tokens_per_s_per_iteration=rates, output_token_ids=tokens,
        host_ms_per_step=per_step_ms(before.step_seconds, after.step_seconds, after.steps - before.steps),
        host_ms_per_decode_step=per_step_ms({}, decode_seconds, decode_steps),
    )
