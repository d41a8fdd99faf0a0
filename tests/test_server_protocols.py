"""kiln serve driven over HTTP and gRPC by tritonclient, unmodified: one server for the module, one
repository of tiny ONNX and TorchScript models; every test leaves the server serving."""
from __future__ import annotations

import asyncio
import contextlib
import base64
import gzip
import json
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import pytest
from server_harness import (ServerProcess, add_sub_config, onnx_add_sub, onnx_identity, torchscript_add_sub,
                            torchscript_fails_on_negative, torchscript_identity, write_config)

onnx = pytest.importorskip("onnx")
tritonclient = pytest.importorskip("tritonclient")

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.grpc.aio as grpcaio  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
import tritonclient.http.aio as httpaio  # noqa: E402
import tritonclient.utils.shared_memory as shm  # noqa: E402
from onnx import TensorProto  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

PROTOCOLS = ["http", "grpc"]
CLIENTS = {"http": httpclient, "grpc": grpcclient}
ALL_TYPES = {  # name -> (ONNX type, Triton datatype, numpy dtype)
    "BOOL": (TensorProto.BOOL, "BOOL", np.bool_), "INT8": (TensorProto.INT8, "INT8", np.int8),
    "INT16": (TensorProto.INT16, "INT16", np.int16), "INT32": (TensorProto.INT32, "INT32", np.int32),
    "INT64": (TensorProto.INT64, "INT64", np.int64), "UINT8": (TensorProto.UINT8, "UINT8", np.uint8),
    "UINT16": (TensorProto.UINT16, "UINT16", np.uint16), "UINT32": (TensorProto.UINT32, "UINT32", np.uint32),
    "UINT64": (TensorProto.UINT64, "UINT64", np.uint64), "FP16": (TensorProto.FLOAT16, "FP16", np.float16),
    "FP32": (TensorProto.FLOAT, "FP32", np.float32), "FP64": (TensorProto.DOUBLE, "FP64", np.float64),
    "BYTES": (TensorProto.STRING, "BYTES", np.object_),
}


def build_repository(root):
    onnx_add_sub(root / "simple/1/model.onnx")
    write_config(root / "simple", add_sub_config("simple"))
    onnx_add_sub(root / "simple_stats/1/model.onnx")
    write_config(root / "simple_stats", add_sub_config("simple_stats"))
    onnx_add_sub(root / "nobatch/1/model.onnx", TensorProto.INT32, batch=False)
    write_config(root / "nobatch", add_sub_config("nobatch", "TYPE_INT32", max_batch_size=0))
    onnx_add_sub(root / "batched/1/model.onnx")
    write_config(root / "batched", add_sub_config(
        "batched", extra="dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 5000000 }"))
    # No config.pbtxt: the onnxruntime backend completes it from the model.
    onnx_identity(root / "all_types/1/model.onnx", {n: t for n, (t, _, _) in ALL_TYPES.items()})
    onnx_identity(root / "strings/1/model.onnx", {"BYTES": TensorProto.STRING})
    write_config(root / "strings", """
max_batch_size: 8
input [ { name: "IN_BYTES" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "OUT_BYTES" data_type: TYPE_STRING dims: [ -1 ] } ]""")
    onnx_identity(root / "reshaped/1/model.onnx", {"X": TensorProto.FLOAT})
    write_config(root / "reshaped", """
platform: "onnxruntime_onnx"
max_batch_size: 4
input [ { name: "IN_X" data_type: TYPE_FP32 dims: [ 4, 4 ] reshape: { shape: [ 16 ] } } ]
output [ { name: "OUT_X" data_type: TYPE_FP32 dims: [ 2, 8 ] reshape: { shape: [ 16 ] } } ]""")
    onnx_add_sub(root / "classify/1/model.onnx")
    write_config(root / "classify", add_sub_config("classify").replace(
        'name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ]',
        'name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] label_filename: "labels.txt"'))
    (root / "classify/labels.txt").write_text("\n".join(f"class{i}" for i in range(16)))
    torchscript_add_sub(root / "torch_add_sub/1/model.pt")
    write_config(root / "torch_add_sub", add_sub_config(
        "torch_add_sub", backend="pytorch", names=("INPUT__0", "INPUT__1", "OUTPUT__0", "OUTPUT__1")))
    torchscript_identity(root / "torch_bf16/1/model.pt")
    write_config(root / "torch_bf16", """
platform: "pytorch_libtorch"
input [ { name: "INPUT__0" data_type: TYPE_BF16 dims: [ -1 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_BF16 dims: [ -1 ] } ]""")
    torchscript_fails_on_negative(root / "torch_fails/1/model.pt")
    write_config(root / "torch_fails", """
backend: "pytorch"
max_batch_size: 4
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]""")
    torchscript_identity(root / "torch_mistyped/1/model.pt")
    write_config(root / "torch_mistyped", """
backend: "pytorch"
max_batch_size: 4
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP64 dims: [ 2 ] } ]""")
    for v in (1, 2, 3):
        for name in ("versioned", "versioned_all", "versioned_specific"):
            onnx_add_sub(root / f"{name}/{v}/model.onnx")
    write_config(root / "versioned", add_sub_config("versioned", extra="version_policy { latest { num_versions: 2 } }"))
    write_config(root / "versioned_all", add_sub_config("versioned_all", extra="version_policy { all { } }"))
    write_config(root / "versioned_specific", add_sub_config(
        "versioned_specific", extra="version_policy { specific { versions: [ 1, 3 ] } }"))
    write_config(root / "bad_syntax", 'name: "bad_syntax" max_batch_size: 8 input [ { name: "X" ')
    onnx_add_sub(root / "bad_dims/1/model.onnx")
    write_config(root / "bad_dims", add_sub_config("bad_dims").replace("dims: [ 16 ] }, {", "dims: [ 0 ] }, {", 1))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("repository")
    build_repository(root)
    process = ServerProcess(root)
    yield process
    assert process.stop() == 0, process.log


