"""``EngineCoreProcess``: the engine core in a process of its own, behind the interface of ``EngineCoreThread``.

The front end (tokenizing, detokenizing, stop strings, streaming, the server's event loop) and the core
(scheduling, the forward pass, sampling) then share no interpreter lock: the core steps while the front
end works, and neither waits on the other's Python. Requests go in and each step's outputs come out over
two ZeroMQ sockets (``ipc://`` in a private folder), as msgpack messages (msgspec) of the core's own
request and output types; the outputs of one step travel as one message.

The client binds both sockets and starts ``python -m kiln.runtime.core_process`` with their addresses,
the engine folder, the runtime config and its log level; the process builds the core (weights, KV pool, CUDA graphs on
a GPU), says it is ready with the facts a front end needs (``CoreFacts``), then loops: take every command
that arrived, step while there is work, send the step's outputs and the core's figures.

A core process that dies (killed, out of memory, a crash in a kernel) is noticed by the client's reader
thread within ``POLL_MS``: every request it held ends with an error that says so, and a new process is
started; requests that arrive meanwhile are refused with an error output, not lost. The process stops
when it is told to (SIGINT and SIGTERM it leaves to its client), and by itself when the client's process
is gone.

``call(fn)`` runs ``fn(core)`` in the process between steps, so ``fn`` must pickle: a module-level
function, not a lambda. Tests that poke at the core run it in a thread (``engine_core="thread"``).
"""
from __future__ import annotations

import itertools
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Union

import msgspec
import zmq

from kiln.engine import Engine, read_engine
from kiln.errors import KilnError
from kiln.runtime.config import RuntimeConfig
from kiln.runtime.core_thread import OnOutputs, add_or_error, safe_step
from kiln.runtime.engine_core import CoreFacts, EngineCoreOutput, EngineCoreRequest
from kiln.runtime.outputs import EngineStats

log = logging.getLogger(__name__)

# How often an idle reader checks that the process lives, and an idle process that its client does.
POLL_MS = 200
# How long a new process may take to build the core (an 8B engine's weights, CUDA graphs) before it is given up.
START_TIMEOUT_S = 900.0


# ----- the messages: client -> core -----
class _Add(msgspec.Struct, tag="add", array_like=True):
    request: EngineCoreRequest


class _Abort(msgspec.Struct, tag="abort", array_like=True):
    request_ids: list[str]


class _Call(msgspec.Struct, tag="call", array_like=True):
    call_id: int
    fn: bytes  # pickled


class _Stop(msgspec.Struct, tag="stop", array_like=True):
    pass


# ----- core -> client -----
class _Ready(msgspec.Struct, tag="ready", array_like=True):
    facts: CoreFacts
    stats: EngineStats


class _Failed(msgspec.Struct, tag="failed", array_like=True):
    message: str
    error: bytes  # the exception, pickled when it pickles, else empty


class _Outputs(msgspec.Struct, tag="outputs", array_like=True):
    outputs: list[EngineCoreOutput]
    stats: EngineStats


class _Reply(msgspec.Struct, tag="reply", array_like=True):
    call_id: int
    ok: bool
    value: bytes  # the pickled result, or the pickled exception


_ToCore = Union[_Add, _Abort, _Call, _Stop]
_FromCore = Union[_Ready, _Failed, _Outputs, _Reply]


