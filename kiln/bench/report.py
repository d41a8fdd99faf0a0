"""Benchmark reports: the environment, a readable table and the same numbers as JSON."""
from __future__ import annotations

import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import TextIO

import torch

from kiln.bench.dataset import describe as describe_dataset
from kiln.engine.target import device_name


def environment(device: torch.device, dtype: str) -> dict:
    from kiln.version import __version__

    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "kiln": __version__,
    }


def write_json(doc: dict, target: str) -> None:
    """``target`` is a file path, or ``-`` for stdout."""
    text = json.dumps(doc, indent=2) + "\n"
    if target == "-":
        sys.stdout.write(text)
    else:
        Path(target).write_text(text, encoding="utf-8")


# ----- the table -----
def _num(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _ratio(kiln: float | None, hf: float | None) -> str:
    return f"{kiln / hf:.2f}x" if kiln is not None and hf else "-"


def _header(doc: dict, what: list[str] | None = None) -> list[str]:
    """The lines every engine benchmark starts with; ``what`` it ran (default: its requests' line)."""
    env, engine = doc["environment"], doc["engine"]
    rule = "=" * 72
    return [
        rule, f" kiln bench {doc['benchmark']}", rule,
        f" command          {doc['command']}",
        f" engine           {engine['path']}",
        f" built from       {engine['source'] or '-'}",
        f" device           {env['device']} ({env['device_name']}), torch {env['torch']}, {env['dtype']}, "
        f"{env['threads']} threads",
        f" limits           batch {engine['max_batch_size']}, {engine['max_num_tokens']} tokens/step, "
        f"seq {engine['max_seq_len']}, KV block {engine['kv_block_size']}",
        *(what or [f" requests         {describe_dataset(doc['dataset'])}"]),
        *_machine_lines(doc),
    ]


def _machine_lines(doc: dict) -> list[str]:
    """What ran and beside what: ops chosen at load, the steps' thread counts, busy neighbours."""
    lines = []
    chosen = doc.get("plan", {}).get("chosen_at_load") or []
    if chosen:
        how = ["cached" if c["cached"] else "timed {:.2f} s".format(c["tuning_s"]) for c in chosen]
        lines.append(" chosen at load   " + ", ".join(f"{c['op']}={c['impl']} ({h})" for c, h in zip(chosen, how)))
    threads = doc.get("threads") or {}
    if threads.get("max_threads", 1) > 1:
        steps = ", ".join(f"{n}: {k:,}" for n, k in threads["steps_by_threads"].items() if k)
        lines.append(f" steps by threads {steps or '-'} (of {threads['max_threads']}; since load, warmup included)")
    n = doc["settings"].get("busy_neighbours", 0)
    if n:
        from kiln.bench.neighbours import DESCRIPTION

        lines.append(f" busy neighbours  {n} ({DESCRIPTION})")
    return lines


def _latency_rows(results: dict, e2e_label: str = "end to end") -> list[str]:
    lines = [f" {'latency (ms)':<22}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}"]
    for label, key in (("time to first token", "ttft_ms"), ("time per output token", "tpot_ms"),
                       (e2e_label, "e2e_latency_ms")):
        s = results[key]
        lines.append(f" {label:<22}" + "".join(f"{_num(s[p]):>10}" for p in ("p50", "p90", "p99", "mean")))
    return lines


def _comparison(title: str, label: str, kiln: float | None, hf: float | None, match: float | None) -> list[str]:
    lines = ["", f" {title}",
             f" {'':<22}{'kiln':>14}{'transformers':>14}{'kiln/hf':>10}",
             f" {label:<22}{_num(kiln):>14}{_num(hf):>14}{_ratio(kiln, hf):>10}"]
    if match is not None:
        lines.append(f" identical greedy outputs: {match:.0%} of sequences")
    return lines


def _host_rows(r: dict, key: str = "host_ms_per_step", label: str = "host time per step (ms)") -> list[str]:
    """The steps' time per phase (runtime/step_clock.py); the host's share is every phase but wait."""
    host = r.get(key) or {}
    if not host:
        return []
    share = sum(v for k, v in host.items() if k != "wait")
    return ["", f" {label:<30}{share:>14.3f}  (all but wait)",
            "   " + ", ".join(f"{k} {v:.3f}" for k, v in host.items())]


def format_throughput(doc: dict) -> str:
    r = doc["results"]
    rate = doc["settings"]["request_rate"]
    lines = _header(doc) + [
        f" request rate     {'all at once' if rate == 'inf' else f'{rate} requests/s (Poisson)'}, "
        f"warmup {doc['settings']['warmup']} requests",
        "-" * 72,
        f" {'requests':<30}{_num(r['num_requests']):>14}",
        f" {'total input tokens':<30}{_num(r['total_input_tokens']):>14}",
        f" {'total output tokens':<30}{_num(r['total_output_tokens']):>14}",
        f" {'duration (s)':<30}{_num(r['duration_s'], 3):>14}",
        f" {'requests/s':<30}{_num(r['request_throughput']):>14}",
        f" {'output tokens/s':<30}{_num(r['output_throughput']):>14}",
        f" {'total tokens/s':<30}{_num(r['total_token_throughput']):>14}",
        "",
        *_latency_rows(r),
        "",
        f" {'KV blocks total / peak used':<30}{_num(r['kv_blocks_total']):>14} / {_num(r['kv_blocks_peak_used'])}",
        f" {'prefix-cache hit rate':<30}{r['prefix_cache_hit_rate']:>14.1%}",
        f" {'preemptions':<30}{_num(r['num_preemptions']):>14}",
        f" {'steps':<30}{_num(r['num_steps']):>14}",
        *_host_rows(r),
    ]
    hf = doc.get("hf")
    if hf:
        lines += _comparison(f"transformers {hf['transformers']} generate, batches of {hf['batch_size']} "
                             f"({hf['num_batches']} batches)", "output tokens/s",
                             r["output_throughput"], hf["output_throughput"], hf["token_match"])
        if rate != "inf":
            lines.append(" note: kiln's requests arrive at --request-rate; transformers runs its batches back to back")
    return "\n".join(lines + ["=" * 72])


def format_latency(doc: dict) -> str:
    r = doc["results"]
    per_iter = ", ".join(_num(x, 1) for x in r["decode_tokens_per_s_per_iteration"])
    lines = _header(doc) + [
        f" batch            {r['batch_size']} x ({r['input_len']} prompt + {r['output_len']} output tokens), "
        f"{r['iterations']} iterations after {doc['settings']['warmup']} warmup",
        "-" * 72,
        *_latency_rows(r, "batch end to end"),
        "",
        f" {'decode tokens/s (mean)':<30}{_num(r['decode_tokens_per_s']):>14}",
        f" {'  per iteration':<30}{per_iter:>14}",
        *_host_rows(r),
        *_host_rows(r, "host_ms_per_decode_step", "  decode steps alone (ms)"),
    ]
    limit = doc.get("limit")
    if limit:
        # Weights are read once per step whatever the batch (KV reads, small here, are left out).
        ceiling = limit["batch1_decode_tokens_per_s_limit"] * r["batch_size"]
        rate = r["decode_tokens_per_s"]
        reached = f"  ({rate / ceiling:.0%} reached)" if rate else ""
        lines += ["",
                  f" {'copy bandwidth (GB/s)':<30}{_num(limit['copy_bandwidth_gb_s']):>14}",
                  f" {'weights (MB)':<30}{_num(limit['weight_bytes'] / 1e6):>14}",
                  f" {'decode limit (tokens/s)':<30}{_num(ceiling):>14}{reached}"]
    hf = doc.get("hf")
    if hf:
        lines += _comparison(f"transformers {hf['transformers']} generate, batch {hf['batch_size']}",
                             "decode tokens/s", r["decode_tokens_per_s"], hf["decode_tokens_per_s"],
                             hf["token_match"])
    return "\n".join(lines + ["=" * 72])


def format_perplexity(doc: dict) -> str:
    r, text = doc["results"], doc["dataset"]
    window_ppl = [math.exp(x) for x in r["window_nll"]]
    what = [f" text             {text['path']}: {_num(text['num_tokens'])} tokens",
            f" windows          {r['num_windows']} of {r['window']} tokens, each scored on its last {r['window'] - 1} "
            f"({_num(r['num_text_tokens'] - r['num_windows'] * r['window'])} tokens of the tail left out)"]
    return "\n".join(_header(doc, what) + [
        "-" * 72,
        f" {'scored tokens':<30}{_num(r['num_scored_tokens']):>14}",
        f" {'mean NLL (nats/token)':<30}{r['nll']:>14.4f}",
        f" {'perplexity':<30}{r['perplexity']:>14.4f}",
        f" {'window perplexity min / max':<30}{min(window_ppl):>14.4f} / {max(window_ppl):.4f}",
        f" {'duration (s)':<30}{_num(r['duration_s'], 3):>14}",
        f" {'scored tokens/s':<30}{_num(r['scored_tokens_per_s']):>14}",
        "=" * 72])


def format_serve(doc: dict) -> str:
    r, server, settings = doc["results"], doc["server"], doc["settings"]
    rate = settings["request_rate"]
    load = "all at once" if rate == "inf" else f"{rate} requests/s (Poisson)"
    if settings["max_concurrency"]:
        load += f", at most {settings['max_concurrency']} in flight"
    label = f"{server['label']}: " if server.get("label") else ""
    name = " ".join(str(server[k]) for k in ("name", "version") if server.get(k))
    out = r["output_len"]
    counted = ", ".join(f"{how} ({n})" for how, n in r["output_tokens_counted_by"].items()) or "-"
    lengths = "exact (ignore_eos / min tokens asked)" if settings["exact_lengths"] else "up to the server"
    lines = [
        "=" * 72, " kiln bench serve", "=" * 72,
        f" command          {doc['command']}",
        f" server           {label}{server['endpoint']} ({server['backend']}, model {server['model']})"
        + (f", {name}" if name else ""),
        f" requests         {describe_dataset(doc['dataset'])}",
        f" load             {load}, warmup {settings['warmup']} requests, peak {r['peak_concurrency']} in flight",
        f" output lengths   {lengths}; tokens counted by {counted}",
        *([" finish reasons   " + ", ".join(f"{k} ({n})" for k, n in r["finish_reasons"].items())]
          if r["finish_reasons"] else []),
        "-" * 72,
        f" {'requests completed / failed':<30}{_num(r['completed']):>14} / {_num(r['failed'])}",
        f" {'total input tokens':<30}{_num(r['total_input_tokens']):>14}",
        f" {'total output tokens':<30}{_num(r['total_output_tokens']):>14}",
        f" {'output tokens per request':<30}{_num(out['min']):>14} min, {_num(out['mean'])} mean, "
        f"{_num(out['max'])} max ({_num(out['not_as_asked'])} not as asked)",
        f" {'duration (s)':<30}{_num(r['duration_s'], 3):>14}",
        f" {'requests/s':<30}{_num(r['request_throughput']):>14}",
        f" {'output tokens/s':<30}{_num(r['output_throughput']):>14}",
        f" {'total tokens/s':<30}{_num(r['total_token_throughput']):>14}",
        "",
        f" {'latency (ms)':<22}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}",
    ]
    for title, key in (("time to first token", "ttft_ms"), ("time per output token", "tpot_ms"),
                       ("inter-token latency", "itl_ms"), ("end to end", "e2e_latency_ms")):
        s = r[key]
        lines.append(f" {title:<22}" + "".join(f"{_num(s[p]):>10}" for p in ("p50", "p90", "p99", "mean")))
    if r["errors"]:
        lines += ["", " failed requests"] + [f" {e['requests']:>6} x {e['error'][:200]}" for e in r["errors"][:10]]
        if len(r["errors"]) > 10:
            lines.append(f" ... and {len(r['errors']) - 10} other errors (all in the JSON)")
    return "\n".join(lines + ["=" * 72])


FORMATS = {"throughput": format_throughput, "latency": format_latency, "perplexity": format_perplexity,
           "serve": format_serve}


def emit(doc: dict, json_target: str | None, out: TextIO | None = None) -> None:
    """Print the table; write the JSON. With ``--json -`` the JSON owns stdout, so the table goes to stderr."""
    table = FORMATS[doc["benchmark"]](doc)
    stream = out or (sys.stderr if json_target == "-" else sys.stdout)
    print(table, file=stream, flush=True)
    if json_target:
        write_json(doc, json_target)
