"""``kiln inspect``: what an engine holds, for a person (text) or a program (JSON)."""
from __future__ import annotations

import math

from tokenizers import Tokenizer

from kiln.engine.format import TOKENIZER_FILE, WEIGHT_DTYPES, Engine
from kiln.errors import EngineError


def describe(engine: Engine) -> dict:
    m, b = engine.model, engine.build
    formats: dict[str, dict[str, int]] = {}  # format -> tensors, parameters, bytes
    for t in engine.manifest:
        fmt = t.get("format", t["dtype"])
        row = formats.setdefault(fmt, {"tensors": 0, "parameters": 0, "bytes": 0})
        row["tensors"] += 1
        row["parameters"] += math.prod(t.get("logical_shape", t["shape"]))
        row["bytes"] += math.prod(t["shape"]) * WEIGHT_DTYPES[t["dtype"]].itemsize
    params = sum(row["parameters"] for row in formats.values())
    nbytes = sum(row["bytes"] for row in formats.values())
    kv_values_per_token = 2 * m["num_layers"] * m["num_kv_heads"] * m["head_dim"]
    tok = engine.tokenizer
    try:
        vocab = Tokenizer.from_file(str(engine.path / TOKENIZER_FILE)).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # the tokenizers library raises its own exception types for a bad file
        raise EngineError(f"cannot load {engine.path / TOKENIZER_FILE}: {e}") from e
    return {
        "path": str(engine.path),
        "format_version": engine.meta["format_version"],
        "kiln_version": engine.meta.get("kiln_version"),
        "source": engine.meta.get("source"),
        "architecture": m["architecture"],
        "model": m,
        "parameters": params,
        "weight_bytes": nbytes,
        # The same weights all in the build dtype: what the packed formats save.
        "float_weight_bytes": params * b.torch_dtype.itemsize,
        "weight_formats": formats,
        "weights_stripped": engine.stripped,
        "build": b.to_dict(),
        "kv_cache_bytes_per_token": kv_values_per_token * b.kv_torch_dtype.itemsize,
        "float_kv_cache_bytes_per_token": kv_values_per_token * b.torch_dtype.itemsize,
        "kv_cache_scales": engine.meta.get("kv_cache_scales"),
        "awq": engine.meta.get("awq"),
        "plan": engine.plan,
        "plugins": engine.plugins,
        "target": engine.target,
        "tokenizer": {
            "vocab_size": vocab,
            "bos_token_id": tok.get("bos_token_id"),
            "eos_token_ids": tok.get("eos_token_ids"),
            "pad_token_id": tok.get("pad_token_id"),
            "add_bos_token": tok.get("add_bos_token"),
            "chat_template": bool(tok.get("chat_template")),
        },
    }