class EngineCoreProcess:
    def __init__(self, engine: str | Engine, config: RuntimeConfig, on_outputs: OnOutputs):
        """Start the process and wait until its core is built (raising here what the build raised)."""
        self.engine = engine if isinstance(engine, Engine) else read_engine(engine, need_weights=False)
        self._config = config
        self._on_outputs = on_outputs
        self._lock = threading.Lock()  # the input socket, the open requests, the pending calls, the state
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(_FromCore)
        self._dir = tempfile.mkdtemp(prefix="kiln-core-")
        self._context = zmq.Context()
        self._input = self._socket(zmq.PUSH, "in")
        self._output = self._socket(zmq.PULL, "out")
        self._open: set[str] = set()  # request ids the process holds (added, not yet finished or aborted)
        self._calls: dict[int, Future] = {}
        self._call_ids = itertools.count()
        self._stopped = False
        self._ready = False
        self.restarts = 0
        self._process: subprocess.Popen | None = None
        try:
            self.facts, self._stats = self._start()
        except BaseException:
            self._close()
            raise
        self._reader = threading.Thread(target=self._read_loop, name="kiln-core-reader", daemon=True)
        self._reader.start()

    # ----- the client interface (EngineCoreThread's) -----
    def add_request(self, request: EngineCoreRequest) -> None:
        with self._lock:
            if self._stopped:
                raise KilnError("the engine has been shut down")
            if self._ready:
                self._open.add(request.request_id)
                self._input.send(self._encoder.encode(_Add(request)))
                return
        # The process is being restarted: refuse the request as the core would, on its stream.
        self._emit([EngineCoreOutput(request.request_id, [], finish_reason="error",
                                     error="the engine core process is restarting; retry the request")])

    def abort(self, request_ids: list[str]) -> None:
        if not request_ids:
            return
        with self._lock:
            if self._stopped or not self._ready:
                return
            self._open.difference_update(request_ids)
            self._input.send(self._encoder.encode(_Abort(list(request_ids))))

    def call(self, fn: Callable, timeout: float | None = 60.0) -> Any:
        """Run ``fn(core)`` in the process between steps and return its result (or raise its error)."""
        try:
            payload = pickle.dumps(fn)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise KilnError(f"the engine core runs in a process of its own, so call() takes a function that "
                            f"pickles (a module-level function, not a lambda or a closure): {e}") from None
        future: Future = Future()
        with self._lock:
            if self._stopped or not self._ready:
                raise KilnError("the engine has been shut down" if self._stopped else
                                "the engine core process is restarting")
            call_id = next(self._call_ids)
            self._calls[call_id] = future
            self._input.send(self._encoder.encode(_Call(call_id, payload)))
        return future.result(timeout)

    def stats(self) -> EngineStats:
        """The core's figures after its latest step (never waits for a step)."""
        return self._stats

    @property
    def alive(self) -> bool:
        return not self._stopped and self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the process after the step in flight; every request still in it is dropped."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            if self._ready:
                try:
                    self._input.send(self._encoder.encode(_Stop()), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        self._reap(timeout)
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout)
        self._close()

    # ----- the process -----
    def _socket(self, kind: int, name: str) -> zmq.Socket:
        sock = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.bind(f"ipc://{self._dir}/{name}")
        return sock

    def _start(self) -> tuple[CoreFacts, EngineStats]:
        """Start a process and wait for its core; its facts and first figures."""
        env = dict(os.environ)
        # The process imports the kiln this one runs, wherever it was imported from.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "kiln.runtime.core_process", f"ipc://{self._dir}/in", f"ipc://{self._dir}/out",
             str(self.engine.path), msgspec.json.encode(self._config).decode(),
             str(logging.getLogger("kiln").getEffectiveLevel()), str(os.getpid())],
            env=env, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._output.poll(POLL_MS):
                message = self._decoder.decode(self._output.recv())
                if isinstance(message, _Ready):
                    with self._lock:
                        self._ready = True
                    return message.facts, message.stats
                if isinstance(message, _Failed):
                    self._reap(10.0)
                    raise _unpickled(message.error) or KilnError(message.message)
                continue  # a late message of a process that died: not this one's
            code = self._process.poll()
            if code is not None:
                raise KilnError(f"the engine core process exited with code {code} before its core was built "
                                f"(its log is above)")
            if time.monotonic() > deadline:
                self._reap(0)
                raise KilnError(f"the engine core process did not build its core in {START_TIMEOUT_S:.0f} s")

    def _reap(self, timeout: float) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _close(self) -> None:
        self._input.close(0)
        self._output.close(0)
        self._context.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    # ----- the reader thread -----
    def _read_loop(self) -> None:
        while not self._stopped:
            try:
                if self._output.poll(POLL_MS):
                    self._handle(self._decoder.decode(self._output.recv()))
                elif self._process.poll() is not None and not self._stopped:
                    self._restart()
            except zmq.ZMQError:
                if not self._stopped:
                    log.exception("the engine core's output socket failed")
                return
            except Exception:  # NOTE: a bad message must not stop the reader
                log.exception("handling a message of the engine core process failed")

    def _handle(self, message: _FromCore) -> None:
        if isinstance(message, _Outputs):
            self._stats = message.stats
            if message.outputs:
                with self._lock:
                    for out in message.outputs:
                        if out.finish_reason is not None:
                            self._open.discard(out.request_id)
                self._emit(message.outputs)
        elif isinstance(message, _Reply):
            with self._lock:
                future = self._calls.pop(message.call_id, None)
            if future is not None and future.set_running_or_notify_cancel():
                value = pickle.loads(message.value)
                if message.ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    def _restart(self) -> None:
        """The process died: fail what it held, then start another."""
        code = self._process.returncode
        with self._lock:
            self._ready = False
            lost, self._open = sorted(self._open), set()
            calls, self._calls = list(self._calls.values()), {}
        reason = f"the engine core process died (exit code {code}); it is being restarted"
        log.error("%s; %d request(s) failed", reason, len(lost))
        if lost:
            self._emit([EngineCoreOutput(rid, [], finish_reason="error", error=reason) for rid in lost])
        for future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(KilnError(reason))
        if self._stopped:
            return
        try:
            self.facts, self._stats = self._start()
            self.restarts += 1
        except Exception:
            log.exception("the engine core process could not be restarted; the engine is stopped")
            with self._lock:
                self._stopped = True

    def _emit(self, outputs: list[EngineCoreOutput]) -> None:
        try:
            self._on_outputs(outputs)
        except Exception:  # NOTE: a consumer's bug must not stop the reader
            log.exception("delivering engine outputs failed")


