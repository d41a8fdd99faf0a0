"""The python backend: Triton-style ``model.py`` files served by ``kiln serve`` and driven by tritonclient
over HTTP and gRPC (sync, async and asyncio clients, gRPC streams), with BLS calls, errors, crashes,
restarts and unloads. One server for the module; every test leaves it serving, and no model process
outlives it."""
from __future__ import annotations

import asyncio
import json
import queue
import time

import numpy as np
import psutil
import pytest
from python_models import build_repository, slow_finalize_model
from server_harness import ServerProcess

pytest.importorskip("onnx")
tritonclient = pytest.importorskip("tritonclient")

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.grpc.aio as grpcaio  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
import tritonclient.http.aio as httpaio  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

CLIENTS = {"http": httpclient, "grpc": grpcclient}
STUB = "kiln_python_stub.py"


@pytest.fixture(scope="module")
def finalize_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("finalized")


class PythonServer(ServerProcess):
    """The server, and the model processes it has started (remembered for the no-orphans check)."""

    seen: set[int]

    def model_processes(self) -> list[psutil.Process]:
        found = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if any(STUB in part for part in child.cmdline()):
                    found.append(child)
                    self.seen.add(child.pid)
            except psutil.NoSuchProcess:
                pass
        return found


@pytest.fixture(scope="module")
def server(tmp_path_factory, finalize_dir):
    root = tmp_path_factory.mktemp("repository")
    build_repository(root, finalize_dir)
    PythonServer.seen = set()
    process = PythonServer(root, "--model-control-mode", "explicit", "--load-model", "*")
    yield process
    process.model_processes()
    assert process.stop() == 0, process.log
    assert process.seen and not [p for p in process.seen if _alive(p)], "model processes outlived the server"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def clients(server):
    made = {"http": httpclient.InferenceServerClient(server.http, concurrency=4),
            "grpc": grpcclient.InferenceServerClient(server.grpc)}
    yield made
    for c in made.values():
        c.close()


def make_inputs(proto: str, arrays: dict[str, np.ndarray], binary: bool = True) -> list:
    module = CLIENTS[proto]
    out = []
    for name, array in arrays.items():
        dtype = {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32", np.dtype(object): "BYTES"}[array.dtype]
        i = module.InferInput(name, list(array.shape), dtype)
        if proto == "http":
            i.set_data_from_numpy(array, binary_data=binary)
        else:
            i.set_data_from_numpy(array)
        out.append(i)
    return out


def add_sub_arrays(batch: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    return {"INPUT0": rng.integers(-50, 50, (batch, 16)).astype(np.float32),
            "INPUT1": rng.integers(-50, 50, (batch, 16)).astype(np.float32)}


def assert_add_sub(result, arrays) -> None:
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), arrays["INPUT0"] + arrays["INPUT1"])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), arrays["INPUT0"] - arrays["INPUT1"])


def info(client, proto: str = "grpc", **kwargs) -> dict:
    result = client.infer("py_info", make_inputs(proto, {"IN": np.array([b"x", "y\u00e9".encode()], dtype=object)}),
                          **kwargs)
    return json.loads(result.as_numpy("INFO")[0]) | {"pid": int(result.as_numpy("PID")[0])}


def faulty(clients, mode: int) -> int:
    result = clients["grpc"].infer("py_faulty", make_inputs("grpc", {"MODE": np.array([mode], dtype=np.int32)}))
    return int(result.as_numpy("PID")[0])


