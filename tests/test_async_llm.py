"""``AsyncLLM``: streaming, abort, failures that stay with their request, a free event loop while the
engine computes, and an engine that is freed when it is dropped."""
from __future__ import annotations

import asyncio
import gc
import time
import weakref

import pytest

from kiln.runtime import AsyncLLM, RequestFailed, SamplingParams
from kiln.runtime.engine_core import EngineCore
from conftest import DEVICE
from test_engine_core import FailingSampler


@pytest.fixture(scope="module")
def engine(engine_dir):
    return engine_dir("llama", max_batch_size=8, max_num_tokens=64)


async def idle_stats(llm: AsyncLLM):
    """The core's figures once it has applied every command sent so far (aborts included)."""
    return await llm.call(EngineCore.checked_stats)


async def drain(llm: AsyncLLM, prompt, params=None, request_id=None):
    outs = []
    async for out in llm.generate(prompt, params or SamplingParams(max_tokens=8, ignore_eos=True), request_id):
        outs.append(out)
    return outs


def test_streaming_deltas_concatenate_to_the_final_text_and_leaving_frees_blocks(engine):
    async def scenario():
        async with AsyncLLM(engine, device=DEVICE) as llm:
            params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
            outs = await drain(llm, "Unicode: café, 日本語", params)
            assert outs[-1].finished and len(outs[-1].token_ids) == 20 and len(outs) <= 20
            assert "".join(o.outputs[0].delta_text for o in outs) == outs[-1].text
            assert sum((o.outputs[0].delta_token_ids for o in outs), []) == outs[-1].token_ids
            # A reader that falls behind (here it blocks its event loop) gets what it missed as one output
            # with the deltas of all the steps it missed, in order.
            slow = []
            async for out in llm.generate("Unicode: café, 日本語", params):
                slow.append(out)
                if len(slow) == 1:
                    time.sleep(0.5)
            assert len(slow) < len(outs) and len(slow[1].outputs[0].delta_token_ids) > 1
            assert "".join(o.outputs[0].delta_text for o in slow) == outs[-1].text
            assert sum((o.outputs[0].delta_token_ids for o in slow), []) == outs[-1].token_ids

            async def leaves_early():
                async for out in llm.generate([5] * 30, SamplingParams(max_tokens=200, ignore_eos=True)):
                    if len(out.token_ids) >= 3:
                        break  # the client goes away mid-stream

            await asyncio.gather(leaves_early(), *[drain(llm, [6] * n) for n in (3, 9, 27)])
            stats = await idle_stats(llm)
            assert stats.kv_blocks_used == 0 and stats.num_running == 0

    asyncio.run(scenario())


def test_abort_ends_the_stream_with_a_final_output(engine):
    async def scenario():
        async with AsyncLLM(engine, device=DEVICE) as llm:
            seen = []

            async def consume():
                async for out in llm.generate([5] * 10, SamplingParams(max_tokens=200, ignore_eos=True),
                                              request_id="victim"):
                    seen.append(out)
                    if len(seen) == 3:
                        await llm.abort("victim")

            await asyncio.wait_for(consume(), timeout=30)
            assert seen[-1].finished and seen[-1].finish_reason == "abort"
            assert 3 <= len(seen[-1].token_ids) < 200
            assert (await idle_stats(llm)).kv_blocks_used == 0

    asyncio.run(scenario())


def test_a_failing_request_fails_only_its_own_stream(engine):
    async def scenario():  # a thread's core, to plant a failing sampler in it
        async with AsyncLLM(engine, device=DEVICE, engine_core="thread") as llm:
            await llm.call(lambda core: setattr(core, "sampler", FailingSampler(core.sampler, {"bad"})))
            params = SamplingParams(max_tokens=12, ignore_eos=True, seed=3)
            results = await asyncio.gather(*[drain(llm, [7, 8, i], params) for i in range(4)],
                                           drain(llm, [9, 9], params, request_id="bad"), return_exceptions=True)
            good, bad = results[:4], results[4]
            assert all(isinstance(r, list) and r[-1].finished and len(r[-1].token_ids) == 12 for r in good)
            assert isinstance(bad, RequestFailed) and "injected failure" in str(bad)
            # A bad seed is refused when the params are made, long before any step.
            with pytest.raises(ValueError, match="seed"):
                SamplingParams(seed=2**70)
            assert (await idle_stats(llm)).kv_blocks_used == 0

    asyncio.run(scenario())


def test_the_event_loop_answers_while_a_long_prefill_runs(smollm2_engine):
    """A timer keeps firing on the loop while the engine computes a 480-token prompt of the real model."""
    async def scenario():
        async with AsyncLLM(smollm2_engine, device=DEVICE) as llm:
            prompt = [100 + (i * 37) % 5000 for i in range(480)]
            ticks: list[float] = []
            done = asyncio.Event()

            async def timer():
                while not done.is_set():
                    ticks.append(time.monotonic())
                    await asyncio.sleep(0.005)

            async def request():
                start = time.monotonic()
                async for out in llm.generate(prompt, SamplingParams(max_tokens=1)):
                    pass
                done.set()
                return time.monotonic() - start

            ticker = asyncio.create_task(timer())
            elapsed = await request()
            await ticker
            gaps = [b - a for a, b in zip(ticks, ticks[1:])]
            # The prefill takes a good while on the CPU; the loop stays responsive throughout.
            assert elapsed > 0.2, elapsed
            assert len(ticks) > elapsed / 0.05 and max(gaps) < 0.15, (elapsed, len(ticks), max(gaps))

    asyncio.run(scenario())


def test_a_dropped_engine_is_freed(engine):
    """With the core in a thread, the pool's tensors are collected (test_core_process: a process exits)."""
    async def use(llm):
        await drain(llm, [5, 6, 7])

    llm = AsyncLLM(engine, device=DEVICE, engine_core="thread")
    asyncio.run(use(llm))
    core = llm._core
    kv = weakref.ref(core.call(lambda c: c.runner.kv_caches[0][0]))
    thread = core._thread
    del llm, core
    gc.collect()
    thread.join(10)
    gc.collect()
    assert not thread.is_alive()
    assert kv() is None  # the KV pool (and with it the model) is gone


def test_generate_after_shutdown_is_refused(engine):
    async def scenario():
        llm = AsyncLLM(engine, device=DEVICE)
        llm.shutdown()
        with pytest.raises(Exception, match="shut down"):
            await drain(llm, [5, 6])

    asyncio.run(scenario())


def test_a_lower_priority_value_is_admitted_first(engine):
    """With one running slot, waiting requests enter by priority (then arrival), whatever order they came in."""
    async def scenario():
        async with AsyncLLM(engine, device=DEVICE, max_batch_size=1) as llm:
            finished: list[str] = []

            async def run(rid: str, priority: int, max_tokens: int = 4) -> None:
                await drain(llm, [5, 6, 7], SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                                           priority=priority), rid)
                finished.append(rid)

            first = asyncio.create_task(run("first", 0, max_tokens=120))
            while (await llm.call(EngineCore.checked_stats)).num_running == 0:
                await asyncio.sleep(0.01)
            rest = [asyncio.create_task(run(rid, p)) for rid, p in (("low", 3), ("default", 0), ("high", -2))]
            while (await llm.call(EngineCore.checked_stats)).num_waiting < 3 and not first.done():
                await asyncio.sleep(0.01)
            assert not first.done(), "the first request ended before the others queued behind it"
            await asyncio.gather(first, *rest)
            return finished

    assert asyncio.run(scenario()) == ["first", "high", "default", "low"]
