"""Python-backend models for the server tests, written as Triton users write them (``model.py`` with
``TritonPythonModel``, ``import triton_python_backend_utils as pb_utils``), and the repository that holds
them next to an ONNX model for BLS calls."""
from __future__ import annotations

from pathlib import Path

from server_harness import add_sub_config, onnx_add_sub, write_config

ADD_SUB = '''
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from add_sub_ops import add_sub  # a neighbour module in the version folder


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.dtype = pb_utils.triton_string_to_numpy(
            pb_utils.get_output_config_by_name(config, "OUTPUT0")["data_type"])
        pb_utils.Logger.log_info(f"add_sub ready as {args['model_instance_name']}")

    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            total, difference = add_sub(a, b)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT0", total.astype(self.dtype)),
                pb_utils.Tensor("OUTPUT1", difference.astype(self.dtype))]))
        return responses
'''

ADD_SUB_OPS = '''
def add_sub(a, b):
    return a + b, a - b
'''

INFO = '''
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.args = args
        config = json.loads(args["model_config"])
        self.finalize_dir = config["parameters"]["FINALIZE_DIR"]["string_value"]

    def execute(self, requests):
        responses = []
        for request in requests:
            info = {
                "args": {k: v for k, v in self.args.items() if k != "model_config"},
                "config_name": json.loads(self.args["model_config"])["name"],
                "request_id": request.request_id(),
                "parameters": json.loads(request.parameters()),
                "requested": request.requested_output_names(),
                "inputs": [x.decode() for x in request.inputs()[0].as_numpy().reshape(-1)],
                "model_dir": pb_utils.get_model_dir(),
                "model_dir_on_path": pb_utils.get_model_dir() in sys.path,
                "cancelled": request.is_cancelled(),
            }
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("INFO", np.array([json.dumps(info)], dtype=np.object_)),
                pb_utils.Tensor("PID", np.array([os.getpid()], dtype=np.int64))]))
        return responses

    def finalize(self):
        path = os.path.join(self.finalize_dir, self.args["model_instance_name"])
        with open(path, "w") as f:
            f.write(f"finalized {os.getpid()}")
'''

REPEAT = '''
import json
import os
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Decoupled: IN [n] -> n responses (OUT = IN[i], IDX = i) from a thread, then the final flag; a
    negative value ends the process. IN empty -> one response whose REPORT says what the model saw
    (cancellations, a send after final)."""

    def initialize(self, args):
        assert pb_utils.using_decoupled_model_transaction_policy(json.loads(args["model_config"]))
        self.report = {"cancelled": [], "send_after_final": None}

    def execute(self, requests):
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            delay = pb_utils.get_input_tensor_by_name(request, "DELAY_MS")
            delay = 0 if delay is None else int(delay.as_numpy()[0]) / 1000
            sender = request.get_response_sender()
            if values.size == 0:
                report = np.array([json.dumps(self.report)], dtype=np.object_)
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("REPORT", report)]),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            threading.Thread(target=self.stream, args=(request.request_id(), sender, values, delay)).start()
        return None

    def stream(self, request_id, sender, values, delay):
        for i, v in enumerate(values):
            time.sleep(delay)
            if v < 0:
                os._exit(-v)  # a crash in the middle of a stream
            if sender.is_cancelled():
                self.report["cancelled"].append(request_id)
                break
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([v], dtype=np.int32)),
                                                    pb_utils.Tensor("IDX", np.array([i], dtype=np.uint32))]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        try:
            sender.send(pb_utils.InferenceResponse([]))
        except pb_utils.TritonModelException as e:
            self.report["send_after_final"] = str(e)
'''

ASYNC_REPEAT = '''
import asyncio

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Decoupled, with an async execute: each request streams IN's values from a coroutine of its own;
    a negative value raises."""

    async def execute(self, requests):
        await asyncio.gather(*(self.stream(r) for r in requests))

    async def stream(self, request):
        sender = request.get_response_sender()
        for v in pb_utils.get_input_tensor_by_name(request, "IN").as_numpy():
            await asyncio.sleep(0.002)
            if v < 0:
                raise ValueError(f"negative value {v}")
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([v], dtype=np.int32))]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
'''

FAULTY = '''
import ctypes
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            mode = int(pb_utils.get_input_tensor_by_name(request, "MODE").as_numpy()[0])
            if mode == 1:
                raise ValueError("bad mode 1")
            if mode == 2:
                raise pb_utils.TritonModelException("the model refuses")
            if mode == 3:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("no such thing", pb_utils.TritonError.NOT_FOUND)))
                continue
            if mode == 4:
                os._exit(3)
            if mode == 5:
                ctypes.string_at(0)  # a segfault
            if mode == 6:
                return []
            if mode == 7:  # the response sender in a model that is not decoupled: one response, final
                request.get_response_sender().send(pb_utils.InferenceResponse([
                    pb_utils.Tensor("PID", np.array([-os.getpid()], dtype=np.int64))]),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                responses.append(None)
                continue
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("PID", np.array([os.getpid()], dtype=np.int64))]))
        return responses
'''

