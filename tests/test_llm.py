"""In-flight batching through the real model, driven through ``LLM``: batched = alone, preemption,
prefix reuse, n, seeds, stop strings, metrics, admission, the decode-graph path and the KV pool size."""
from __future__ import annotations

import random

import pytest

from kiln.errors import RequestError
from kiln.runtime import LLM, SamplingParams
from conftest import DEVICE, LIVE_CORE
from tests_support import assert_idle, block_bytes


@pytest.fixture(scope="module")
def engine(engine_dir):
    return engine_dir("llama", max_batch_size=8, max_num_tokens=64)


def mixed_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.choice([1, 3, 9, 17, 33, 70]))] for _ in range(n)]


GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def test_batched_outputs_equal_one_at_a_time(engine):
    llm = LLM(engine, device=DEVICE, engine_core=LIVE_CORE)
    prompts = mixed_prompts(16)
    batched = llm.generate(prompts, GREEDY)
    alone = [llm.generate([p], GREEDY)[0] for p in prompts]
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    assert all(len(o.token_ids) == 12 for o in batched)
    assert_idle(llm)


LONG = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def long_prompts() -> list[list[int]]:
    return [p * 4 for p in mixed_prompts(8, seed=1) if len(p) < 40][:6] + [[9] * 31, [10] * 20]


def test_small_pool_preempts_with_identical_outputs(engine):
    prompts = long_prompts()
    reference = LLM(engine, device=DEVICE).generate(prompts, LONG)
    # 12 blocks of 16 tokens cannot hold 8 requests that each grow by 40 tokens at once.
    small = LLM(engine, device=DEVICE, engine_core=LIVE_CORE, kv_cache_memory=12 * block_bytes(engine),
                enable_prefix_caching=False)
    outs = small.generate(prompts, LONG)
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference]
    assert small.engine.stats().num_preemptions > 0
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert_idle(small)


def test_guaranteed_no_evict_never_preempts(engine):
    prompts = long_prompts()
    llm = LLM(engine, device=DEVICE, kv_cache_memory=12 * block_bytes(engine), policy="guaranteed_no_evict")
    outs = llm.generate(prompts, LONG)
    assert llm.engine.stats().num_preemptions == 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in LLM(engine, device=DEVICE).generate(prompts, LONG)]


def test_shared_prefix_is_served_from_cache(engine):
    llm = LLM(engine, device=DEVICE)
    prefix = mixed_prompts(1, seed=5)[0] * 4
    first = llm.generate([prefix + [7, 8, 9]], GREEDY)[0]
    second = llm.generate([prefix + [10, 11]], GREEDY)[0]
    assert first.metrics.num_cached_tokens == 0
    assert len(prefix) >= 64
    assert second.metrics.num_cached_tokens == len(prefix) // 16 * 16  # the shared prefix's full blocks
    cold = LLM(engine, device=DEVICE, enable_prefix_caching=False).generate([prefix + [10, 11]], GREEDY)[0]
    assert second.token_ids == cold.token_ids
    assert llm.engine.stats().prefix_cache_hit_rate > 0


def test_seeded_sampling_is_independent_of_the_batch(engine):
    llm = LLM(engine, device=DEVICE)
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], params)[0].token_ids
    others = [SamplingParams(max_tokens=14, temperature=0.8, ignore_eos=True)] * 5
    batch = llm.generate(mixed_prompts(5, seed=3) + [[5, 6, 7]], others + [params])
    assert batch[-1].token_ids == alone
    assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=10, seed=99, ignore_eos=True))[0].token_ids != alone