@pytest.fixture(scope="module")
def clients(server):
    made = {"http": httpclient.InferenceServerClient(server.http, concurrency=4),
            "grpc": grpcclient.InferenceServerClient(server.grpc)}
    yield made
    for c in made.values():
        c.close()


def make_inputs(proto: str, arrays: dict[str, np.ndarray], datatypes: dict[str, str] | None = None,
                binary: bool = True) -> list:
    module = CLIENTS[proto]
    inputs = []
    for name, array in arrays.items():
        dtype = (datatypes or {}).get(name) or _triton_dtype(array)
        i = module.InferInput(name, list(array.shape), dtype)
        if proto == "http":
            i.set_data_from_numpy(array, binary_data=binary)
        else:
            i.set_data_from_numpy(array)
        inputs.append(i)
    return inputs


def make_outputs(proto: str, names: list[str], binary: bool = True) -> list:
    if proto == "http":
        return [httpclient.InferRequestedOutput(n, binary_data=binary) for n in names]
    return [grpcclient.InferRequestedOutput(n) for n in names]


def _triton_dtype(array: np.ndarray) -> str:
    if array.dtype == ml_dtypes.bfloat16:
        return "BF16"
    return {np.dtype(d): t for _, t, d in ALL_TYPES.values()}[array.dtype]


def add_sub_arrays(batch: int = 1, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    return {"INPUT0": rng.integers(-50, 50, (batch, 16)).astype(dtype),
            "INPUT1": rng.integers(-50, 50, (batch, 16)).astype(dtype)}


def shm_tensors(module, region_in: str, region_out: str, size: int) -> tuple[list, list]:
    """`simple`'s inputs read from ``region_in`` and its outputs written to ``region_out`` (a [2, 16] FP32 tensor
    each, ``size`` bytes, side by side in each region)."""
    inputs, outputs = [], []
    for k, (i_name, o_name) in enumerate((("INPUT0", "OUTPUT0"), ("INPUT1", "OUTPUT1"))):
        inputs.append(module.InferInput(i_name, [2, 16], "FP32"))
        inputs[-1].set_shared_memory(region_in, size, offset=k * size)
        outputs.append(module.InferRequestedOutput(o_name))
        outputs[-1].set_shared_memory(region_out, size, offset=k * size)
    return inputs, outputs


def assert_add_sub(result, arrays, names=("OUTPUT0", "OUTPUT1")) -> None:
    a, b = arrays.values()
    np.testing.assert_array_equal(result.as_numpy(names[0]), a + b)
    np.testing.assert_array_equal(result.as_numpy(names[1]), a - b)


# -- health, metadata, config -------------------------------------------------------------------------

@pytest.mark.parametrize("proto", PROTOCOLS)
def test_health_and_server_metadata(clients, proto):
    c = clients[proto]
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("simple") and c.is_model_ready("simple", "1")
    assert not c.is_model_ready("simple", "2") and not c.is_model_ready("no_such_model")
    meta = c.get_server_metadata(**({"as_json": True} if proto == "grpc" else {}))
    assert meta["name"] == "kiln"
    assert {"model_repository", "system_shared_memory", "binary_tensor_data", "statistics"} <= set(meta["extensions"])


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_model_metadata_and_config(clients, proto):
    c = clients[proto]
    kw = {"as_json": True} if proto == "grpc" else {}
    meta = c.get_model_metadata("simple", **kw)
    assert meta["name"] == "simple" and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] == [
        ("INPUT0", "FP32", [-1, 16]), ("INPUT1", "FP32", [-1, 16])]
    config = c.get_model_config("simple", **kw)
    config = config["config"] if proto == "grpc" else config
    assert config["name"] == "simple" and config["max_batch_size"] == 8 and config["backend"] == "onnxruntime"
    assert [i["name"] for i in config["input"]] == ["INPUT0", "INPUT1"]
    assert [int(d) for d in config["output"][1]["dims"]] == [16]
    # No batch dimension: the metadata shape is the config dims as they are.
    meta = c.get_model_metadata("nobatch", "1", **kw)
    assert [int(d) for d in meta["inputs"][0]["shape"]] == [16]
    # Completed by the backend from model.onnx: batching (Triton's default 4), dims from the graph.
    config = c.get_model_config("all_types", **kw)
    config = config["config"] if proto == "grpc" else config
    assert config["max_batch_size"] == 4 and config["platform"] == "onnxruntime_onnx"
    assert {i["name"]: i["data_type"] for i in config["input"]}["IN_FP16"] == "TYPE_FP16"
    assert [int(d) for d in config["input"][0]["dims"]] == [-1]
    meta = c.get_model_metadata("torch_add_sub", **kw)
    assert meta["platform"] == "pytorch_libtorch"


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_version_policies(clients, proto):
    c = clients[proto]
    kw = {"as_json": True} if proto == "grpc" else {}
    assert c.get_model_metadata("versioned", **kw)["versions"] == ["2", "3"]  # latest { num_versions: 2 }
    assert c.get_model_metadata("versioned_all", **kw)["versions"] == ["1", "2", "3"]
    assert c.get_model_metadata("versioned_specific", **kw)["versions"] == ["1", "3"]
    assert c.get_model_metadata("versioned", "2", **kw)["versions"] == ["2"]
    assert not c.is_model_ready("versioned", "1") and c.is_model_ready("versioned", "2")
    arrays = add_sub_arrays()
    result = c.infer("versioned", make_inputs(proto, arrays))
    assert result.get_response(**kw)["model_version"] == "3"  # the latest
    result = c.infer("versioned_specific", make_inputs(proto, arrays), model_version="1")
    assert result.get_response(**kw)["model_version"] == "1"
    with pytest.raises(InferenceServerException, match="'versioned' version 1 is not found"):
        c.infer("versioned", make_inputs(proto, arrays), model_version="1")


