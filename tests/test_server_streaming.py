"""Decoupled models, streaming and cancellation, through the backend interface that the python and
kiln backends will implement: a test backend registered in-process, driven by tritonclient over gRPC
streams and HTTP."""
from __future__ import annotations

import asyncio
import json
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from server_harness import InProcessServer, add_sub_config, onnx_add_sub, wait_for, write_config

pytest.importorskip("onnx")
tritonclient = pytest.importorskip("tritonclient")

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from kiln.server import backends  # noqa: E402
from kiln.server.backends.base import Backend, InstanceSpec, ModelInstance  # noqa: E402
from kiln.server.config import ModelConfig, mc  # noqa: E402

# What the test backend saw, per request id: responses sent and whether it saw the cancellation.
SEEN: dict[str, dict] = {}


class RepeatBackend(Backend):
    """A decoupled model: IN (INT32 [n]) -> n responses OUT = [IN[i]], DELAY_MS apart, then the final flag.

    Its folder has no config.pbtxt: ``complete_config`` writes the whole config, as the kiln backend will
    for an engine folder.
    """

    name = "test_repeat"
    default_model_filename = "repeat.marker"

    @classmethod
    def complete_config(cls, config: ModelConfig, version_dir: Path) -> None:
        config.model_transaction_policy.decoupled = True
        if not config.input:
            config.input.add(name="IN", data_type=mc.TYPE_INT32, dims=[-1])
            config.input.add(name="DELAY_MS", data_type=mc.TYPE_INT32, dims=[1], optional=True)
            config.output.add(name="OUT", data_type=mc.TYPE_INT32, dims=[1])

    def create_instance(self, spec: InstanceSpec) -> ModelInstance:
        return RepeatInstance(spec, int(self.context.parameters.get("max_concurrency", "8")))


class RepeatInstance(ModelInstance):
    cancel_execute = True

    def __init__(self, spec: InstanceSpec, max_concurrency: int):
        super().__init__(spec)
        self.max_concurrency = max_concurrency

    async def execute(self, requests):
        for r in requests:
            seen = SEEN.setdefault(r.id, {"sent": 0, "cancelled": False})
            delay = r.input("DELAY_MS")
            delay = 0 if delay is None else int(delay[0]) / 1000
            try:
                for v in r.input("IN"):
                    await asyncio.sleep(delay)
                    if r.cancelled:
                        seen["cancelled"] = True
                        break
                    r.respond({"OUT": np.array([v], dtype=np.int32)}, final=False)
                    seen["sent"] += 1
                r.respond(final=True)
            except asyncio.CancelledError:
                seen["cancelled"] = True
                raise


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    backends.register(RepeatBackend)
    root = tmp_path_factory.mktemp("repository")
    (root / "repeat/1").mkdir(parents=True)
    (root / "repeat/1/repeat.marker").write_text("")
    (root / "repeat_flat").mkdir()
    (root / "repeat_flat/repeat.marker").write_text("")  # no version folder: the folder is version 1
    (root / "repeat_queue/1").mkdir(parents=True)
    (root / "repeat_queue/1/repeat.marker").write_text("")
    write_config(root / "repeat_queue", """
backend: "test_repeat"
dynamic_batching { default_queue_policy { max_queue_size: 1 } }
instance_group [ { kind: KIND_CPU count: 1 } ]
parameters { key: "max_concurrency" value: { string_value: "1" } }""")
    one_at_a_time = """
instance_group [ { kind: KIND_CPU count: COUNT } ]
parameters { key: "max_concurrency" value: { string_value: "1" } }"""
    queued_models = {
        # Level 2 (the default) rejects at its deadline and holds 3; level 1 delays expired requests.
        "repeat_priority": """dynamic_batching { priority_levels: 2 default_priority_level: 2
    default_queue_policy { allow_timeout_override: true max_queue_size: 3 }
    priority_queue_policy { key: 1 value: { timeout_action: DELAY allow_timeout_override: true } } }""",
        "repeat_ordered": "dynamic_batching { preserve_ordering: true }",
        "repeat_unordered": "dynamic_batching { }",
    }
    for name, batching in queued_models.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "1/repeat.marker").write_text("")
        count = 1 if name == "repeat_priority" else 2
        write_config(root / name, 'backend: "test_repeat"\n' + batching + one_at_a_time.replace("COUNT", str(count)))
    onnx_add_sub(root / "simple/1/model.onnx")
    write_config(root / "simple", add_sub_config("simple"))
    s = InProcessServer(root, model_control_mode="explicit", load_models=["*"], trace_file=root.parent / "trace.json")
    yield s
    s.stop()
    backends.BACKENDS.pop(RepeatBackend.name)


