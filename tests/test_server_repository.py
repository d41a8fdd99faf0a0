"""Model control over a real ``kiln serve`` process: explicit load (with config override) and unload on
both protocols, load failures that name the model, poll mode following the folder, and memory that
returns after loading and unloading a model many times."""
from __future__ import annotations

import json
import shutil
import urllib.request

import numpy as np
import psutil
import pytest
from server_harness import ServerProcess, add_sub_config, onnx_add_sub, onnx_big_weight, wait_for, write_config

pytest.importorskip("onnx")
tritonclient = pytest.importorskip("tritonclient")

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

BIG_ELEMENTS = 4 * 1024 * 1024  # a 16 MiB weight: a leak per load would show at once


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("repository")
    for name in ("simple", "other"):
        onnx_add_sub(root / f"{name}/1/model.onnx")
        write_config(root / name, add_sub_config(name))
    onnx_big_weight(root / "big/1/model.onnx", BIG_ELEMENTS)
    write_config(root / "big", """
backend: "onnxruntime"
max_batch_size: 1
input [ { name: "X" data_type: TYPE_INT64 dims: [ 1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]""")
    onnx_add_sub(root / "broken/1/model.onnx")
    write_config(root / "broken", add_sub_config("broken", backend="no_such_backend"))
    process = ServerProcess(root, "--model-control-mode", "explicit", "--load-model", "simple")
    yield process
    assert process.stop() == 0, process.log


@pytest.fixture(scope="module")
def http(server):
    client = httpclient.InferenceServerClient(server.http)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc(server):
    client = grpcclient.InferenceServerClient(server.grpc)
    yield client
    client.close()


def infer_add_sub(client, module, model: str, batch: int = 1):
    a = np.arange(16 * batch, dtype=np.float32).reshape(batch, 16)
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        i = module.InferInput(name, [batch, 16], "FP32")
        i.set_data_from_numpy(a)
        inputs.append(i)
    result = client.infer(model, inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * a)


def index(http) -> dict[str, dict]:
    return {m["name"]: m for m in http.get_model_repository_index()}


def test_startup_loads_only_the_named_models(server, http, grpc):
    models = index(http)
    assert models["simple"]["state"] == "READY"
    assert "state" not in models["other"] and "state" not in models["big"]  # present, never loaded
    listed = grpc.get_model_repository_index(as_json=True)["models"]
    assert {m["name"] for m in listed} == {"simple", "other", "big", "broken"}
    request = urllib.request.Request(f"http://{server.http}/v2/repository/index", method="POST",
                                     data=json.dumps({"ready": True}).encode())
    with urllib.request.urlopen(request) as r:
        assert [m["name"] for m in json.loads(r.read())] == ["simple"]


