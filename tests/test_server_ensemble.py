"""Ensembles (``platform: "ensemble"``): a DAG of steps over HTTP and gRPC, a decoupled step streaming through
the ensemble, a failing step, statistics per step, and the configs Triton refuses, driven by tritonclient."""
from __future__ import annotations

import json
import queue
import urllib.request

import numpy as np
import pytest
from server_harness import InProcessServer, add_sub_config, onnx_add_sub, write_config

pytest.importorskip("onnx")
tritonclient = pytest.importorskip("tritonclient")

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from kiln.server import backends  # noqa: E402
from kiln.server.backends.base import Backend, InstanceSpec, ModelInstance  # noqa: E402
from kiln.server.config import parse_text  # noqa: E402
from kiln.server.ensemble import Graph  # noqa: E402
from kiln.server.errors import ServerError  # noqa: E402
from test_server_streaming import RepeatBackend  # noqa: E402


class ScaleBackend(Backend):
    """X (INT32 [-1]) -> Y = 2 X; a negative X fails the request."""

    name = "test_scale"

    def create_instance(self, spec: InstanceSpec) -> ModelInstance:
        return ScaleInstance(spec)


class ScaleInstance(ModelInstance):
    async def execute(self, requests):
        for r in requests:
            x = r.input("X")
            if (x < 0).any():
                r.respond(error=ServerError.invalid(f"test_scale takes no negative input, got {x.tolist()}"))
            else:
                r.respond({"Y": (2 * x).astype(np.int32)})


# A diamond: s1 feeds s2 and s3, which both feed s4 (simple: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1).
DIAMOND = """
platform: "ensemble"
max_batch_size: 8
input [ { name: "A" data_type: TYPE_FP32 dims: [ 16 ] }, { name: "B" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "FINAL" data_type: TYPE_FP32 dims: [ 16 ] }, { name: "FINAL_DIFF" data_type: TYPE_FP32 dims: [ 16 ] } ]
ensemble_scheduling { step [
  { model_name: "simple" model_version: -1 input_map { key: "INPUT0" value: "A" } input_map { key: "INPUT1" value: "B" }
    output_map { key: "OUTPUT0" value: "S1" } output_map { key: "OUTPUT1" value: "D1" } },
  { model_name: "simple" model_version: -1 input_map { key: "INPUT0" value: "S1" } input_map { key: "INPUT1" value: "D1" }
    output_map { key: "OUTPUT0" value: "S2" } },
  { model_name: "simple" model_version: -1 input_map { key: "INPUT0" value: "S1" } input_map { key: "INPUT1" value: "S1" }
    output_map { key: "OUTPUT0" value: "S3" } },
  { model_name: "simple" model_version: -1 input_map { key: "INPUT0" value: "S2" } input_map { key: "INPUT1" value: "S3" }
    output_map { key: "OUTPUT0" value: "FINAL" } output_map { key: "OUTPUT1" value: "FINAL_DIFF" } }
] }
"""

# A decoupled step streaming into a non-decoupled one: each response of "repeat" is doubled by "scale".
STREAM = """
platform: "ensemble"
input [ { name: "VALUES" data_type: TYPE_INT32 dims: [ -1 ] }, { name: "DELAY" data_type: TYPE_INT32 dims: [ 1 ] optional: true } ]
output [ { name: "DOUBLED" data_type: TYPE_INT32 dims: [ 1 ] } ]
model_transaction_policy { decoupled: %s }
ensemble_scheduling { step [
  { model_name: "repeat" input_map { key: "IN" value: "VALUES" } input_map { key: "DELAY_MS" value: "DELAY" }
    output_map { key: "OUT" value: "ONE" } },
  { model_name: "scale" input_map { key: "X" value: "ONE" } output_map { key: "Y" value: "DOUBLED" } }
] }
"""

