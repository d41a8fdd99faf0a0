"""The engine core and its clients under failure: requests that raise fail alone, interrupted calls
clean up, bad input is refused at submission, and a property test of random work with random aborts
and failures that must end with every request accounted for and every KV block free."""
from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import signal
import threading

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from kiln.errors import KilnError, RequestError
from kiln.runtime import LLM, AsyncLLM, RequestFailed, SamplingParams
from kiln.runtime.config import RuntimeConfig
from kiln.runtime.core_thread import EngineCoreThread
from kiln.runtime.engine_core import EngineCore
from conftest import DEVICE, LIVE_CORE
from tests_support import assert_idle, block_bytes

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(engine_dir):
    return engine_dir("llama", max_batch_size=8, max_num_tokens=64)


class FailingSampler:
    """Fault injection: the real sampler, except that a step holding a poisoned request raises."""

    def __init__(self, inner, poisoned: set[str]):
        self.inner = inner
        self.poisoned = poisoned

    def sample(self, logits, requests):
        bad = [r.request_id for r in requests if r.request_id.split("#")[0] in self.poisoned]
        if bad:
            raise RuntimeError(f"injected failure for {bad}")
        return self.inner.sample(logits, requests)

    def __call__(self, logits, requests):
        return self.sample(logits, requests).result()

    def free(self, request_id: str) -> None:
        self.inner.free(request_id)

    def needs_history(self, request) -> bool:
        return self.inner.needs_history(request)


def poison(llm: LLM, poisoned: set[str]) -> None:
    llm.engine.call(lambda core: setattr(core, "sampler", FailingSampler(core.sampler, poisoned)))


def test_a_failing_request_fails_alone_with_its_message(engine):
    llm = LLM(engine, device=DEVICE, engine_core=LIVE_CORE)
    prompts = [[5, 6, 7], [8, 9] * 10, [10] * 30, [11, 12]]
    expected = llm.generate(prompts, GREEDY)
    poison(llm, {"req-bad"})
    engine_ = llm.engine
    ids = [engine_.add_request(p, GREEDY) for p in prompts]
    engine_.add_request([13, 14, 15], GREEDY, request_id="req-bad")
    done, failed = {}, {}
    while len(done) + len(failed) < 5:
        for out in engine_.step(timeout=1):
            if out.error is not None:
                failed[out.request_id] = out
            elif out.finished:
                done[out.request_id] = out
    assert set(failed) == {"req-bad"} and failed["req-bad"].finish_reason == "error"
    assert "injected failure" in failed["req-bad"].error
    assert [done[i].token_ids for i in ids] == [o.token_ids for o in expected]
    assert_idle(llm)
    # Through LLM.generate the failure raises, naming the request; the LLM stays usable.
    with pytest.raises(RequestFailed, match="req-bad2.*injected failure"):
        llm.generate([[5, 6, 7]], GREEDY) if False else _generate_with_id(llm, "req-bad2", {"req-bad2"})
    assert llm.generate(prompts, GREEDY)[0].token_ids == expected[0].token_ids
    assert_idle(llm)


@pytest.mark.parametrize("cuda_graphs", ["off", "static"])
def test_a_prompt_chunk_beside_a_failing_request_goes_on(engine, cuda_graphs):
    """Run alone after a failed step, a request in the middle of its prompt samples nothing: its step
    gives no logits, which is not an error (the graph path once indexed with an empty float tensor)."""
    llm = LLM(engine, device=DEVICE, engine_core=LIVE_CORE, cuda_graphs=cuda_graphs, enable_prefix_caching=False)
    long_prompt = [(7 * i) % 250 + 3 for i in range(150)]
    expected = llm.generate([long_prompt], GREEDY)[0].token_ids
    poison(llm, {"req-bad"})
    engine_ = llm.engine
    # One step of 64 tokens holds req-bad's prompt (it samples, and fails) and the long prompt's first
    # chunk, 54 tokens: alone, with 8 padding rows, it fits the graph shape of 64 tokens.
    engine_.add_request(list(range(13, 23)), GREEDY, request_id="req-bad")
    good = engine_.add_request(long_prompt, GREEDY)
    ended = {}
    while len(ended) < 2:
        for out in engine_.step(timeout=1):
            if out.finished:
                ended[out.request_id] = out
    assert "injected failure" in ended["req-bad"].error
    assert ended[good].error is None and ended[good].token_ids == expected
    assert_idle(llm)