# -- inference ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("proto,binary", [("http", True), ("http", False), ("grpc", True)])
def test_infer_add_sub(clients, proto, binary):
    arrays = add_sub_arrays(batch=3)
    result = clients[proto].infer("simple", make_inputs(proto, arrays, binary=binary),
                                  outputs=make_outputs(proto, ["OUTPUT0", "OUTPUT1"], binary), request_id="req-7")
    assert_add_sub(result, arrays)
    response = result.get_response(**({"as_json": True} if proto == "grpc" else {}))
    assert response["id"] == "req-7" and response["model_name"] == "simple"


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_infer_only_requested_outputs(clients, proto):
    arrays = add_sub_arrays()
    result = clients[proto].infer("simple", make_inputs(proto, arrays), outputs=make_outputs(proto, ["OUTPUT1"]))
    assert result.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), arrays["INPUT0"] - arrays["INPUT1"])


def test_async_infer_http(clients):
    jobs = [(add_sub_arrays(batch=b), ) for b in (1, 2, 3, 4)]
    pending = [(a, clients["http"].async_infer("simple", make_inputs("http", a))) for (a,) in jobs]
    for arrays, job in pending:
        assert_add_sub(job.get_result(), arrays)


def test_async_infer_grpc(clients):
    loop_results: list = []
    done = __import__("threading").Event()
    batches = (1, 2, 3, 4)

    def callback(result, error):
        loop_results.append((result, error))
        if len(loop_results) == len(batches):
            done.set()

    sent = {}
    for b in batches:
        arrays = add_sub_arrays(batch=b)
        sent[f"r{b}"] = arrays
        clients["grpc"].async_infer("simple", make_inputs("grpc", arrays), callback, request_id=f"r{b}")
    assert done.wait(30)
    for result, error in loop_results:
        assert error is None
        assert_add_sub(result, sent[result.get_response().id])


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_asyncio_clients(server, proto):
    async def run():
        if proto == "http":
            client = httpaio.InferenceServerClient(server.http)
            module = httpclient
        else:
            client = grpcaio.InferenceServerClient(server.grpc)
            module = grpcclient
        try:
            assert await client.is_server_ready()
            batches = [add_sub_arrays(batch=b) for b in (1, 2, 5)]

            async def one(arrays):
                inputs = []
                for name, a in arrays.items():
                    i = module.InferInput(name, list(a.shape), "FP32")
                    i.set_data_from_numpy(a)
                    inputs.append(i)
                return await client.infer("simple", inputs)

            results = await asyncio.gather(*(one(a) for a in batches))
            for arrays, result in zip(batches, results):
                assert_add_sub(result, arrays)
        finally:
            await client.close()

    asyncio.run(run())


