"""Write the compressed-tensors test checkpoints in tests/data/compressed_tensors/ with llm-compressor.

Run with a Python that has llmcompressor (it pins its own transformers, so not kiln's environment); the files
here were made with llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0 and torch 2.13.0 (CPU):

    python -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    /tmp/llmc/bin/python tests/data/make_compressed_tensors.py [NAME ...]

(names: only those checkpoints are written again; the others stay as they are).

Each checkpoint is a tiny random bfloat16 Llama (tests/hf_models.py's tokenizer) quantized by llm-compressor's
``oneshot`` and saved compressed, as RedHatAI's published checkpoints are:

- ``fp8_dynamic``: scheme FP8_DYNAMIC (float8 e4m3 weights scaled per output channel, activations per token).
- ``w4a16_gptq``: GPTQ, 4-bit symmetric weights in groups of 64 (pack-quantized), calibrated on a few sentences.
- ``mixed``: one config group per kind: static FP8 (one scale per tensor, and a static input scale) in
  attention, int8 per channel with int8 activations (W8A8, int-quantized) in gate/up, 8-bit packed weights per
  channel in layer 0's down projection, 4-bit asymmetric groups of 32 with zero points in layer 1's; layer 0's
  q_proj left float (ignored).
- ``fp8_kv``: FP8_DYNAMIC weights and llm-compressor's FP8 KV cache (``kv_cache_scheme``: float8 e4m3 keys and
  values, one static scale per tensor, ``self_attn.k_scale`` and ``v_scale``, calibrated on the same sentences
  on the post-RoPE keys).

Next to each, ``NAME.reference.safetensors`` holds what compressed-tensors itself computes, in float32: the
weights decompressed (scales cast to float32 first, so each is the exact product scale * (q - zero)) as a
sha256 per weight in its metadata (and the asymmetric weights whole, ``weight.NAME``); the logits of every
position of ``prompt`` from the model as the tool runs it, its activation quantization included (``logits``),
and, where kiln's ops treat the activations otherwise, as they do (``logits_kiln_activations``: FP8 layers'
activations rounded to e4m3 per token, integer layers' left float); for a quantized KV cache, also with the
cache's quantization off (``logits_float_kv``); and the 8 greedy tokens after the prompt (``greedy``).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import compressed_tensors
import llmcompressor
import torch
import transformers
from compressed_tensors.compressors import decompress_module
from compressed_tensors.quantization import QuantizationArgs
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from hf_models import CORPUS, make_tokenizer  # noqa: E402

OUT = HERE / "compressed_tensors"
PROMPT_TEXT = "Inference engines batch requests and stream tokens back. The quick brown fox"
GREEDY_TOKENS = 8


# What kiln's op for each kind of weight does to the activations: rounds them to e4m3 per token with scales of
# their own for FP8 weights (FP8_DYNAMIC's activations), nothing for integer ones.
KILN_ACTIVATIONS = {
    "float": QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True),
    "int": None,
}


def int_weights(num_bits: int, strategy: str, symmetric: bool = True, group_size: int | None = None) -> dict:
    return {"num_bits": num_bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
            "group_size": group_size}


def recipes():
    int8_tokens = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    fp8_tensor = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor"}
    fp8_dynamic = {"targets": "Linear", "scheme": "FP8_DYNAMIC", "ignore": ["lm_head"]}
    return {
        "fp8_dynamic": (QuantizationModifier(**fp8_dynamic), False),
        "w4a16_gptq": (GPTQModifier(config_groups={"group_0": {
            "targets": ["Linear"], "weights": int_weights(4, "group", group_size=64)}}, ignore=["lm_head"]), True),
        "mixed": (QuantizationModifier(config_groups={
            "attention_fp8": {"targets": [r"re:.*self_attn\.(q|k|v|o)_proj$"], "weights": fp8_tensor,
                              "input_activations": {**fp8_tensor, "dynamic": False}},
            "gate_up_w8a8": {"targets": [r"re:.*mlp\.(gate|up)_proj$"], "weights": int_weights(8, "channel"),
                             "input_activations": int8_tokens},
            "down0_w8a16": {"targets": [r"re:.*layers\.0\.mlp\.down_proj$"], "weights": int_weights(8, "channel")},
            "down1_w4a16_asym": {"targets": [r"re:.*layers\.1\.mlp\.down_proj$"],
                                 "weights": int_weights(4, "group", symmetric=False, group_size=32)},
        }, ignore=["lm_head", r"re:.*layers\.0\.self_attn\.q_proj$"]), True),
        "fp8_kv": (QuantizationModifier(**fp8_dynamic, kv_cache_scheme={**fp8_tensor, "dynamic": False}), True),
    }


def base_model(path: Path):
    """A tiny random Llama in bfloat16 (as published checkpoints are), saved at ``path``."""
    tokenizer = make_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # as tests/hf_models.py: weights large enough that logits are not all near zero
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) / p.shape[-1] ** 0.5)
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer


def calibration(tokenizer):
    ids = [tokenizer(text)["input_ids"] for text in dict.fromkeys(CORPUS)]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]})


def quantize(base: Path, out: Path, recipe, calibrate: bool, tokenizer) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    data = calibration(tokenizer) if calibrate else None
    oneshot(model=model, recipe=recipe, dataset=data, num_calibration_samples=len(data) if data else 512,
            max_seq_length=64)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)


def decompressed_float32(path: Path):
    """The saved checkpoint loaded by transformers and decompressed by compressed-tensors in float32: every
    quantized module's float parameters (scales) cast to float32 first, so its weight is scale * (q - zero)
    exactly; its activation quantization stays on, as the tool runs the model."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    # transformers leaves a hook that decompresses on the first forward (at the stored scales' dtype): not wanted
    model.ct_decompress_hook.remove()
    quantized = {}
    for name, module in model.named_modules():
        if getattr(module, "quantization_scheme", None) is None or module.quantization_scheme.weights is None:
            continue  # (an attention module's scheme is the KV cache's: its k_scale, v_scale as stored)
        for param in module.parameters(recurse=False):
            if param.dtype in (torch.bfloat16, torch.float16):
                param.data = param.data.float()
        decompress_module(module)
        quantized[f"{name}.weight"] = module.weight.detach()
    return torch.nn.Module.float(model).eval(), quantized  # (transformers refuses .float() on a quantized model)