class Stream:
    """A gRPC stream to the decoupled model whose callback results land in a queue."""

    def __init__(self, server):
        self.client = grpcclient.InferenceServerClient(server.grpc)
        self.results: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.results.put((result, error)))

    def send(self, values, request_id: str, delay_ms: int = 0, model: str = "py_repeat") -> None:
        arrays = {"IN": np.array(values, dtype=np.int32), "DELAY_MS": np.array([delay_ms], dtype=np.int32)}
        self.client.async_stream_infer(model, make_inputs("grpc", arrays), request_id=request_id,
                                       enable_empty_final_response=True)

    def next(self, timeout: float = 30):
        result, error = self.results.get(timeout=timeout)
        assert error is None, error
        response = result.get_response()
        return response.id, result, response.parameters["triton_final_response"].bool_param

    def collect(self, request_ids: set[str]) -> dict[str, list]:
        """Every response of these requests, until each has its final flag."""
        got: dict[str, list] = {i: [] for i in request_ids}
        open_ids = set(request_ids)
        while open_ids:
            rid, result, final = self.next()
            got[rid].append(result)
            if final:
                open_ids.discard(rid)
        return got

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def repeat(server, values) -> list[int]:
    stream = Stream(server)
    try:
        stream.send(values, "one")
        results = stream.collect({"one"})["one"]
    finally:
        stream.close()
    assert results[-1].as_numpy("OUT") is None  # the final flag alone
    return [int(r.as_numpy("OUT")[0]) for r in results[:-1]]


def assert_every_model_serves(server, clients) -> None:
    """The other models answer (after a model failed or crashed)."""
    arrays = add_sub_arrays(2)
    for model in ("simple", "py_add_sub"):
        assert_add_sub(clients["grpc"].infer(model, make_inputs("grpc", arrays)), arrays)
    assert info(clients["grpc"])["inputs"] == ["x", "y\u00e9"]
    assert repeat(server, [4, 5]) == [4, 5]


# -- inference ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("proto,binary", [("http", True), ("http", False), ("grpc", True)])
def test_infer_add_sub(clients, proto, binary):
    arrays = add_sub_arrays(batch=3)
    outputs = ([httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("OUTPUT0", "OUTPUT1")]
               if proto == "http" else None)
    result = clients[proto].infer("py_add_sub", make_inputs(proto, arrays, binary), outputs=outputs,
                                  request_id="py-7")
    assert_add_sub(result, arrays)
    response = result.get_response(**({"as_json": True} if proto == "grpc" else {}))
    assert response["id"] == "py-7" and response["model_name"] == "py_add_sub"


def test_async_clients(clients):
    batches = {f"r{b}": add_sub_arrays(batch=b) for b in (1, 2, 3, 4)}
    jobs = {rid: clients["http"].async_infer("py_add_sub", make_inputs("http", a), request_id=rid)
            for rid, a in batches.items()}
    for rid, job in jobs.items():
        assert_add_sub(job.get_result(), batches[rid])

    results: queue.Queue = queue.Queue()
    for rid, arrays in batches.items():
        clients["grpc"].async_infer("py_add_sub", make_inputs("grpc", arrays),
                                    lambda result, error: results.put((result, error)), request_id=rid)
    for _ in batches:
        result, error = results.get(timeout=30)
        assert error is None
        assert_add_sub(result, batches[result.get_response().id])


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_asyncio_clients(server, proto):
    async def run():
        client = httpaio.InferenceServerClient(server.http) if proto == "http" else \
            grpcaio.InferenceServerClient(server.grpc)
        try:
            batches = [add_sub_arrays(batch=b) for b in (1, 2, 5)]
            results = await asyncio.gather(*(client.infer("py_add_sub", make_inputs(proto, a)) for a in batches))
            for arrays, result in zip(batches, results):
                assert_add_sub(result, arrays)
        finally:
            await client.close()

    asyncio.run(run())


def test_dynamic_batching_gives_execute_several_requests(clients):
    batches = {f"r{i}": add_sub_arrays(batch=b) for i, b in enumerate((1, 2, 1))}
    jobs = {rid: clients["http"].async_infer("py_batched", make_inputs("http", a), request_id=rid)
            for rid, a in batches.items()}
    for rid, job in jobs.items():
        assert_add_sub(job.get_result(), batches[rid])
    stats = clients["http"].get_inference_statistics("py_batched")["model_stats"][0]
    assert stats["inference_count"] == 4 and stats["execution_count"] == 1  # three requests, one execute


