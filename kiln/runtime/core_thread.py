"""Clients of the engine core: ``EngineCoreThread`` steps it in a thread of its own, ``InlineCore`` in
the caller's thread (for a synchronous caller on a CPU, see there).

``EngineCoreThread``: the engine core stepping in a thread of its own (on a CPU also built there),
driven through a command queue.

Callers never touch the core directly: they queue commands (add, abort, a function to run between
steps, stop) and receive each step's outputs through a callback, called on the core thread. The
thread keeps stepping while there is work and sleeps on the queue when there is none, so the
caller's thread (an asyncio loop, or ``LLM.generate``) is free during every forward pass, and the
core never waits on its consumers.

NOTE: the thread holds the core and the callback, never the client object that started it, so a
client that is dropped can be garbage-collected; its finalizer stops the thread (``shutdown``).

NOTE: on a CPU, torch's parallel work runs on GNU OpenMP (libgomp), which keeps a pool of worker
threads for each thread that starts parallel regions. Once it manages more threads than there are
CPUs, its idle workers stop spinning almost at once and every region pays a futex wake-up: a 2-thread
torch.add of 200k floats took 12 us from one thread and 30-70 us from a second thread once the
first had a pool, on the 2-core dev machine. So on a CPU the core is built (weights loaded, CPU
kernels timed) on the thread that steps it, and the caller's thread need not start a pool of its own
(``llm_engine.core_factory`` decides).
"""
from __future__ import annotations

import contextlib
import logging
import queue
import signal
import threading
from concurrent.futures import Future
from typing import Any, Callable, Iterator

from kiln.errors import KilnError
from kiln.runtime.engine_core import EngineCore, EngineCoreOutput, EngineCoreRequest
from kiln.runtime.outputs import EngineStats

log = logging.getLogger(__name__)

OnOutputs = Callable[[list[EngineCoreOutput]], None]

_STOP = object()


