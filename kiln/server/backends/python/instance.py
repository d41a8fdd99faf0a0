"""One instance of a Python-backend model: its own process, and the traffic between it and the server.

The server side of each request the process holds is kept here by a key until its final response, so
that responses (from ``execute``'s return value or a response sender, from any thread of the model)
reach the right request, cancellation questions get answers, and a process that dies fails exactly the
requests it held. A dead process is started again, with ``initialize``, by the next ``execute``.
Everything here runs on the server's event loop (the process's messages are read there), so the
bookkeeping needs no lock.

A BLS call from the model (``InferenceRequest(...).exec()``) arrives here as a message and runs through
the server's own ``infer`` (``ModelContext.infer``), like a client's request: admission, scheduling,
statistics and every backend apply; each response goes back to the model as it comes.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any

from kiln.server.backends.base import InstanceSpec, ModelContext, ModelInstance
from kiln.server.backends.python.process import StubProcess
from kiln.server.config import is_decoupled
from kiln.server.core import InferenceRequest, InferenceResponse, RequestedOutput, Tensor
from kiln.server.errors import Code, ServerError
from kiln.server.protocols.proto_json import to_json
from kiln.server.stats import ComputeTimes

log = logging.getLogger("kiln.server")


class PythonInstance(ModelInstance):
    # Seconds unload waits for ``finalize`` and the process to end before killing it.
    finalize_timeout: float = 10.0

    def __init__(self, spec: InstanceSpec, context: ModelContext, model_file: Path):
        super().__init__(spec)
        self.context = context
        self.model_file = model_file
        self.label = f"model '{context.name}' instance '{spec.name}'"
        self.decoupled = is_decoupled(context.config)
        # The next call waits in the process while one runs, so the process does not idle between two calls on
        # the server's loop (the reply read, the next batch taken, its message written); the process still runs
        # them one at a time, in order. Not where a waiting batch could still grow (dynamic batching); the
        # sequence batcher hands none ahead either (its batches come from an instance's free slots).
        self.calls_ahead = 0 if context.config.HasField("dynamic_batching") else 1
        self._args = {
            "model_config": json.dumps(to_json(context.config, defaults=True)),
            "model_instance_kind": spec.kind.upper(), "model_instance_name": spec.name,
            "model_instance_device_id": str(spec.device_id or 0), "model_repository": str(context.model_dir),
            "model_version": str(context.version), "model_name": context.name,
        }
        self._pending: dict[int, InferenceRequest] = {}  # in the process, no final response yet
        self._calls: dict[int, asyncio.Future] = {}  # execute calls waiting for "execute_done"
        self._bls: dict[int, asyncio.Task] = {}  # BLS calls of the model
        self._keys = itertools.count(1)
        self._exits: set[asyncio.Task] = set()  # reporting a process that ended
        self._loop: asyncio.AbstractEventLoop | None = None
        self._process: StubProcess | None = self._spawn()

    # -- the process -----------------------------------------------------------------------------------

    def _spawn(self) -> StubProcess:
        """Start the process and run ``initialize`` (blocking; ``_attach`` then hands it to the loop)."""
        process = StubProcess(self.label)
        message = {"op": "init", "name": self.context.name, "version_dir": str(self.model_file.parent),
                   "model_file": self.model_file.name, "decoupled": self.decoupled, "args": self._args}
        try:
            reply = process.request(message, "init_done")
        except (EOFError, OSError):
            status = process.exit_status()
            process.kill()
            raise ServerError.invalid(
                f"the Python process of {self.label} ended while loading the model ({status})") from None
        if reply["error"] is not None:
            log.error("initialize of %s failed:\n%s", self.label, reply.get("traceback", ""))
            process.stop(self.finalize_timeout)
            raise ServerError.invalid(f"{self.label} failed to initialize: {reply['error']}")
        return process

    async def _attach(self, process: StubProcess) -> None:
        await process.attach(lambda m: self._on_message(process, m), lambda: self._on_exit(process))

    async def _restart(self) -> StubProcess:
        old, self._process = self._process, None
        if old is not None:
            old.close()
        log.warning("starting the Python process of %s again", self.label)
        try:
            process = await self.run_blocking(self._spawn)
        except ServerError as e:
            raise ServerError.unavailable(f"{e.message} (while starting it again after it ended)") from None
        await self._attach(process)
        self._process = process
        return process

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._process is not None:
            await self._attach(self._process)

    async def reclaim(self) -> None:
        """Stop the process: its reader fails every request it held; the next ``execute`` starts it again."""
        process = self._process
        if process is not None and not process.exited:
            log.warning("stopping the Python process of %s: it holds requests that outlived their cancellation",
                        self.label)
            process.reclaim()

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            await process.finish(self.finalize_timeout)

    def close(self) -> None:
        process, self._process = self._process, None
        if process is not None:  # never started on a loop (a load that failed), or not stopped
            process.stop(self.finalize_timeout)
        super().close()

    # -- execute ---------------------------------------------------------------------------------------

    async def execute(self, requests: list[InferenceRequest]) -> ComputeTimes:
        t0 = time.monotonic_ns()
        process, call, done, keys = await self._submit(requests)
        message = {"op": "execute", "call": call, "requests": [
            {"key": key, "id": r.id, "correlation_id": r.parameters.get("sequence_id", 0),
             "inputs": [(name, t.data) for name, t in r.inputs.items()], "outputs": r.output_names + r.state_outputs,
             "parameters": json.dumps(r.parameters), "flags": _sequence_flags(r.parameters)}
            for key, r in zip(keys, requests)]}
        process.send(message)  # a process that died meanwhile is reported by on_exit
        t1 = time.monotonic_ns()
        reply = await done
        t2 = time.monotonic_ns()
        if reply["error"] is not None or not self.decoupled:
            for key in keys:  # these requests are done in the process (or failed by the scheduler)
                self._pending.pop(key, None)
        if reply["error"] is not None:
            log.error("%s\n%s", reply["error"], reply.get("traceback") or "")
            raise ServerError.internal(reply["error"])
        infer_ns = min(reply["infer_ns"], t2 - t1)
        return ComputeTimes(input_ns=t1 - t0, infer_ns=infer_ns, output_ns=t2 - t1 - infer_ns)

    async def _submit(self, requests: list[InferenceRequest]):
        """Register the call and its requests with a live process (started again if it ended)."""
        for _ in range(2):
            process = self._process
            if process is None or process.exited:
                process = await self._restart()
            if process.exited:
                continue  # it died right after it was started
            keys = [next(self._keys) for _ in requests]
            self._pending.update(zip(keys, requests))
            call = next(self._keys)
            done = self._loop.create_future()
            self._calls[call] = done
            return process, call, done, keys
        raise ServerError.unavailable(f"the Python process of {self.label} ended again right after it was started")

    # -- messages from the process (read on the loop) -------------------------------------------------

    def _on_message(self, process: StubProcess, m: dict[str, Any]) -> None:
        op = m["op"]
        if op == "response":
            self._on_response(m)
        elif op == "execute_done":
            for response in m["responses"]:  # what execute returned, sent with its end (one message)
                self._on_response(response)
            done = self._calls.pop(m["call"], None)
            if done is not None:
                _settle(done, m, None)
        elif op == "is_cancelled":
            request = self._pending.get(m["key"])
            # A request the server has finished is as good as cancelled: the model should stop on it.
            process.send({"op": "answer", "id": m["id"], "value": request is None or request.cancelled})
        elif op == "bls":
            self._start_bls(process, m)
        elif op == "bls_cancel":
            running = self._bls.get(m["id"])
            if running is not None:
                running.cancel()
        elif op == "log":
            process.log_line(m)
        elif op == "finalize_done" and m["error"] is not None:
            log.error("finalize of %s failed: %s\n%s", self.label, m["error"], m.get("traceback") or "")

    def _on_response(self, m: dict[str, Any]) -> None:
        request = self._pending.get(m["key"])
        if request is None:
            return  # failed or finished on the server's side already
        if m["final"]:
            del self._pending[m["key"]]
        error = None
        if m["error"] is not None:
            code, message = m["error"]
            error = ServerError(Code.__members__.get(code, Code.INTERNAL), message)
        outputs = dict(m["outputs"]) if m["outputs"] is not None and error is None else None
        try:
            request.respond(outputs, parameters=m["parameters"], error=error, final=m["final"])
        except RuntimeError:
            pass  # the scheduler failed it meanwhile (its execute call ended)

    def _on_exit(self, process: StubProcess) -> None:
        process.exited = True
        pending = list(self._pending.values())
        calls = list(self._calls.values())
        bls = list(self._bls.values())
        self._pending.clear()
        self._calls.clear()
        self._bls.clear()
        for running in bls:
            running.cancel()
        if process.stopping:
            return
        task = self._loop.create_task(self._report_exit(process, pending, calls))
        self._exits.add(task)
        task.add_done_callback(self._exits.discard)

    async def _report_exit(self, process: StubProcess, pending: list[InferenceRequest],
                           calls: list[asyncio.Future]) -> None:
        """Fail what the process held, saying how it ended (waited for off the loop)."""
        status = await asyncio.to_thread(process.exit_status)
        if process.reclaimed:
            message = (f"the Python process of {self.label} was stopped: it held requests that did not end within "
                       "the grace period after their cancellation; it is started again for the next request")
        else:
            message = (f"the Python process of {self.label} ended unexpectedly ({status}); it is started again "
                       "for the next request")
        log.error(message)
        error = ServerError.internal(message)
        for request in pending:
            with contextlib.suppress(RuntimeError):
                request.respond(error=error)
        for done in calls:
            _settle(done, None, error)

    # -- BLS -------------------------------------------------------------------------------------------

    def _start_bls(self, process: StubProcess, m: dict[str, Any]) -> None:
        if self._loop is None or self.context.infer is None:
            process.send(_bls_error(m["id"], ServerError.unavailable(
                f"{self.label} is not served by a running server: it cannot call other models")))
            return
        self._bls[m["id"]] = self._loop.create_task(self._bls_call(process, m))

    async def _bls_call(self, process: StubProcess, m: dict[str, Any]) -> None:
        call_id = m["id"]

        async def relay() -> None:
            inputs = [Tensor(name, datatype, list(array.shape), array) for name, datatype, array in m["inputs"]]
            request = InferenceRequest(m["model"], m["version"], m["request_id"], inputs,
                                       [RequestedOutput(n) for n in m["outputs"]], m["parameters"])
            async with contextlib.aclosing(self.context.infer(request)) as responses:
                async for response in responses:
                    process.send(_bls_reply(call_id, response))

        try:
            timeout = m["timeout_us"] / 1e6 if m["timeout_us"] > 0 else None
            await asyncio.wait_for(relay(), timeout)
        except ServerError as e:
            self._send_quietly(process, _bls_error(call_id, e))
        except asyncio.TimeoutError:
            self._send_quietly(process, _bls_error(call_id, ServerError.unavailable("Request timeout expired")))
        except asyncio.CancelledError:
            if not process.exited:
                self._send_quietly(process, _bls_error(call_id, ServerError(Code.CANCELLED, "request cancelled")))
        except Exception as e:
            log.exception("BLS call of %s to model '%s' failed", self.label, m["model"])
            self._send_quietly(process, _bls_error(call_id, ServerError.internal(f"{type(e).__name__}: {e}")))
        finally:
            self._bls.pop(call_id, None)

    def _send_quietly(self, process: StubProcess, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            process.send(message)


def _settle(done: asyncio.Future, reply: dict[str, Any] | None, error: ServerError | None) -> None:
    if done.done():
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(reply)


def _bls_reply(call_id: int, r: InferenceResponse) -> dict[str, Any]:
    return {"op": "bls_response", "id": call_id, "final": r.final, "empty": r.flag_only,
            "error": None if r.error is None else (r.error.code.name, r.error.message),
            "outputs": [(t.name, t.data) for t in r.outputs], "parameters": r.parameters}


def _bls_error(call_id: int, e: ServerError) -> dict[str, Any]:
    return {"op": "bls_response", "id": call_id, "final": True, "empty": False,
            "error": (e.code.name, e.message), "outputs": [], "parameters": {}}


def _sequence_flags(parameters: dict) -> int:
    """``pb_utils.InferenceRequest.flags()``: TRITONSERVER_REQUEST_FLAG_SEQUENCE_START (1) and _END (2)."""
    return (1 if parameters.get("sequence_start") is True else 0) | (2 if parameters.get("sequence_end") is True else 0)