@pytest.mark.parametrize("proto,binary", [("http", False), ("grpc", True)])
def test_every_datatype_round_trips(clients, proto, binary):
    import ml_dtypes

    rng = np.random.default_rng(5)
    arrays = {f"IN_{name}": rng.integers(0, 100, (2, 3)).astype(dtype) for name, dtype in (
        ("BOOL", np.bool_), ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32),
        ("UINT64", np.uint64), ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32), ("INT64", np.int64),
        ("FP16", np.float16), ("FP32", np.float32), ("FP64", np.float64))}
    arrays["IN_STRING"] = np.array([["", "ascii", "h\u00e9llo"], ["\u65e5\u672c", "a b", "z"]], dtype=object)
    if binary:  # BF16 travels only as binary data
        arrays["IN_BF16"] = rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16)
    module = CLIENTS[proto]
    wire_types = {"STRING": "BYTES"}
    infer_inputs = []
    for name, array in arrays.items():
        kind = name[3:]
        i = module.InferInput(name, list(array.shape), wire_types.get(kind, kind))
        i.set_data_from_numpy(array, **({"binary_data": binary} if proto == "http" else {}))
        infer_inputs.append(i)
    outputs = [module.InferRequestedOutput("OUT_" + n[3:], **({"binary_data": binary} if proto == "http" else {}))
               for n in arrays]
    result = clients[proto].infer("py_identity", infer_inputs, outputs=outputs)
    for name, array in arrays.items():
        got = result.as_numpy("OUT_" + name[3:])
        if name == "IN_STRING":
            assert [x.decode() if isinstance(x, bytes) else x for x in got.reshape(-1)] == list(array.reshape(-1))
        else:
            assert got.dtype == array.dtype and np.array_equal(got, array), name


def test_model_sees_its_args_and_requests(server, clients):
    got = info(clients["grpc"], request_id="info-1", parameters={"temperature": 3, "tag": "t"},
               outputs=[grpcclient.InferRequestedOutput("INFO"), grpcclient.InferRequestedOutput("PID")])
    args = got["args"]
    assert args["model_name"] == "py_info" and args["model_version"] == "1"
    assert args["model_instance_kind"] == "CPU" and args["model_instance_device_id"] == "0"
    assert args["model_instance_name"] in ("py_info_0_0", "py_info_0_1")
    assert args["model_repository"].endswith("/py_info") and got["config_name"] == "py_info"
    assert got["model_dir"] == args["model_repository"] + "/1" and got["model_dir_on_path"]
    assert got["request_id"] == "info-1" and got["parameters"] == {"temperature": 3, "tag": "t"}
    assert got["requested"] == ["INFO", "PID"] and got["inputs"] == ["x", "y\u00e9"] and not got["cancelled"]
    # Two instances, two processes, each a child of the server.
    pids = {p.pid for p in server.model_processes()}
    assert got["pid"] in pids and len(pids) >= 7
    config = clients["http"].get_model_config("py_info")
    assert config["backend"] == "python" and config["instance_group"][0]["count"] == 2
    assert "add_sub ready as py_add_sub_0_0" in server.log  # pb_utils.Logger lines reach the server's log


def test_auto_complete_config(clients):
    config = clients["http"].get_model_config("py_auto")
    assert config["max_batch_size"] == 4 and "dynamic_batching" in config
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [("X", "TYPE_FP32", [-1])]
    assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [("Y", "TYPE_FP32", [-1])]
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    i = grpcclient.InferInput("X", [2, 3], "FP32")
    i.set_data_from_numpy(x)
    np.testing.assert_array_equal(clients["grpc"].infer("py_auto", [i]).as_numpy("Y"), 2 * x)


# -- decoupled ------------------------------------------------------------------------------------------

def test_decoupled_model_streams_many_responses(server):
    stream = Stream(server)
    try:
        stream.send(list(range(100, 140)), "forty")
        stream.send([7, 8, 9], "three", delay_ms=2)
        got = stream.collect({"forty", "three"})
    finally:
        stream.close()
    for rid, values in (("forty", list(range(100, 140))), ("three", [7, 8, 9])):
        *responses, final = got[rid]
        assert [int(r.as_numpy("OUT")[0]) for r in responses] == values
        assert [int(r.as_numpy("IDX")[0]) for r in responses] == list(range(len(values)))
        assert final.as_numpy("OUT") is None