def _unpickled(data: bytes) -> BaseException | None:
    try:
        return pickle.loads(data) if data else None
    except Exception:
        return None


def _pickled(value: Any) -> bytes:
    try:
        return pickle.dumps(value)
    except Exception as e:
        if isinstance(value, BaseException):
            return pickle.dumps(KilnError(f"{type(value).__name__}: {value}"))
        return pickle.dumps(KilnError(f"the result of call() does not pickle: {e}"))


# ----- the process's side -----
def serve(input_address: str, output_address: str, engine: str, config: RuntimeConfig, parent: int) -> int:
    """Build the core, then step it for the client at these addresses until told to stop or orphaned (its
    parent is no longer the client's process ``parent``: given by the client, as the client may already be
    gone when this process starts)."""
    from kiln.runtime.engine_core import EngineCore

    # Ctrl-C, and a SIGTERM sent to the whole process group (`timeout`, a shell's job control), are the client's
    # to handle: it stops us. Dying of them would have the client restart us while it shuts down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.getppid() != parent:
        return 0
    context = zmq.Context()
    commands = context.socket(zmq.PULL)
    commands.setsockopt(zmq.RCVHWM, 0)
    commands.connect(input_address)
    results = context.socket(zmq.PUSH)
    results.setsockopt(zmq.SNDHWM, 0)
    results.setsockopt(zmq.LINGER, 5000)
    results.connect(output_address)
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(_ToCore)
    try:
        core = EngineCore(engine, config)
    except BaseException as e:
        log.exception("building the engine core failed")
        results.send(encoder.encode(_Failed(f"{type(e).__name__}: {e}", _pickled(e))))
        results.close()
        context.term()
        return 1
    results.send(encoder.encode(_Ready(core.facts(), core.stats())))
    try:
        while True:
            busy = core.has_unfinished()
            outputs: list[EngineCoreOutput] = []
            received = changed = commands.poll(0 if busy else POLL_MS)
            while received:
                message = decoder.decode(commands.recv())
                if isinstance(message, _Stop):
                    core.abort(core.request_ids())
                    return 0
                if isinstance(message, _Add):
                    outputs += add_or_error(core, message.request)
                elif isinstance(message, _Abort):
                    core.abort(message.request_ids)
                elif isinstance(message, _Call):
                    results.send(encoder.encode(_run_call(core, message)))
                received = commands.poll(0)
            if os.getppid() != parent:  # the client's process is gone
                core.abort(core.request_ids())
                return 0
            if core.has_unfinished():
                outputs += safe_step(core)
            elif not (changed or busy):
                continue
            results.send(encoder.encode(_Outputs(outputs, core.stats())))
    finally:
        results.close()
        commands.close()
        context.term()


def _run_call(core, message: _Call) -> _Reply:
    try:
        return _Reply(message.call_id, True, _pickled(pickle.loads(message.fn)(core)))
    except BaseException as e:
        return _Reply(message.call_id, False, _pickled(e))


def main(argv: list[str]) -> int:
    input_address, output_address, engine, config, level, parent = argv
    # The client's level for kiln's loggers, in the CLI's format (the process writes to the client's stderr).
    logging.basicConfig(level=int(level), format="%(levelname)s %(message)s")
    return serve(input_address, output_address, engine, msgspec.json.decode(config, type=RuntimeConfig),
                 int(parent))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