def test_load_and_unload_on_both_protocols(http, grpc):
    http.load_model("other")
    assert grpc.is_model_ready("other")
    infer_add_sub(grpc, grpcclient, "other")
    grpc.unload_model("other")
    assert not http.is_model_ready("other")
    assert index(http)["other"] == {"name": "other", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
    with pytest.raises(InferenceServerException, match="Request for unknown model: 'other' is not found"):
        infer_add_sub(http, httpclient, "other")
    grpc.load_model("other")
    infer_add_sub(http, httpclient, "other")
    http.unload_model("big")  # unloading a model of the repository that is not loaded is no error (as Triton)
    # A name with no folder is an error that names it (Triton answers 200, which hides a typo).
    with pytest.raises(InferenceServerException, match="failed to unload 'never_seen': no model folder"):
        http.unload_model("never_seen")


def test_load_with_config_override(http, grpc):
    config = http.get_model_config("simple")
    config.update(name="other", max_batch_size=2)
    http.load_model("other", config=json.dumps(config))
    assert http.get_model_config("other")["max_batch_size"] == 2
    with pytest.raises(InferenceServerException, match="batch-size must be <= 2 for 'other'"):
        infer_add_sub(grpc, grpcclient, "other", batch=3)
    grpc.load_model("other")  # a load without a config keeps the last override, as Triton does
    assert grpc.get_model_config("other").config.max_batch_size == 2
    config.update(max_batch_size=8)
    http.load_model("other", config=json.dumps(config))  # a new override replaces it
    assert grpc.get_model_config("other").config.max_batch_size == 8
    infer_add_sub(grpc, grpcclient, "other", batch=3)


def test_failed_loads_name_the_model_and_change_nothing_else(http, grpc):
    with pytest.raises(InferenceServerException, match="failed to load 'broken'.*no_such_backend") as e:
        http.load_model("broken")
    assert e.value.status() == "400"
    models = index(http)
    assert models["broken"]["state"] == "UNAVAILABLE" and "no_such_backend" in models["broken"]["reason"]
    with pytest.raises(InferenceServerException, match="failed to load 'ghost'.*no model folder 'ghost'") as e:
        grpc.load_model("ghost")
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "ghost" not in index(http)  # a model with no folder leaves no row behind
    with pytest.raises(InferenceServerException, match="failed to load 'simple'.*model configuration JSON"):
        http.load_model("simple", config="{not json")
    # A reload that fails leaves the loaded version serving.
    bad = http.get_model_config("simple")
    bad["input"][0]["dims"] = [0]
    with pytest.raises(InferenceServerException, match="failed to load 'simple'.*dimension must be integer >= 1"):
        grpc.load_model("simple", config=json.dumps(bad))
    assert index(http)["simple"]["state"] == "READY"
    infer_add_sub(http, httpclient, "simple")
    infer_add_sub(grpc, grpcclient, "simple")


def test_memory_returns_after_load_unload_cycles(server, http):
    process = psutil.Process(server.proc.pid)
    x = np.array([[BIG_ELEMENTS - 3]], dtype=np.int64)

    def cycle() -> int:
        http.load_model("big")
        i = httpclient.InferInput("X", [1, 1], "INT64")
        i.set_data_from_numpy(x)
        assert http.infer("big", [i]).as_numpy("Y").tolist() == [[BIG_ELEMENTS - 3]]  # Y = W[X], W = arange
        loaded = process.memory_info().rss
        http.unload_model("big")
        return loaded

    for _ in range(2):  # warm up allocators and code paths
        cycle()
    baseline = process.memory_info().rss
    loaded = [cycle() for _ in range(20)]
    after = process.memory_info().rss
    mib = 1024 * 1024
    report = (baseline / mib, [round(m / mib, 1) for m in loaded], after / mib)
    # Loaded, the model holds its 16 MiB weight; unloaded, all of it is given back, every time.
    assert min(loaded) - baseline > 12 * mib, report
    assert abs(after - baseline) < 4 * mib, report
    assert not http.is_model_ready("big")


def test_poll_mode_follows_the_folder(tmp_path):
    root = tmp_path / "repository"
    onnx_add_sub(root / "a/1/model.onnx")
    write_config(root / "a", add_sub_config("a"))
    server = ServerProcess(root, "--model-control-mode", "poll", "--repository-poll-secs", "0.2")
    try:
        client = httpclient.InferenceServerClient(server.http)
        assert client.is_model_ready("a")
        with pytest.raises(InferenceServerException, match="not allowed if polling is enabled"):
            client.load_model("a")

        staging = tmp_path / "staging/b"  # write the folder elsewhere, then move it in at once
        onnx_add_sub(staging / "1/model.onnx")
        write_config(staging, add_sub_config("b"))
        shutil.move(str(staging), str(root / "b"))
        assert wait_for(lambda: client.is_model_ready("b")), server.log
        infer_add_sub(client, httpclient, "b")

        write_config(root / "a", add_sub_config("a", max_batch_size=4))
        assert wait_for(lambda: client.get_model_config("a")["max_batch_size"] == 4), server.log

        shutil.rmtree(root / "b")
        assert wait_for(lambda: "b" not in index(client)), server.log
        assert not client.is_model_ready("b")
        infer_add_sub(client, httpclient, "a")
    finally:
        assert server.stop() == 0, server.log



def test_logging_extension_changes_what_is_logged(server, http, grpc):
    """Triton's logging extension over HTTP and gRPC: the settings read back as set, and log_info really hides
    the INFO lines (here, a load's) until it is on again; bad settings change nothing."""
    settings = http.get_log_settings()
    assert settings["log_info"] is True and settings["log_file"] == "" and settings["log_format"] == "default"
    assert http.update_log_settings({"log_info": False})["log_info"] is False
    assert grpc.get_log_settings().settings["log_info"].bool_param is False
    before = len(server.lines)
    grpc.load_model("other")
    assert not any("successfully loaded 'other'" in line for line in server.lines[before:])
    grpc.update_log_settings({"log_info": True, "log_verbose_level": 0})
    before = len(server.lines)
    http.load_model("other")
    assert wait_for(lambda: any("successfully loaded 'other'" in line for line in server.lines[before:]), 10)
    for bad, message in (({"log_file": "/tmp/kiln.log"}, "log_file must be empty"),
                         ({"log_info": "yes"}, "must be a bool"), ({"log_colour": True}, "unknown log setting"),
                         ({"log_format": "json"}, "log_format must be one of")):
        for client in (http, grpc) if "log_info" not in bad else (http,):  # (gRPC's client types the values)
            with pytest.raises(InferenceServerException, match=message):
                client.update_log_settings(bad)
    assert http.get_log_settings() == {**settings, "log_info": True}
    assert "logging" in http.get_server_metadata()["extensions"]


def test_load_with_files_sent_in_the_request(server, http, grpc, tmp_path):
    """Triton's ``file:`` load parameters: the model's files come with the request (and its config), are written
    to a private temporary folder and served from there; a path that leaves the model folder is refused and
    nothing is written; files need the config."""
    model = onnx_add_sub(tmp_path / "model.onnx").read_bytes()
    config = json.dumps({"name": "sent", "backend": "onnxruntime", "max_batch_size": 8,
                         "input": [{"name": n, "data_type": "TYPE_FP32", "dims": [16]} for n in ("INPUT0", "INPUT1")],
                         "output": [{"name": n, "data_type": "TYPE_FP32", "dims": [16]}
                                    for n in ("OUTPUT0", "OUTPUT1")]})
    http.load_model("sent", config=config, files={"file:1/model.onnx": model})
    infer_add_sub(grpc, grpcclient, "sent")
    assert index(http)["sent"]["state"] == "READY"
    grpc.load_model("sent2", config=config.replace('"sent"', '"sent2"'), files={"file:1/model.onnx": model})
    infer_add_sub(http, httpclient, "sent2")
    for client in (http, grpc):
        for path in ("../escape.onnx", "1/../../escape", "/abs/model.onnx", "1/.hidden"):
            with pytest.raises(InferenceServerException, match="must be relative to the model folder"):
                client.load_model("evil", config=config, files={f"file:{path}": b"x"})
        with pytest.raises(InferenceServerException, match="clashes with another file's path") as clash:
            client.load_model("evil", config=config, files={"file:1/a": b"x", "file:1/a/b": b"y"})
        assert "400" in str(clash.value.status()) or "INVALID_ARGUMENT" in str(clash.value.status())
        with pytest.raises(InferenceServerException, match="needs the model configuration"):
            client.load_model("evil", files={"file:1/model.onnx": model})
    assert not list(tmp_path.parent.glob("escape*")) and "evil" not in index(http)
    http.unload_model("sent")
    http.unload_model("sent2")
