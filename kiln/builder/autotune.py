"""Build-time autotuning: every candidate implementation and config of each op, timed at the engine's
own shapes, the fastest recorded in the plan with the times measured. On by default on a GPU; on a
CPU when asked (the runtime already times the CPU's matrix products at load, where it runs).

Candidates are the implementations that support the device and dtype and can run inside a CUDA graph
(the runtime replays steps from graphs, so a kernel that cannot be captured costs more than its own
time), each with every config it declares. Each candidate runs the op's work at a few shapes the
engine will see (decode at batch 1 and at the full batch, short and long contexts, a prefill chunk of
max_num_tokens tokens, a mixed step; each of the model's projections at decode row counts) on fresh
random inputs, and is timed as a CUDA graph of repeated calls, so launch costs (which the runtime's
graphs remove) do not decide. Matrix products cycle through weights that together outgrow the GPU's
L2 cache, as a step's do. The candidate with the least total time wins.
"""
from __future__ import annotations

import itertools
import logging
import statistics
from dataclasses import dataclass
from typing import Callable

import torch

from kiln.engine import BuildConfig
from kiln.models import ModelConfig
from kiln.ops import Implementation, all_ops
from kiln.ops.sample_inputs import linear_batches, norm_batch, paged_batch, rotary_batch, silu_batch
from kiln.ops.timing import time_ms
from kiln.ops.user_plugins import belongs

log = logging.getLogger(__name__)

CALLS_PER_GRAPH = 10
REPLAYS = 5
# More than any GPU's L2 cache (50 MB on an H100 or H200): the bytes of weights a matrix product cycles through.
WEIGHT_BYTES_TIMED = 256 << 20


@dataclass(frozen=True, slots=True)
class Workload:
    label: str
    make_args: Callable[[], tuple | list[tuple]]  # a list: successive calls cycle through its argument tuples


def workloads(op: str, model: ModelConfig, build: BuildConfig, device: torch.device) -> list[Workload]:
    """The shapes an op is timed at for this engine ([] for ops the tuner leaves alone)."""
    dtype = build.torch_dtype
    heads = dict(num_heads=model.num_heads, num_kv_heads=model.num_kv_heads, head_dim=model.head_dim,
                 block_size=build.kv_block_size, dtype=dtype, kv_dtype=build.kv_torch_dtype, device=device)
    batch = build.max_batch_size
    chunk = min(build.max_num_tokens, build.max_seq_len)
    contexts = sorted({min(256, build.max_seq_len), min(1024, build.max_seq_len), build.max_seq_len})
    rows = sorted({1, batch, build.max_num_tokens})
    if op == "paged_attention":
        scale = model.head_dim ** -0.5
        found = [Workload(f"decode b={b} ctx={c}", lambda b=b, c=c: (*paged_batch([c] * b, [1] * b, poison=False,
                                                                                    **heads), scale))
                 for b in sorted({1, batch}) for c in contexts]
        found.append(Workload(f"prefill 1x{chunk}", lambda: (*paged_batch([chunk], [chunk], poison=False, **heads),
                                                              scale)))
        return found
    if op == "rotary_and_write_kv_cache":
        return [Workload(f"rows={r}", lambda r=r: rotary_batch(r, **{k: v for k, v in heads.items()})) for r in rows]
    if op == "add_rms_norm":
        return [Workload(f"rows={r}", lambda r=r: norm_batch(r, model.hidden_size, dtype=dtype, device=device))
                for r in rows]
    if op == "rms_norm":
        return [Workload(f"rows={r}", lambda r=r: _drop_residual(norm_batch(r, model.hidden_size, dtype=dtype,
                                                                             device=device))) for r in rows]
    if op in ("linear", "logits"):
        # Decode steps of a few rows are where implementations differ; larger ones are cuBLAS's in all.
        few = sorted({1, min(batch, 8)})
        q, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
        shapes = ({"logits": (model.hidden_size, model.vocab_size)} if op == "logits" else
                  {"qkv": (model.hidden_size, q + 2 * kv), "o": (q, model.hidden_size),
                   "gate_up": (model.hidden_size, 2 * model.intermediate_size),
                   "down": (model.intermediate_size, model.hidden_size)})
        return [Workload(f"{name} {k}->{n} rows={r}",
                         lambda r=r, k=k, n=n: linear_batches(r, k, n, dtype=dtype, device=device, min_bytes=(
                             WEIGHT_BYTES_TIMED if device.type == "cuda" else 0)))
                for name, (k, n) in shapes.items() for r in few]
    if op == "silu_and_mul":
        return [Workload(f"rows={r}", lambda r=r: silu_batch(r, model.intermediate_size, dtype=dtype, device=device))
                for r in rows]
    return []