def test_the_core_thread_builds_the_core_it_steps_and_reports_a_failed_build(engine):
    """Loading (and, on a CPU, timing kernels) happens on the thread that will step the core, so the
    caller's thread starts no OpenMP pool of its own (core_thread's note); a build error reaches the caller."""
    built_on = []

    def make():
        built_on.append(threading.current_thread())
        return EngineCore(str(engine), RuntimeConfig(device=DEVICE))

    core = EngineCoreThread(make, lambda outputs: None)
    try:
        assert core.call(lambda c: threading.current_thread()) is built_on[0] is not threading.current_thread()
        assert core.stats().kv_blocks_used == 0
    finally:
        core.shutdown()

    def broken():
        raise KilnError("no engine here")

    with pytest.raises(KilnError, match="no engine here"):
        EngineCoreThread(broken, lambda outputs: None)
    with pytest.raises(KilnError, match="is not a kiln engine"):
        AsyncLLM(str(engine) + "-missing", device=DEVICE)


def _generate_with_id(llm: LLM, request_id: str, poisoned: set[str]):
    poison(llm, poisoned)
    engine_ = llm.engine
    rid = engine_.add_request([5, 6], GREEDY, request_id=request_id)
    while True:
        for out in engine_.step(timeout=1):
            if out.request_id == rid and out.error is not None:
                raise RequestFailed(rid, out.error)


@pytest.mark.parametrize("bad, message", [
    ([[True, False]], "must be integers"),
    ([[5, 6.0]], "must be integers"),
    ([[5, 10**7]], "out of range"),
    ([{"a": 1}], "a prompt is a string or a list of token ids"),
    ([[]], "empty"),
])
def test_bad_prompts_are_refused_at_submission_and_the_llm_stays_usable(engine, bad, message):
    llm = LLM(engine, device=DEVICE, engine_core=LIVE_CORE)
    with pytest.raises(RequestError, match=message):
        llm.generate([[5, 6, 7]] * 3 + bad, GREEDY)
    assert llm.generate([[5, 6, 7]], GREEDY)[0].finish_reason == "length"
    assert_idle(llm)


@pytest.mark.parametrize("field, value, message", [
    ("seed", 2**70, "seed must be in"),
    ("seed", -1, "seed must be in"),
    ("seed", True, "seed must be an integer"),
    ("max_tokens", 2.5, "max_tokens must be an integer"),
    ("max_tokens", "8", "max_tokens must be an integer"),
    ("n", False, "n must be an integer"),
    ("temperature", float("nan"), "temperature must be a finite number"),
    ("top_p", "0.5", "top_p must be a number"),
    ("stop_token_ids", [True], r"stop_token_ids\[\] must be an integer"),
    ("stop", [1], "stop must be a string or a list of strings"),
    ("logit_bias", {"x": 1.0}, "logit_bias key must be an integer"),
    ("ignore_eos", 1, "ignore_eos must be true or false"),
])
def test_sampling_params_check_every_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})
    assert SamplingParams(seed=2**64 - 1, max_tokens=3.0).max_tokens == 3  # integral floats are integers


def test_params_are_checked_against_the_vocabulary(engine):
    llm = LLM(engine, device=DEVICE)
    with pytest.raises(RequestError, match="stop_token_ids has token ids out of range"):
        llm.generate([[5, 6]], SamplingParams(stop_token_ids=[10**6]))
    with pytest.raises(RequestError, match="logit_bias has token ids out of range"):
        llm.generate([[5, 6]], SamplingParams(logit_bias={10**6: 5}))
    # A large bias makes its token the greedy choice at every step.
    out = llm.generate([[5, 6]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True,
                                                logit_bias={"42": 100}))[0]
    assert out.token_ids == [42] * 5


def test_a_huge_seed_samples_reproducibly(engine):
    llm = LLM(engine, device=DEVICE)
    params = SamplingParams(max_tokens=6, seed=2**64 - 1, ignore_eos=True)
    assert llm.generate([[5, 6]], params)[0].token_ids == llm.generate([[5, 6]], params)[0].token_ids


