"""``kiln serve`` under attack: each test is one of the findings of the server's security review, sent as
an attacker would send it (with tritonclient, the openai package, raw sockets and raw gRPC), and asserts
the refusal and that the server still serves afterwards, with its resident memory within a stated bound.

One server for the module: explicit model control, an API key, a key of its own for the control plane,
and small limits so the attacks are cheap to send.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
from server_harness import ServerProcess, add_sub_config, onnx_add_sub, onnx_identity, wait_for, write_config

tritonclient = pytest.importorskip("tritonclient")
openai = pytest.importorskip("openai")

import grpc  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
import tritonclient.utils.shared_memory as shm  # noqa: E402
from onnx import TensorProto  # noqa: E402
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

KEY = "sk-attack-test"
ADMIN = "admin-secret"
# tritonclient adds its own headers to the dict it is given: each call gets a copy (dict(AUTH)).
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTROL = {"admin-key": ADMIN}
GRPC_AUTH = {"authorization": f"Bearer {KEY}"}
MAX_REQUEST = 4 * 2**20
HEADER_TIMEOUT = 2.0
GRACE = 1.0
SHM_REGIONS = 8
MAX_CONNECTIONS = 200
# What any one attack may leave the server's resident memory grown by, once it is answered.
RSS_BOUND = 150 * 2**20

HANG = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Decoupled, and broken: one response, then never the final flag, whatever the client does."""

    def execute(self, requests):
        for request in requests:
            request.get_response_sender().send(
                pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([1], dtype=np.int32))]))
        return None
'''

WRONG_SHAPE = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.zeros(3, dtype=np.int32))]) for _ in requests]
'''

SLEEPY = '''
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        time.sleep(1.5)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", pb_utils.get_input_tensor_by_name(r, "IN")
                                                            .as_numpy())]) for r in requests]
'''

EVIL = '''
from pathlib import Path
Path(__file__).with_name("RAN").write_text("outside code ran")


class TritonPythonModel:
    def execute(self, requests):
        return []
'''


def _python_model(root: Path, name: str, source: str, config: str) -> None:
    (root / name / "1").mkdir(parents=True)
    (root / name / "1" / "model.py").write_text(source)
    write_config(root / name, config)


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A folder next to the repository, holding a Python model that must never run."""
    root = tmp_path_factory.mktemp("outside")
    (root / "evil" / "1").mkdir(parents=True)
    (root / "evil" / "1" / "model.py").write_text(EVIL)
    (root / "evil" / "config.pbtxt").write_text('backend: "python"\n')
    (root / "secret.txt").write_text("the operator's secret\n")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, engine_dir, outside):
    root = tmp_path_factory.mktemp("attack-repo")
    onnx_add_sub(root / "simple/1/model.onnx")
    write_config(root / "simple", add_sub_config("simple"))
    onnx_identity(root / "strings/1/model.onnx", {"BYTES": TensorProto.STRING})
    write_config(root / "strings", """