def _drop_residual(args: tuple) -> tuple:
    x, _, weight, eps = args
    return x, weight, eps


def graph_time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one ``fn()`` call: on a GPU the median of replays of a CUDA graph of repeated
    calls; elsewhere the median of timed calls (``kiln.ops.timing.time_ms``)."""
    if device.type != "cuda":
        return time_ms(fn, device, warmup_ms=5, rep_ms=30)
    fn()  # compiles, and allocates what the capture must not
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_GRAPH):
            fn()
    graph.replay()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / CALLS_PER_GRAPH)
    return statistics.median(times)


def tune_op(op: str, candidates: list[Implementation], loads: list[Workload],
            device: torch.device) -> dict:
    """The plan entry of ``op``: the fastest candidate and config, and every candidate's time."""
    inputs = [(w.label, w.make_args()) for w in loads]
    timed = []
    for impl in candidates:
        for config in impl.configs or ({},):
            fn = impl.with_config(config) if config else impl.fn
            total, error = 0.0, None
            for _, args in inputs:
                calls = itertools.cycle(args if isinstance(args, list) else [args])
                try:
                    total += graph_time_ms(lambda: fn(*next(calls)), device)
                except Exception as e:  # a config the device cannot run (e.g. too much shared memory)
                    error = f"{type(e).__name__}: {e}"
                    break
            timed.append({"impl": impl.name, "config": dict(config), "ms": None if error else round(total, 5),
                          **({"error": error[:200]} if error else {})})
    ok = [t for t in timed if t["ms"] is not None]
    if not ok:
        raise RuntimeError(f"no candidate of op {op!r} ran: {timed[0].get('error')}")
    best = min(ok, key=lambda t: t["ms"])
    log.info("op %s: %s %s, %.4f ms over %d shapes", op, best["impl"], best["config"], best["ms"], len(inputs))
    return {"impl": best["impl"], "config": best["config"],
            "tuning": {"shapes": [label for label, _ in inputs], "candidates": timed}}


def tune_plan(model: ModelConfig, build: BuildConfig, device: torch.device,
              preferred: Callable[[str], str], plugins: set[str] = frozenset()) -> dict[str, dict]:
    """A plan for ``device``: ops with a choice tuned, the others ``preferred(op)``; a user's plugins
    are candidates only from this build's plugin modules (``plugins``)."""
    dtype = build.torch_dtype
    plan = {}
    for name, op in sorted(all_ops().items()):
        # On a GPU steps replay from CUDA graphs: a candidate that cannot be captured is no candidate.
        candidates = [impl for impl in op.impls.values()
                      if impl.supports(device, dtype) and (impl.graph_safe or device.type != "cuda")
                      and belongs(impl, plugins)]
        loads = workloads(name, model, build, device)
        choices = sum(len(impl.configs) or 1 for impl in candidates)
        if not loads or choices < 2:
            plan[name] = {"impl": preferred(name), "config": {}}
            continue
        with torch.inference_mode():
            plan[name] = tune_op(name, candidates, loads, device)
    return plan