def test_decoupled_async_execute_streams_and_fails_alone(server):
    stream = Stream(server)
    try:
        stream.send(list(range(10)), "ten", model="py_async_repeat")
        stream.send([1, -2, 3], "broken", model="py_async_repeat")
        stream.send([5, 6], "two", model="py_async_repeat")
        got: dict[str, list] = {"ten": [], "broken": [], "two": []}
        errors = []
        open_ids = {"ten", "two"}
        while open_ids or not errors:
            result, error = stream.results.get(timeout=30)
            if error is not None:
                errors.append(str(error))
                continue
            response = result.get_response()
            if response.parameters["triton_final_response"].bool_param:
                open_ids.discard(response.id)
            else:
                got[response.id].append(int(result.as_numpy("OUT")[0]))
    finally:
        stream.close()
    assert got == {"ten": list(range(10)), "broken": [1], "two": [5, 6]}
    assert errors == ["Failed to process the request(s) for model 'py_async_repeat', message: ValueError: "
                      "negative value -2"]


def test_decoupled_cancellation_and_send_after_final(server):
    stream = Stream(server)
    stream.send(list(range(500)), "cancel-me", delay_ms=20)
    rid, first, final = stream.next()
    assert rid == "cancel-me" and int(first.as_numpy("OUT")[0]) == 0 and not final
    stream.close(cancel=True)

    def report() -> dict:
        s = Stream(server)
        try:
            s.send([], "report")
            rid, result, final = s.next()
            assert final
            return json.loads(result.as_numpy("REPORT")[0])
        finally:
            s.close()

    deadline = time.monotonic() + 10
    while "cancel-me" not in (seen := report())["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "cancel-me" in seen["cancelled"]
    assert seen["send_after_final"] == "Unable to send response. Response sender has been closed."


# -- BLS ------------------------------------------------------------------------------------------------

def _successes(clients, model: str) -> int:
    return clients["http"].get_inference_statistics(model)["model_stats"][0]["inference_stats"]["success"]["count"]


def test_large_tensors_travel_through_shared_memory_and_the_socket_when_it_is_full(clients):
    """8 MiB tensors go to the model's process and back through the shared-memory rings (64 MiB a direction):
    the model's input is the ring's memory. A model that keeps its inputs fills its ring; later
    tensors then travel on the socket, with the same answers, until it lets go."""
    client = clients["http"]
    values = np.arange(2 << 20, dtype=np.float32)

    def call(hold: int) -> bool:
        arrays = {"IN": values, "HOLD": np.array([hold], dtype=np.int32)}
        result = client.infer("py_large", make_inputs("http", arrays))
        np.testing.assert_array_equal(result.as_numpy("OUT"), values * 2 + 1)
        return bool(result.as_numpy("IN_SHM")[0])

    assert call(0) and call(0)
    shared = [call(1) for _ in range(10)]  # each kept: 8 fill the ring
    assert shared[:7] == [True] * 7 and not shared[-1], shared
    assert not call(-1)  # still full when it arrives; the model lets go of every kept input
    assert call(0) and call(0)


@pytest.mark.parametrize("target", ["simple", "py_add_sub"])
def test_bls_calls_other_models_through_the_server(clients, target):
    before = _successes(clients, target)
    arrays = add_sub_arrays(batch=2) | {"MODEL": np.array([[target.encode()]] * 2, dtype=object)}
    assert_add_sub(clients["grpc"].infer("py_bls", make_inputs("grpc", arrays)), arrays)
    assert _successes(clients, target) == before + 1  # counted like a client's request


def test_bls_errors_come_back_in_the_response(clients):
    arrays = add_sub_arrays() | {"MODEL": np.array([[b"nowhere"]], dtype=object)}
    with pytest.raises(InferenceServerException, match="BLS to nowhere failed: Request for unknown model: "
                                                       "'nowhere' is not found") as e:
        clients["grpc"].infer("py_bls", make_inputs("grpc", arrays))
    assert e.value.status() == "StatusCode.NOT_FOUND"  # the code the model passed on
    # Validation applies to BLS requests: py_info has no INPUT0.
    arrays["MODEL"] = np.array([[b"py_info"]], dtype=object)
    with pytest.raises(InferenceServerException, match="unexpected inference input 'INPUT0' for model 'py_info'"):
        clients["grpc"].infer("py_bls", make_inputs("grpc", arrays))


def test_async_execute_with_async_and_decoupled_bls(clients):
    arrays = add_sub_arrays(batch=1) | {"N": np.array([[6]], dtype=np.int32)}
    for proto in ("grpc", "http"):
        result = clients[proto].infer("py_bls_async", make_inputs(proto, arrays))
        assert_add_sub(result, arrays)
        assert result.as_numpy("SUM").tolist() == [[21]]  # 1 + ... + 6
        assert result.as_numpy("RESPONSES").tolist() == [[7]]  # six values and the empty final response


# -- errors and crashes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,code,message", [
    (1, "INTERNAL", "Failed to process the request(s) for model 'py_faulty', message: ValueError: bad mode 1"),
    (2, "INTERNAL", "Failed to process the request(s) for model 'py_faulty', message: TritonModelException: "
                    "the model refuses"),
    (3, "NOT_FOUND", "no such thing"),
    (6, "INTERNAL", "Failed to process the request(s) for model 'py_faulty', message: Number of InferenceResponse "
                    "objects do not match the number of InferenceRequest objects. InferenceRequest(s) size is:1, and "
                    "InferenceResponse(s) size is:0"),
])
def test_model_errors_fail_their_request_with_the_message(server, clients, mode, code, message):
    pid = faulty(clients, 0)
    with pytest.raises(InferenceServerException) as e:
        faulty(clients, mode)
    assert e.value.message() == message and e.value.status() == f"StatusCode.{code}"
    assert faulty(clients, 0) == pid  # an exception is not a crash: same process
    with pytest.raises(InferenceServerException, match="bad mode 1") as e:
        clients["http"].infer("py_faulty", make_inputs("http", {"MODE": np.array([1], dtype=np.int32)}))
    assert e.value.status() == "500"