def repeat_inputs(module, values, delay_ms=0):
    i = module.InferInput("IN", [len(values)], "INT32")
    i.set_data_from_numpy(np.array(values, dtype=np.int32))
    d = module.InferInput("DELAY_MS", [1], "INT32")
    d.set_data_from_numpy(np.array([delay_ms], dtype=np.int32))
    return [i, d]


class Stream:
    """A gRPC stream whose callback results land in a queue."""

    def __init__(self, server):
        self.client = grpcclient.InferenceServerClient(server.grpc)
        self.results: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.results.put((result, error)))

    def next(self, timeout=30):
        return self.results.get(timeout=timeout)

    def close(self, cancel=False):
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def test_backend_completed_config(server):
    config = httpclient.InferenceServerClient(server.http).get_model_config("repeat")
    assert config["backend"] == "test_repeat" and config["model_transaction_policy"]["decoupled"] is True
    assert [i["name"] for i in config["input"]] == ["IN", "DELAY_MS"] and config["input"][1]["optional"]


def test_decoupled_model_streams_every_response(server):
    stream = Stream(server)
    try:
        stream.client.async_stream_infer("repeat", repeat_inputs(grpcclient, [5, 6, 7]), request_id="s1",
                                         enable_empty_final_response=True)
        got, final = [], False
        while not final:
            result, error = stream.next()
            assert error is None
            response = result.get_response()
            assert response.id == "s1"
            final = response.parameters["triton_final_response"].bool_param
            if not final:
                got.append(int(result.as_numpy("OUT")[0]))
        assert got == [5, 6, 7]
        assert result.as_numpy("OUT") is None  # the final flag travels as an empty response
    finally:
        stream.close()


def test_stream_interleaves_requests_and_survives_errors(server):
    stream = Stream(server)
    try:
        a = np.arange(16, dtype=np.float32)[None]
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            i = grpcclient.InferInput(name, [1, 16], "FP32")
            i.set_data_from_numpy(a)
            inputs.append(i)
        stream.client.async_stream_infer("simple", inputs, request_id="ordinary")
        stream.client.async_stream_infer("simple", inputs[:1], request_id="broken")
        stream.client.async_stream_infer("repeat", repeat_inputs(grpcclient, [1, 2]), request_id="two")
        outcomes = [stream.next() for _ in range(4)]  # ordinary, broken (error), two responses
        errors = [str(e) for _, e in outcomes if e is not None]
        assert len(errors) == 1 and "expected 2 inputs but got 1" in errors[0]
        by_id: dict[str, list] = {}
        for result, error in outcomes:
            if error is None:
                by_id.setdefault(result.get_response().id, []).append(result)
        np.testing.assert_array_equal(by_id["ordinary"][0].as_numpy("OUTPUT0"), 2 * a)
        assert [int(r.as_numpy("OUT")[0]) for r in by_id["two"]] == [1, 2]
    finally:
        stream.close()


def test_http_infer_takes_exactly_one_response(server):
    client = httpclient.InferenceServerClient(server.http)
    result = client.infer("repeat", repeat_inputs(httpclient, [42]))
    assert result.as_numpy("OUT").tolist() == [42]
    with pytest.raises(InferenceServerException, match="more than one response.*ModelStreamInfer") as e:
        client.infer("repeat", repeat_inputs(httpclient, [1, 2, 3]))
    assert e.value.status() == "501"
    with pytest.raises(InferenceServerException, match="more than one response"):
        grpcclient.InferenceServerClient(server.grpc).infer("repeat", repeat_inputs(grpcclient, [1, 2]))



def test_cancelled_stream_stops_the_backend(server):
    stream = Stream(server)
    stream.client.async_stream_infer("repeat", repeat_inputs(grpcclient, list(range(200)), delay_ms=20),
                                     request_id="cancel-me")
    first, error = stream.next()
    assert error is None and int(first.as_numpy("OUT")[0]) == 0
    stream.close(cancel=True)
    assert wait_for(lambda: SEEN["cancel-me"]["cancelled"])
    assert SEEN["cancel-me"]["sent"] < 200