BLS = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Calls the model named by MODEL with INPUT0 and INPUT1 (exec, synchronous) and returns its outputs."""

    def execute(self, requests):
        responses = []
        for request in requests:
            target = pb_utils.get_input_tensor_by_name(request, "MODEL").as_numpy().reshape(-1)[0].decode()
            call = pb_utils.InferenceRequest(
                model_name=target, requested_output_names=["OUTPUT0", "OUTPUT1"],
                inputs=[pb_utils.get_input_tensor_by_name(request, "INPUT0"),
                        pb_utils.get_input_tensor_by_name(request, "INPUT1")])
            response = call.exec()
            if response.has_error():
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"BLS to {target} failed: {response.error().message()}", response.error().code())))
                continue
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT0", pb_utils.get_output_tensor_by_name(response, "OUTPUT0").as_numpy()),
                pb_utils.Tensor("OUTPUT1", pb_utils.get_output_tensor_by_name(response, "OUTPUT1").as_numpy())]))
        return responses
'''

BLS_ASYNC = '''
import asyncio

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """async execute: OUTPUT0 from the ONNX model and OUTPUT1 from the Python add_sub model, called at once
    (async_exec), and the sum and count of the responses of py_repeat streaming N values (exec decoupled)."""

    async def execute(self, requests):
        responses = []
        for request in requests:
            inputs = [pb_utils.get_input_tensor_by_name(request, "INPUT0"),
                      pb_utils.get_input_tensor_by_name(request, "INPUT1")]
            n = int(pb_utils.get_input_tensor_by_name(request, "N").as_numpy().reshape(-1)[0])
            onnx = pb_utils.InferenceRequest(model_name="simple", inputs=inputs, requested_output_names=["OUTPUT0"])
            python = pb_utils.InferenceRequest(model_name="py_add_sub", inputs=inputs,
                                               requested_output_names=["OUTPUT1"])
            stream = pb_utils.InferenceRequest(model_name="py_repeat", requested_output_names=["OUT"],
                                               inputs=[pb_utils.Tensor("IN", np.arange(1, n + 1, dtype=np.int32))])
            onnx_response, python_response, stream_responses = await asyncio.gather(
                onnx.async_exec(), python.async_exec(), stream.async_exec(decoupled=True))
            total = count = 0
            for r in stream_responses:
                if r.has_error():
                    raise pb_utils.TritonModelException(r.error().message())
                count += 1
                out = pb_utils.get_output_tensor_by_name(r, "OUT")
                if out is not None:
                    total += int(out.as_numpy()[0])
            for r in (onnx_response, python_response):
                if r.has_error():
                    raise pb_utils.TritonModelException(r.error().message())
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT0", pb_utils.get_output_tensor_by_name(onnx_response, "OUTPUT0").as_numpy()),
                pb_utils.Tensor("OUTPUT1", pb_utils.get_output_tensor_by_name(python_response, "OUTPUT1").as_numpy()),
                pb_utils.Tensor("SUM", np.array([[total]], dtype=np.int64)),
                pb_utils.Tensor("RESPONSES", np.array([[count]], dtype=np.int64))]))
        return responses
'''

IDENTITY = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """OUT_<type> = IN_<type> for every input given."""

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT_" + t.name()[3:], t.as_numpy())
                                            for t in r.inputs()]) for r in requests]
'''

LARGE = '''
import mmap

import numpy as np
import triton_python_backend_utils as pb_utils


def _in_shared_memory(array):
    base = array  # down the chain of arrays and memoryviews to the memory's owner
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.base if isinstance(base, np.ndarray) else base.obj
    return isinstance(base, mmap.mmap)


class TritonPythonModel:
    """OUT = IN * 2 + 1; IN_SHM: whether IN arrived in shared memory. HOLD 1 keeps the request's input (so
    its memory stays in use), -1 lets go of every input kept."""

    def initialize(self, args):
        self.kept = []

    def execute(self, requests):
        responses = []
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            hold = int(pb_utils.get_input_tensor_by_name(request, "HOLD").as_numpy()[0])
            shared = _in_shared_memory(values)
            if hold == 1:
                self.kept.append(values)
            elif hold == -1:
                self.kept.clear()
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUT", values * 2 + 1), pb_utils.Tensor("IN_SHM", np.array([shared]))]))
        return responses
'''

AUTO = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        auto_complete_model_config.add_input({"name": "X", "data_type": "TYPE_FP32", "dims": [-1]})
        auto_complete_model_config.add_output({"name": "Y", "data_type": "TYPE_FP32", "dims": [-1]})
        auto_complete_model_config.set_max_batch_size(4)
        auto_complete_model_config.set_dynamic_batching()
        return auto_complete_model_config

    def execute(self, requests):
        return [pb_utils.InferenceResponse([
            pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy() * 2)]) for r in requests]
'''

BAD_INIT = '''
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("no weights in " + args["model_repository"])

    def execute(self, requests):
        return []
'''

SLOW_FINALIZE = '''
import time


class TritonPythonModel:
    def execute(self, requests):
        return []

    def finalize(self):
        time.sleep(60)
'''


def _model(root: Path, name: str, source: str, config: str | None, **neighbours: str) -> None:
    version = root / name / "1"
    version.mkdir(parents=True)
    (version / "model.py").write_text(source)
    for filename, text in neighbours.items():
        (version / f"{filename}.py").write_text(text)
    if config is not None:
        write_config(root / name, config)


def build_repository(root: Path, finalize_dir: Path) -> None:
    onnx_add_sub(root / "simple/1/model.onnx")
    write_config(root / "simple", add_sub_config("simple"))
    _model(root, "py_add_sub", ADD_SUB, add_sub_config("py_add_sub", backend="python"), add_sub_ops=ADD_SUB_OPS)
    _model(root, "py_info", INFO, f"""