def test_response_sender_in_a_model_that_is_not_decoupled(clients):
    assert faulty(clients, 7) == -faulty(clients, 0)


@pytest.mark.parametrize("mode,how", [(4, "exit code 3"), (5, "killed by signal SIGSEGV")])
def test_crash_fails_its_request_and_the_model_restarts(server, clients, mode, how):
    pid = faulty(clients, 0)
    others = {p.pid for p in server.model_processes()} - {pid}
    with pytest.raises(InferenceServerException) as e:
        faulty(clients, mode)
    assert e.value.message() == (f"the Python process of model 'py_faulty' instance 'py_faulty_0_0' ended "
                                 f"unexpectedly ({how}); it is started again for the next request")
    assert not _alive(pid)
    assert_every_model_serves(server, clients)
    restarted = faulty(clients, 0)
    assert restarted != pid
    assert others <= {p.pid for p in server.model_processes()}  # nobody else was restarted


def test_crash_in_the_middle_of_a_stream(server, clients):
    stream = Stream(server)
    try:
        stream.send([1, 2, -4, 3], "doomed")
        got = []
        while True:
            result, error = stream.results.get(timeout=30)
            if error is not None:
                break
            got.append(int(result.as_numpy("OUT")[0]))
    finally:
        stream.close()
    assert got == [1, 2]
    assert "the Python process of model 'py_repeat' instance 'py_repeat_0_0' ended unexpectedly (exit code 4)" \
        in str(error)
    assert_every_model_serves(server, clients)


def test_a_failed_initialize_fails_only_that_model(clients):
    index = {m["name"]: m for m in clients["http"].get_model_repository_index()}
    assert index["py_bad_init"]["state"] == "UNAVAILABLE"
    assert "failed to initialize: RuntimeError: no weights in " in index["py_bad_init"]["reason"]
    assert all(index[m]["state"] == "READY" for m in ("py_add_sub", "py_info", "py_repeat", "py_bls", "simple"))


