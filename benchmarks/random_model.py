"""Save a random-weight Llama of a real model's shape as a Hugging Face folder, fast (weights drawn on
the GPU when there is one and written straight to safetensors, no transformers model in memory).

For speed runs on a machine that lacks the real weights: speed depends on the shapes, not the values.
The tokenizer is the tests' small byte-level BPE, or a real one copied from a Hugging Face folder
(``--tokenizer DIR``, e.g. SmolLM2's, so that a served run detokenizes real tokens); prompts use token ids
below its vocabulary. The output head's rows of ids the tokenizer lacks are zero, so that greedy decoding
picks tokens that decode to text (a server's stream then carries text, as with a real model).
Usage: python benchmarks/random_model.py {smollm2-135m,llama-3.2-1b,llama-3.1-8b} OUT_DIR [--dtype bfloat16]
         [--tokenizer DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hf_models import make_tokenizer  # noqa: E402

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def tensors_of(shape: dict, dtype: torch.dtype, device: str, known_ids: int) -> Iterator[tuple[str, torch.Tensor]]:
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    d = shape.get("head_dim") or h // heads
    g = torch.Generator(device=device).manual_seed(0)

    def weight(out_f: int, in_f: int) -> torch.Tensor:
        # Scaled like a trained model's so activations stay O(1) through the layers.
        return (torch.randn(out_f, in_f, generator=g, device=device) / in_f ** 0.5).to(dtype).cpu()

    def norm(n: int) -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(n, generator=g, device=device)).to(dtype).cpu()

    def head() -> torch.Tensor:
        w = weight(shape["vocab_size"], h)
        w[known_ids:] = 0
        return w

    yield "model.embed_tokens.weight", head() if shape["tie_word_embeddings"] else weight(shape["vocab_size"], h)
    yield "model.norm.weight", norm(h)
    if not shape["tie_word_embeddings"]:
        yield "lm_head.weight", head()
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", weight(heads * d, h)
        yield p + "self_attn.k_proj.weight", weight(kv * d, h)
        yield p + "self_attn.v_proj.weight", weight(kv * d, h)
        yield p + "self_attn.o_proj.weight", weight(h, heads * d)
        yield p + "mlp.gate_proj.weight", weight(inter, h)
        yield p + "mlp.up_proj.weight", weight(inter, h)
        yield p + "mlp.down_proj.weight", weight(h, inter)
        yield p + "input_layernorm.weight", norm(h)
        yield p + "post_attention_layernorm.weight", norm(h)


def save_shards(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, shard_bytes: int) -> None:
    """``model.safetensors``, or shards of at most ``shard_bytes`` with Hugging Face's index where the weights
    are larger (so that no more than a shard is in memory: an 8B model on a 24 GB machine)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    files: list[Path] = []

    def flush() -> None:
        files.append(out / f"part-{len(files):05d}.safetensors")
        save_file(shards[-1], str(files[-1]), metadata={"format": "pt"})
        shards[-1] = {}

    names: list[list[str]] = [[]]
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            flush()
            names.append([])
            size = 0
        shards[-1][name] = t
        names[-1].append(name)
        size += nbytes
        total += nbytes
    flush()
    if len(files) == 1:
        files[0].rename(out / "model.safetensors")
        return
    weight_map = {}
    for i, (file, group) in enumerate(zip(files, names)):
        final = out / f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        file.rename(final)
        weight_map.update({name: final.name for name in group})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shard-gb", type=float, default=2.0, help="largest safetensors file (GB)")
    parser.add_argument("--tokenizer", type=Path, help="a Hugging Face folder whose tokenizer to copy")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[args.shape]
    dtype = getattr(torch, args.dtype)
    if args.tokenizer is not None:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = make_tokenizer()
    if len(tokenizer) > shape["vocab_size"]:
        sys.exit(f"the tokenizer has {len(tokenizer)} tokens, more than the model's {shape['vocab_size']}")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": args.dtype,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, **shape,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    save_shards(tensors_of(shape, dtype, device, len(tokenizer)), out, int(args.shard_gb * 1e9))
    tokenizer.save_pretrained(out)
    print(f"wrote a random {args.shape} ({args.dtype}) to {out}")


if __name__ == "__main__":
    main()
