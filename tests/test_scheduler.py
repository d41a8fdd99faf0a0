"""The scheduler, driven by a fake model that reads its tokens back through the block tables."""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from kiln.errors import PromptTooLong, RequestError
from kiln.runtime.kv_cache import BlockManager
from kiln.runtime.request import Request, RequestStatus
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

# About 2% of the fake model's tokens end a request that has these EOS ids.
EOS = frozenset(range(3, 23))


def next_token(ids: list[int]) -> int:
    return hash(tuple(ids)) % 1000 + 3


def reference(prompt: list[int], params: SamplingParams, eos: frozenset[int], max_seq_len: int
              ) -> tuple[list[int], RequestStatus]:
    """The outputs of one request generated alone, with the stop rules written out independently."""
    ids = list(prompt)
    out: list[int] = []
    while True:
        t = next_token(ids)
        ids.append(t)
        out.append(t)
        stoppable = len(out) >= params.min_tokens
        if stoppable and (t in params.stop_token_ids or (not params.ignore_eos and t in eos)):
            return out, RequestStatus.FINISHED_STOPPED
        if len(out) >= params.max_tokens or len(ids) >= max_seq_len:
            return out, RequestStatus.FINISHED_LENGTH


class FakeModel:
    """Writes each computed token id into its KV slot, then reads every position back through the
    block table: a wrong table, a stale prefix hit or a shared block overwritten shows up at once."""

    def __init__(self, block_manager: BlockManager):
        self.bs = block_manager.block_size
        self.kv: list[int | None] = [None] * (block_manager.num_blocks * self.bs)

    def _slot(self, req: Request, pos: int) -> int:
        return req.block_ids[pos // self.bs] * self.bs + pos % self.bs

    def step(self, out: SchedulerOutput) -> dict[str, int]:
        for req, n in zip(out.requests, out.num_new_tokens):
            start = req.num_computed_tokens
            assert n >= 1 and start + n <= req.num_tokens
            assert len(req.block_ids) * self.bs >= start + n, "blocks do not cover the step"
            for pos in range(start, start + n):
                self.kv[self._slot(req, pos)] = req.token_ids[pos]
        sampled = {}
        for req, n, sample in zip(out.requests, out.num_new_tokens, out.will_sample):
            end = req.num_computed_tokens + n
            seen = [self.kv[self._slot(req, pos)] for pos in range(end)]
            assert seen == req.token_ids[:end], f"{req.request_id}: the KV cache holds other tokens"
            assert sample == (end == req.num_tokens)
            if sample:
                sampled[req.request_id] = next_token(seen)
        return sampled


@dataclass
class Run:
    steps: int = 0
    computed_tokens: int = 0
    preempted: int = 0
    outputs: dict[str, list[int]] = field(default_factory=dict)
    statuses: dict[str, RequestStatus] = field(default_factory=dict)
    max_step_tokens: int = 0


def drive(sched: Scheduler, arrivals: dict[int, list[Request]], aborts: dict[int, list[str]] | None = None,
          max_steps: int = 100_000, on_step: Callable[[int, Scheduler], None] | None = None) -> Run:
    """Run the step loop until everything has arrived and finished, checking integrity after each step."""
    cfg = sched.config
    model = FakeModel(sched.block_manager)
    arrivals = {k: list(v) for k, v in arrivals.items()}
    aborts = {k: list(v) for k, v in (aborts or {}).items()}
    last_event = max([*arrivals, *aborts], default=0)
    run = Run()
    live: dict[str, Request] = {}
    while sched.has_unfinished() or run.steps <= last_event:
        for req in arrivals.pop(run.steps, []):
            sched.add_request(req)
            live[req.request_id] = req
        for rid in aborts.pop(run.steps, []):
            sched.abort(rid)
            sched.check_integrity()
        if on_step is not None:
            on_step(run.steps, sched)
            sched.check_integrity()
        was_running = {r.request_id for r in sched.running}
        out = sched.schedule()
        assert out.num_scheduled_tokens <= cfg.max_num_tokens
        if out.preempted:
            # A step that had to preempt is short of blocks: it admits nobody new (no thrashing).
            assert all(r.request_id in was_running for r in out.requests)
            assert not {r.request_id for r in out.preempted} & {r.request_id for r in out.requests}
        assert len({r.request_id for r in out.requests}) == len(out.requests)
        assert sched.num_running <= cfg.max_batch_size
        if cfg.policy == "guaranteed_no_evict":
            assert not out.preempted
        sampled = model.step(out)
        sched.update(out, sampled)
        sched.check_integrity()
        run.steps += 1
        run.computed_tokens += out.num_scheduled_tokens
        run.preempted += len(out.preempted)
        run.max_step_tokens = max(run.max_step_tokens, out.num_scheduled_tokens)
        assert run.steps <= max_steps, "the loop did not finish within its bound"
    for rid, req in live.items():
        assert req.is_finished and req.block_ids == []
        run.outputs[rid] = req.output_token_ids
        run.statuses[rid] = req.status
    bm = sched.block_manager
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == bm.num_blocks
    assert sched.num_running == sched.num_waiting == 0
    return run


def make(rid: str, prompt: list[int], max_tokens: int, eos: frozenset[int] = EOS, **params) -> Request:
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, **params), eos_token_ids=eos)