@pytest.mark.parametrize("proto,binary", [("http", True), ("http", False), ("grpc", True)])
def test_every_datatype_round_trips(clients, proto, binary):
    rng = np.random.default_rng(3)
    arrays = {}
    for name, (_, _, dtype) in ALL_TYPES.items():
        if dtype is np.object_:
            values = np.array(["", "ascii", "héllo wörld", "日本"] * 2, dtype=object).reshape(2, 4)
        elif dtype is np.bool_:
            values = rng.integers(0, 2, (2, 4)).astype(bool)
        elif np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            values = np.array([[info.min, info.max, 0, 1], [2, 3, info.max - 1, 7]], dtype=dtype)
        else:
            values = rng.standard_normal((2, 4)).astype(dtype)
        arrays[f"IN_{name}"] = values
    c = clients[proto]
    result = c.infer("all_types", make_inputs(proto, arrays, binary=binary),
                     outputs=make_outputs(proto, [f"OUT_{n}" for n in ALL_TYPES], binary))
    for name, (_, _, dtype) in ALL_TYPES.items():
        got = result.as_numpy(f"OUT_{name}")
        want = arrays[f"IN_{name}"]
        if dtype is np.object_ and binary:  # JSON carries BYTES as text, and tritonclient returns it as str
            want = np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(want)
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_bf16_through_torchscript(clients, proto):
    values = np.array([1.0, -2.5, 3.140625, 1e30, -0.0078125], dtype=ml_dtypes.bfloat16)
    result = clients[proto].infer("torch_bf16", make_inputs(proto, {"INPUT__0": values}))
    got = result.as_numpy("OUTPUT__0")
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), values.astype(np.float32))


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_bytes_identity(clients, proto):
    values = np.array([["a", "", "naïve café", "x" * 300]], dtype=object)
    result = clients[proto].infer("strings", make_inputs(proto, {"IN_BYTES": values}))
    assert result.as_numpy("OUT_BYTES").tolist() == [[s.encode() for s in values[0]]]


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_model_without_batch_dimension(clients, proto):
    a = np.arange(16, dtype=np.int32)
    b = np.full(16, 5, dtype=np.int32)
    result = clients[proto].infer("nobatch", make_inputs(proto, {"INPUT0": a, "INPUT1": b}))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    assert list(result.as_numpy("OUTPUT1").shape) == [16]
    with pytest.raises(InferenceServerException, match=r"unexpected shape for input 'INPUT0'.*Expected \[16\]"):
        clients[proto].infer("nobatch", make_inputs(proto, {"INPUT0": a[None], "INPUT1": b[None]}))


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_torchscript_model(clients, proto):
    arrays = {"INPUT__0": add_sub_arrays(2)["INPUT0"], "INPUT__1": add_sub_arrays(2)["INPUT1"]}
    result = clients[proto].infer("torch_add_sub", make_inputs(proto, arrays))
    assert_add_sub(result, arrays, names=("OUTPUT__0", "OUTPUT__1"))


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_reshape(clients, proto):
    x = np.arange(32, dtype=np.float32).reshape(2, 4, 4)
    result = clients[proto].infer("reshaped", make_inputs(proto, {"IN_X": x}))
    np.testing.assert_array_equal(result.as_numpy("OUT_X"), x.reshape(2, 2, 8))


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_classification(clients, proto):
    arrays = add_sub_arrays(batch=2)
    module = CLIENTS[proto]
    output = module.InferRequestedOutput("OUTPUT0", class_count=3)
    result = clients[proto].infer("classify", make_inputs(proto, arrays), outputs=[output])
    got = result.as_numpy("OUTPUT0")
    total = arrays["INPUT0"] + arrays["INPUT1"]
    assert got.shape == (2, 3)
    for row, sums in zip(got, total):
        top = np.argsort(-sums, kind="stable")[:3]
        assert [s.decode() for s in row] == [f"{sums[i]:f}:{i}:class{i}" for i in top]


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_shared_memory_inputs_and_outputs(clients, proto):
    c = clients[proto]
    arrays = add_sub_arrays(batch=2)
    size = arrays["INPUT0"].nbytes
    tag = uuid.uuid4().hex[:8]
    regions = {n: shm.create_shared_memory_region(f"{n}_{tag}", f"/kiln_test_{n}_{tag}", 2 * size)
               for n in ("in", "out")}
    try:
        shm.set_shared_memory_region(regions["in"], [arrays["INPUT0"]])
        shm.set_shared_memory_region(regions["in"], [arrays["INPUT1"]], offset=size)
        for n in regions:
            c.register_system_shared_memory(f"{n}_{tag}", f"/kiln_test_{n}_{tag}", 2 * size)
        status = c.get_system_shared_memory_status(**({"as_json": True} if proto == "grpc" else {}))
        names = [r["name"] for r in status] if proto == "http" else list(status["regions"])
        assert f"in_{tag}" in names and f"out_{tag}" in names
        inputs, outputs = shm_tensors(CLIENTS[proto], f"in_{tag}", f"out_{tag}", size)
        result = c.infer("simple", inputs, outputs=outputs)
        # The response describes the output; the data is in shared memory (as Triton's shm examples read it).
        described = result.get_output("OUTPUT0")
        if proto == "http":
            assert described["shape"] == [2, 16] and "data" not in described and "parameters" not in described
        else:
            assert list(described.shape) == [2, 16] and result.get_response().raw_output_contents[0] == b""
        sums = shm.get_contents_as_numpy(regions["out"], np.float32, [2, 16])
        diffs = shm.get_contents_as_numpy(regions["out"], np.float32, [2, 16], offset=size)
        np.testing.assert_array_equal(sums, arrays["INPUT0"] + arrays["INPUT1"])
        np.testing.assert_array_equal(diffs, arrays["INPUT0"] - arrays["INPUT1"])
    finally:
        for n, handle in regions.items():
            c.unregister_system_shared_memory(f"{n}_{tag}")
            shm.destroy_shared_memory_region(handle)
    status = c.get_system_shared_memory_status(**({"as_json": True} if proto == "grpc" else {}))
    assert not status or not status.get("regions") if proto == "grpc" else status == []


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_cuda_shared_memory_answers_as_triton_with_no_region(clients, proto):
    """With no CUDA region registered: status lists none, unregister is no error (tritonclient's shm examples
    call it to clean up first), a named region is not found; a malformed register request is a 400 that says
    what is wrong, and a name a system region holds is taken (one namespace, as in Triton)."""
    c = clients[proto]
    status = c.get_cuda_shared_memory_status(**({"as_json": True} if proto == "grpc" else {}))
    assert status == [] if proto == "http" else not status.get("regions")
    c.unregister_cuda_shared_memory()
    c.unregister_cuda_shared_memory("never_registered")
    with pytest.raises(InferenceServerException, match="Unable to find cuda shared memory region: 'gone'"):
        c.get_cuda_shared_memory_status("gone")
    handle = base64.b64encode(b"\x00" * 64)
    with pytest.raises(InferenceServerException, match="invalid args") as e:
        c.register_cuda_shared_memory("r", handle, 0, 0)
    assert "400" in str(e.value.status()) or "INVALID_ARGUMENT" in str(e.value.status())
    tag = uuid.uuid4().hex[:8]
    held = shm.create_shared_memory_region(f"held_{tag}", f"/kiln_test_held_{tag}", 64)
    try:
        c.register_system_shared_memory(f"held_{tag}", f"/kiln_test_held_{tag}", 64)
        with pytest.raises(InferenceServerException, match="already in manager"):
            c.register_cuda_shared_memory(f"held_{tag}", handle, 0, 64)
        c.unregister_cuda_shared_memory(f"held_{tag}")  # a system region's name: not this kind's, no error
        assert [r["name"] for r in c.get_system_shared_memory_status()] == [f"held_{tag}"] if proto == "http" \
            else list(c.get_system_shared_memory_status(as_json=True)["regions"]) == [f"held_{tag}"]
    finally:
        c.unregister_system_shared_memory(f"held_{tag}")
        shm.destroy_shared_memory_region(held)
    meta = c.get_server_metadata(**({"as_json": True} if proto == "grpc" else {}))
    assert "cuda_shared_memory" in meta["extensions"]