def format_text(d: dict) -> str:
    m, b, t = d["model"], d["build"], d["tokenizer"]
    windows = sorted({w for w in m["sliding_windows"] if w})
    lines = [
        f"engine      {d['path']}  (format {d['format_version']}, kiln {d['kiln_version']})",
        f"source      {(d.get('source') or {}).get('original') or (d.get('source') or {}).get('path')}",
        "",
        f"model       {d['architecture']}: {m['num_layers']} layers, hidden {m['hidden_size']}, "
        f"MLP {m['intermediate_size']}, vocab {m['vocab_size']}",
        f"attention   {m['num_heads']} query heads, {m['num_kv_heads']} KV heads of {m['head_dim']}"
        f"{', QKV bias' if m['qkv_bias'] else ''}"
        f"{', sliding window ' + '/'.join(map(str, windows)) if windows else ''}",
        f"rope        theta {m['rope_theta']:g}"
        f"{', scaling ' + str(m['rope_scaling']) if m['rope_scaling'] else ''}, "
        f"max positions {m['max_position_embeddings']}",
        f"parameters  {d['parameters']:,} ({_size(d['weight_bytes'])}"
        f"{' in ' + b['dtype'] if len(d['weight_formats']) == 1 else ''})"
        f"{'  [weights stripped: run kiln refit]' if d['weights_stripped'] else ''}"
        f"{', tied embeddings' if m['tie_word_embeddings'] else ''}",
    ]
    if len(d["weight_formats"]) > 1 or d["weight_bytes"] != d["float_weight_bytes"]:
        saved = d["float_weight_bytes"] - d["weight_bytes"]
        lines.append("formats     " + ", ".join(
            f"{fmt} {row['tensors']} tensor{'s' if row['tensors'] != 1 else ''} ({_size(row['bytes'])})"
            for fmt, row in sorted(d["weight_formats"].items())))
        lines.append(f"            {_size(saved)} less than all in {b['dtype']} "
                     f"({_size(d['float_weight_bytes'])}, {d['weight_bytes'] / d['float_weight_bytes']:.0%} of it)")
    if b.get("quantization"):
        lines.append(f"quantized   linear layers' float weights to {b['quantization']} at build (kiln build --quantize)")
    awq = d.get("awq")
    if awq:
        errors = ", ".join(f"{k} {v:.2f}" for k, v in sorted(awq.get("error_vs_round_to_nearest", {}).items()))
        lines.append(f"            activation-aware scales ({awq['file']}), calibrated on "
                     f"{awq.get('calibration_tokens', '?')} tokens"
                     + (f"; output error over round to nearest's: {errors}" if errors else ""))
    lines += [
        "",
        f"limits      max batch {b['max_batch_size']}, max sequence {b['max_seq_len']}, "
        f"max tokens/step {b['max_num_tokens']}",
        f"kv cache    blocks of {b['kv_block_size']} tokens, {b['kv_cache_dtype'] or b['dtype']}, "
        f"{_size(d['kv_cache_bytes_per_token'])} per token"
        + (f" ({_size(d['float_kv_cache_bytes_per_token'])} in {b['dtype']}), scaled per layer "
           "(calibrated at build, or a quantized checkpoint's)" if d.get("kv_cache_scales") else ""),
        "",
        "plan        op                  implementation",
    ]
    for op, entry in sorted(d["plan"].items()):
        config = f"  {entry['config']}" if entry.get("config") else ""
        lines.append(f"            {op:<19} {entry['impl']}{config}")
        tuning = entry.get("tuning")
        if tuning:
            # The timed candidates, fastest first: ms summed over the shapes the op was timed at.
            ranked = sorted((c for c in tuning["candidates"] if c["ms"] is not None), key=lambda c: c["ms"])
            lines.append(f"            {'':<19} timed at {', '.join(tuning['shapes'])}:")
            for c in ranked[:4]:
                lines.append(f"            {'':<19}   {c['ms'] * 1000:9.1f} us  {c['impl']} {c['config'] or ''}")
            if len(ranked) > 4:
                lines.append(f"            {'':<19}   ... {len(ranked) - 4} more; `kiln inspect --json` has them all")
    if d.get("plugins"):
        lines.append(f"plugins     {', '.join(d['plugins'])} (carried by the engine, imported at load)")
    tgt = d["target"]
    lines += [
        "",
        f"target      {tgt.get('device_type')} {tgt.get('name') or ''}"
        f"{' (sm ' + tgt['compute_capability'] + ')' if tgt.get('compute_capability') else ''}, "
        f"torch {tgt.get('torch')}, triton {tgt.get('triton') or 'absent'}",
        f"tokenizer   vocab {t['vocab_size']}, bos {t['bos_token_id']}, eos {t['eos_token_ids']}, "
        f"pad {t['pad_token_id']}, add bos {t['add_bos_token']}, chat template {'yes' if t['chat_template'] else 'no'}",
    ]
    if d.get("weights_verified"):
        v = d["weights_verified"]
        lines.append(f"verified    all {v['tensors']} tensors ({_size(v['bytes'])}) match the manifest's sha256")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