def scheduler(num_blocks: int, block_size: int = 16, max_num_tokens: int = 64, max_batch_size: int = 8,
              max_seq_len: int = 512, policy: str = "max_utilization", chunked: bool = True,
              caching: bool = True) -> Scheduler:
    cfg = SchedulerConfig(max_num_tokens, max_batch_size, max_seq_len, policy, chunked)
    return Scheduler(cfg, BlockManager(num_blocks, block_size, caching))


def mixed_specs(n: int, seed: int, max_prompt: int = 120, max_out: int = 40) -> list[tuple[str, list[int], int, dict]]:
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        prompt = [rng.randrange(3, 1000) for _ in range(rng.randint(1, max_prompt))]
        params: dict = {}
        if i % 3 == 0:
            params["min_tokens"] = min(5, max_out)
        if i % 5 == 0:
            params["ignore_eos"] = True
        specs.append((f"r{i}", prompt, rng.randint(max(1, params.get("min_tokens", 1)), max_out), params))
    return specs


def requests(specs) -> list[Request]:
    return [make(rid, prompt, mt, **params) for rid, prompt, mt, params in specs]


def expected(specs, max_seq_len: int = 512) -> dict[str, list[int]]:
    return {rid: reference(p, SamplingParams(max_tokens=mt, **params), EOS, max_seq_len)[0]
            for rid, p, mt, params in specs}


SPECS16 = mixed_specs(16, seed=1)


def test_batched_equals_one_at_a_time():
    batched = drive(scheduler(200), {0: requests(SPECS16[:10]), 3: requests(SPECS16[10:])})
    alone = {}
    for r in requests(SPECS16):
        alone.update(drive(scheduler(200, max_batch_size=1), {0: [r]}).outputs)
    assert batched.outputs == alone == expected(SPECS16)
    assert batched.preempted == 0
    assert any(s == RequestStatus.FINISHED_STOPPED for s in batched.statuses.values())
    assert any(s == RequestStatus.FINISHED_LENGTH for s in batched.statuses.values())


def test_small_pool_preempts_and_outputs_stay_identical():
    # 16 blocks of 8 slots; each request needs at most 120 tokens (15 blocks), 16 together far more.
    specs = mixed_specs(16, seed=2, max_prompt=80, max_out=40)
    sched = scheduler(16, block_size=8, max_num_tokens=48, max_batch_size=8, caching=False)
    reqs = requests(specs)
    run = drive(sched, {0: reqs})
    assert run.preempted > 0 and sched.num_preemptions == run.preempted
    assert sum(r.num_preemptions for r in reqs) == run.preempted
    assert run.outputs == expected(specs)


def test_small_pool_with_prefix_caching_recovers_preempted_work():
    specs = mixed_specs(16, seed=2, max_prompt=80, max_out=40)
    run = drive(scheduler(16, block_size=8, max_num_tokens=48), {0: requests(specs)})
    assert run.preempted > 0
    assert run.outputs == expected(specs)


def test_guaranteed_no_evict_never_preempts():
    specs = mixed_specs(16, seed=2, max_prompt=80, max_out=40)
    sched = scheduler(16, block_size=8, max_num_tokens=48, policy="guaranteed_no_evict")
    run = drive(sched, {0: requests(specs)})  # drive asserts no preemption on every step
    assert run.preempted == 0 and sched.num_preemptions == 0
    assert run.outputs == expected(specs)