def test_cuda_shared_memory_register_on_a_machine_without_a_device(clients):
    """Where the server has no CUDA driver or device, registering a handle says so (a 400 over both protocols)."""
    from kiln.server import cuda_ipc

    try:
        cuda_ipc.driver()
    except cuda_ipc.CudaIpcError as e:
        reason = str(e)
    else:
        pytest.skip("this machine has a CUDA device (the GPU test registers real handles)")
    for proto in PROTOCOLS:
        with pytest.raises(InferenceServerException, match="failed to register CUDA shared memory region") as e:
            clients[proto].register_cuda_shared_memory("r", base64.b64encode(b"\x00" * 64), 0, 64)
        assert reason in str(e.value)


def test_cuda_ipc_copies_at_the_region_offset_into_one_buffer(monkeypatch):
    """cuda_ipc.read and write against a stand-in driver whose "device memory" is a host buffer (the copies are
    memmoves): the bytes at the allocation's pointer plus the offset, read into the one buffer it returns, and
    written back at the same place; no driver call for zero bytes."""
    import ctypes

    from kiln.server import cuda_ipc

    calls = []

    class HostDriver:
        @contextlib.contextmanager
        def on_device(self, device_id):
            yield

        def call(self, name, dst, src, size):
            calls.append(name)
            to = dst.value if isinstance(dst, ctypes.c_uint64) else ctypes.addressof(dst)
            ctypes.memmove(to, src.value if isinstance(src, ctypes.c_uint64) else src, size.value)

    device = ctypes.create_string_buffer(bytes(range(64)))
    memory = cuda_ipc.OpenedMemory(0, ctypes.addressof(device), 64)
    monkeypatch.setattr(cuda_ipc, "driver", lambda: HostDriver())
    got = cuda_ipc.read(memory, 10, 6)
    assert got == bytes(range(10, 16)) and isinstance(got, bytearray)
    cuda_ipc.write(memory, 60, b"\xff\xfe")
    assert device.raw[58:64] == bytes([58, 59, 0xFF, 0xFE, 62, 63])
    assert cuda_ipc.read(memory, 3, 0) == b"" and calls == ["cuMemcpyDtoH_v2", "cuMemcpyHtoD_v2"]


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_cuda_shared_memory_inputs_and_outputs(clients, proto):
    """On a GPU: regions made by tritonclient's own CUDA shared memory utilities (cudaMalloc + cudaIpcGetMemHandle
    in this process) carry the inputs and outputs of `simple`, read and written by the server through the IPC
    handles; a region declared larger than its allocation is refused; unregistering closes them."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    try:
        import tritonclient.utils.cuda_shared_memory as cudashm
    except RuntimeError as e:  # tritonclient's own message: it needs cuda-python
        pytest.skip(str(e))
    c = clients[proto]
    arrays = add_sub_arrays(batch=2)
    size = arrays["INPUT0"].nbytes
    tag = uuid.uuid4().hex[:8]
    regions = {n: cudashm.create_shared_memory_region(f"cuda_{n}_{tag}", 2 * size, 0) for n in ("in", "out")}
    try:
        cudashm.set_shared_memory_region(regions["in"], [arrays["INPUT0"], arrays["INPUT1"]])
        with pytest.raises(InferenceServerException, match="exceeds the .* bytes of the allocation"):
            c.register_cuda_shared_memory(f"too_big_{tag}", cudashm.get_raw_handle(regions["in"]), 0, 1 << 30)
        for n, handle in regions.items():
            c.register_cuda_shared_memory(f"cuda_{n}_{tag}", cudashm.get_raw_handle(handle), 0, 2 * size)
        status = c.get_cuda_shared_memory_status(**({"as_json": True} if proto == "grpc" else {}))
        found = {r["name"]: r for r in status} if proto == "http" else status["regions"]
        assert set(found) == {f"cuda_in_{tag}", f"cuda_out_{tag}"}
        assert int(found[f"cuda_in_{tag}"]["byte_size"]) == 2 * size
        inputs, outputs = shm_tensors(CLIENTS[proto], f"cuda_in_{tag}", f"cuda_out_{tag}", size)
        c.infer("simple", inputs, outputs=outputs)
        sums, diffs = cudashm.get_contents_as_numpy(regions["out"], np.float32, [2, 2, 16])  # OUTPUT0, OUTPUT1
        np.testing.assert_array_equal(sums, arrays["INPUT0"] + arrays["INPUT1"])
        np.testing.assert_array_equal(diffs, arrays["INPUT0"] - arrays["INPUT1"])
        c.unregister_cuda_shared_memory(f"cuda_in_{tag}")
        status = c.get_cuda_shared_memory_status(**({"as_json": True} if proto == "grpc" else {}))
        assert [r["name"] for r in status] == [f"cuda_out_{tag}"] if proto == "http" \
            else list(status["regions"]) == [f"cuda_out_{tag}"]
    finally:
        c.unregister_cuda_shared_memory()
        for handle in regions.values():
            cudashm.destroy_shared_memory_region(handle)


def test_dynamic_batching(clients):
    """Four concurrent requests of batch 1 reach the preferred batch size: one execution of 4."""
    batches = [add_sub_arrays(batch=1, dtype=np.float32) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda a: clients["grpc"].infer("batched", make_inputs("grpc", a)), batches))
    for arrays, result in zip(batches, results):
        assert_add_sub(result, arrays)
    stats = clients["http"].get_inference_statistics("batched")["model_stats"][0]
    assert stats["inference_count"] == 4 and stats["execution_count"] == 1
    assert [b["batch_size"] for b in stats["batch_stats"]] == [4]


def test_latency_has_no_delayed_ack_stall(clients):
    """A response written in two segments must not wait for the client's delayed ACK (~40 ms)."""
    import statistics
    import time

    arrays = add_sub_arrays()
    for proto in PROTOCOLS:
        inputs = make_inputs(proto, arrays)
        times = []
        for _ in range(15):
            start = time.perf_counter()
            clients[proto].infer("simple", inputs)
            times.append(time.perf_counter() - start)
        assert statistics.median(times) < 0.02, (proto, times)