max_batch_size: 8
input [ { name: "IN_BYTES" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "OUT_BYTES" data_type: TYPE_STRING dims: [ -1 ] } ]""")
    onnx_identity(root / "floats/1/model.onnx", {"X": TensorProto.FLOAT, "I": TensorProto.INT32})
    one = 'input [ { name: "IN" data_type: TYPE_INT32 dims: [ 1 ] } ]\n' \
          'output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
    _python_model(root, "hang", HANG, 'backend: "python"\nmodel_transaction_policy { decoupled: true }\n' + one)
    _python_model(root, "wrong_shape", WRONG_SHAPE, 'backend: "python"\n' + one)
    _python_model(root, "sleepy", SLEEPY, 'backend: "python"\n' + one)
    shutil.copytree(engine_dir("llama"), root / "tiny")
    s = ServerProcess(
        root, "--model-control-mode", "explicit", "--load-model", "*", "--api-key", KEY,
        "--restricted-api", f"model-repository,shared-memory:admin-key={ADMIN}",
        "--max-request-size", str(MAX_REQUEST), "--header-timeout", str(HEADER_TIMEOUT), "--idle-timeout", "5",
        "--max-connections", str(MAX_CONNECTIONS), "--shm-max-regions", str(SHM_REGIONS),
        "--cancel-grace", str(GRACE), ready_timeout=180)
    s.process = psutil.Process(s.proc.pid)
    s.baseline_rss = s.process.memory_info().rss
    yield s
    s.stop()


@pytest.fixture
def http(server):
    c = httpclient.InferenceServerClient(server.http)
    yield c
    c.close()


@pytest.fixture
def grpc_client(server):
    c = grpcclient.InferenceServerClient(server.grpc)
    yield c
    c.close()


@pytest.fixture(autouse=True)
def no_tracebacks(server):
    """Client errors are answered, not logged as server faults: no test may add a traceback to the log."""
    before = len(server.lines)
    yield
    added = "\n".join(server.lines[before:])
    assert "Traceback" not in added, added


def simple_inputs(module, a: np.ndarray | None = None):
    a = np.arange(16, dtype=np.float32).reshape(1, 16) if a is None else a
    inputs = [module.InferInput(n, list(a.shape), "FP32") for n in ("INPUT0", "INPUT1")]
    for i in inputs:
        i.set_data_from_numpy(a)
    return inputs, a


def assert_serving(server) -> None:
    """The server answers an inference over both protocols, and its memory is within the bound."""
    for module, address in ((httpclient, server.http), (grpcclient, server.grpc)):
        client = module.InferenceServerClient(address)
        try:
            inputs, a = simple_inputs(module)
            result = client.infer("simple", inputs, headers=dict(AUTH) if module is httpclient else GRPC_AUTH)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * a)
        finally:
            client.close()
    grown = server.process.memory_info().rss - server.baseline_rss
    assert grown < RSS_BOUND, f"resident memory grew by {grown / 2**20:.0f} MiB"


def raw_http(server, head: bytes, body: bytes = b"", read_timeout: float = 10.0) -> tuple[bytes, bool]:
    """Send ``head`` and ``body`` on a socket of its own; what came back, and whether the server closed it."""
    host, port = server.http.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=read_timeout) as sock:
        sock.sendall(head + body)
        data, closed = b"", False
        deadline = time.monotonic() + read_timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:  # closed with what the client sent still unread
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
    return data, closed


def status_of(fn) -> tuple[int, str]:
    try:
        fn()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    return 200, ""


def post(server, path: str, body: bytes, headers: dict | None = None, port: str | None = None):
    request = urllib.request.Request(f"http://{port or server.http}{path}", data=body, method="POST",
                                     headers={**AUTH, **(headers or {})})
    return urllib.request.urlopen(request, timeout=30)


def raw_grpc_infer(server, request: pb.ModelInferRequest) -> grpc.RpcError:
    """The error a ModelInfer request made by hand gets (tritonclient refuses some before sending)."""
    with grpc.insecure_channel(server.grpc) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=pb.ModelInferResponse.FromString)
        with pytest.raises(grpc.RpcError) as e:
            call(request, metadata=list(GRPC_AUTH.items()))
    return e.value


def simple_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="simple", raw_input_contents=[np.ones(16, np.float32).tobytes()] * 2)
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="FP32", shape=[1, 16])
    return request


def grpc_status(fn) -> str:
    with pytest.raises(InferenceServerException) as e:
        fn()
    return e.value.status()


# -- 1. shared memory: only /dev/shm objects, never through a link ----------------------------------------

def test_a_shared_memory_key_that_is_a_symlink_reaches_no_other_file(server, http, grpc_client, outside):
    secret = outside / "secret.txt"
    before = secret.read_bytes()
    key = f"kiln_adv_link_{uuid.uuid4().hex[:8]}"
    os.symlink(secret, f"/dev/shm/{key}")
    try:
        for client, headers in ((http, CONTROL), (grpc_client, CONTROL)):
            with pytest.raises(InferenceServerException, match="symbolic link"):
                client.register_system_shared_memory("adv", f"/{key}", 8, headers=dict(headers))
        for bad in ("/../etc/passwd", "/dev/shm/x", f"/{'a' * 300}", "/a\0b"):
            with pytest.raises(InferenceServerException, match="Unable to open shared memory region"):
                grpc_client.register_system_shared_memory("adv", bad, 8, headers=dict(CONTROL))
        assert http.get_system_shared_memory_status(headers=dict(CONTROL)) == []
    finally:
        os.unlink(f"/dev/shm/{key}")
    assert secret.read_bytes() == before
    assert_serving(server)


# -- 2. model control runs nothing from outside the repository, and not from a web page ---------------------

def test_model_control_cannot_load_or_run_anything_outside_the_repository(server, http, grpc_client, outside):
    marker = outside / "evil" / "1" / "RAN"
    for name in (str(outside / "evil"), "../" + outside.name + "/evil", "..", ".", "a/b", "x\\y"):
        assert grpc_status(lambda: grpc_client.load_model(name, headers=dict(CONTROL))) == "StatusCode.INVALID_ARGUMENT"
    # A config override that names a model file (or an engine) outside the model's folder is refused.
    escape = os.path.relpath(outside / "evil" / "1" / "model.py", Path(server_repo(server)) / "hang" / "1")
    with pytest.raises(InferenceServerException, match="default_model_filename .* must name a file inside"):
        http.load_model("hang", headers=dict(CONTROL), config=json.dumps(
            {"backend": "python", "default_model_filename": escape,
             "model_transaction_policy": {"decoupled": True}}))
    with pytest.raises(InferenceServerException, match="parameter 'engine_dir' .* must name a file inside"):
        http.load_model("tiny", headers=dict(CONTROL), config=json.dumps(
            {"backend": "kiln", "parameters": {"engine_dir": {"string_value": str(outside)}}}))
    assert not marker.exists()
    # A page in the operator's browser: a simple cross-site POST, and a DNS-rebound name, are refused.
    body = json.dumps({"parameters": {}}).encode()
    for origin, host in (("http://evil.example", None), (f"http://evil.example:{server.http.rsplit(':', 1)[1]}",
                                                         f"evil.example:{server.http.rsplit(':', 1)[1]}")):
        headers = {**CONTROL, "Origin": origin, "Content-Type": "text/plain"}
        if host:
            headers["Host"] = host
        code, text = status_of(lambda: post(server, "/v2/repository/models/simple/unload", body, headers))
        assert code == 403 and "cross-origin" in text
    assert http.is_model_ready("simple", headers=dict(AUTH))
    # A config override that Python's JSON reader chokes on is a 400 too.
    for config in ("[" * 100_000 + "]" * 100_000, '{"max_batch_size": 1' + "0" * 5000 + "}"):
        with pytest.raises(InferenceServerException, match="model configuration JSON") as e:
            http.load_model("simple", headers=dict(CONTROL), config=config)
        assert e.value.status() == "400"
    # A load whose body is not JSON is refused, whatever its Content-Type.
    code, text = status_of(lambda: post(server, "/v2/repository/models/simple/load", b"config=x", CONTROL))
    assert code == 400 and "JSON" in text
    assert not marker.exists()
    assert_serving(server)


def server_repo(server) -> str:
    return server.proc.args[server.proc.args.index("--model-repository") + 1]


# -- 3. a shrunk shared-memory region is a 400, not SIGBUS ----------------------------------------------------

def test_a_region_shrunk_after_registering_gives_400(server, http, grpc_client):
    key = f"/kiln_adv_shrink_{uuid.uuid4().hex[:8]}"
    size = 16 * 4
    handle = shm.create_shared_memory_region("shrink_in", key, 2 * size)
    try:
        a = np.arange(16, dtype=np.float32).reshape(1, 16)
        shm.set_shared_memory_region(handle, [a, a])
        http.register_system_shared_memory("shrink", key, 2 * size, headers=dict(CONTROL))
        os.truncate(f"/dev/shm{key}", 0)
        for module, client, headers in ((httpclient, http, AUTH), (grpcclient, grpc_client, GRPC_AUTH)):
            inputs = [module.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
            for k, i in enumerate(inputs):
                i.set_shared_memory("shrink", size, offset=k * size)
            with pytest.raises(InferenceServerException, match="smaller than when it was registered"):
                client.infer("simple", inputs, headers=dict(headers))
            inputs, _ = simple_inputs(module)
            out = module.InferRequestedOutput("OUTPUT0")
            out.set_shared_memory("shrink", size)
            with pytest.raises(InferenceServerException, match="smaller than when it was registered"):
                client.infer("simple", inputs, outputs=[out], headers=dict(headers))
        assert server.proc.poll() is None
    finally:
        http.unregister_system_shared_memory("shrink", headers=dict(CONTROL))
        shm.destroy_shared_memory_region(handle)
    assert_serving(server)


# -- 4. the keys guard every protocol and the control plane ---------------------------------------------------

def test_keys_guard_every_api_on_every_protocol(server, grpc_client):
    bare_http = httpclient.InferenceServerClient(server.http)
    try:
        inputs, _ = simple_inputs(httpclient)
        for call in (lambda: bare_http.infer("simple", inputs), lambda: bare_http.get_model_config("simple"),
                     lambda: bare_http.get_model_metadata("simple"), lambda: bare_http.get_inference_statistics()):
            with pytest.raises(InferenceServerException, match="API key") as e:
                call()
            assert e.value.status() == "401"
        # The control plane takes its own key, not the API key.
        for call in (lambda: bare_http.get_model_repository_index(headers=dict(AUTH)),
                     lambda: bare_http.unload_model("simple", headers=dict(AUTH)),
                     lambda: bare_http.register_system_shared_memory("r", "/r", 8, headers=dict(AUTH)),
                     lambda: bare_http.load_model("simple", headers={"admin-key": "wrong"})):
            with pytest.raises(InferenceServerException, match="restricted, expecting header 'admin-key'") as e:
                call()
            assert e.value.status() == "403"
        assert bare_http.is_server_live() and bare_http.is_server_ready()  # health stays open for probes
    finally:
        bare_http.close()
    inputs, _ = simple_inputs(grpcclient)
    assert grpc_status(lambda: grpc_client.infer("simple", inputs)) == "StatusCode.UNAUTHENTICATED"
    assert grpc_status(lambda: grpc_client.get_model_repository_index(headers=dict(GRPC_AUTH))) \
        == "StatusCode.PERMISSION_DENIED"
    assert grpc_status(lambda: grpc_client.unload_model("simple", headers=dict(GRPC_AUTH))) == "StatusCode.PERMISSION_DENIED"
    assert grpc_client.is_server_live()
    # Generate (the LLM) and the metrics page too.
    code, _ = status_of(lambda: urllib.request.urlopen(urllib.request.Request(
        f"http://{server.http}/v2/models/tiny/generate", data=b'{"text_input": "hi", "max_tokens": 1}')))
    assert code == 401
    code, _ = status_of(lambda: urllib.request.urlopen(f"http://{server.metrics}/metrics"))
    assert code == 401
    with urllib.request.urlopen(urllib.request.Request(f"http://{server.metrics}/metrics", headers=dict(AUTH))) as r:
        assert b"nv_inference_request_success" in r.read()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://{server.http}/v1", api_key="wrong", max_retries=0).models.list()
    assert_serving(server)


# -- 5. body limits, also after decompression -----------------------------------------------------------------

def test_bodies_past_the_limit_are_refused_as_they_arrive(server):
    port = server.http.rsplit(":", 1)[1]
    bomb = gzip.compress(b" " * (256 * 2**20), compresslevel=9)  # 256 KiB that inflates to 256 MiB
    assert len(bomb) < MAX_REQUEST
    code, text = status_of(lambda: post(server, "/v2/models/simple/infer", bomb, {"Content-Encoding": "gzip"}))
    assert code == 413 and "inflates past" in text
    chunked = (f"POST /v2/models/simple/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
               "Transfer-Encoding: chunked\r\n\r\n").encode()
    piece = b"%x\r\n" % 2**20 + b"y" * 2**20 + b"\r\n"
    reply, _ = raw_http(server, chunked, piece * 5)  # no declared length: counted as it arrives
    assert reply.startswith(b"HTTP/1.1 413")
    # A declared length past the limit is refused at once, without waiting for the body; a body that
    # stops arriving gets 408. Either way the connection is closed.
    started = time.monotonic()
    head = (f"POST /v2/models/simple/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Length: 2000000000\r\n\r\n").encode()
    reply, closed = raw_http(server, head, b"\0" * 65536)
    assert reply.startswith(b"HTTP/1.1 413") and closed and time.monotonic() - started < HEADER_TIMEOUT + 6
    head = head.replace(b"2000000000", b"1000")
    reply, closed = raw_http(server, head, b"{}", read_timeout=HEADER_TIMEOUT + 8)
    assert reply.startswith(b"HTTP/1.1 408") and closed
    # A request head past the server's limit (64 KiB): 431 and the connection closed, whether the head
    # came whole or never ends.
    line = f"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    for big in ((line + "X-Filler: " + "a" * 70000 + "\r\n\r\n").encode(), (line + "X-a: b\r\n" * 20000).encode()):
        reply, closed = raw_http(server, big)
        assert reply.startswith(b"HTTP/1.1 431") and b"over the server's limit" in reply and closed
    reply, _ = raw_http(server, (line + "X-Filler: " + "a" * 30000 + "\r\n\r\n").encode())
    assert reply.startswith(b"HTTP/1.1 200")
    # The OpenAI routes share the limit (in their own error shape).
    reply, _ = raw_http(server, head.replace(b"/v2/models/simple/infer", b"/v1/completions").replace(
        b"Content-Length: 1000", f"Content-Length: {32 * 2**20}".encode()), b"x" * 65536)
    assert reply.startswith(b"HTTP/1.1 413")
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"
    assert_serving(server)


# -- 6. a declared shape allocates nothing the bytes do not back ---------------------------------------------

def test_a_huge_declared_bytes_shape_costs_nothing(server, http):
    for count in (100_000_000, 10**12):
        doc = {"inputs": [{"name": "IN_BYTES", "shape": [1, count], "datatype": "BYTES",
                           "parameters": {"binary_data_size": 8}}]}
        head = json.dumps(doc).encode()
        started = time.monotonic()
        code, text = status_of(lambda: post(server, "/v2/models/strings/infer", head + b"\x04\0\0\0abcd",
                                            {"Inference-Header-Content-Length": str(len(head))}))
        assert code == 400 and "unexpected number of string elements 1" in text
        assert time.monotonic() - started < 2
    # Over gRPC too.
    request = pb.ModelInferRequest(model_name="strings", raw_input_contents=[b"\x04\0\0\0abcd"])
    request.inputs.add(name="IN_BYTES", datatype="BYTES", shape=[1, 10**12])
    assert raw_grpc_infer(server, request).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_serving(server)


# -- 7. descriptors: idle connections, slow headers, shared-memory registrations ---------------------------

def test_idle_and_slow_connections_and_registrations_cannot_exhaust_descriptors(server, http):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2500:
        pytest.skip(f"this process may open only {hard} files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(4096, hard)), hard))
    host, port = server.http.rsplit(":", 1)
    idle = []
    try:
        for _ in range(2000):
            idle.append(socket.create_connection((host, int(port)), timeout=5))
        # The server holds no more than its limit (it closes the others as it accepts them, well before the
        # head timeout), and closes the idle ones after the head timeout.
        assert wait_for(lambda: server.process.num_fds() < MAX_CONNECTIONS + 150, HEADER_TIMEOUT / 2)
        slow = socket.create_connection((host, int(port)), timeout=5)
        idle.append(slow)
        time.sleep(HEADER_TIMEOUT + 1.5)
        closed = 0
        for s in idle[:-1]:
            s.settimeout(0.01)
            try:
                closed += s.recv(1) == b""
            except (socket.timeout, ConnectionResetError):
                closed += isinstance(s, socket.socket) and False
        assert closed >= 1900
    finally:
        for s in idle:
            s.close()
    def trickled_until_cut(s: socket.socket, first_line: bytes, pause: float) -> float | None:
        """Seconds from a request line to the server cutting the connection, header lines trickling in."""
        s.sendall(first_line)
        started = time.monotonic()
        while time.monotonic() - started < HEADER_TIMEOUT + 5:
            try:
                s.sendall(b"X-a: b\r\n")
                time.sleep(pause)
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started
        return None

    # A slow-header client (slowloris) is cut off after the head timeout, however it trickles.
    with socket.create_connection((host, int(port)), timeout=10) as s:
        cut = trickled_until_cut(s, b"GET /v2/health/live HTTP/1.1\r\n", 0.3)
        assert cut is not None and cut < HEADER_TIMEOUT + 3
    # On a kept-alive connection the limit counts from when the next head began, not from the connection's start.
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(HEADER_TIMEOUT * 0.6)
        cut = trickled_until_cut(s, b"GET /v2/health/live HTTP/1.1\r\n", 0.2)
        assert cut is not None and HEADER_TIMEOUT - 0.3 < cut < HEADER_TIMEOUT + 3
    # Shared-memory registrations stop at the cap, and the server keeps no descriptor for a refused one.
    keys = [f"/kiln_adv_fd_{uuid.uuid4().hex[:6]}_{i}" for i in range(SHM_REGIONS + 1)]
    handles = [shm.create_shared_memory_region(k, k, 64) for k in keys]
    try:
        for k in keys[:SHM_REGIONS]:
            http.register_system_shared_memory(k[1:], k, 64, headers=dict(CONTROL))
        with pytest.raises(InferenceServerException, match="--shm-max-regions"):
            http.register_system_shared_memory(keys[-1][1:], keys[-1], 64, headers=dict(CONTROL))
    finally:
        http.unregister_system_shared_memory(headers=dict(CONTROL))
        for h in handles:
            shm.destroy_shared_memory_region(h)
    assert wait_for(lambda: server.process.num_fds() < 120, 10)
    assert_serving(server)


# -- 8. a decoupled request that never ends does not hold its model --------------------------------------

def test_a_decoupled_request_that_never_ends_lets_its_model_unload(server, grpc_client):
    responses = []
    grpc_client.start_stream(lambda result, error: responses.append((result, error)), headers=dict(GRPC_AUTH))
    i = grpcclient.InferInput("IN", [1], "INT32")
    i.set_data_from_numpy(np.array([7], dtype=np.int32))
    grpc_client.async_stream_infer("hang", [i])
    assert wait_for(lambda: responses, 30)
    grpc_client.stop_stream(cancel_requests=True)  # the client leaves; the model never sends its final flag
    started = time.monotonic()
    grpc_client.unload_model("hang", headers=dict(CONTROL))  # returns once the model is unloaded
    assert time.monotonic() - started < 4 * GRACE + 10
    assert not grpc_client.is_model_ready("hang", headers=dict(GRPC_AUTH))
    assert "did not end within" in server.log
    grpc_client.load_model("hang", headers=dict(CONTROL))
    assert grpc_client.is_model_ready("hang", headers=dict(GRPC_AUTH))
    assert_serving(server)


# -- 9. one huge prompt does not stall the other streams ------------------------------------------------

def test_a_huge_prompt_is_refused_before_tokenizing_while_streams_flow(server):
    client = openai.OpenAI(base_url=f"http://{server.http}/v1", api_key=KEY, max_retries=0, timeout=120)
    gaps: list[float] = []
    usage = []

    def stream() -> None:
        last = time.monotonic()
        for chunk in client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=120, stream=True,
                                               stream_options={"include_usage": True},
                                               extra_body={"ignore_eos": True}):
            if chunk.usage is not None:
                usage.append(chunk.usage.completion_tokens)
            if chunk.choices:
                now = time.monotonic()
                gaps.append(now - last)
                last = now

    reader = threading.Thread(target=stream)
    reader.start()
    assert wait_for(lambda: len(gaps) > 3, 60)
    huge = "lorem ipsum " * (MAX_REQUEST // 12 - 100)  # just under the body limit: about 350,000 words
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=huge, max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded" and time.monotonic() - started < 5
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": huge}], max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded"
    reader.join(120)
    # Every token arrived (steps the stream's reader fell behind on come as one chunk), none late.
    assert usage == [120] and max(gaps[3:]) < 2.0, max(gaps)
    assert_serving(server)


# -- 10. a gRPC stream request that cannot be parsed still gets its answer ------------------------------------

def test_every_grpc_stream_request_gets_an_answer(server, grpc_client):
    answers = []
    grpc_client.start_stream(lambda result, error: answers.append(error), headers=dict(GRPC_AUTH))
    try:
        inputs, _ = simple_inputs(grpcclient)
        for classification in ("abc", -1, True):
            request_output = grpcclient.InferRequestedOutput("OUTPUT0")
            param = request_output._output.parameters["classification"]
            if isinstance(classification, str):
                param.string_param = classification
            elif isinstance(classification, bool):
                param.bool_param = classification
            else:
                param.int64_param = classification
            grpc_client.async_stream_infer("simple", inputs, outputs=[request_output])
        assert wait_for(lambda: len(answers) == 3, 30)
    finally:
        grpc_client.stop_stream()
    assert all(a is not None and "classification" in str(a) for a in answers), answers
    # Bytes that are no protobuf message: INVALID_ARGUMENT, unary and streamed.
    with grpc.insecure_channel(server.grpc) as channel:
        raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as e:
            raw(b"\xff\xff\xff\xff", metadata=list(GRPC_AUTH.items()))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                       response_deserializer=pb.ModelStreamInferResponse.FromString)
        replies = list(stream(iter([b"\xff\xff\xff\xff"]), metadata=list(GRPC_AUTH.items())))
        assert len(replies) == 1 and "not a valid inference.ModelInferRequest" in replies[0].error_message
    assert_serving(server)


# -- 11. client errors are 4xx, named, and logged without tracebacks -------------------------------------------

def test_malformed_values_are_client_errors(server, grpc_client):
    cases = [
        ("/v1/completions", b'{"model": "tiny", "prompt": "\\ud800 hi", "max_tokens": 1}', "surrogate"),
        ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}',
         "surrogate"),
        ("/v1/completions", b'{"model": "\\ud800", "prompt": "hi"}', "surrogate"),
        ("/v1/completions", b'{"model": "tiny", "prompt": [-1], "max_tokens": 1}', "out of range"),
        ("/v1/completions", b'{"model": "tiny", "prompt": [1000000000000], "max_tokens": 1}', "out of range"),
        ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "max_tokens": 1' + b"9" * 5000 + b"}", "digits"),
        ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, "JSON"),
        ("/v2/models/simple/infer", b"[" * 100_000 + b"]" * 100_000, "JSON"),
        ("/v2/models/simple/infer", b'{"inputs": NaN}', "NaN"),
        ("/v2/systemsharedmemory/region/r/register", b'{"key": "/a\\u0000b", "byte_size": 8}', "NUL"),
        ("/v2/models/tiny/generate", b'{"text_input": "\\ud800", "max_tokens": 1}', "surrogate"),
    ]
    for path, body, words in cases:
        code, text = status_of(lambda: post(server, path, body, CONTROL))
        assert 400 <= code < 500 and words in text, (path, body[:60], code, text[:300])
    # gRPC: a 10,000-character model name, a model name that is not UTF-8 (garbage protobuf).
    inputs, _ = simple_inputs(grpcclient)
    assert grpc_status(lambda: grpc_client.infer("m" * 10_000, inputs, headers=dict(GRPC_AUTH))) == "StatusCode.NOT_FOUND"
    assert grpc_status(lambda: grpc_client.load_model("m" * 10_000, headers=dict(CONTROL))) == "StatusCode.INVALID_ARGUMENT"
    with grpc.insecure_channel(server.grpc) as channel:
        raw = channel.unary_unary("/inference.GRPCInferenceService/ModelReady")
        with pytest.raises(grpc.RpcError) as e:
            raw(b"\x0a\x02\xff\xfe", metadata=list(GRPC_AUTH.items()))  # name = invalid UTF-8
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_serving(server)


# -- 12. the smaller findings ---------------------------------------------------------------------------------

def test_the_smaller_findings(server, http, grpc_client):
    # Non-finite floats never make invalid JSON: asked for as JSON they are refused; as binary they pass.
    x = np.array([[np.nan, np.inf, 1.0]], dtype=np.float32)
    i = httpclient.InferInput("IN_X", [1, 3], "FP32")
    i.set_data_from_numpy(x, binary_data=True)
    n = httpclient.InferInput("IN_I", [1, 1], "INT32")
    n.set_data_from_numpy(np.array([[1]], dtype=np.int32))
    with pytest.raises(InferenceServerException, match="NaN or infinity"):
        http.infer("floats", [i, n], outputs=[httpclient.InferRequestedOutput("OUT_X", binary_data=False)],
                   headers=dict(AUTH))
    result = http.infer("floats", [i, n], outputs=[httpclient.InferRequestedOutput("OUT_X", binary_data=True)],
                        headers=dict(AUTH))
    np.testing.assert_array_equal(result.as_numpy("OUT_X"), x)
    # JSON values of the wrong type are refused, not converted.
    for value in ("5", 2.5, True):
        doc = {"inputs": [{"name": "IN_I", "shape": [1, 1], "datatype": "INT32", "data": [value]},
                          {"name": "IN_X", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}
        code, text = status_of(lambda: post(server, "/v2/models/floats/infer", json.dumps(doc).encode()))
        assert code == 400 and "not integers" in text
    # gRPC refuses what HTTP refuses: reserved parameters, a negative classification.
    request = simple_request()
    request.parameters["triton_x"].int64_param = 1
    error = raw_grpc_infer(server, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "reserved for Triton" in error.details()
    inputs, _ = simple_inputs(grpcclient)
    with pytest.raises(InferenceServerException, match="classification"):
        grpc_client.infer("simple", inputs, outputs=[grpcclient.InferRequestedOutput("OUTPUT0", class_count=-1)],
                          headers=dict(GRPC_AUTH))
    # An output whose shape contradicts the config is an error, not a 200.
    one = httpclient.InferInput("IN", [1], "INT32")
    one.set_data_from_numpy(np.array([1], dtype=np.int32))
    with pytest.raises(InferenceServerException, match="produced output 'OUT' of shape \\[3\\]"):
        http.infer("wrong_shape", [one], headers=dict(AUTH))
    # An invalid generate_stream request gets a status code, not 200 with an error event.
    code, text = status_of(lambda: post(server, "/v2/models/tiny/generate_stream", b'{"max_tokens": 1}'))
    assert code == 400 and "text_input" in text
    # A model name with no folder: loading or unloading it is an error that names it.
    with pytest.raises(InferenceServerException, match="no model folder 'never_seen'"):
        http.unload_model("never_seen", headers=dict(CONTROL))
    # Triton's reserved parameters are checked, on both protocols.
    doc = {"parameters": {"timeout": "soon"}, "inputs": [
        {"name": n, "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16} for n in ("INPUT0", "INPUT1")]}
    code, text = status_of(lambda: post(server, "/v2/models/simple/infer", json.dumps(doc).encode()))
    assert code == 400 and "Unable to parse 'timeout'" in text
    request = simple_request()
    request.parameters["priority"].int64_param = -1
    assert "Unable to parse 'priority'" in raw_grpc_infer(server, request).details()
    assert_serving(server)


def test_queue_timeouts_and_requests_during_an_unload(server, http):
    from concurrent.futures import ThreadPoolExecutor

    def one(value: int) -> httpclient.InferInput:
        i = httpclient.InferInput("IN", [1], "INT32")
        i.set_data_from_numpy(np.array([value], dtype=np.int32))
        return i

    def on_own_client(method: str, *args, **kwargs):  # tritonclient's HTTP client is not for two threads
        client = httpclient.InferenceServerClient(server.http)
        try:
            return getattr(client, method)(*args, **kwargs)
        finally:
            client.close()

    with ThreadPoolExecutor(2) as pool:
        # A request that waits in the queue past its own timeout (microseconds) is rejected.
        busy = pool.submit(on_own_client, "infer", "sleepy", [one(1)], headers=dict(AUTH))
        time.sleep(0.3)
        with pytest.raises(InferenceServerException, match="Request timeout expired"):
            http.infer("sleepy", [one(2)], timeout=200_000, headers=dict(AUTH))
        assert busy.result().as_numpy("OUT").tolist() == [1]
        # While a model unloads (waiting for its request in flight), requests get 503, not 404.
        busy = pool.submit(on_own_client, "infer", "sleepy", [one(3)], headers=dict(AUTH))
        time.sleep(0.3)
        unloading = pool.submit(on_own_client, "unload_model", "sleepy", headers=dict(CONTROL))
        time.sleep(0.3)
        with pytest.raises(InferenceServerException, match="being unloaded") as e:
            http.infer("sleepy", [one(4)], headers=dict(AUTH))
        assert e.value.status() == "503"
        assert busy.result().as_numpy("OUT").tolist() == [3]
        unloading.result()
    http.load_model("sleepy", headers=dict(CONTROL))
    assert http.infer("sleepy", [one(5)], headers=dict(AUTH)).as_numpy("OUT").tolist() == [5]
    # cache_salt is taken by both LLM protocols (the KV manager's tests show what it isolates).
    code, _ = status_of(lambda: post(server, "/v2/models/tiny/generate",
                                     b'{"text_input": "hi", "max_tokens": 1, "cache_salt": "user-1"}'))
    assert code == 200
    client = openai.OpenAI(base_url=f"http://{server.http}/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=1,
                                      extra_body={"cache_salt": "user-1"}).choices
    assert_serving(server)