def reference(path: Path, tokenizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    model, weights = decompressed_float32(path)
    prompt = torch.tensor(tokenizer(PROMPT_TEXT)["input_ids"])
    ids = prompt.clone()
    schemes = {name: module.quantization_scheme for name, module in model.named_modules()
               if getattr(module, "quantization_scheme", None) is not None
               and module.quantization_scheme.weights is not None}
    kv_cache = [module for module in model.modules() if getattr(module, "quantization_scheme", None) is not None
                and module.quantization_scheme.weights is None]
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
        for _ in range(GREEDY_TOKENS):
            ids = torch.cat((ids, model(ids[None]).logits[0, -1].argmax().reshape(1)))
        tensors = {"prompt": prompt, "logits": logits.contiguous(), "greedy": ids[len(prompt):].contiguous()}
        kiln_schemes = {name: s.model_copy(update={"input_activations": KILN_ACTIVATIONS[s.weights.type]})
                        for name, s in schemes.items()}
        if kiln_schemes != schemes:
            for name, scheme in kiln_schemes.items():
                model.get_submodule(name).quantization_scheme = scheme
            tensors["logits_kiln_activations"] = model(prompt[None]).logits[0].contiguous()
        if kv_cache:
            for module in kv_cache:
                module.quantization_enabled = False
            tensors["logits_float_kv"] = model(prompt[None]).logits[0].contiguous()
    asymmetric = sorted(name for name, s in schemes.items() if not s.weights.symmetric)
    tensors |= {f"weight.{name}.weight": weights[f"{name}.weight"].contiguous() for name in asymmetric}
    hashes = {name: hashlib.sha256(w.float().contiguous().numpy().tobytes()).hexdigest()
              for name, w in sorted(weights.items())}
    made_by = (f"llmcompressor {llmcompressor.__version__}, compressed-tensors {compressed_tensors.__version__}, "
               f"transformers {transformers.__version__}, torch {torch.__version__}")
    return tensors, {"weights_sha256": json.dumps(hashes), "made_by": made_by}


def main(names: list[str]) -> None:
    every = recipes()
    unknown = sorted(set(names) - set(every))
    if unknown:
        sys.exit(f"no checkpoint named {', '.join(unknown)}; the names are {', '.join(every)}")
    OUT.mkdir(exist_ok=True)
    base = OUT / "_base"
    tokenizer = base_model(base)
    try:
        for name, (recipe, calibrate) in every.items():
            if names and name not in names:
                continue
            out = OUT / name
            shutil.rmtree(out, ignore_errors=True)
            quantize(base, out, recipe, calibrate, tokenizer)
            tensors, meta = reference(out, tokenizer)
            save_file(tensors, str(OUT / f"{name}.reference.safetensors"), metadata=meta)
            size = sum(f.stat().st_size for f in out.iterdir())
            print(f"{name}: {size / 1e3:.0f} kB, {meta['made_by']}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