# -- statistics and metrics -----------------------------------------------------------------------------

def test_statistics_and_metrics_count_what_was_sent(server, clients):
    sent = {"http": [1, 2, 3], "grpc": [4, 1]}
    for proto, batches in sent.items():
        for b in batches:
            arrays = add_sub_arrays(batch=b)
            assert_add_sub(clients[proto].infer("simple_stats", make_inputs(proto, arrays)), arrays)
    bad = make_inputs("http", {"INPUT0": np.zeros((1, 3), np.float32), "INPUT1": np.zeros((1, 3), np.float32)})
    for _ in range(2):
        with pytest.raises(InferenceServerException):
            clients["http"].infer("simple_stats", bad)
    requests = sum(len(b) for b in sent.values())
    inferences = sum(sum(b) for b in sent.values())

    stats = clients["http"].get_inference_statistics("simple_stats")["model_stats"]
    assert len(stats) == 1 and stats[0]["name"] == "simple_stats" and stats[0]["version"] == "1"
    s = stats[0]
    assert s["inference_stats"]["success"]["count"] == requests
    # Refused at validation (a wrong shape): Triton counts those neither as failures nor in the metrics.
    assert s["inference_stats"]["fail"]["count"] == 0
    assert s["inference_stats"]["queue"]["count"] == requests
    assert s["inference_stats"]["compute_infer"]["count"] == requests
    assert s["inference_count"] == inferences and s["execution_count"] == requests
    assert sorted(b["batch_size"] for b in s["batch_stats"]) == [1, 2, 3, 4]
    g = clients["grpc"].get_inference_statistics("simple_stats", "1").model_stats[0]
    assert g.inference_stats.success.count == requests and g.inference_count == inferences

    with urllib.request.urlopen(f"http://{server.metrics}/metrics") as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        page = r.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(page)}

    def value(family, **labels):
        labels = {"model": "simple_stats", "version": "1", **labels}
        found = [x.value for x in families[family].samples if x.labels == labels]
        assert len(found) == 1, (family, labels, found)
        return found[0]

    assert "nv_inference_request_success{" in page  # Triton's names: counters without a _total suffix
    assert families["nv_inference_request_success"].type == "counter"
    assert value("nv_inference_request_success") == requests
    assert value("nv_inference_request_failure", reason="OTHER") == 0
    assert value("nv_inference_count") == inferences
    assert value("nv_inference_exec_count") == requests
    assert value("nv_inference_pending_request_count") == 0
    assert value("nv_inference_request_duration_us") == s["inference_stats"]["success"]["ns"] // 1000
    assert value("nv_inference_queue_duration_us") == s["inference_stats"]["queue"]["ns"] // 1000
    for stage in ("input", "infer", "output"):
        assert value(f"nv_inference_compute_{stage}_duration_us") == \
            s["inference_stats"][f"compute_{stage}"]["ns"] // 1000
    first = families["nv_inference_first_response_histogram_ms"]
    count = [x.value for x in first.samples if x.name.endswith("_count") and x.labels["model"] == "simple_stats"]
    assert count == [requests]
    assert families["nv_cpu_memory_total_bytes"].samples[0].value > 0
    assert "nv_gpu_utilization" not in families  # no GPU here