def test_shared_prefix_is_served_from_cache():
    rng = random.Random(3)
    prefix = [rng.randrange(3, 1000) for _ in range(96)]  # 6 blocks of 16
    specs = [(f"p{i}", prefix + [rng.randrange(3, 1000) for _ in range(5)], 12, {"ignore_eos": True})
             for i in range(8)]

    def go(caching: bool) -> tuple[Run, list[Request], BlockManager]:
        sched = scheduler(200, caching=caching)
        reqs = requests(specs)
        # The first computes the prefix; the rest come once it is cached (and while it still runs).
        return drive(sched, {0: reqs[:1], 4: reqs[1:]}), reqs, sched.block_manager

    cold, cold_reqs, _ = go(False)
    warm, warm_reqs, bm = go(True)
    assert warm.outputs == cold.outputs == expected(specs)
    assert cold.computed_tokens - warm.computed_tokens == 7 * 96
    assert [r.num_cached_tokens for r in warm_reqs] == [0] + [96] * 7
    assert all(r.num_cached_tokens == 0 for r in cold_reqs)
    assert bm.prefix_cache_hit_rate == pytest.approx(7 * 96 / (8 * 101))


def test_chunked_prefill_respects_the_token_budget():
    rng = random.Random(4)
    long = make("long", [rng.randrange(3, 1000) for _ in range(300)], 5, ignore_eos=True)
    short = [make(f"s{i}", [rng.randrange(3, 1000) for _ in range(6)], 30, ignore_eos=True) for i in range(4)]
    sched = scheduler(200, max_num_tokens=32)
    for r in short:
        sched.add_request(r)
    model = FakeModel(sched.block_manager)
    mixed_steps = 0
    long_chunks = []
    step = 0
    while sched.has_unfinished():
        if step == 2:
            sched.add_request(long)
        out = sched.schedule()
        assert out.num_scheduled_tokens <= 32
        if long in out.requests:
            n = out.num_new_tokens[out.requests.index(long)]
            long_chunks.append(n)
            if long.num_computed_tokens + n < long.num_tokens:
                # A prefill chunk fills whatever the decodes leave of the budget.
                assert out.num_scheduled_tokens == 32
                if any(s for r, s in zip(out.requests, out.will_sample) if r is not long):
                    mixed_steps += 1
        sched.update(out, model.step(out))
        sched.check_integrity()
        step += 1
    assert sum(long_chunks) == 300 + 4  # the prompt in chunks, then 4 decode tokens
    assert len(long_chunks) >= 300 // 32 + 4
    assert mixed_steps > 0, "decodes and prefill chunks never shared a step"
    assert long.output_token_ids == reference(long.prompt_token_ids, long.sampling_params, EOS, 512)[0]