# -- unload ---------------------------------------------------------------------------------------------

def test_unload_finalizes_and_ends_the_processes(server, clients, finalize_dir):
    pid = info(clients["grpc"])["pid"]
    before = {p.pid for p in server.model_processes()}
    clients["http"].unload_model("py_info")
    gone = before - {p.pid for p in server.model_processes()}
    assert pid in gone and len(gone) == 2  # both instances
    assert not any(_alive(p) for p in gone)
    written = {f.name: f.read_text() for f in finalize_dir.iterdir()}
    assert sorted(written) == ["py_info_0_0", "py_info_0_1"]
    assert {int(text.split()[1]) for text in written.values()} == gone

    start = time.monotonic()
    clients["http"].load_model("py_info")
    assert time.monotonic() - start < 5  # two processes start, each well under a second here
    assert info(clients["grpc"])["pid"] not in gone
    assert_every_model_serves(server, clients)


def test_unload_kills_a_process_whose_finalize_hangs(tmp_path):
    from kiln.server import config as cfg
    from kiln.server.backends.base import InstanceSpec, ModelContext
    from kiln.server.backends.python import PythonBackend

    version_dir = slow_finalize_model(tmp_path)
    config = cfg.ModelConfig(name="py_slow_finalize", backend="python")
    config.input.add(name="X", data_type=cfg.mc.TYPE_FP32, dims=[1])
    config.output.add(name="Y", data_type=cfg.mc.TYPE_FP32, dims=[1])
    backend = PythonBackend(ModelContext("py_slow_finalize", 1, config, version_dir.parent, version_dir))
    instance = backend.create_instance(InstanceSpec("py_slow_finalize_0", "cpu", None))
    process = psutil.Process(instance._process.proc.pid)
    instance.finalize_timeout = 0.5
    start = time.monotonic()
    instance.close()
    assert time.monotonic() - start < 5 and not _alive(process.pid)


# -- triton_python_backend_utils on its own --------------------------------------------------------------