# -- errors ---------------------------------------------------------------------------------------------

def _still_serving(clients) -> None:
    for proto in PROTOCOLS:
        arrays = add_sub_arrays()
        assert_add_sub(clients[proto].infer("simple", make_inputs(proto, arrays)), arrays)


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_bad_requests_get_clear_errors(clients, proto):
    c = clients[proto]
    code = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}[proto]
    not_found = {"http": "404", "grpc": "StatusCode.NOT_FOUND"}[proto]
    f32 = np.zeros((1, 16), np.float32)
    cases = [
        ("simple", {"INPUT0": f32.astype(np.float64), "INPUT1": f32}, code,
         "inference input 'INPUT0' data-type is 'FP64', but model 'simple' expects 'FP32'"),
        ("simple", {"INPUT0": np.zeros((1, 8), np.float32), "INPUT1": f32}, code,
         r"unexpected shape for input 'INPUT0' for model 'simple'. Expected \[-1, 16\], got \[1, 8\]"),
        ("simple", {"INPUT0": np.zeros((9, 16), np.float32), "INPUT1": np.zeros((9, 16), np.float32)}, code,
         "inference request batch-size must be <= 8 for 'simple'"),
        ("simple", {"INPUT0": f32}, code, r"expected 2 inputs but got 1 inputs for model 'simple'.*'INPUT1'"),
        ("simple", {"INPUT0": f32, "INPUT1": f32, "EXTRA": f32}, code,
         "unexpected inference input 'EXTRA' for model 'simple'"),
        ("no_such_model", {"INPUT0": f32}, not_found, "Request for unknown model: 'no_such_model' is not found"),
    ]
    for model, arrays, status, message in cases:
        with pytest.raises(InferenceServerException, match=message) as e:
            c.infer(model, make_inputs(proto, arrays))
        assert e.value.status() == status
    with pytest.raises(InferenceServerException, match="'simple' version 7 is not found") as e:
        c.infer("simple", make_inputs(proto, {"INPUT0": f32, "INPUT1": f32}), model_version="7")
    assert e.value.status() == not_found
    with pytest.raises(InferenceServerException, match="unexpected inference output 'NOPE' for model 'simple'"):
        c.infer("simple", make_inputs(proto, {"INPUT0": f32, "INPUT1": f32}), outputs=make_outputs(proto, ["NOPE"]))
    # An unregistered shared-memory region.
    i0, i1 = make_inputs(proto, {"INPUT0": f32, "INPUT1": f32})
    i0.set_shared_memory("never_registered", 64)
    with pytest.raises(InferenceServerException, match="Unable to find shared memory region: 'never_registered'"):
        c.infer("simple", [i0, i1])
    _still_serving(clients)