def test_without_chunked_prefill_prompts_are_never_split():
    rng = random.Random(5)
    sched = scheduler(200, max_num_tokens=32, chunked=False)
    reqs = [make(f"r{i}", [rng.randrange(3, 1000) for _ in range(20)], 3, ignore_eos=True) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    out = sched.schedule()
    # 20 + 20 > 32: the second prompt waits whole rather than being split.
    assert out.requests == reqs[:1] and out.num_new_tokens == [20]
    model = FakeModel(sched.block_manager)
    while True:
        for r, n in zip(out.requests, out.num_new_tokens):
            if r.num_computed_tokens == 0:
                assert n == r.num_tokens
        sched.update(out, model.step(out))
        if not sched.has_unfinished():
            break
        out = sched.schedule()
    assert all(r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 3 for r in reqs)
    with pytest.raises(RequestError, match="chunked prefill is off"):
        sched.add_request(make("big", list(range(3, 43)), 3))


def test_admission_refuses_requests_that_can_never_fit():
    sched = scheduler(8, block_size=16, max_seq_len=256)
    with pytest.raises(PromptTooLong, match=r"maximum context length is 256 tokens, but .* is 301 tokens"):
        sched.add_request(make("too-long", list(range(3, 303)), 1))
    with pytest.raises(RequestError, match=r"need 9 KV blocks of 16 tokens, but the whole KV cache has 8 blocks"):
        sched.add_request(make("too-big", list(range(3, 123)), 10))
    sched.add_request(make("fits", list(range(3, 123)), 8))  # 128 tokens: exactly the pool
    with pytest.raises(RequestError, match="already in use"):
        sched.add_request(make("fits", [5], 1))
    assert sched.num_waiting == 1
    run = drive(sched, {})
    assert run.steps > 0


def test_stop_rules():
    sched = scheduler(64, max_seq_len=64)
    script = {
        "eos": [30, 31, 1, 32],
        "min": [1, 2, 1, 1, 5, 6],
        "ignore": [1, 1, 1, 1],
        "stop-id": [40, 41, 42],
        "stop-min": [41, 7, 41, 8],
        "seq-len": [50] * 10,
    }
    reqs = {
        "eos": make("eos", [9], 10, eos=frozenset({1})),
        "min": make("min", [9], 10, eos=frozenset({1}), min_tokens=4),
        "ignore": make("ignore", [9], 4, eos=frozenset({1}), ignore_eos=True),
        "stop-id": make("stop-id", [9], 10, eos=frozenset({1}), stop_token_ids=[42]),
        "stop-min": make("stop-min", [9], 10, eos=frozenset({1}), stop_token_ids=[41], min_tokens=2),
        "seq-len": make("seq-len", list(range(3, 57)), 10, eos=frozenset({1})),  # 54 + 10 = max_seq_len
    }
    for r in reqs.values():
        sched.add_request(r)
    finished: dict[str, Request] = {}
    while sched.has_unfinished():
        out = sched.schedule()
        sampled = {r.request_id: script[r.request_id][r.num_output_tokens]
                   for r, s in zip(out.requests, out.will_sample) if s}
        for r in sched.update(out, sampled):
            finished[r.request_id] = r
        sched.check_integrity()
    assert finished.keys() == reqs.keys()
    result = {k: (r.status, r.output_token_ids) for k, r in finished.items()}
    assert result == {
        "eos": (RequestStatus.FINISHED_STOPPED, [30, 31, 1]),
        "min": (RequestStatus.FINISHED_STOPPED, [1, 2, 1, 1]),
        "ignore": (RequestStatus.FINISHED_LENGTH, [1, 1, 1, 1]),
        "stop-id": (RequestStatus.FINISHED_STOPPED, [40, 41, 42]),
        "stop-min": (RequestStatus.FINISHED_STOPPED, [41, 7, 41]),
        "seq-len": (RequestStatus.FINISHED_LENGTH, [50] * 10),
    }
    assert all(r.finished_time is not None and r.scheduled_time is not None for r in finished.values())


def test_abort_and_finish_from_outside():
    sched = scheduler(10, block_size=8, max_num_tokens=64, max_batch_size=4, caching=False)
    a = make("a", list(range(3, 43)), 30, ignore_eos=True)  # 40 + 30 tokens: 9 blocks of 10
    b = make("b", list(range(3, 30)), 20, ignore_eos=True)
    c = make("c", list(range(3, 10)), 5, ignore_eos=True)
    for r in (a, b, c):
        sched.add_request(r)
    model = FakeModel(sched.block_manager)
    preempted_seen = False
    for _ in range(200):
        out = sched.schedule()
        sched.update(out, model.step(out))
        sched.check_integrity()
        if out.preempted:
            preempted_seen = True
            victim = out.preempted[-1]  # the last preempted is at the front of the queue
            assert victim.status == RequestStatus.PREEMPTED and sched.waiting[0] is victim
            sched.abort(victim.request_id)
            assert victim.status == RequestStatus.FINISHED_ABORTED and victim.block_ids == []
            break
    assert preempted_seen
    sched.abort("no-such-id")
    sched.finish_request("no-such-id", RequestStatus.FINISHED_STOPPED)
    running = sched.running[0]
    sched.finish_request(running.request_id, RequestStatus.FINISHED_STOPPED)
    assert running.status == RequestStatus.FINISHED_STOPPED and running.block_ids == []
    waiting = make("w", [5, 6, 7], 3)
    sched.add_request(waiting)
    sched.abort("w")
    assert waiting.status == RequestStatus.FINISHED_ABORTED
    sched.check_integrity()
    drive(sched, {})
    with pytest.raises(ValueError):
        sched.finish_request("a", RequestStatus.RUNNING)


def test_priority_orders_admission_and_keeps_arrival_order_within_a_priority():
    sched = scheduler(64, max_batch_size=1)
    for rid, priority in (("first", 0), ("low", 5), ("default", 0), ("high", -1), ("low2", 5), ("mid", 2)):
        sched.add_request(make(rid, [5, 6, 7], 2, ignore_eos=True, priority=priority))
    order: list[str] = []

    def admitted(step: int, sched: Scheduler) -> None:
        order.extend(r.request_id for r in sched.running if r.request_id not in order)

    drive(sched, {}, on_step=admitted)
    assert order == ["high", "first", "default", "mid", "low", "low2"]
    with pytest.raises(ValueError, match="priority must be an integer"):
        SamplingParams(priority=1.5)


def test_abort_between_schedule_and_update():
    sched = scheduler(32)
    a, b = make("a", [5] * 20, 4), make("b", [6] * 20, 4)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    sampled = FakeModel(sched.block_manager).step(out)
    sched.abort("a")
    sched.update(out, sampled)
    sched.check_integrity()
    assert a.status == RequestStatus.FINISHED_ABORTED and a.num_output_tokens == 0
    assert b.num_output_tokens == 1


def test_config_is_checked():
    with pytest.raises(ValueError, match="policy"):
        SchedulerConfig(64, 8, 512, "fastest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_num_tokens"):
        SchedulerConfig(0, 8, 512)


# ----- the property test -----

@st.composite
def scenarios(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    max_seq_len = draw(st.integers(16, 128))
    max_blocks = -(-max_seq_len // block_size)
    return dict(
        seed=draw(st.integers(0, 2**32 - 1)),
        block_size=block_size,
        # Small pools: one request of max_seq_len fits, often not much more.
        num_blocks=draw(st.integers(max_blocks, 3 * max_blocks)),
        max_seq_len=max_seq_len,
        max_num_tokens=draw(st.one_of(st.integers(1, 16), st.integers(16, 160))),
        max_batch_size=draw(st.integers(1, 24)),
        policy=draw(st.sampled_from(["max_utilization", "guaranteed_no_evict"])),
        chunked=draw(st.booleans()),
        caching=draw(st.booleans()),
        num_requests=draw(st.integers(500, 560)),
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=scenarios())
def test_random_workloads_finish_cleanly(sc):
    """500+ requests with shared prefixes, random arrivals and aborts, tiny pools: every request ends
    with the tokens it would have had alone, the pool is consistent after every step and empty at the end."""
    note(repr(sc))
    rng = random.Random(sc["seed"])
    sched = scheduler(sc["num_blocks"], sc["block_size"], sc["max_num_tokens"], sc["max_batch_size"],
                      sc["max_seq_len"], sc["policy"], sc["chunked"], sc["caching"])
    msl = sc["max_seq_len"]
    prefixes = [[rng.randrange(3, 1000) for _ in range(rng.randint(1, msl // 2))] for _ in range(4)]
    arrivals: dict[int, list[Request]] = {}
    aborts: dict[int, list[str]] = {}
    accepted: list[Request] = []
    step = 0
    refused = 0
    for i in range(sc["num_requests"]):
        step += rng.choice([0, 0, 0, 1, 1, 2, 5, 40])
        prompt = rng.choice(prefixes)[:rng.randint(1, msl // 2)] if rng.random() < 0.6 else []
        prompt = prompt + [rng.randrange(3, 1000) for _ in range(rng.randint(0 if prompt else 1, msl // 4))]
        params: dict = {"ignore_eos": rng.random() < 0.3}
        max_tokens = rng.randint(1, msl // 2)
        if rng.random() < 0.2:
            params["min_tokens"] = rng.randint(0, max_tokens)
        req = make(f"r{i}", prompt, max_tokens, **params)
        total = len(prompt) + max_tokens
        never_fits = (total > msl or -(-total // sc["block_size"]) > sc["num_blocks"]
                      or (not sc["chunked"] and len(prompt) > sc["max_num_tokens"]))
        if never_fits:
            with pytest.raises(RequestError):
                sched.add_request(req)
            refused += 1
            continue
        arrivals.setdefault(step, []).append(req)
        accepted.append(req)
        if rng.random() < 0.1:
            aborts.setdefault(step + rng.randint(0, 60), []).append(req.request_id)
    stopped: set[str] = set()

    def chaos(_: int, sched: Scheduler) -> None:
        """Aborts and outside stops (stop strings) that hit running, waiting and preempted requests alike."""
        r = rng.random()
        if r < 0.02 and sched.running:
            sched.abort(rng.choice(sched.running).request_id)
        elif r < 0.03 and sched.waiting:
            preempted = [q for q in sched.waiting if q.status == RequestStatus.PREEMPTED]
            sched.abort(rng.choice(preempted or list(sched.waiting)).request_id)
        elif r < 0.04 and sched.running:
            victim = rng.choice(sched.running)
            stopped.add(victim.request_id)
            sched.finish_request(victim.request_id, RequestStatus.FINISHED_STOPPED)

    # Liveness: the oldest running request is never preempted and computes a token every step,
    # so the loop ends within the last arrival plus every request's full length.
    bound = step + 61 + sum(r.max_total_tokens for r in accepted) + 1
    run = drive(sched, arrivals, aborts, max_steps=bound, on_step=chaos)
    note(f"steps={run.steps} preempted={run.preempted} refused={refused}")
    for req in accepted:
        out, status = reference(req.prompt_token_ids, req.sampling_params, EOS, msl)
        if req.status == RequestStatus.FINISHED_ABORTED or req.request_id in stopped:
            assert req.output_token_ids == out[:req.num_output_tokens], req.request_id
        else:
            assert (req.output_token_ids, req.status) == (out, status), req.request_id
    if sc["policy"] == "guaranteed_no_evict":
        assert run.preempted == 0