def test_an_interrupted_generate_aborts_its_requests(engine):
    llm = LLM(engine, device=DEVICE, engine_core=LIVE_CORE)
    started = threading.Event()
    original = llm.engine.step

    def step(timeout=None):
        started.set()
        return original(timeout)

    llm.engine.step = step
    # A real SIGINT, as Ctrl-C sends: the core holds it back while a step runs, so it lands between steps. Python's
    # own handler for it, which a suite started in the background (SIGINT ignored, as a shell's `&` leaves it)
    # does not have.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Thread(target=lambda: started.wait(10) and os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate([[5] * 20] * 6, SamplingParams(max_tokens=200, ignore_eos=True))
    finally:
        timer.join()
        signal.signal(signal.SIGINT, previous)
    llm.engine.step = original
    # The next call runs only its own requests and nothing is leaked.
    outs = llm.generate([[5, 6], [7, 8]], GREEDY)
    assert [len(o.token_ids) for o in outs] == [8, 8]
    assert_idle(llm)


def test_static_cuda_graphs_refuse_a_plan_that_reads_lengths_on_the_host(engine, tmp_path):
    """The padded graph path with the reference attention gave wrong tokens silently; now it is refused."""
    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    meta = json.loads((copy / "engine.json").read_text())
    meta["plan"]["paged_attention"] = {"impl": "reference", "config": {}}
    (copy / "engine.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="paged_attention:reference"):
        LLM(copy, device=DEVICE, cuda_graphs="static")
    # auto chooses the eager path for such a plan, and it is correct.
    prompts = [[5, 6, 7], [9] * 20]
    assert [o.token_ids for o in LLM(copy, device=DEVICE).generate(prompts, GREEDY)] == \
        [o.token_ids for o in LLM(engine, device=DEVICE, cuda_graphs="off").generate(prompts, GREEDY)]


def test_unknown_runtime_options_are_named(engine):
    with pytest.raises(TypeError, match="unknown runtime option.*kv_cache_mem"):
        LLM(engine, device=DEVICE, kv_cache_mem=10)


# ----- the property test -----

@st.composite
def workloads(draw):
    return dict(
        seed=draw(st.integers(0, 2**32 - 1)),
        num_requests=draw(st.integers(5, 40)),
        pool_blocks=draw(st.integers(8, 40)),
        p_abort=draw(st.sampled_from([0.0, 0.2, 0.5])),
        p_fail=draw(st.sampled_from([0.0, 0.1, 0.3])),
        policy=draw(st.sampled_from(["max_utilization", "guaranteed_no_evict"])),
        async_scheduling=draw(st.booleans()),
    )


@pytest.fixture(scope="module")
def llms(engine):
    """One LLM per policy and pool size, reused across examples (loading is the slow part)."""
    made: dict = {}

    def get(policy: str, blocks: int, async_scheduling: bool) -> LLM:
        key = (policy, blocks, async_scheduling)
        if key not in made:
            made[key] = LLM(engine, device=DEVICE, engine_core=LIVE_CORE, policy=policy,
                            kv_cache_memory=blocks * block_bytes(engine), async_scheduling=async_scheduling)
        return made[key]

    return get


_RUNS = itertools.count()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(w=workloads())
def test_random_work_with_aborts_and_failures_ends_clean(llms, w):
    """Requests with shared prefixes, n>1, seeds and stop tokens; random aborts while they run and
    injected failures: each request ends exactly once (finished, aborted or failed, never lost), the
    core's checks pass and every KV block is free at the end."""
    note(repr(w))
    rng = random.Random(w["seed"])
    run = next(_RUNS)
    llm = llms(w["policy"], w["pool_blocks"], w["async_scheduling"])
    poisoned: set[str] = set()
    poison(llm, poisoned)
    engine_ = llm.engine
    prefixes = [[rng.randrange(3, 300) for _ in range(rng.randint(1, 40))] for _ in range(3)]
    pending = list(range(w["num_requests"]))
    ended: dict[str, str] = {}
    live: list[str] = []
    added: list[str] = []
    try:
        while pending or live:
            for _ in range(rng.randint(0, 4)):
                if not pending:
                    break
                i = pending.pop(0)
                rid = f"run{run}-{i}"
                prompt = rng.choice(prefixes)[:rng.randint(1, 40)] + [rng.randrange(3, 300)
                                                                       for _ in range(rng.randint(0, 20))]
                params = SamplingParams(max_tokens=rng.randint(1, 24), n=rng.choice([1, 1, 1, 2, 3]),
                                        temperature=rng.choice([0.0, 1.0]), seed=rng.choice([None, i]),
                                        stop_token_ids=rng.choice([[], [rng.randrange(3, 300)]]))
                if rng.random() < w["p_fail"]:
                    poisoned.add(rid)
                try:
                    engine_.add_request(prompt, params, request_id=rid)
                except RequestError:  # may never fit this small pool: refused at submission, not lost
                    ended[rid] = "refused"
                    continue
                added.append(rid)
                live.append(rid)
            if live and rng.random() < w["p_abort"] / 4:
                victim = rng.choice(live)
                final = engine_.abort(victim)
                # Its completions that were still running end as aborted (an n>1 sibling may have ended).
                assert final is not None and final.finished
                assert any(c.finish_reason == "abort" for c in final.outputs)
                live.remove(victim)
                ended[victim] = "abort"
            for out in engine_.step(timeout=0.01 if pending else 2.0):
                assert out.request_id not in ended, f"{out.request_id} ended twice"
                if out.finished:
                    ended[out.request_id] = "error" if out.error else out.finish_reason
                    live.remove(out.request_id)
                    if out.request_id in poisoned:
                        assert out.error and "injected failure" in out.error
    finally:
        poisoned.clear()
        for rid in live:  # a failed example must not leave work for the next one
            engine_.abort(rid)
    note(f"ended: {sorted(set(ended.values()))}")
    assert set(added) <= set(ended) and not live
    assert all(ended[r] == "error" for r in added if r in poisoned)
    assert_idle(llm)


# ----- async scheduling -----

def test_async_scheduling_gives_the_same_results(engine):
    """Steps launched before the previous step's tokens are on the host: the same tokens, stops, logprobs,
    penalties (which wait for the tokens in flight) and preemptions as one step at a time."""
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.choice([1, 5, 17, 40]))] for _ in range(12)]
    params = [
        SamplingParams(max_tokens=rng.randint(1, 30), temperature=rng.choice([0.0, 0.9]), seed=i,
                       stop_token_ids=[prompts[i][0]], min_tokens=i % 3,
                       repetition_penalty=1.3 if i % 4 == 0 else 1.0, frequency_penalty=0.5 if i % 5 == 0 else 0.0,
                       logprobs=2 if i % 3 == 0 else None, n=2 if i == 7 else 1)
        for i in range(12)
    ]
    small = 14 * block_bytes(engine)  # small enough to preempt
    runs = {}
    for mode in (False, True):
        llm = LLM(engine, device=DEVICE, engine_core=LIVE_CORE, async_scheduling=mode, kv_cache_memory=small)
        outs = llm.generate(prompts, params)
        runs[mode] = [[(c.token_ids, c.finish_reason, c.stop_reason, [lp.token_id for lp in c.logprobs or []],
                        [lp.logprob for lp in c.logprobs or []]) for c in o.outputs] for o in outs]
        assert_idle(llm)
        if mode:
            assert llm.engine.stats().num_preemptions > 0
    # Tokens exactly; logprobs to within what another batch shape's kernels may round differently.
    assert [[c[:4] for c in o] for o in runs[True]] == [[c[:4] for c in o] for o in runs[False]]
    for a, b in zip(runs[True], runs[False]):
        for ca, cb in zip(a, b):
            assert ca[4] == pytest.approx(cb[4], abs=1e-3)


def test_async_scheduling_with_static_cuda_graphs(engine):
    prompts = [[5, 6, 7], [9] * 20, [11] * 33]
    params = SamplingParams(max_tokens=25, temperature=0, ignore_eos=True)
    eager = LLM(engine, device=DEVICE, cuda_graphs="off", async_scheduling=False).generate(prompts, params)
    llm = LLM(engine, device=DEVICE, engine_core=LIVE_CORE, cuda_graphs="static", async_scheduling=True)
    assert [o.token_ids for o in llm.generate(prompts, params)] == [o.token_ids for o in eager]
    assert_idle(llm)