backend: "python"
input [ {{ name: "IN" data_type: TYPE_STRING dims: [ -1 ] }} ]
output [ {{ name: "INFO" data_type: TYPE_STRING dims: [ 1 ] }}, {{ name: "PID" data_type: TYPE_INT64 dims: [ 1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 2 }} ]
parameters {{ key: "FINALIZE_DIR" value: {{ string_value: "{finalize_dir}" }} }}
""")
    _model(root, "py_repeat", REPEAT, """
backend: "python"
model_transaction_policy { decoupled: true }
input [ { name: "IN" data_type: TYPE_INT32 dims: [ -1 ] },
        { name: "DELAY_MS" data_type: TYPE_INT32 dims: [ 1 ] optional: true } ]
output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] }, { name: "IDX" data_type: TYPE_UINT32 dims: [ 1 ] },
         { name: "REPORT" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
""")
    _model(root, "py_async_repeat", ASYNC_REPEAT, """
backend: "python"
model_transaction_policy { decoupled: true }
input [ { name: "IN" data_type: TYPE_INT32 dims: [ -1 ] },
        { name: "DELAY_MS" data_type: TYPE_INT32 dims: [ 1 ] optional: true } ]
output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
""")
    _model(root, "py_faulty", FAULTY, """
backend: "python"
input [ { name: "MODE" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "PID" data_type: TYPE_INT64 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
""")
    bls_io = """
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] }, { name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] },
        { name: "%s" data_type: %s dims: [ 1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
         { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] } %s ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
    _model(root, "py_bls", BLS, 'backend: "python"\nmax_batch_size: 8\n' + bls_io % ("MODEL", "TYPE_STRING", ""))
    _model(root, "py_bls_async", BLS_ASYNC, 'backend: "python"\nmax_batch_size: 8\n' + bls_io % (
        "N", "TYPE_INT32", ', { name: "SUM" data_type: TYPE_INT64 dims: [ 1 ] }, '
                           '{ name: "RESPONSES" data_type: TYPE_INT64 dims: [ 1 ] }'))
    _model(root, "py_batched", ADD_SUB, add_sub_config(
        "py_batched", backend="python",
        extra="dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 5000000 }"),
        add_sub_ops=ADD_SUB_OPS)
    types = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BF16", "STRING")
    ios = [f'input {{ name: "IN_{t}" data_type: TYPE_{t} dims: [ -1 ] optional: true }}' for t in types]
    ios += [f'output {{ name: "OUT_{t}" data_type: TYPE_{t} dims: [ -1 ] }}' for t in types]
    _model(root, "py_identity", IDENTITY, 'backend: "python"\nmax_batch_size: 8\n' + "\n".join(ios))
    _model(root, "py_large", LARGE, """
backend: "python"
input [ { name: "IN" data_type: TYPE_FP32 dims: [ -1 ] }, { name: "HOLD" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ -1 ] }, { name: "IN_SHM" data_type: TYPE_BOOL dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
""")
    _model(root, "py_auto", AUTO, None)  # no config.pbtxt: auto_complete_config writes it
    _model(root, "py_bad_init", BAD_INIT, 'backend: "python"\n'
           'input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
           'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n')


def slow_finalize_model(root: Path) -> Path:
    """A model whose finalize never ends in time (for the unload kill test); returns its version folder."""
    _model(root, "py_slow_finalize", SLOW_FINALIZE, None)
    return root / "py_slow_finalize" / "1"
