"""``kiln deploy``: the repository it writes is served by ``kiln serve`` as it is (the ensemble over generate,
generate_stream and gRPC, and the BLS model, each giving LLM.generate's greedy text); ``kiln fill-template``;
a deploy that fails leaves nothing; the Kubernetes and KServe manifests pass the Kubernetes schemas."""
from __future__ import annotations

import json
import queue
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from server_harness import ServerProcess

tritonclient = pytest.importorskip("tritonclient")

import tritonclient.grpc as grpcclient  # noqa: E402

from kiln.cli.main import main  # noqa: E402
from kiln.deploy.fill_template import fill, parse_substitutions  # noqa: E402
from kiln.deploy.kubernetes import ManifestOptions, manifests, validate_manifests  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.runtime import LLM, SamplingParams  # noqa: E402

PROMPT = "The quick brown fox"
TOKENS = 12
MODELS = {"preprocessing", "kiln", "postprocessing", "ensemble", "kiln_bls"}


@pytest.fixture(scope="module")
def engine(engine_dir):
    return engine_dir("llama")


@pytest.fixture(scope="module")
def deployed(engine, tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    assert main(["deploy", str(engine), "--repo", str(root / "repo"), "--kubernetes", str(root / "k8s")]) == 0
    return root


@pytest.fixture(scope="module")
def expected(engine):
    llm = LLM(engine, device="cpu")
    try:
        return llm.generate([PROMPT], SamplingParams(max_tokens=TOKENS, temperature=0, min_tokens=TOKENS))[0]
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def server(deployed):
    s = ServerProcess(deployed / "repo", ready_timeout=180)
    yield s
    s.stop()


def post(server, path: str, doc: dict) -> bytes:
    request = urllib.request.Request(f"http://{server.http}{path}", data=json.dumps(doc).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=60) as r:
        return r.read()


def events(body: bytes) -> list[dict]:
    return [json.loads(chunk[len("data: "):]) for chunk in body.decode().split("\n\n") if chunk.strip()]


def test_the_repository_holds_plain_configs(deployed, engine):
    repo = deployed / "repo"
    assert {p.name for p in repo.iterdir()} == MODELS
    for name in MODELS:
        text = (repo / name / "config.pbtxt").read_text()
        assert "${" not in text and f'name: "{name}"' in text
    assert (repo / "kiln/1/engine.json").read_bytes() == (engine / "engine.json").read_bytes()
    assert (repo / "preprocessing/1/tokenizer/tokenizer.json").read_bytes() == (engine / "tokenizer.json").read_bytes()
    assert not [p for p in deployed.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_the_ensemble_answers_generate_with_llm_generates_text(server, expected):
    doc = {"text_input": PROMPT, "max_tokens": TOKENS, "temperature": 0.0, "min_tokens": TOKENS}
    whole = json.loads(post(server, "/v2/models/ensemble/generate", doc))
    assert whole["text_output"] == expected.text
    streamed = events(post(server, "/v2/models/ensemble/generate_stream", {**doc, "stream": True}))
    assert len(streamed) > 1  # a response per step, each through postprocessing
    assert "".join(e["text_output"] for e in streamed) == expected.text  # spaces and characters kept
    bls = events(post(server, "/v2/models/kiln_bls/generate_stream", {**doc, "stream": True}))
    assert len(bls) > 1 and "".join(e["text_output"] for e in bls) == expected.text


def test_the_ensemble_streams_over_grpc(server, expected):
    def tensor(name, value, datatype):
        t = grpcclient.InferInput(name, [1, 1], datatype)
        t.set_data_from_numpy(np.array([[value]], dtype=object if datatype == "BYTES" else
                                       {"INT32": np.int32, "BOOL": np.bool_, "FP32": np.float32}[datatype]))
        return t

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("ensemble", [
            tensor("text_input", PROMPT.encode(), "BYTES"), tensor("max_tokens", TOKENS, "INT32"),
            tensor("min_tokens", TOKENS, "INT32"), tensor("temperature", 0.0, "FP32"),
            tensor("stream", True, "BOOL")], enable_empty_final_response=True)
        texts = []
        while True:
            result, error = results.get(timeout=60)
            assert error is None, error
            if result.as_numpy("text_output") is not None:
                texts.append(result.as_numpy("text_output")[0, 0].decode())
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    assert len(texts) > 1 and "".join(texts) == expected.text


def test_the_manifests_pass_the_kubernetes_schemas(deployed):
    import yaml

    k8s = deployed / "k8s"
    docs = {p.name: yaml.safe_load(p.read_text()) for p in k8s.glob("*.yaml")}
    assert set(docs) == {"deployment.yaml", "service.yaml", "hpa.yaml", "kserve-servingruntime.yaml",
                         "kserve-inferenceservice.yaml"}
    validate_manifests(docs)
    container = docs["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert docs["hpa.yaml"]["spec"]["metrics"][0]["pods"]["metric"]["name"] == "kiln_num_requests_waiting"
    assert docs["kserve-servingruntime.yaml"]["spec"]["protocolVersions"] == ["v2", "grpc-v2"]
    assert "COPY repo/ /models/" in (k8s / "Dockerfile").read_text()
    # The check can fail: a misspelt field is refused.
    import kubernetes_validate

    bad = manifests(ManifestOptions(deployed / "repo"))
    bad["service.yaml"]["spec"]["prots"] = bad["service.yaml"]["spec"].pop("ports")
    with pytest.raises(kubernetes_validate.ValidationError, match="prots"):
        validate_manifests(bad)
    bad = manifests(ManifestOptions(deployed / "repo"))
    bad["kserve-servingruntime.yaml"]["spec"]["containers"][0]["imagee"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagee"):
        validate_manifests(bad)


def test_a_hugging_face_folder_is_built_on_the_way(hf_model_dir, tmp_path):
    from kiln.deploy.triton_repository import check_repository

    assert main(["deploy", str(hf_model_dir("llama")), "--repo", str(tmp_path / "repo"), "--name", "tiny",
                 "--max-batch-size", "4"]) == 0
    assert (tmp_path / "repo/tiny/1/engine.json").is_file()
    assert "max_batch_size: 4" in (tmp_path / "repo/ensemble/config.pbtxt").read_text()
    assert 'model_name: "tiny"' in (tmp_path / "repo/ensemble/config.pbtxt").read_text()
    check_repository(tmp_path / "repo", sorted(p.name for p in (tmp_path / "repo").iterdir()))


def test_a_failing_deploy_leaves_nothing(engine, deployed, tmp_path):
    with pytest.raises(KilnError, match="already has preprocessing"):
        main_raising(["deploy", str(engine), "--repo", str(deployed / "repo")])
    with pytest.raises(KilnError, match="must differ"):
        main_raising(["deploy", str(engine), "--repo", str(tmp_path / "r"), "--name", "ensemble"])
    assert not (tmp_path / "r").exists() and list(tmp_path.iterdir()) == []


def main_raising(argv: list[str]) -> None:
    """The deploy verb's work, raising its KilnError (``main`` prints it and returns 1)."""
    from kiln.deploy.triton_repository import DeployOptions, deploy

    args = dict(zip(argv[2::2], argv[3::2]))
    deploy(argv[1], Path(args["--repo"]), DeployOptions(name=args.get("--name", "kiln")))


def test_fill_template_fills_every_placeholder_and_refuses_unknown_or_missing_keys(tmp_path):
    template = 'max_batch_size: ${triton_max_batch_size}\nparameters { key: "x" value: { string_value: "${x}" } }\n'
    assert fill(template, {"triton_max_batch_size": "8", "x": "a,b"}) == template.replace(
        "${triton_max_batch_size}", "8").replace("${x}", "a,b")
    assert parse_substitutions(r"triton_max_batch_size:8,x:a\,b:c") == {"triton_max_batch_size": "8", "x": "a,b:c"}
    with pytest.raises(KilnError, match="has no placeholder for decoupled_mode"):
        fill(template, {"triton_max_batch_size": "8", "x": "1", "decoupled_mode": "true"})
    with pytest.raises(KilnError, match="still needs a value for x"):
        fill(template, {"triton_max_batch_size": "8"})
    with pytest.raises(KilnError, match="is not key:value"):
        parse_substitutions("triton_max_batch_size=8")
    path = tmp_path / "config.pbtxt"
    path.write_text(template)
    assert main(["fill-template", str(path), r"triton_max_batch_size:4,x:p\,q"]) == 0
    assert path.read_text() == template.replace("${triton_max_batch_size}", "4").replace("${x}", "p,q")
    path.write_text(template)
    assert main(["fill-template", str(path), "triton_max_batch_size:4"]) == 1  # x left unfilled: refused
    assert path.read_text() == template  # and the file is as it was
