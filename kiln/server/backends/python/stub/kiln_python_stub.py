"""kiln's stub: the process that runs one instance of a Python-backend model (Triton's "stub").

Started by the server as ``python kiln_python_stub.py FD`` (FD: its end of a Unix socket pair), it
imports nothing from kiln: this folder goes first on ``sys.path``, so ``triton_python_backend_utils`` and
the wire format (``kiln_python_wire``) come from here. The main thread runs the model's calls in the
order the server sends them (``init`` or ``auto_complete``, then ``execute`` calls, then ``finalize``),
and reads them off the socket itself while it waits for one (a command handed from a reader thread costs a
thread's wake-up a call). While it runs a call and someone waits for a reply (a BLS call, a cancellation
query, from ``execute`` or a thread of the model's), a reader thread reads instead, queueing the commands it
meets; one thread reads at a time. A watchdog thread ends the process when the server goes away, also while
nobody reads. Coroutine ``execute`` methods run on an asyncio loop in a thread of their own.
"""
from __future__ import annotations

import collections
import importlib.util
import itertools
import json
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
import types
from pathlib import Path
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
if not sys.path or sys.path[0] != _HERE:
    sys.path.insert(0, _HERE)

import kiln_python_wire as wire  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class BlsCall:
    """One call from the model to another model, filled as its responses are read (by whichever thread reads)."""

    def __init__(self, stub: Stub, call_id: int, model: str):
        self.stub = stub
        self.id = call_id
        self.model = model
        self._cond = threading.Condition()
        self._responses: list[pb_utils.InferenceResponse] = []
        self._empty: list[bool] = []  # the response carried only the final flag
        self._done = False
        self._on_change: list = []

    def put(self, message: dict) -> None:
        error = message["error"]
        if error is not None:
            response = pb_utils.InferenceResponse(error=pb_utils.TritonError(error[1], _code(error[0])))
        else:
            response = pb_utils.InferenceResponse(
                [pb_utils.Tensor(n, a) for n, a in message["outputs"]], parameters=message["parameters"])
        with self._cond:
            self._responses.append(response)
            self._empty.append(message["empty"])
            self._done = message["final"]
            callbacks = list(self._on_change)
            self._cond.notify_all()
        if message["final"]:
            self.stub.finished(self.id)
        for callback in callbacks:
            callback()

    def get(self, index: int) -> pb_utils.InferenceResponse | None:
        """Response ``index``, waiting for it; None once the call has no more."""
        with self._cond:
            self._cond.wait_for(lambda: index < len(self._responses) or self._done)
            return self._responses[index] if index < len(self._responses) else None

    def single(self) -> pb_utils.InferenceResponse:
        with self._cond:
            self._cond.wait_for(lambda: self._done)
        return self._one()

    def _one(self) -> pb_utils.InferenceResponse:
        for r in self._responses:
            if r.has_error():
                return r
        full = [r for r, empty in zip(self._responses, self._empty) if not empty]
        if len(full) > 1:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"model '{self.model}' sent {len(full)} responses to a BLS request; read them with "
                "exec(decoupled=True)", pb_utils.TritonError.UNSUPPORTED))
        return full[0] if full else pb_utils.InferenceResponse([])

    def future(self, loop, decoupled: bool):
        """An asyncio future on ``loop``: the response, or (decoupled) an iterator once the first response is in."""
        future = loop.create_future()

        def settle() -> None:
            if future.done():
                return
            if decoupled:
                future.set_result(pb_utils.ResponseIterator(self))
            elif self._done:
                future.set_result(self._one())

        def changed() -> None:
            loop.call_soon_threadsafe(settle)

        with self._cond:
            ready = self._done or (decoupled and self._responses)
            if not ready:
                self._on_change.append(changed)
        if ready:
            settle()
        return future

    def cancel(self) -> None:
        with self._cond:
            if self._done:
                return
        self.stub.conn.send({"op": "bls_cancel", "id": self.id})


