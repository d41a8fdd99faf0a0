"""``LLMEngine``: the synchronous front end over an engine core.

``add_request`` checks and submits; ``step`` takes the core's next outputs and turns them into
``RequestOutput``s (detokenized, stop strings applied, n>1 merged). ``LLM`` and the benchmarks drive
it; ``AsyncLLM`` is the same pieces delivered to asyncio callers. By default (``engine_core="auto"``),
on a GPU the core steps in a process of its own (``core_process``), as ``AsyncLLM``'s does; on a CPU it
steps in the caller's thread, which a synchronous caller gives up during a step anyway
(``core_thread.InlineCore``). A caller that reaches into the core with ``call(closure)`` asks for
``live_core_place(device)``: a thread on a GPU.
"""
from __future__ import annotations

import queue
import time
import weakref
from typing import TYPE_CHECKING

import torch

from kiln.engine import Engine
from kiln.runtime.config import RuntimeConfig
from kiln.runtime.core_thread import EngineCoreThread, InlineCore
from kiln.runtime.engine_core import CoreFacts, EngineCore
from kiln.runtime.input_processor import InputProcessor, Prompt
from kiln.runtime.output_processor import OutputProcessor
from kiln.runtime.outputs import EngineStats, RequestOutput
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.tokenizer import EngineTokenizer

if TYPE_CHECKING:
    from kiln.runtime.core_process import EngineCoreProcess


def core_factory(engine: str | Engine, config: RuntimeConfig):
    """``make_core`` for ``EngineCoreThread``: it holds the engine and config, never the client.

    On a CPU the core is built on the thread that steps it (torch's OpenMP pools, see core_thread);
    on a GPU it is built here, in the caller's thread, where the H200 runs validated it (weights
    loaded and CUDA graphs captured there, replayed on the core's thread).
    """
    if config.torch_device().type != "cpu":
        core = EngineCore(engine, config)
        return lambda: core
    return lambda: EngineCore(engine, config)


def core_place(config: RuntimeConfig, synchronous: bool) -> str:
    """Where a client's core steps (``RuntimeConfig.engine_core``), "auto" resolved: a process of its own, but
    for a synchronous caller (``LLM``) on a CPU, where it steps inline. Only a synchronous caller can step a
    core inline.

    Why a process on a GPU, also for ``LLM``: a core in a thread shares the interpreter lock with the caller's
    detokenizing, and each time the core lets the lock go (a copy, a launch) the caller may keep it for the
    interpreter's switch interval (5 ms). On an H100 host, the 8B shape at batch 256 (``kiln bench
    throughput``, BENCHMARKS.md): the host's share of a step 6.9 ms in a thread, 4.1 in a process, output
    15,097 against 15,507 tok/s. On a CPU the forward pass is the host's own work, and inline needs no
    hand-off."""
    place = config.engine_core
    if place == "auto":
        place = "inline" if synchronous and config.torch_device().type == "cpu" else "process"
    if place == "inline" and not synchronous:
        raise ValueError("engine_core='inline' needs a synchronous caller (LLM); AsyncLLM takes 'process' or 'thread'")
    return place


def live_core_place(device: str | torch.device | None) -> str:
    """``engine_core`` for a caller that reaches into its core with ``call(closure)`` (calibration hooks,
    tests reading the runner): the core in this process, inline on a CPU and in a thread on a GPU."""
    on_cpu = RuntimeConfig(device=str(device) if device else None).torch_device().type == "cpu"
    return "inline" if on_cpu else "thread"


def start_core(engine: str | Engine, config: RuntimeConfig, on_outputs,
               place: str) -> EngineCoreProcess | EngineCoreThread:
    """The engine core in a process of its own or in a thread (``place``), delivering to ``on_outputs``."""
    if place == "process":
        from kiln.runtime.core_process import EngineCoreProcess  # ZeroMQ and msgspec only when used

        return EngineCoreProcess(engine, config, on_outputs)
    return EngineCoreThread(core_factory(engine, config), on_outputs)


class FrontEnd:
    """The pieces every client of an engine core builds around it: its tokenizer and the input and
    output processors, from the engine's files and the core's facts."""

    def __init__(self, engine: Engine, facts: CoreFacts):
        self.engine = engine
        self.facts = facts
        self.max_seq_len = facts.limits.max_seq_len
        self.tokenizer = EngineTokenizer(engine)
        self.inputs = InputProcessor(self.tokenizer, facts.vocab_size, facts.admission_error, self.max_seq_len)
        self.outputs = OutputProcessor(self.tokenizer)


class LLMEngine:
    def __init__(self, engine: str | Engine, config: RuntimeConfig | None = None):
        config = config or RuntimeConfig()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.core: EngineCoreProcess | EngineCoreThread | InlineCore
        place = core_place(config, synchronous=True)
        if place == "inline":
            self.core = InlineCore(EngineCore(engine, config))
        else:
            self.core = start_core(engine, config, self._queue.put, place)
        weakref.finalize(self, self.core.shutdown)
        front = FrontEnd(self.core.engine, self.core.facts)
        self.engine = front.engine
        self.tokenizer = front.tokenizer
        self.device = torch.device(front.facts.device)
        self.max_seq_len = front.max_seq_len
        self.limits = front.facts.limits
        self._inputs = front.inputs
        self._outputs = front.outputs

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    arrival_time: float | None = None) -> str:
        new, core_requests = self._inputs.process(prompt, params, request_id, arrival_time)
        self._outputs.add(new)
        try:
            for r in core_requests:
                refused = self.core.add_request(r)
                if refused:  # inline: an admission error comes back at once, as the thread would send it
                    self._queue.put(refused)
        except BaseException:
            self.abort(new.request_id)
            raise
        return new.request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request now; its final output (``finish_reason="abort"``), or None if it is not running."""
        final, seq_ids = self._outputs.abort(request_id)
        self.core.abort(seq_ids)
        return final

    def has_unfinished(self) -> bool:
        return self._outputs.has_unfinished()

    def step(self, timeout: float | None = None) -> list[RequestOutput]:
        """The outputs of the core's next step (waiting up to ``timeout`` seconds for it; [] if none came).

        A request the engine failed comes back finished, with ``finish_reason="error"`` and ``error`` set.
        """
        try:
            core_outputs = self._queue.get_nowait() if isinstance(self.core, InlineCore) else \
                self._queue.get(timeout=timeout)
        except queue.Empty:
            if not isinstance(self.core, InlineCore):
                return []
            if not self.core.has_unfinished():
                if timeout:
                    time.sleep(timeout)  # nothing to compute: wait as the thread's queue would
                return []
            core_outputs = self.core.step()
        processed = self._outputs.process(core_outputs)
        self.core.abort(processed.to_abort)
        return processed.outputs

    def stats(self) -> EngineStats:
        return self.core.stats()

    def call(self, fn):
        """Run ``fn(engine_core)`` between steps where the core runs (checks, resets) and return its result;
        with the core in a process, ``fn`` must pickle (a module-level function)."""
        return self.core.call(fn)

    def shutdown(self) -> None:
        self.core.shutdown()