def test_tensors_dlpack_and_types():
    import ml_dtypes
    import torch

    from kiln.server.backends.python.stub import triton_python_backend_utils as pb_utils

    t = pb_utils.Tensor("X", np.arange(6, dtype=np.float32).reshape(2, 3).T)  # made contiguous
    assert t.as_numpy().flags.c_contiguous and t.shape() == [3, 2] and t.triton_dtype() == 11 and t.is_cpu()
    assert torch.equal(torch.from_dlpack(t), torch.from_numpy(t.as_numpy()))
    assert torch.equal(torch.utils.dlpack.from_dlpack(t.to_dlpack()), torch.from_numpy(t.as_numpy()))
    back = pb_utils.Tensor.from_dlpack("Y", torch.utils.dlpack.to_dlpack(torch.arange(4, dtype=torch.int64)))
    assert back.name() == "Y" and back.as_numpy().tolist() == [0, 1, 2, 3]
    bf16 = pb_utils.Tensor.from_dlpack("B", torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
    assert bf16.as_numpy().dtype == ml_dtypes.bfloat16 and bf16.triton_dtype() == 14
    assert bf16.as_numpy().astype(np.float32).tolist() == [1.5, -2.0]
    text = pb_utils.Tensor("S", np.array(["h\u00e9", "x"]))
    assert text.as_numpy().dtype == np.object_ and text.as_numpy().tolist() == ["h\u00e9".encode(), b"x"]
    with pytest.raises(pb_utils.TritonModelException, match="DLPack does not have support for string tensors"):
        text.to_dlpack()
    with pytest.raises(pb_utils.TritonModelException, match="Tensor name cannot be an empty string"):
        pb_utils.Tensor("", np.zeros(1))
    with pytest.raises(pb_utils.TritonModelException, match="has no Triton data type"):
        pb_utils.Tensor("C", np.zeros(2, dtype=np.complex64))
    data = np.array([b"a", b"", "\u65e5".encode()], dtype=object)
    assert pb_utils.deserialize_bytes_tensor(pb_utils.serialize_byte_tensor(data)).tolist() == data.tolist()
    assert pb_utils.triton_string_to_numpy("TYPE_FP16") is np.float16
    assert pb_utils.numpy_to_triton_type(np.int8) == 6 and pb_utils.triton_to_numpy_type(13) is np.object_


def test_responses_errors_and_requests_check_their_arguments():
    from kiln.server.backends.python.stub import triton_python_backend_utils as pb_utils

    e = pb_utils.TritonError("gone", pb_utils.TritonError.NOT_FOUND)
    assert e.message() == "gone" and e.code() == pb_utils.TritonError.NOT_FOUND == 2
    assert pb_utils.TritonError("x").code() == pb_utils.TritonError.INTERNAL
    r = pb_utils.InferenceResponse(error=e, parameters={"n": 1, "ok": True})
    assert r.has_error() and r.error() is e and json.loads(r.parameters()) == {"n": 1, "ok": True}
    with pytest.raises(pb_utils.TritonModelException, match='"output_tensors" must be a list'):
        pb_utils.InferenceResponse(pb_utils.Tensor("X", np.zeros(1)))
    with pytest.raises(pb_utils.TritonModelException, match="parameters values to have type bool/int/str"):
        pb_utils.InferenceResponse([], parameters={"f": 1.5})
    request = pb_utils.InferenceRequest(model_name="m", inputs=[pb_utils.Tensor("X", np.zeros(1))],
                                        requested_output_names=["Y"], parameters={"a": "b"}, request_id="r")
    assert request.parameters() == '{"a": "b"}' and request.requested_output_names() == ["Y"]
    with pytest.raises(pb_utils.TritonModelException, match="a BLS request has no response sender"):
        request.get_response_sender()
    with pytest.raises(pb_utils.TritonModelException, match="needs a running kiln server"):
        request.exec()
    with pytest.raises(TypeError, match="needs model_name"):
        pb_utils.InferenceRequest(inputs=[], requested_output_names=[])


def test_auto_complete_model_config_rules():
    from kiln.server.backends.python.stub import triton_python_backend_utils as pb_utils

    config = pb_utils.ModelConfig(json.dumps({"name": "m", "max_batch_size": 8, "input": [
        {"name": "A", "data_type": "TYPE_FP32", "dims": [4]}], "output": []}))
    config.add_input({"name": "A", "data_type": "TYPE_FP32", "dims": [4], "optional": True})  # agrees: merged
    config.add_output({"name": "Y", "data_type": "TYPE_INT32", "dims": [-1]})
    config.set_dynamic_batching()
    config.set_model_transaction_policy({"decoupled": True})
    d = config.as_dict()
    assert d["input"] == [{"name": "A", "data_type": "TYPE_FP32", "dims": [4], "optional": True}]
    assert d["output"] == [{"name": "Y", "data_type": "TYPE_INT32", "dims": [-1]}]
    assert d["dynamic_batching"] == {} and d["model_transaction_policy"] == {"decoupled": True}
    with pytest.raises(ValueError, match="configuration expects datatype TYPE_FP32 for input 'A', model provides "
                                         "TYPE_INT8"):
        config.add_input({"name": "A", "data_type": "TYPE_INT8", "dims": [4]})
    with pytest.raises(ValueError, match="the model expects dims \\[5\\] but the model configuration specifies "
                                         "dims \\[4\\]"):
        config.add_input({"name": "A", "data_type": "TYPE_FP32", "dims": [5]})
    with pytest.raises(ValueError, match="is missing 'dims' property"):
        config.add_output({"name": "Z", "data_type": "TYPE_FP32"})
    with pytest.raises(ValueError, match="configuration specified max_batch_size 8, but in auto-complete-config "
                                         "function for model 'm' specified max_batch_size 4"):
        config.set_max_batch_size(4)
    with pytest.raises(ValueError, match="trying to change decoupled property"):
        config.set_model_transaction_policy({"decoupled": False})