def _code(name: str) -> int:
    return getattr(pb_utils.TritonError, name, pb_utils.TritonError.INTERNAL)


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Stub:
    """The model's side of the connection; ``triton_python_backend_utils`` calls it for responses, BLS
    calls, cancellation queries and log lines."""

    def __init__(self, conn: wire.Connection):
        self.conn = conn
        self.waiting: dict[int, Any] = {}  # BLS calls and questions to the server, by id
        # Who reads the socket (one thread at a time), and the commands the reader thread met.
        self._reading = threading.Condition()
        self._main_reads = False
        self._reader_reads = False
        self._commands: collections.deque[dict] = collections.deque()
        self._ids = itertools.count(1)
        self.name = ""
        self.model_dir = ""
        self.decoupled = False
        self.model: Any = None
        self.initialized = False
        self.finalizing = False
        self._aloop = None
        # Responses that execute returned, sent with its execute_done (one message, one wake-up of the server).
        self._returned: list[dict] | None = None

    # -- the process -------------------------------------------------------------------------------------

    def run(self) -> int:
        threading.Thread(target=self._read_for_waiters, name="kiln-stub-reader", daemon=True).start()
        threading.Thread(target=self._watch_hangup, name="kiln-stub-watchdog", daemon=True).start()
        while True:
            message = self._next_command()
            op = message["op"]
            if op == "init":
                if not self._initialize(message):
                    return 1
            elif op == "auto_complete":
                self._auto_complete(message)
                return 0
            elif op == "execute":
                self._execute(message)
            elif op == "finalize":
                self._finalize()
                return 0

    def _next_command(self) -> dict:
        """The next command for the main thread: one the reader thread queued, else read here (replies read
        on the way go to their waiters)."""
        while True:
            with self._reading:
                while not self._commands and self._reader_reads:
                    self._reading.wait()
                if self._commands:
                    return self._commands.popleft()
                self._main_reads = True
            try:
                message = self._recv()
            finally:
                with self._reading:
                    self._main_reads = False
                    if self.waiting:  # the reader thread may read now (else it has nothing to wake for)
                        self._reading.notify_all()
            if not self._deliver_reply(message):
                return message

    def _read_for_waiters(self) -> None:
        """The reader thread: reads while a reply is awaited and the main thread is not reading."""
        while True:
            with self._reading:
                while self._main_reads or not self.waiting:
                    self._reading.wait()
                self._reader_reads = True
            message = None
            try:
                message = self._recv()
            finally:
                with self._reading:
                    self._reader_reads = False
                    if message is not None and not _is_reply(message):
                        self._commands.append(message)
                    self._reading.notify_all()
            if _is_reply(message):
                self._deliver_reply(message)

    def _recv(self) -> dict:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            _exit(0)  # the server is gone: nothing the model does can reach anyone any more

    def _deliver_reply(self, message: dict) -> bool:
        """Hand a reply to its waiter (True), or say the message is no reply (False)."""
        if not _is_reply(message):
            return False
        waiter = self.waiting.get(message["id"])
        if waiter is not None:
            waiter.put(message)
        return True

    def _awaiting(self, key: int, waiter: Any) -> None:
        """Register a waiter for the replies to ``key`` (before its request is sent), so that one reads them."""
        self.waiting[key] = waiter
        with self._reading:
            self._reading.notify_all()

    def _watch_hangup(self) -> None:
        """End the process once the server has closed its end, even while nobody reads the socket (a long call
        with no reply awaited): the socket is watched for the hang-up alone, its data left to the readers."""
        hangup = getattr(select, "POLLRDHUP", 0) | select.POLLHUP
        poller = select.poll()
        poller.register(self.conn.sock.fileno(), hangup)
        while True:
            for _, events in poller.poll():
                if events & (hangup | select.POLLERR | select.POLLNVAL):
                    _exit(0)

    # -- loading -----------------------------------------------------------------------------------------

    def _load(self, message: dict) -> type:
        self.name = message["name"]
        version_dir = Path(message["version_dir"])
        path = version_dir / message["model_file"]
        self.model_dir = str(version_dir)
        self.decoupled = message["decoupled"]
        pb_utils._binding = self
        # As Triton: the version folder and the model folder on sys.path (model.py imports its
        # neighbours), and model.py loaded as "<version>.model" so relative imports work too.
        for folder in (str(version_dir), str(version_dir.parent)):
            if folder not in sys.path:
                sys.path.append(folder)
        if not path.is_file():
            raise FileNotFoundError(f"Python model file not found in '{path}'")
        package = version_dir.name.replace(".", "_")
        if package not in sys.modules:
            module = types.ModuleType(package)
            module.__path__ = [str(version_dir)]
            sys.modules[package] = module
        spec = importlib.util.spec_from_file_location(f"{package}.{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        cls = getattr(module, "TritonPythonModel", None)
        if not isinstance(cls, type):
            raise AttributeError(f"{path} defines no class TritonPythonModel")
        return cls

    def _initialize(self, message: dict) -> bool:
        try:
            self.model = self._load(message)()
            if hasattr(self.model, "initialize"):
                self.model.initialize(message["args"])
            if not hasattr(self.model, "execute"):
                raise AttributeError(f"Python model '{self.name}' does not implement `execute` method.")
        except Exception as e:
            self.conn.send({"op": "init_done", "error": _describe(e), "traceback": traceback.format_exc()})
            return False
        self.initialized = True
        self.conn.send({"op": "init_done", "error": None})
        return True

    def _auto_complete(self, message: dict) -> None:
        try:
            cls = self._load(message)
            config = pb_utils.ModelConfig(message["config"])
            if hasattr(cls, "auto_complete_config"):
                config = cls.auto_complete_config(config)
                if not isinstance(config, pb_utils.ModelConfig):
                    raise TypeError(f"auto_complete_config function in model '{self.name}' must return a valid "
                                    "pb.ModelConfig object.")
            self.conn.send({"op": "auto_complete_done", "config": json.dumps(config.as_dict()), "error": None})
        except Exception as e:
            self.conn.send({"op": "auto_complete_done", "config": None, "error": _describe(e),
                            "traceback": traceback.format_exc()})

    def _finalize(self) -> None:
        self.finalizing = True
        error = tb = None
        try:
            if hasattr(self.model, "finalize"):
                self.model.finalize()
        except Exception as e:
            error, tb = _describe(e), traceback.format_exc()
        self.conn.send({"op": "finalize_done", "error": error, "traceback": tb})

    # -- execute -----------------------------------------------------------------------------------------

    def _execute(self, message: dict) -> None:
        start = time.monotonic_ns()
        returned: list[dict] = []
        requests = [pb_utils.InferenceRequest._from_server(
            r["key"], r["id"], r["correlation_id"], [pb_utils.Tensor(n, a) for n, a in r["inputs"]],
            r["outputs"], r["parameters"], r["flags"], self.decoupled) for r in message["requests"]]
        error = tb = None
        try:
            result = self.model.execute(requests)
            if isinstance(result, types.CoroutineType):
                if self.decoupled:
                    # As Triton: a decoupled coroutine runs on, and execute returns at once.
                    self._in_background(result, requests)
                    result = None
                else:
                    result = self._coroutine_result(result)
        except Exception as e:
            error, tb = _describe(e), traceback.format_exc()
        else:
            self._returned = returned
            try:
                self._send_returned(requests, result)
            except pb_utils.TritonModelException as e:
                error = str(e)  # the backend's own checks: the message alone, as Triton words them
            except Exception as e:
                error, tb = _describe(e), traceback.format_exc()
            finally:
                self._returned = None
        if error is not None:
            error = f"Failed to process the request(s) for model '{self.name}', message: {error}"
            for r in requests:
                r._sender._close()  # the server fails them; nothing more may be sent
        self.conn.send({"op": "execute_done", "call": message["call"], "responses": returned, "error": error,
                        "traceback": tb, "infer_ns": time.monotonic_ns() - start})

    def _send_returned(self, requests: list, result: Any) -> None:
        if result is None:
            return
        if self.decoupled:
            raise pb_utils.TritonModelException(
                f"Python model '{self.name}' is using the decoupled mode and the execute function must return None.")
        if not isinstance(result, list):
            raise pb_utils.TritonModelException(
                f"Expected a list in the execute return, found type '{type(result)}'.")
        if len(result) != len(requests):
            raise pb_utils.TritonModelException(
                "Number of InferenceResponse objects do not match the number of InferenceRequest objects. "
                f"InferenceRequest(s) size is:{len(requests)}, and InferenceResponse(s) size is:{len(result)}")
        for r in result:
            if r is not None and not isinstance(r, pb_utils.InferenceResponse):
                raise pb_utils.TritonModelException(
                    "Expected an 'InferenceResponse' object in the execute function return list, found type "
                    f"'{type(r)}'.")
        for request, response in zip(requests, result):
            if response is not None:
                request._sender.send(response, pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _event_loop(self):
        if self._aloop is None:
            import asyncio

            self._aloop = asyncio.new_event_loop()
            threading.Thread(target=self._aloop.run_forever, name="kiln-stub-asyncio", daemon=True).start()
        return self._aloop

    def _coroutine_result(self, coroutine) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coroutine, self._event_loop()).result()

    def _in_background(self, coroutine, requests: list) -> None:
        import asyncio

        def done(future) -> None:
            e = future.exception() if not future.cancelled() else None
            if e is None:
                return
            message = f"Failed to process the request(s) for model '{self.name}', message: {_describe(e)}"
            self.log("error", "", message + "\n" + "".join(traceback.format_exception(e)))
            for r in requests:
                if r._sender._close():
                    self.conn.send({"op": "response", "key": r._key, "final": True, "outputs": None,
                                    "parameters": None, "error": ("INTERNAL", message)})

        asyncio.run_coroutine_threadsafe(coroutine, self._event_loop()).add_done_callback(done)

    # -- what triton_python_backend_utils calls ----------------------------------------------------------

    def send_response(self, key: int, response: pb_utils.InferenceResponse | None, final: bool,
                      requested: list[str]) -> None:
        message = {"op": "response", "key": key, "final": final, "outputs": None, "parameters": None, "error": None}
        if response is not None:
            if response.has_error():
                e = response.error()
                message["error"] = (e.code().name, e.message())
            else:
                # Only what the request asked for crosses to the server (as Triton prunes outputs).
                message["outputs"] = [(t.name(), t.as_numpy()) for t in response.output_tensors()
                                      if t.name() in requested]
            message["parameters"] = json.loads(response.parameters())
        if self._returned is not None and threading.current_thread() is threading.main_thread():
            self._returned.append(message)
        else:
            self.conn.send(message)

    def is_cancelled(self, key: int) -> bool:
        return bool(self._ask({"op": "is_cancelled", "key": key})["value"])

    def infer(self, request: pb_utils.InferenceRequest) -> BlsCall:
        if not self.initialized or self.finalizing:
            raise pb_utils.TritonModelException("BLS is only supported during the 'execute' function.")
        call_id = next(self._ids)
        call = BlsCall(self, call_id, request._model_name)
        self._awaiting(call_id, call)
        self.conn.send({
            "op": "bls", "id": call_id, "model": request._model_name, "version": request._model_version,
            "request_id": request.request_id(), "correlation_id": request.correlation_id(),
            "inputs": [(t.name(), pb_utils._NAME_OF[t.triton_dtype()], t.as_numpy()) for t in request.inputs()],
            "outputs": request.requested_output_names(), "parameters": json.loads(request.parameters()),
            "timeout_us": request.timeout()})
        return call

    def finished(self, call_id: int) -> None:
        self.waiting.pop(call_id, None)

    def log(self, level: str, where: str, message: str) -> None:
        self.conn.send({"op": "log", "level": level, "where": where, "message": message})

    def _ask(self, message: dict) -> dict:
        answer: queue.SimpleQueue[dict] = queue.SimpleQueue()
        message["id"] = next(self._ids)
        self._awaiting(message["id"], answer)
        try:
            self.conn.send(message)
            return answer.get()
        finally:
            self.waiting.pop(message["id"], None)


def _is_reply(message: dict | None) -> bool:
    return message is not None and message["op"] in ("bls_response", "answer")


def _exit(code: int) -> None:
    # os._exit: threads the model started must not keep its process alive once it is done.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main() -> None:
    # Ctrl-C reaches the whole process group; the server decides when its models stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # argv: the socket's fd; then, when the server gave shared memory, the fds of the ring it writes and the
    # ring this process writes, and their size.
    sock = socket.socket(fileno=int(sys.argv[1]))
    to_here = from_here = None
    if len(sys.argv) == 5:
        to_here, from_here = (wire.Ring(int(fd), int(sys.argv[4])) for fd in sys.argv[2:4])
        to_here.close_fd()
        from_here.close_fd()
    stub = Stub(wire.Connection(sock, send_ring=from_here, recv_ring=to_here))
    _exit(stub.run())


if __name__ == "__main__":
    main()
