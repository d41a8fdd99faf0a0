"""Helpers for the server tests: tiny models built with the onnx package and torch.jit, a model
repository writer, and a ``kiln serve`` subprocess on ephemeral ports."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


# -- models ---------------------------------------------------------------------------------------------

def onnx_add_sub(path: Path, elem_type: int | None = None, batch: bool = True, dims: int = 16) -> Path:
    """Triton's "simple" model: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1."""
    from onnx import TensorProto, helper

    elem_type = TensorProto.FLOAT if elem_type is None else elem_type
    shape = [None, dims] if batch else [dims]
    graph = helper.make_graph(
        [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
         helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])], "add_sub",
        [helper.make_tensor_value_info(n, elem_type, shape) for n in ("INPUT0", "INPUT1")],
        [helper.make_tensor_value_info(n, elem_type, shape) for n in ("OUTPUT0", "OUTPUT1")])
    return _save_onnx(graph, path)


def onnx_identity(path: Path, types: dict[str, int], batch: bool = True) -> Path:
    """One Identity per entry: input IN_<name> -> output OUT_<name>, of the given ONNX element type."""
    from onnx import helper

    shape = [None, None] if batch else [None]
    graph = helper.make_graph(
        [helper.make_node("Identity", [f"IN_{n}"], [f"OUT_{n}"]) for n in types], "identity",
        [helper.make_tensor_value_info(f"IN_{n}", t, shape) for n, t in types.items()],
        [helper.make_tensor_value_info(f"OUT_{n}", t, shape) for n, t in types.items()])
    return _save_onnx(graph, path)


def onnx_big_weight(path: Path, elements: int) -> Path:
    """Y = W[X]: a float weight W of ``elements`` values read at run time (so it cannot be folded away),
    a model whose memory an unload must free, with tiny inputs and outputs."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(elements, dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["W", "X"], ["Y"])], "big_weight",
        [helper.make_tensor_value_info("X", TensorProto.INT64, [None, 1])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 1])], initializer=[weight])
    return _save_onnx(graph, path)


def _save_onnx(graph, path: Path) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # what onnxruntime reads, whatever the onnx package writes by default
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _script(module, path: Path) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is what Triton's pytorch backend loads
        torch.jit.script(module).save(str(path))
    return path


def torchscript_add_sub(path: Path) -> Path:
    import torch

    class AddSub(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor):
            return a + b, a - b

    return _script(AddSub(), path)


def torchscript_identity(path: Path) -> Path:
    import torch

    class Identity(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

    return _script(Identity(), path)


def torchscript_fails_on_negative(path: Path) -> Path:
    import torch

    class FailsOnNegative(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool((x < 0).any()):
                raise RuntimeError("negative input")
            return x * 2

    return _script(FailsOnNegative(), path)


def wait_for(predicate, timeout: float = 30.0) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def write_config(model_dir: Path, text: str) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text)


def add_sub_config(name: str, dtype: str = "TYPE_FP32", max_batch_size: int = 8, extra: str = "",
                   backend: str = "onnxruntime", names: tuple[str, ...] = ("INPUT0", "INPUT1", "OUTPUT0", "OUTPUT1")
                   ) -> str:
    i0, i1, o0, o1 = names
    return f"""
name: "{name}"
backend: "{backend}"
max_batch_size: {max_batch_size}
input [ {{ name: "{i0}" data_type: {dtype} dims: [ 16 ] }}, {{ name: "{i1}" data_type: {dtype} dims: [ 16 ] }} ]
output [ {{ name: "{o0}" data_type: {dtype} dims: [ 16 ] }}, {{ name: "{o1}" data_type: {dtype} dims: [ 16 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
{extra}
"""


# -- the server process ---------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """In the child: end it if the test process dies without stopping it (Linux)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ServerProcess:
    """``kiln serve`` in a subprocess on ephemeral ports; ``stop()`` always ends it. ``repository`` None
    leaves ``--model-repository`` out (``args`` then name a model, or none for the default one). The
    constructor returns once the server is ready, or with ``wait_ready=False`` once its ports are up."""

    def __init__(self, repository: Path | None, *args: str, ready_timeout: float = 60.0,
                 env: dict[str, str] | None = None, wait_ready: bool = True):
        where = ["--model-repository", str(repository)] if repository is not None else []
        cmd = [sys.executable, "-m", "kiln.cli.main", "serve", *where,
               "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", *args]
        # The repo first, then whatever path the tests run with (the GPU machine's carried wheels).
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **(env or {}))
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, preexec_fn=_die_with_parent)
        self.lines: list[str] = []
        self._ports: dict[str, str] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self._wait_ready(ready_timeout, wait_ready)
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = re.search(r"Started (GRPCInferenceService|HTTPService|Metrics Service) at (\S+)", line)
            if m:
                self._ports[m.group(1)] = m.group(2)

    def _wait_ready(self, timeout: float, ready: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("kiln serve exited:\n" + self.log)
            if len(self._ports) == 3 and not ready:
                return
            if len(self._ports) == 3:
                try:
                    with urllib.request.urlopen(f"http://{self.http}/v2/health/ready", timeout=2) as r:
                        if r.status == 200:
                            return
                except (urllib.error.URLError, ConnectionError):
                    pass
            time.sleep(0.05)
        raise TimeoutError("kiln serve did not become ready:\n" + self.log)

    @property
    def http(self) -> str:
        return self._ports["HTTPService"]

    @property
    def grpc(self) -> str:
        return self._ports["GRPCInferenceService"]

    @property
    def metrics(self) -> str:
        return self._ports["Metrics Service"]

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        return self.proc.returncode


class InProcessServer:
    """``kiln.server.app.serve`` on its own event loop in a thread, for tests that register their own
    backend or look inside the server. ``stop()`` ends it and unloads every model."""

    def __init__(self, repository: Path, **options):
        import asyncio

        from kiln.server.app import ServeOptions, serve

        opts = ServeOptions(model_repository=repository, http_port=0, grpc_port=0, metrics_port=0, **options)
        self.loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._started = threading.Event()
        self.addresses: dict[str, str] = {}
        self.error: BaseException | None = None

        def started(server, addresses: dict[str, str]) -> None:
            self.addresses = addresses
            self._started.set()

        def run() -> None:
            try:
                self.loop.run_until_complete(serve(opts, self._stop, started))
            except BaseException as e:  # reported by __init__ or stop()
                self.error = e
                self._started.set()
            finally:
                self.loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not self._started.wait(60) or self.error is not None:
            raise RuntimeError(f"the in-process server did not start: {self.error!r}")

    @property
    def http(self) -> str:
        return self.addresses["http"]

    @property
    def grpc(self) -> str:
        return self.addresses["grpc"]

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)
        assert not self._thread.is_alive(), "the in-process server did not stop"
        if self.error is not None:
            raise self.error