def test_http_disconnect_cancels_the_request(server):
    body = (b'{"id": "hangup", "inputs": [{"name": "IN", "shape": [1], "datatype": "INT32", "data": [1]},'
            b' {"name": "DELAY_MS", "shape": [1], "datatype": "INT32", "data": [30000]}]}')
    host, port = server.http.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v2/models/repeat/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert wait_for(lambda: "hangup" in SEEN)
    assert wait_for(lambda: SEEN["hangup"]["cancelled"])
    assert SEEN["hangup"]["sent"] == 0
    stats = httpclient.InferenceServerClient(server.http).get_inference_statistics("repeat")["model_stats"][0]
    assert stats["inference_stats"]["fail"]["count"] >= 1


def test_unload_waits_for_requests_in_flight(server):
    stream = Stream(server)
    done: dict[str, float] = {}
    try:
        stream.client.async_stream_infer("repeat", repeat_inputs(grpcclient, [1, 2, 3, 4, 5], delay_ms=100),
                                         request_id="inflight", enable_empty_final_response=True)
        assert stream.next()[1] is None  # the first response: the request is running

        def unload():
            httpclient.InferenceServerClient(server.http).unload_model("repeat")
            done["unloaded"] = time.monotonic()

        t = threading.Thread(target=unload)
        t.start()
        values = []
        while True:
            result, error = stream.next()
            assert error is None
            if result.get_response().parameters["triton_final_response"].bool_param:
                done["final"] = time.monotonic()
                break
            values.append(int(result.as_numpy("OUT")[0]))
        t.join(30)
        assert values == [2, 3, 4, 5]  # the unload let the request finish
        assert done["unloaded"] >= done["final"]
        client = httpclient.InferenceServerClient(server.http)
        assert not client.is_model_ready("repeat")
        client.load_model("repeat")
        assert client.is_model_ready("repeat")
    finally:
        stream.close()


def test_model_folder_without_versions_is_version_one(server):
    client = httpclient.InferenceServerClient(server.http)
    assert client.get_model_metadata("repeat_flat")["versions"] == ["1"]
    assert client.infer("repeat_flat", repeat_inputs(httpclient, [9])).as_numpy("OUT").tolist() == [9]


def _pending(server, model: str) -> float:
    with urllib.request.urlopen(f"http://{server.addresses['metrics']}/metrics") as r:
        page = r.read().decode()
    family = next(f for f in text_string_to_metric_families(page) if f.name == "nv_inference_pending_request_count")
    return next(s.value for s in family.samples if s.labels["model"] == model)


