"""Prompt logprobs against transformers' log-softmax of the same prompt: whole, chunked over several
steps, after a prefix-cache hit, beside requests that do not ask, with n > 1, after preemption and with
async scheduling; and requests that do not ask are unchanged."""
from __future__ import annotations

import random

import pytest
import torch
import transformers

from kiln.runtime import LLM, SamplingParams
from kiln.runtime.prompt_logprobs import prompt_spans
from kiln.runtime.request import Request
from conftest import DEVICE
from tests_support import assert_idle, block_bytes

# Longer than the engine's 64-token step, so its prompt is computed in several chunks.
LONG_PROMPT = [random.Random(3).randrange(3, 300) for _ in range(150)]
SHORT_PROMPT = [5, 17, 99, 42, 7, 250, 31, 12, 8]


@pytest.fixture(scope="module")
def engine(engine_dir):
    return engine_dir("llama", max_batch_size=8, max_num_tokens=64)


@pytest.fixture(scope="module")
def hf(hf_model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_model_dir("llama"), dtype=torch.float32)


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: row i is the log-softmax of the logits that score token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)


def assert_matches(out, ref: torch.Tensor, k: int) -> None:
    ids = out.prompt_token_ids
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(ids)
    assert out.prompt_logprobs[0] is None
    for i, entry in enumerate(out.prompt_logprobs[1:]):
        assert entry.token_id == ids[i + 1]
        assert entry.logprob == pytest.approx(float(ref[i, ids[i + 1]]), abs=1e-4), i
        assert len(entry.top) == k
        values, top_ids = ref[i].topk(k)
        assert [t for t, _ in entry.top] == top_ids.tolist(), i
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)


def test_prompt_logprobs_match_transformers_whole_and_chunked(engine, hf):
    llm = LLM(engine, device=DEVICE)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=3)
    short, long = llm.generate([SHORT_PROMPT, LONG_PROMPT], params)
    assert_matches(short, hf_logprobs(hf, SHORT_PROMPT), 3)
    assert_matches(long, hf_logprobs(hf, LONG_PROMPT), 3)
    # k = 0: the prompt token's own logprob alone.
    out = llm.generate([LONG_PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    assert_matches(out, hf_logprobs(hf, LONG_PROMPT), 0)
    # A one-token prompt has nothing to score.
    assert llm.generate([[7]], SamplingParams(max_tokens=1, prompt_logprobs=2))[0].prompt_logprobs == [None]
    assert_idle(llm)


def test_a_request_that_asks_after_a_prefix_hit_computes_its_whole_prompt(engine, hf):
    llm = LLM(engine, device=DEVICE)
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    llm.generate([LONG_PROMPT], greedy)  # leaves the prompt's full blocks in the prefix cache
    warm = llm.generate([LONG_PROMPT], greedy)[0]
    assert warm.metrics.num_cached_tokens > 0 and warm.prompt_logprobs is None
    out = llm.generate([LONG_PROMPT], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                                                     prompt_logprobs=1))[0]
    assert out.metrics.num_cached_tokens == 0
    assert_matches(out, hf_logprobs(hf, LONG_PROMPT), 1)
    assert out.token_ids == warm.token_ids


def test_requests_that_do_not_ask_are_unchanged(engine, hf):
    llm = LLM(engine, device=DEVICE)
    plain = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
    prompts = [SHORT_PROMPT, LONG_PROMPT[:70], [9] * 20]
    alone = llm.generate(prompts, plain)
    mixed = llm.generate(prompts + [LONG_PROMPT], [plain] * 3 + [SamplingParams(max_tokens=8, prompt_logprobs=2)])
    for a, m in zip(alone, mixed):
        assert m.prompt_logprobs is None
        assert m.token_ids == a.token_ids
        for x, y in zip(m.outputs[0].logprobs, a.outputs[0].logprobs):
            assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-5)
    assert_matches(mixed[3], hf_logprobs(hf, LONG_PROMPT), 2)


def test_n_completions_share_one_set_of_prompt_logprobs(engine, hf):
    llm = LLM(engine, device=DEVICE)
    out = llm.generate([SHORT_PROMPT], SamplingParams(max_tokens=3, n=3, seed=1, prompt_logprobs=1))[0]
    assert len(out.outputs) == 3
    assert_matches(out, hf_logprobs(hf, SHORT_PROMPT), 1)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preemption_and_async_scheduling_keep_them_whole(engine, hf, async_scheduling):
    # 12 blocks of 16 tokens cannot hold these requests at once: some are preempted and recomputed.
    llm = LLM(engine, device=DEVICE, kv_cache_memory=12 * block_bytes(engine), enable_prefix_caching=False,
              async_scheduling=async_scheduling)
    prompts = [LONG_PROMPT[i:i + 60] for i in range(0, 90, 15)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, prompt_logprobs=1)
    outs = llm.generate(prompts, params)
    if not async_scheduling:
        assert sum(o.metrics.num_preemptions for o in outs) > 0
    for prompt, out in zip(prompts, outs):
        assert_matches(out, hf_logprobs(hf, prompt), 1)
    assert_idle(llm)


def test_spans_skip_positions_already_scored():
    req = Request("r", list(range(10, 30)), SamplingParams(prompt_logprobs=0))
    plain = Request("p", list(range(10, 30)), SamplingParams())
    # Two rows of a step before it: positions 0..7 of req (scores tokens 1..8), then plain's.
    span, = prompt_spans([(plain, 5), (req, 8)])
    assert (span.row, span.start, span.count) == (5, 0, 8)
    req.prompt_logprobs.extend([None] * 5)  # as if positions 0..4 came back before a preemption
    span, = prompt_spans([(req, 20)])
    assert (span.row, span.start, span.count) == (5, 5, 14)  # up to position 18, which scores token 19
    req.prompt_logprobs.extend([None] * 14)
    assert not req.lacks_prompt_logprobs and prompt_spans([(req, 20)]) == []


def test_prompt_logprobs_are_checked():
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