def test_grpc_model_infer_takes_tritons_one_reserved_parameter(server, clients):
    """perf_analyzer sends triton_enable_empty_final_response on unary ModelInfer too; Triton accepts it (a
    bool) there and refuses any other triton_ key."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    arrays = {"INPUT0": np.arange(16, dtype=np.float32).reshape(1, 16), "INPUT1": np.ones((1, 16), np.float32)}

    def request(**parameters) -> service_pb2.ModelInferRequest:
        r = service_pb2.ModelInferRequest(model_name="simple")
        for name, a in arrays.items():
            t = r.inputs.add(name=name, datatype="FP32")
            t.shape.extend(a.shape)
            r.raw_input_contents.append(a.tobytes())
        for key, value in parameters.items():
            if isinstance(value, bool):
                r.parameters[key].bool_param = value
            else:
                r.parameters[key].string_param = value
        return r

    with grpc.insecure_channel(server.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        reply = stub.ModelInfer(request(triton_enable_empty_final_response=True))
        assert np.array_equal(np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(1, 16),
                              arrays["INPUT0"] + arrays["INPUT1"])
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request(triton_enable_empty_final_response="yes"))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "invalid value type for 'triton_enable_empty_final_response' parameter, expected bool_param" in \
            e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request(triton_something_else=True))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "parameter keys starting with 'triton_' are reserved" in e.value.details()
    _still_serving(clients)


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_model_failures_are_internal_errors_that_name_the_model(clients, proto):
    c = clients[proto]
    internal = {"http": "500", "grpc": "StatusCode.INTERNAL"}[proto]
    with pytest.raises(InferenceServerException,
                       match=r"(?s)model 'torch_fails' \(pytorch\) failed: .*negative input") as e:
        c.infer("torch_fails", make_inputs(proto, {"INPUT__0": np.array([[1.0, -1.0]], np.float32)}))
    assert e.value.status() == internal
    ok = c.infer("torch_fails", make_inputs(proto, {"INPUT__0": np.array([[1.0, 3.0]], np.float32)}))
    np.testing.assert_array_equal(ok.as_numpy("OUTPUT__0"), [[2.0, 6.0]])
    with pytest.raises(InferenceServerException, match="unexpected datatype float32 for inference output "
                       "'OUTPUT__0' of model 'torch_mistyped', expecting TYPE_FP64") as e:
        c.infer("torch_mistyped", make_inputs(proto, {"INPUT__0": np.ones((1, 2), np.float32)}))
    assert e.value.status() == internal
    stats = clients["http"].get_inference_statistics("torch_fails")["model_stats"][0]["inference_stats"]
    assert stats["fail"]["count"] >= 1 and stats["success"]["count"] >= 1
    _still_serving(clients)


def _post(server, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://{server.http}{path}", data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_malformed_http_bodies(server, clients):
    status, body = _post(server, "/v2/models/simple/infer", b'{"inputs": [ {"name": ')
    assert status == 400 and "failed to parse the request JSON" in body["error"]
    status, body = _post(server, "/v2/models/simple/infer", b'[1, 2]')
    assert status == 400 and "must be an object" in body["error"]
    header = json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 64}},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 64}}]}).encode()
    truncated = header + bytes(64) + bytes(10)
    status, body = _post(server, "/v2/models/simple/infer", truncated,
                         {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "unexpected end of binary data for input 'INPUT1'" in body["error"]
    status, body = _post(server, "/v2/models/simple/infer", header + bytes(128),
                         {"Inference-Header-Content-Length": str(len(header) + 500)})
    assert status == 400 and "Inference-Header-Content-Length" in body["error"]
    json_data = json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 15},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}]}).encode()
    status, body = _post(server, "/v2/models/simple/infer", json_data)
    assert status == 400 and "input 'INPUT0' for model 'simple'" in body["error"] and "16" in body["error"]
    status, body = _post(server, "/v2/models/simple/nonsense", b"{}")
    assert status == 404 and body == {"error": "Not Found"}
    _still_serving(clients)


def test_http_compression_and_json_parameters(server, clients):
    doc = {"id": "zip", "parameters": {"custom": 3, "binary_data_output": False}, "inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": list(range(16))},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [1] * 16}]}
    request = urllib.request.Request(
        f"http://{server.http}/v2/models/simple/infer", data=gzip.compress(json.dumps(doc).encode()),
        headers={"Content-Encoding": "gzip", "Accept-Encoding": "gzip"}, method="POST")
    with urllib.request.urlopen(request) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        body = json.loads(gzip.decompress(r.read()))
    assert body["id"] == "zip" and body["model_version"] == "1"
    out = {o["name"]: o for o in body["outputs"]}
    assert out["OUTPUT0"]["data"] == [float(i + 1) for i in range(16)] and out["OUTPUT0"]["shape"] == [1, 16]
    status, body = _post(server, "/v2/models/simple/infer", json.dumps(
        {**doc, "parameters": {"triton_x": 1}}).encode())
    assert status == 400 and "reserved" in body["error"]


def test_invalid_configs_fail_alone(clients):
    index = {m["name"]: m for m in clients["http"].get_model_repository_index()}
    assert index["bad_syntax"]["state"] == "UNAVAILABLE" and "failed to parse" in index["bad_syntax"]["reason"]
    assert index["bad_dims"]["state"] == "UNAVAILABLE"
    assert "dimension must be integer >= 1" in index["bad_dims"]["reason"]
    assert index["simple"]["state"] == "READY" and index["torch_add_sub"]["state"] == "READY"
    g = clients["grpc"].get_model_repository_index(as_json=True)["models"]
    assert {m["name"]: m.get("state") for m in g}["bad_syntax"] == "UNAVAILABLE"
    assert not clients["http"].is_model_ready("bad_dims")
    with pytest.raises(InferenceServerException, match="'bad_dims' is not found.*dimension must be"):
        clients["grpc"].get_model_metadata("bad_dims")


def test_load_refused_without_explicit_control(clients):
    for proto in PROTOCOLS:
        with pytest.raises(InferenceServerException, match="explicit model load / unload is not allowed") as e:
            clients[proto].load_model("simple")
        assert e.value.status() in ("503", "StatusCode.UNAVAILABLE")
        with pytest.raises(InferenceServerException, match="not allowed"):
            clients[proto].unload_model("simple")
    assert clients["http"].is_model_ready("simple")