def test_full_queue_rejects_requests(server):
    # NOTE: the gRPC client's async_infer sends at once from its own thread; the HTTP client's sends
    # only when its gevent loop runs (in get_result), which a plain wait never lets happen.
    client = grpcclient.InferenceServerClient(server.grpc)
    results: dict[str, queue.Queue] = {"q1": queue.Queue(), "q2": queue.Queue()}

    def send(rid: str, values: list[int], delay_ms: int = 0) -> None:
        client.async_infer("repeat_queue", repeat_inputs(grpcclient, values, delay_ms=delay_ms), request_id=rid,
                           callback=lambda result, error: results[rid].put((result, error)))

    send("q1", [1], delay_ms=500)
    assert wait_for(lambda: "q1" in SEEN)  # executing: the one instance is busy
    send("q2", [2])
    assert wait_for(lambda: _pending(server, "repeat_queue") == 1)  # the queue holds its one request
    with pytest.raises(InferenceServerException, match="Exceeds maximum queue size") as e:
        grpcclient.InferenceServerClient(server.grpc).infer("repeat_queue", repeat_inputs(grpcclient, [3]))
    assert e.value.status() == "StatusCode.UNAVAILABLE"
    for rid, value in (("q1", 1), ("q2", 2)):
        result, error = results[rid].get(timeout=30)
        assert error is None and result.as_numpy("OUT").tolist() == [value]
    stats = httpclient.InferenceServerClient(server.http).get_inference_statistics("repeat_queue")["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] == 2 and stats["inference_stats"]["fail"]["count"] == 1


def _stream_order(server, model: str, sends: list[tuple[str, dict]], first_ms: int = 400) -> list[str]:
    """Send requests on one gRPC stream, the first holding the model's one instance for ``first_ms``, the
    others (id, infer keyword arguments) queued behind it; the ids in the order their responses came back."""
    stream = Stream(server)
    try:
        stream.client.async_stream_infer(model, repeat_inputs(grpcclient, [0], delay_ms=first_ms),
                                         request_id=f"{model}-first")
        assert wait_for(lambda: f"{model}-first" in SEEN)
        for rid, kwargs in sends:
            stream.client.async_stream_infer(model, repeat_inputs(grpcclient, [1]), request_id=rid, **kwargs)
        order = []
        while len(order) < len(sends) + 1:
            result, error = stream.next()
            assert error is None, error
            response = result.get_response()
            if response.outputs:  # the final flag alone follows each response
                order.append(response.id)
        return order
    finally:
        stream.close()


def test_priority_levels_serve_the_higher_level_first_over_grpc(server):
    order = _stream_order(server, "repeat_priority", [("low-a", {}), ("low-b", {"priority": 2}),
                                                      ("high", {"priority": 1}), ("out-of-range", {"priority": 7})])
    # Level 1 first; a priority above the levels takes the default level (2), in arrival order.
    assert order == ["repeat_priority-first", "high", "low-a", "low-b", "out-of-range"]


def test_a_delay_policy_moves_an_expired_request_behind_its_level(server):
    # Level 1's policy delays: "late" waits past its 50 ms, so "prompt", queued after it, goes first; both still
    # go before level 2's "low".
    order = _stream_order(server, "repeat_priority", [("late", {"priority": 1, "timeout": 50_000}),
                                                      ("low", {}), ("prompt", {"priority": 1})])
    assert order == ["repeat_priority-first", "prompt", "late", "low"]


def test_a_reject_policy_fails_a_request_past_its_timeout_and_a_full_level_over_http(server):
    from concurrent.futures import ThreadPoolExecutor

    def infer(values, **kwargs):
        client = httpclient.InferenceServerClient(server.http)
        try:
            return client.infer("repeat_priority", repeat_inputs(httpclient, values, delay_ms=400), **kwargs)
        finally:
            client.close()

    with ThreadPoolExecutor(4) as pool:
        busy = pool.submit(infer, [1], request_id="http-busy")
        assert wait_for(lambda: "http-busy" in SEEN)  # executing: the one instance is busy
        with pytest.raises(InferenceServerException, match="Request timeout expired") as e:
            infer([2], timeout=100_000)  # level 2 rejects at the deadline the request asked for
        assert e.value.status() == "503"
        queued = [pool.submit(infer, [3]) for _ in range(3)]  # level 2 holds three
        assert wait_for(lambda: _pending(server, "repeat_priority") == 3)
        started = time.monotonic()
        with pytest.raises(InferenceServerException, match="Exceeds maximum queue size") as e:
            infer([4])
        assert e.value.status() == "503" and time.monotonic() - started < 0.3  # refused at once
        assert infer([5], priority=1).as_numpy("OUT").tolist() == [5]  # level 1 has its own room
        assert busy.result().as_numpy("OUT").tolist() == [1]
        assert [f.result().as_numpy("OUT").tolist() for f in queued] == [[3]] * 3


def test_preserve_ordering_holds_responses_in_request_order(server):
    # Two instances: the second request finishes first, and waits for the first's responses.
    def order(model: str) -> list[str]:
        stream = Stream(server)
        try:
            stream.client.async_stream_infer(model, repeat_inputs(grpcclient, [1, 2], delay_ms=200),
                                             request_id=f"{model}-slow")
            assert wait_for(lambda: f"{model}-slow" in SEEN)
            stream.client.async_stream_infer(model, repeat_inputs(grpcclient, [3]), request_id=f"{model}-fast")
            got = []
            while len(got) < 3:
                result, error = stream.next()
                assert error is None, error
                if result.get_response().outputs:
                    got.append(result.get_response().id)
            return got
        finally:
            stream.close()

    assert order("repeat_unordered") == ["repeat_unordered-fast", "repeat_unordered-slow", "repeat_unordered-slow"]
    assert order("repeat_ordered") == ["repeat_ordered-slow", "repeat_ordered-slow", "repeat_ordered-fast"]


def _post_json(server, path: str, doc: dict):
    request = urllib.request.Request(f"http://{server.http}{path}", data=json.dumps(doc).encode(), method="POST")
    try:
        r = urllib.request.urlopen(request)
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()
    return r.status, r.headers, r.read()


def test_generate_extension(server):
    status, _, body = _post_json(server, "/v2/models/simple/generate",
                                 {"INPUT0": list(range(16)), "INPUT1": [1] * 16, "id": "g1"})
    doc = json.loads(body)
    assert status == 200 and doc["id"] == "g1" and doc["model_name"] == "simple"
    assert doc["OUTPUT0"] == [float(i + 1) for i in range(16)]
    status, _, body = _post_json(server, "/v2/models/repeat/generate", {"IN": 42, "custom_parameter": "x"})
    assert status == 200 and json.loads(body)["OUT"] == 42  # one element: a scalar, as Triton writes it
    status, _, body = _post_json(server, "/v2/models/repeat/generate", {"IN": [1, 2]})
    assert status == 501 and "more than one response" in json.loads(body)["error"]
    status, _, body = _post_json(server, "/v2/models/simple/generate", {"INPUT0": [1, 2, 3], "INPUT1": [1] * 16})
    assert status == 400 and "can not convert input 'INPUT0'" in json.loads(body)["error"]


def test_generate_stream_sends_an_event_per_response(server):
    status, headers, body = _post_json(server, "/v2/models/repeat/generate_stream", {"IN": [4, 5, 6], "id": "sse"})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [json.loads(chunk[len("data: "):]) for chunk in body.decode().split("\n\n") if chunk]
    assert [e["OUT"] for e in events] == [4, 5, 6] and all(e["id"] == "sse" for e in events)
    status, _, body = _post_json(server, "/v2/models/no_such_model/generate_stream", {"IN": [1]})
    assert status == 404 and "unknown model" in json.loads(body)["error"]


def test_closing_an_event_stream_cancels_the_request(server):
    body = json.dumps({"IN": list(range(200)), "DELAY_MS": 20, "id": "sse-hangup"}).encode()
    host, port = server.http.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v2/models/repeat/generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while b"data: " not in received:
            received += s.recv(4096)
    assert wait_for(lambda: SEEN["sse-hangup"]["cancelled"])
    assert SEEN["sse-hangup"]["sent"] < 200


def test_trace_settings_per_model_and_traces_in_tritons_shape(server):
    http = httpclient.InferenceServerClient(server.http)
    settings = http.get_trace_settings()
    assert settings["trace_level"] == ["OFF"] and settings["trace_rate"] == "1000" and settings["trace_count"] == "-1"
    trace_file = Path(settings["trace_file"])
    for bad, message in ((({"trace_file": "/tmp/elsewhere.json"}), "opens no file a client names"),
                         ({"trace_level": ["TENSORS"]}, "kiln keeps no tensors"),
                         ({"trace_rate": "0"}, "must be an integer >= 1"),
                         ({"no_such": "1"}, "unknown trace setting")):
        with pytest.raises(InferenceServerException, match=message):
            http.update_trace_settings(settings=bad)
    # Trace every request of "simple" (a model's setting), two traces a file; the server stays off.
    model = http.update_trace_settings("simple", {"trace_level": ["TIMESTAMPS"], "trace_rate": "1",
                                                  "log_frequency": "2"})
    assert model["trace_level"] == ["TIMESTAMPS"] and http.get_trace_settings()["trace_level"] == ["OFF"]
    grpc = grpcclient.InferenceServerClient(server.grpc)
    assert list(grpc.get_trace_settings("simple").settings["trace_level"].value) == ["TIMESTAMPS"]
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    for i in range(2):
        inputs = [httpclient.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
        for t in inputs:
            t.set_data_from_numpy(a)
        http.infer("simple", inputs, request_id=f"traced-{i}")
    http.infer("repeat", repeat_inputs(httpclient, [1]))  # not traced
    first = Path(f"{trace_file}.0")
    assert wait_for(first.exists)
    traces = json.loads(first.read_text())
    assert [t.get("request_id") for t in traces[::2]] == ["traced-0", "traced-1"]
    assert all(t["model_name"] == "simple" and t["model_version"] == 1 for t in traces[::2])
    names = [s["name"] for s in traces[1]["timestamps"]]
    assert names == ["REQUEST_START", "QUEUE_START", "COMPUTE_START", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START",
                     "COMPUTE_END", "REQUEST_END"]
    stamps = [s["ns"] for s in traces[1]["timestamps"]]
    assert stamps == sorted(stamps) and traces[0]["id"] == traces[1]["id"] != traces[2]["id"]
    # Clearing the model's setting over gRPC (an empty value) gives it the server's again.
    cleared = grpc.update_trace_settings("simple", {"trace_level": None})
    assert list(cleared.settings["trace_level"].value) == ["OFF"]