class EngineCoreThread:
    def __init__(self, make_core: Callable[[], EngineCore], on_outputs: OnOutputs):
        """Get the core from ``make_core()`` on the new thread (raising here what it raised; on a CPU
        it builds the core there, ``llm_engine.core_factory``), then step it there; ``core`` is it,
        for reading its fixed facts (engine, limits, tokenizer)."""
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._stats = _StatsBox(None)
        built: Future = Future()
        self._thread = threading.Thread(target=_build_and_loop,
                                        args=(make_core, built, self._commands, on_outputs, self._stats),
                                        name="kiln-engine-core", daemon=True)
        self._stopped = False
        self._thread.start()
        try:
            self.core: EngineCore = built.result()
        except BaseException:
            self.shutdown(timeout=0)  # interrupted while it builds: the thread stops once built
            raise
        self.engine = self.core.engine
        self.facts = self.core.facts()

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(("add", request))

    def abort(self, request_ids: list[str]) -> None:
        if request_ids and not self._stopped:
            self._commands.put(("abort", list(request_ids)))

    def call(self, fn: Callable[[EngineCore], Any], timeout: float | None = 60.0) -> Any:
        """Run ``fn(core)`` on the core thread between steps and return its result (or raise its error)."""
        future: Future = Future()
        self._send(("call", (fn, future)))
        return future.result(timeout)

    def stats(self) -> EngineStats:
        """The core's figures after its latest step (never waits for a step)."""
        return self._stats.value

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the thread after the step in flight; every request still in the core is dropped."""
        if not self._stopped:
            self._stopped = True
            self._commands.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _send(self, command: tuple) -> None:
        if self._stopped or not self._thread.is_alive():
            raise KilnError("the engine has been shut down")
        self._commands.put(command)


class _StatsBox:
    __slots__ = ("value",)

    def __init__(self, value: EngineStats):
        self.value = value


def _build_and_loop(make_core: Callable[[], EngineCore], built: Future, commands: queue.SimpleQueue,
                    on_outputs: OnOutputs, stats: _StatsBox) -> None:
    try:
        core = make_core()
        stats.value = core.stats()
    except BaseException as e:
        built.set_exception(e)
        return
    built.set_result(core)
    del make_core
    _loop(core, commands, on_outputs, stats)


def _loop(core: EngineCore, commands: queue.SimpleQueue, on_outputs: OnOutputs, stats: _StatsBox) -> None:
    while True:
        # Block only when idle; otherwise take what has arrived and step.
        try:
            command = commands.get(block=not core.has_unfinished())
        except queue.Empty:
            command = None
        while command is not None:
            if command is _STOP:
                core.abort(core.request_ids())
                return
            errors = _apply(core, command)
            if errors:
                _emit(on_outputs, errors)
            try:
                command = commands.get_nowait()
            except queue.Empty:
                command = None
        if not core.has_unfinished():
            stats.value = core.stats()
            continue
        outputs = safe_step(core)
        stats.value = core.stats()
        if outputs:
            _emit(on_outputs, outputs)


def add_or_error(core: EngineCore, request: EngineCoreRequest) -> list[EngineCoreOutput]:
    """Queue a request; an admission error comes back as its error output (the front end checks first,
    this is the backstop)."""
    try:
        core.add_request(request)
    except Exception as e:
        return [EngineCoreOutput(request.request_id, [], finish_reason="error", error=str(e))]
    return []


def safe_step(core: EngineCore) -> list[EngineCoreOutput]:
    """One step; a broken step (a bug, not one request's fault) fails what is in flight and keeps the
    core usable."""
    try:
        return core.step()
    except Exception as e:
        log.exception("engine step failed; failing every request in flight")
        ids = core.request_ids()
        core.abort(ids)
        return [EngineCoreOutput(rid, [], finish_reason="error", error=f"engine step failed: {type(e).__name__}: {e}")
                for rid in ids]


def _apply(core: EngineCore, command: tuple) -> list[EngineCoreOutput]:
    kind, arg = command
    if kind == "add":
        return add_or_error(core, arg)
    if kind == "abort":
        core.abort(arg)
    elif kind == "call":
        fn, future = arg
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(core))
            except BaseException as e:
                future.set_exception(e)
    return []


def _emit(on_outputs: OnOutputs, outputs: list[EngineCoreOutput]) -> None:
    try:
        on_outputs(outputs)
    except Exception:  # NOTE: a consumer's bug must not stop the core
        log.exception("delivering engine outputs failed")


class InlineCore:
    """The engine core stepped in the caller's thread, by ``step()``: for ``LLMEngine`` on a CPU.

    NOTE: on a CPU the forward pass is torch's OpenMP work, which runs slower on a second thread once
    another has a pool of OpenMP workers (see the module's note; SmolLM2 at batch 8, 146 tokens/s
    against 93 when a core thread stepped what the caller's thread had loaded). A synchronous caller
    waits for every step anyway, so stepping in its thread loses no overlap. SIGINT is held back while a step runs, so Ctrl-C lands between steps
    and the caller can abort its requests from a consistent core.
    """

    def __init__(self, core: EngineCore):
        self.core = core
        self.engine = core.engine
        self.facts = core.facts()
        self._stopped = False

    def add_request(self, request: EngineCoreRequest) -> list[EngineCoreOutput]:
        """Queue a request; an admission error comes back as its error output."""
        self._check()
        return add_or_error(self.core, request)

    def abort(self, request_ids: list[str]) -> None:
        if request_ids and not self._stopped:
            self.core.abort(list(request_ids))

    def call(self, fn: Callable[[EngineCore], Any], timeout: float | None = None) -> Any:
        self._check()
        return fn(self.core)

    def stats(self) -> EngineStats:
        return self.core.stats()

    @property
    def alive(self) -> bool:
        return not self._stopped

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def step(self) -> list[EngineCoreOutput]:
        self._check()
        with _sigint_deferred():
            return safe_step(self.core)

    def shutdown(self, timeout: float = 0.0) -> None:
        if not self._stopped:
            self._stopped = True
            self.core.abort(self.core.request_ids())

    def _check(self) -> None:
        if self._stopped:
            raise KilnError("the engine has been shut down")


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold SIGINT back for the block (a pending one is delivered at its end); a no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