def test_n_completions_share_the_prompt_blocks(engine):
    llm = LLM(engine, device=DEVICE, engine_core=LIVE_CORE)
    prompt = mixed_prompts(1, seed=7)[0] * 3  # long enough for full blocks
    out = llm.generate([prompt], SamplingParams(n=3, max_tokens=6, seed=10, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    single = llm.generate([prompt], SamplingParams(max_tokens=6, seed=10, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == single.token_ids
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # Completions 2 and 3 reuse the prompt's full blocks instead of recomputing them.
    assert llm.engine.call(lambda core: core.block_manager.prefix_cache_hits) >= 2 * (len(prompt) // 16) * 16


def test_stop_strings_and_logprobs(engine):
    llm = LLM(engine, device=DEVICE)
    free = llm.generate(["def add(a, b):"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    text = free.text
    assert len(text) > 6
    stop = text[3:6]
    out = llm.generate(["def add(a, b):"], SamplingParams(max_tokens=24, temperature=0, stop=[stop],
                                                          ignore_eos=True, logprobs=3))[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    lps = out.outputs[0].logprobs
    assert len(lps) == len(out.token_ids)
    for lp, tok in zip(lps, out.token_ids):
        assert lp.token_id == tok and len(lp.top) == 3 and lp.top[0][0] == tok  # greedy: chosen is the top


def test_admission_refuses_requests_that_can_never_fit(engine):
    llm = LLM(engine, device=DEVICE, engine_core=LIVE_CORE)
    with pytest.raises(RequestError, match="maximum context length"):
        llm.generate([[5] * 250], SamplingParams(max_tokens=10))
    with pytest.raises(RequestError, match="out of range"):
        llm.generate([[5, 10**7]], GREEDY)
    # The engine is still usable, with nothing leaked.
    assert llm.generate([[5, 6]], GREEDY)[0].finish_reason == "length"
    assert_idle(llm)


def test_metrics(engine):
    out = LLM(engine, device=DEVICE).generate([[5] * 40], GREEDY)[0]
    m = out.metrics
    assert m.num_prompt_tokens == 40 and m.num_generated_tokens == 12
    assert 0 <= m.queue_time <= m.time_to_first_token <= m.e2e_latency
    assert m.time_per_output_token > 0


def test_graph_shaped_steps_give_identical_outputs(engine):
    """The padded, fixed-shape steps that CUDA graphs capture (decode steps, and mixed steps of prefill
    chunks beside decodes), run eagerly on a CPU or replayed on a GPU: same tokens, no leaks."""
    prompts = mixed_prompts(11, seed=4)
    eager = LLM(engine, device=DEVICE, cuda_graphs="off").generate(prompts, LONG)
    graphed = LLM(engine, device=DEVICE, engine_core=LIVE_CORE, cuda_graphs="static" if DEVICE == "cpu" else "on")
    shapes = []
    graphs = graphed.engine.call(lambda core: core.runner.graphs)
    original = graphs.run
    graphs.run = lambda batch, shape, prev=None: shapes.append((len(batch), shape)) or original(batch, shape, prev)
    outs = graphed.generate(prompts, LONG)
    assert [o.token_ids for o in outs] == [o.token_ids for o in eager]
    decode = [n for n, s in shapes if s in graphs.decode_shapes]
    mixed = [n for n, s in shapes if s in graphs.mixed_shapes]
    assert decode and max(decode) == 8 and min(decode) < 8  # full and padded decode batches
    assert mixed  # steps with prefill chunks took a graph shape too
    assert_idle(graphed)


def test_kv_pool_is_sized_from_the_byte_budget(engine):
    per_block = block_bytes(engine)
    assert per_block == 2 * 3 * 16 * 2 * 16 * 4  # K and V, 3 layers, 16 slots, 2 KV heads of 16, float32
    llm = LLM(engine, device=DEVICE, kv_cache_memory=10 * per_block + per_block - 1)
    assert llm.engine.stats().kv_blocks_total == 10
    with pytest.raises(RequestError, match="holds no block"):
        LLM(engine, device=DEVICE, kv_cache_memory=per_block - 1)


def test_the_batch_is_sized_from_the_pool_when_neither_is_given(engine, monkeypatch):
    """The build's max_batch_size is a ceiling: with the pool sized by the runtime, it admits as many
    sequences as the pool holds at the planned length; a pool or a batch given by hand is taken as meant."""
    from kiln.runtime import kv_pool

    assert kv_pool.batch_the_pool_holds(640, 16, 4096) == 10  # 1,024-token sequences: 64 blocks each
    assert kv_pool.batch_the_pool_holds(640, 16, 256) == 40  # never planned past max_seq_len
    assert kv_pool.batch_the_pool_holds(3, 16, 4096) == 1
    if DEVICE != "cpu":
        pytest.skip("the CPU pool's default budget")
    per_block = block_bytes(engine)
    monkeypatch.setattr(kv_pool, "CPU_KV_CACHE_BYTES", 48 * per_block)  # 3 sequences of 256 tokens (16 blocks)
    sized = LLM(engine, device=DEVICE).engine
    assert sized.stats().kv_blocks_total == 48 and sized.limits.max_batch_size == 3
    assert LLM(engine, device=DEVICE, max_batch_size=6).engine.limits.max_batch_size == 6
    assert LLM(engine, device=DEVICE, kv_cache_memory=48 * per_block).engine.limits.max_batch_size == 8
    monkeypatch.undo()
    assert LLM(engine, device=DEVICE).engine.limits.max_batch_size == 8  # a full batch at max length fits


def test_request_ids_may_not_collide(engine):
    engine_ = LLM(engine, device=DEVICE).engine
    engine_.add_request([5, 6], SamplingParams(n=2, max_tokens=2), request_id="a")
    for clash in ("a", "a#1"):
        with pytest.raises(RequestError, match="already in use"):
            engine_.add_request([5, 6], SamplingParams(max_tokens=2), request_id=clash)
    while engine_.has_unfinished():
        engine_.step(timeout=1)
    engine_.add_request([5, 6], SamplingParams(max_tokens=2), request_id="a")  # free again once finished
