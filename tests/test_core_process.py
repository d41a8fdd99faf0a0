"""The engine core in a process of its own (``runtime/core_process``): the same tokens as a thread's core,
every block freed through the process boundary, a killed process failing its streams and coming back,
and a process that never outlives its client."""
from __future__ import annotations

import asyncio
import gc
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kiln.errors import EngineError, KilnError
from kiln.runtime import LLM, AsyncLLM, RequestFailed, SamplingParams
from kiln.runtime.engine_core import EngineCore
from kiln.runtime.config import RuntimeConfig
from kiln.runtime.llm_engine import core_place, live_core_place
from conftest import DEVICE, LIVE_CORE

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(engine_dir):
    return engine_dir("llama", max_batch_size=8, max_num_tokens=64)


async def collect(llm: AsyncLLM, prompt, params=GREEDY, request_id=None):
    outs = []
    async for out in llm.generate(prompt, params, request_id):
        outs.append(out)
    return outs


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_the_process_core_gives_the_thread_cores_tokens_and_frees_every_block(engine):
    prompts = [[5, 6, 7], [9] * 30, list(range(40, 75)), [11, 12]]
    seeded = SamplingParams(max_tokens=10, temperature=0.8, seed=7, ignore_eos=True, logprobs=2)

    async def run(place: str):
        async with AsyncLLM(engine, device=DEVICE, engine_core=place) as llm:
            greedy = await asyncio.gather(*[collect(llm, p) for p in prompts])
            sampled = await collect(llm, prompts[1], seeded)

            async def leaves_early():
                async for out in llm.generate([5] * 30, SamplingParams(max_tokens=200, ignore_eos=True)):
                    if len(out.token_ids) >= 3:
                        break  # the client goes away mid-stream: its request is aborted in the core

            await asyncio.gather(leaves_early(), collect(llm, [6] * 9))
            stats = await llm.call(EngineCore.checked_stats)
            assert stats.kv_blocks_used == 0 and stats.num_running == stats.num_waiting == 0
            return [o[-1].token_ids for o in greedy], sampled[-1].token_ids, \
                [(lp.token_id, lp.top) for lp in sampled[-1].outputs[0].logprobs]

    assert asyncio.run(run("process")) == asyncio.run(run("thread"))


def test_a_killed_core_process_fails_its_streams_and_is_restarted(engine):
    async def scenario():
        async with AsyncLLM(engine, device=DEVICE) as llm:
            core = llm._core
            first_pid = core.pid
            long = SamplingParams(max_tokens=240, ignore_eos=True)
            started = asyncio.Event()
            counts = []

            async def stream(i):
                async for out in llm.generate([5 + i] * 8, long):
                    if len(out.token_ids) >= 2:
                        started.set()
                counts.append(len(out.token_ids))

            tasks = [asyncio.create_task(stream(i)) for i in range(3)]
            await asyncio.wait_for(started.wait(), 60)
            os.kill(first_pid, signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
            assert all(isinstance(r, RequestFailed) and "engine core process died" in str(r) for r in results), results
            await asyncio.to_thread(wait_for, lambda: core.restarts == 1 and core.alive)
            assert core.pid != first_pid
            again = await collect(llm, [5, 6, 7])
            assert again[-1].finish_reason == "length" and len(again[-1].token_ids) == 12
            assert (await llm.call(EngineCore.checked_stats)).kv_blocks_used == 0

    asyncio.run(scenario())


def test_call_takes_functions_that_pickle_and_returns_their_errors(engine):
    async def scenario():
        async with AsyncLLM(engine, device=DEVICE) as llm:
            with pytest.raises(KilnError, match="a module-level function, not a lambda"):
                await llm.call(lambda core: core.stats())
            with pytest.raises(AttributeError, match="no_such_method"):
                await llm.call(EngineCore.no_such_method)
            with pytest.raises(TypeError):
                await llm.call(EngineCore.add_request)  # its error, raised in the process, comes back
            assert (await llm.call(EngineCore.stats)).steps == 0

    asyncio.run(scenario())


def test_a_failed_build_in_the_process_reaches_the_caller(engine, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(engine, broken)
    weights = next(p for p in broken.iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short: the process's load fails
    with pytest.raises(EngineError):
        AsyncLLM(broken, device=DEVICE)
    with pytest.raises(ValueError, match="engine_core must be one of"):
        AsyncLLM(engine, device=DEVICE, engine_core="elsewhere")
    with pytest.raises(ValueError, match="synchronous caller"):
        AsyncLLM(engine, device=DEVICE, engine_core="inline")


def test_where_the_core_steps_by_default():
    """A process of its own, but for LLM on a CPU (inline); a caller that reaches into its core asks for it in
    this process (inline on a CPU, a thread on a GPU). Resolved from the config alone: no GPU needed."""
    cpu, gpu = RuntimeConfig(device="cpu"), RuntimeConfig(device="cuda")
    assert core_place(cpu, synchronous=True) == "inline"
    assert core_place(gpu, synchronous=True) == "process"
    assert core_place(cpu, synchronous=False) == core_place(gpu, synchronous=False) == "process"
    assert core_place(RuntimeConfig(device="cuda", engine_core="thread"), synchronous=True) == "thread"
    assert (live_core_place("cpu"), live_core_place("cuda")) == ("inline", "thread")


def test_llm_runs_its_core_in_a_process_when_asked(engine):
    inline = LLM(engine, device=DEVICE, engine_core=LIVE_CORE)
    process = LLM(engine, device=DEVICE, engine_core="process")
    try:
        prompts = [[5, 6, 7], list(range(30, 60))]
        assert [o.token_ids for o in process.generate(prompts, GREEDY)] == \
            [o.token_ids for o in inline.generate(prompts, GREEDY)]
        assert process.engine.call(EngineCore.checked_stats).kv_blocks_used == 0
    finally:
        process.shutdown()
        inline.shutdown()


def test_the_core_process_never_outlives_its_client(engine):
    """Dropped: the client stops it. Its client's process killed: it notices and exits by itself."""
    llm = AsyncLLM(engine, device=DEVICE)
    pid = llm._core.pid
    os.kill(pid, signal.SIGTERM)  # a signal to the whole process group is the client's to act on, not the core's
    time.sleep(0.5)
    assert not gone(pid)
    del llm
    gc.collect()
    wait_for(lambda: gone(pid), 30)

    script = textwrap.dedent(f"""
        import sys, time
        from kiln.runtime import AsyncLLM
        llm = AsyncLLM({str(engine)!r}, device={DEVICE!r})
        print(llm._core.pid, flush=True)
        time.sleep(600)
    """)
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        core_pid = int(client.stdout.readline())
        assert not gone(core_pid)
        client.kill()
        client.wait()
        wait_for(lambda: gone(core_pid), 30)
    finally:
        client.kill()
        client.stdout.close()
    # A core whose client was gone before it started (its parent is not the client it was told of) exits at
    # once, before it builds anything.
    started = time.monotonic()
    late = subprocess.run([sys.executable, "-m", "kiln.runtime.core_process", "ipc:///nowhere/in",
                           "ipc:///nowhere/out", str(engine), "{}", "30", str(os.getpid() + 1_000_000)], timeout=60)
    assert late.returncode == 0 and time.monotonic() - started < 30