SCALE = """backend: "test_scale"
input [ { name: "X" data_type: TYPE_INT32 dims: [ -1 ] } ]
output [ { name: "Y" data_type: TYPE_INT32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    backends.register(RepeatBackend)
    backends.register(ScaleBackend)
    root = tmp_path_factory.mktemp("repository")
    (root / "repeat/1").mkdir(parents=True)
    (root / "repeat/1/repeat.marker").write_text("")
    (root / "scale/1").mkdir(parents=True)
    write_config(root / "scale", SCALE)
    onnx_add_sub(root / "simple/1/model.onnx")
    write_config(root / "simple", add_sub_config("simple"))
    for name, text in (("diamond", DIAMOND), ("stream", STREAM % "true"), ("stream_once", STREAM % "false"),
                       ("broken", DIAMOND.replace('value: "A" }', 'value: "B" }'))):
        (root / name / "1").mkdir(parents=True)
        write_config(root / name, text)
    # Explicit mode, loading only the ensembles: each loads the models its steps name first.
    s = InProcessServer(root, model_control_mode="explicit", load_models=["diamond", "stream", "stream_once"])
    yield s
    s.stop()
    for b in (RepeatBackend, ScaleBackend):
        backends.BACKENDS.pop(b.name)


def diamond_inputs(module, a: np.ndarray, b: np.ndarray):
    out = []
    for name, value in (("A", a), ("B", b)):
        i = module.InferInput(name, list(value.shape), "FP32")
        i.set_data_from_numpy(value)
        out.append(i)
    return out


def test_a_diamond_of_steps_over_http_and_grpc(server):
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.full((2, 16), 3, dtype=np.float32)
    for module, address in ((httpclient, server.http), (grpcclient, server.grpc)):
        client = module.InferenceServerClient(address)
        result = client.infer("diamond", diamond_inputs(module, a, b), request_id="d1")
        # s2 = (a+b) + (a-b) = 2a, s3 = 2(a+b); FINAL = 4a + 2b, FINAL_DIFF = -2b
        np.testing.assert_allclose(result.as_numpy("FINAL"), 4 * a + 2 * b)
        np.testing.assert_allclose(result.as_numpy("FINAL_DIFF"), -2 * b)
        response = result.get_response()
        assert (response["id"] if module is httpclient else response.id) == "d1"  # the request's id, kept
    http = httpclient.InferenceServerClient(server.http)
    assert http.is_model_ready("simple")  # loaded because the ensemble's steps name it
    config = http.get_model_config("diamond")
    assert config["platform"] == "ensemble" and len(config["ensemble_scheduling"]["step"]) == 4


def test_a_decoupled_step_streams_through_the_ensemble(server):
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        inputs = [grpcclient.InferInput("VALUES", [3], "INT32"), grpcclient.InferInput("DELAY", [1], "INT32")]
        inputs[0].set_data_from_numpy(np.array([1, 2, 3], dtype=np.int32))
        inputs[1].set_data_from_numpy(np.array([20], dtype=np.int32))
        client.async_stream_infer("stream", inputs, request_id="s1", enable_empty_final_response=True)
        got = []
        while True:
            result, error = results.get(timeout=30)
            assert error is None, error
            response = result.get_response()
            if response.outputs:
                got.append(result.as_numpy("DOUBLED").tolist())
            if response.parameters["triton_final_response"].bool_param:
                break
        assert got == [[2], [4], [6]]  # one response per response of the decoupled step, in order
    finally:
        client.stop_stream()
        client.close()
    # HTTP generate_stream carries the same stream; the optional DELAY left out is left out of the step.
    request = urllib.request.Request(f"http://{server.http}/v2/models/stream/generate_stream",
                                     data=json.dumps({"VALUES": [5, 6]}).encode(), method="POST")
    with urllib.request.urlopen(request) as r:
        events = [json.loads(chunk[len("data: "):]) for chunk in r.read().decode().split("\n\n") if chunk]
    assert [e["DOUBLED"] for e in events if "DOUBLED" in e] == [10, 12]


def test_an_ordinary_ensemble_answers_once_with_the_last_values_and_steps_count_in_their_own_statistics(server):
    http = httpclient.InferenceServerClient(server.http)
    before = http.get_inference_statistics("scale")["model_stats"][0]["inference_stats"]["success"]["count"]
    values = httpclient.InferInput("VALUES", [3], "INT32")
    values.set_data_from_numpy(np.array([7, 8, 9], dtype=np.int32))
    result = http.infer("stream_once", [values])
    assert result.as_numpy("DOUBLED").tolist() == [18]
    stats = http.get_inference_statistics("scale")["model_stats"][0]["inference_stats"]
    assert stats["success"]["count"] == before + 3  # the step ran once per response of the decoupled step
    ensemble = http.get_inference_statistics("stream_once")["model_stats"][0]["inference_stats"]
    assert ensemble["success"]["count"] >= 1


def test_a_failing_step_fails_the_request_with_its_message(server):
    for module, address in ((httpclient, server.http), (grpcclient, server.grpc)):
        client = module.InferenceServerClient(address)
        values = module.InferInput("VALUES", [2], "INT32")
        values.set_data_from_numpy(np.array([1, -4], dtype=np.int32))
        with pytest.raises(InferenceServerException,
                           match=r"in ensemble 'stream_once', test_scale takes no negative input, got \[-4\]"):
            client.infer("stream_once", [values])
    # The server and the ensemble keep serving.
    values = httpclient.InferInput("VALUES", [1], "INT32")
    values.set_data_from_numpy(np.array([2], dtype=np.int32))
    assert httpclient.InferenceServerClient(server.http).infer("stream_once", [values]).as_numpy(
        "DOUBLED").tolist() == [4]


def test_a_broken_ensemble_or_one_whose_step_model_is_missing_is_refused_at_load(server):
    http = httpclient.InferenceServerClient(server.http)
    with pytest.raises(InferenceServerException, match="failed to load 'broken'.*ensemble input 'A' of 'broken' "
                                                       "is read by no step"):
        http.load_model("broken")
    bad = STREAM.replace('model_name: "scale"', 'model_name: "no_such_model"') % "true"
    with pytest.raises(InferenceServerException, match="step model 'no_such_model' did not load"):
        http.load_model("stream", config=json.dumps(_as_json(bad)))
    assert http.is_model_ready("stream")  # a failed reload keeps the loaded copy serving


def test_unload_dependents_unloads_the_step_models_too(server):
    http = httpclient.InferenceServerClient(server.http)
    http.unload_model("diamond")
    assert http.is_model_ready("simple")  # without unload_dependents the steps stay
    http.load_model("diamond")
    http.unload_model("diamond", unload_dependents=True)
    assert not http.is_model_ready("diamond") and not http.is_model_ready("simple")
    grpc = grpcclient.InferenceServerClient(server.grpc)
    grpc.unload_model("stream_once", unload_dependents=True)
    assert not grpc.is_model_ready("scale") and not grpc.is_model_ready("repeat")
    grpc.load_model("stream_once")  # loads its steps again
    assert grpc.is_model_ready("scale") and grpc.is_model_ready("repeat")


def _as_json(text: str) -> dict:
    from google.protobuf import json_format

    return json_format.MessageToDict(parse_text(text), preserving_proto_field_name=True)


def graph(text: str) -> Graph:
    config = parse_text(text)
    config.name = "e"
    return Graph(config)


@pytest.mark.parametrize("change,message", [
    (('value: "A" }', 'value: "S4" }'), r"no ensemble input or step output gives tensor\(s\) 'S4'"),
    (('value: "S2" } },', 'value: "S1" } },'), "is the output of step 1 .* and of step 0"),
    (('input_map { key: "INPUT1" value: "B" }', 'input_map { key: "INPUT1" value: "A" }'),
     "ensemble input 'B' of 'e' is read by no step"),
    (('output_map { key: "OUTPUT1" value: "FINAL_DIFF" }', ""), "ensemble output 'FINAL_DIFF' of 'e' is the output "
                                                                "of no step"),
    (('key: "INPUT0" value: "S1" } input_map { key: "INPUT1" value: "D1" }',
      'key: "INPUT0" value: "S1" } input_map { key: "INPUT1" value: "FINAL" }'), "has a cycle"),
])
def test_graph_checks(change, message):
    graph(DIAMOND)
    with pytest.raises(ServerError, match=message):
        graph(DIAMOND.replace(*change))


def test_steps_are_checked_against_their_models():
    simple = parse_text(add_sub_config("simple"))
    g = graph(DIAMOND)
    config = parse_text(DIAMOND)
    g.check_steps(config, lambda name, version: simple)
    with pytest.raises(ServerError, match="TYPE_FP32 as ensemble input 'A' but TYPE_INT32 as input 'INPUT0'"):
        g.check_steps(config, lambda name, version: parse_text(add_sub_config("simple", dtype="TYPE_INT32")))
    with pytest.raises(ServerError, match="only allows maximum batch size to be 4"):
        g.check_steps(config, lambda name, version: parse_text(add_sub_config("simple", max_batch_size=4)))
    renamed = parse_text(add_sub_config("simple", names=("X0", "X1", "OUTPUT0", "OUTPUT1")))
    with pytest.raises(ServerError, match="maps 'INPUT0', which is no input of model 'simple'"):
        g.check_steps(config, lambda name, version: renamed)
