"""The kiln backend: a kiln engine served by a real ``kiln serve`` subprocess, driven by tritonclient
(gRPC streams, HTTP) and Triton's generate extension, with TensorRT-LLM's tensor names; greedy results
checked against ``LLM.generate`` on the same engine. One server for the module."""
from __future__ import annotations

import json
import queue
import shutil
import socket
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from server_harness import ServerProcess, wait_for, write_config

tritonclient = pytest.importorskip("tritonclient")

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from kiln.runtime import LLM, SamplingParams  # noqa: E402

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def engine(engine_dir):
    return engine_dir("llama")


@pytest.fixture(scope="module")
def reference(engine):
    llm = LLM(engine, device="cpu")
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def server(engine, engine_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("kiln-repository")
    shutil.copytree(engine, root / "tiny")  # an engine folder as it is: no config.pbtxt, no version folder
    (root / "tiny_config/1").mkdir(parents=True)
    write_config(root / "tiny_config", f"""
backend: "kiln"
model_transaction_policy {{ decoupled: false }}
parameters {{ key: "engine_dir" value {{ string_value: "{engine}" }} }}
parameters {{ key: "exclude_input_in_output" value {{ string_value: "false" }} }}
parameters {{ key: "enable_prefix_caching" value {{ string_value: "false" }} }}""")
    # A config written for TensorRT-LLM's ensemble (its names and types), with the engine in version folder 1.
    shutil.copytree(engine, root / "trtllm_style/1")
    write_config(root / "trtllm_style", """
backend: "kiln"
max_batch_size: 4
model_transaction_policy { decoupled: true }
input [
  { name: "text_input" data_type: TYPE_STRING dims: [ -1 ] },
  { name: "max_tokens" data_type: TYPE_UINT32 dims: [ -1 ] },
  { name: "top_k" data_type: TYPE_UINT32 dims: [ 1 ] optional: true },
  { name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true }
]
output [ { name: "text_output" data_type: TYPE_STRING dims: [ -1 ] } ]""")
    # One request at a time, one waiting: the queue limit every protocol meets (OpenAI's requests too).
    (root / "tiny_queue/1").mkdir(parents=True)
    write_config(root / "tiny_queue", f"""
backend: "kiln"
dynamic_batching {{ default_queue_policy {{ max_queue_size: 1 }} }}
parameters {{ key: "engine_dir" value {{ string_value: "{engine_dir("llama", max_seq_len=512)}" }} }}
parameters {{ key: "max_concurrency" value {{ string_value: "1" }} }}""")
    s = ServerProcess(root, "--model-control-mode", "explicit", "--load-model", "*", ready_timeout=120)
    yield s
    s.stop()


def greedy(reference, prompt, max_tokens, **kw):
    return reference.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, **kw))[0]


def inputs(module, **values):
    """Named inputs, each one batch row: strings as BYTES, bools BOOL, ints INT32 (seeds UINT64), floats FP32."""
    out = []
    for name, value in values.items():
        if isinstance(value, str):
            array = np.array([[value.encode()]], dtype=object)
        elif isinstance(value, bool):
            array = np.array([[value]], dtype=bool)
        elif isinstance(value, list):
            array = np.array([value], dtype=np.int32)
        elif isinstance(value, int):
            array = np.array([[value]], dtype=np.uint64 if "seed" in name else np.int32)
        else:
            array = np.array([[value]], dtype=np.float32)
        i = module.InferInput(name, list(array.shape), _datatype(array))
        i.set_data_from_numpy(array)
        out.append(i)
    return out


def _datatype(array):
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(array.dtype)


def post(server, path, doc):
    request = urllib.request.Request(f"http://{server.http}{path}", data=json.dumps(doc).encode(), method="POST")
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def events(body: bytes) -> list[dict]:
    return [json.loads(chunk[len("data: "):]) for chunk in body.decode().split("\n\n") if chunk]


def metric(server, name: str, **labels) -> float:
    with urllib.request.urlopen(f"http://{server.metrics}/metrics") as r:
        page = r.read().decode()
    family = next(f for f in text_string_to_metric_families(page) if f.name == name)
    return next(s.value for s in family.samples if {"model": "tiny", **labels}.items() <= s.labels.items())


def kv_blocks_used(server) -> float:
    return metric(server, "kiln_kv_cache_blocks_used")



def test_engine_folder_config_is_completed(server, engine):
    from kiln.engine import read_engine

    config = httpclient.InferenceServerClient(server.http).get_model_config("tiny")
    assert config["backend"] == "kiln" and config["model_transaction_policy"]["decoupled"] is True
    assert config["max_batch_size"] == read_engine(engine, need_weights=False).build.max_batch_size
    types = {i["name"]: i["data_type"] for i in config["input"]}
    assert types["text_input"] == "TYPE_STRING" and types["max_tokens"] == "TYPE_INT32"
    assert types["stream"] == "TYPE_BOOL" and types["random_seed"] == "TYPE_UINT64"
    assert types["runtime_top_k"] == "TYPE_INT32" and types["runtime_top_p"] == "TYPE_FP32"
    assert {o["name"] for o in config["output"]} >= {"text_output", "output_ids", "sequence_length", "cum_log_probs"}


def test_grpc_stream_matches_llm_generate(server, reference):
    expected = greedy(reference, PROMPT, 12, ignore_eos=True)
    client = grpcclient.InferenceServerClient(server.grpc)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("tiny", inputs(grpcclient, text_input=PROMPT, max_tokens=12, stream=True,
                                                 temperature=0.0, min_tokens=12),
                                  request_id="g1", enable_empty_final_response=True)
        texts, ids, final = [], [], False
        while not final:
            result, error = results.get(timeout=30)
            assert error is None, error.message()
            final = result.get_response().parameters["triton_final_response"].bool_param
            if result.as_numpy("text_output") is not None:
                texts.append(result.as_numpy("text_output")[0, 0].decode())
                ids += result.as_numpy("output_ids")[0, 0].tolist()
                assert result.as_numpy("sequence_length")[0, 0] == result.as_numpy("output_ids").shape[-1]
    finally:
        client.stop_stream()
        client.close()
    assert len(texts) > 1  # a response per step
    assert "".join(texts) == expected.text and ids == expected.token_ids


def test_http_generate_and_generate_stream_match_llm_generate(server, reference):
    expected = greedy(reference, PROMPT, 10, ignore_eos=True)
    doc = {"text_input": PROMPT, "max_tokens": 10, "temperature": 0.0, "min_tokens": 10}
    status, body = post(server, "/v2/models/tiny/generate_stream", {**doc, "stream": True})
    assert status == 200
    streamed = events(body)
    assert len(streamed) > 1 and "".join(e["text_output"] for e in streamed) == expected.text
    status, body = post(server, "/v2/models/tiny/generate", doc)
    whole = json.loads(body)
    assert status == 200 and whole["text_output"] == expected.text
    assert whole["output_ids"] == expected.token_ids and whole["sequence_length"] == len(expected.token_ids)


def test_a_config_written_for_tensorrt_llm(server, reference):
    expected = greedy(reference, PROMPT, 5)
    client = httpclient.InferenceServerClient(server.http)
    text = httpclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[PROMPT.encode()]], dtype=object))
    length = httpclient.InferInput("max_tokens", [1, 1], "UINT32")
    length.set_data_from_numpy(np.array([[5]], dtype=np.uint32))
    top_k = httpclient.InferInput("top_k", [1, 1], "UINT32")
    top_k.set_data_from_numpy(np.array([[1]], dtype=np.uint32))
    result = client.infer("trtllm_style", [text, length, top_k])
    assert result.as_numpy("text_output")[0, 0].decode() == expected.text
    assert result.as_numpy("output_ids") is None  # only the config's outputs
    status, body = post(server, "/v2/models/trtllm_style/generate_stream",
                        {"text_input": PROMPT, "max_tokens": 5, "top_k": 1, "stream": True})
    assert status == 200 and "".join(e["text_output"] for e in events(body)) == expected.text


def test_token_ids_prompt_and_exclude_input_in_output(server, reference):
    prompt = reference.tokenizer.encode(PROMPT)
    expected = greedy(reference, prompt, 6, ignore_eos=True)
    client = httpclient.InferenceServerClient(server.http)
    result = client.infer("tiny_config", inputs(httpclient, input_ids=prompt, request_output_len=6,
                                                 runtime_top_k=1, min_length=6))
    # tiny_config's parameter exclude_input_in_output is false: the prompt leads the output.
    assert result.as_numpy("output_ids")[0, 0].tolist() == prompt + expected.token_ids
    assert result.as_numpy("sequence_length")[0, 0] == len(prompt) + 6
    result = client.infer("tiny_config", inputs(httpclient, input_ids=prompt, request_output_len=6, runtime_top_k=1,
                                                 min_length=6, exclude_input_in_output=True))
    assert result.as_numpy("output_ids")[0, 0].tolist() == expected.token_ids
    assert result.as_numpy("text_output")[0, 0].decode() == expected.text


def test_log_probs_and_seeded_sampling(server, reference):
    expected = greedy(reference, PROMPT, 5, ignore_eos=True, logprobs=0)
    client = httpclient.InferenceServerClient(server.http)
    result = client.infer("tiny", inputs(httpclient, text_input=PROMPT, max_tokens=5, temperature=0.0, min_tokens=5,
                                          return_log_probs=True))
    lps = result.as_numpy("output_log_probs")[0, 0]
    np.testing.assert_allclose(lps, [lp.logprob for lp in expected.outputs[0].logprobs], rtol=1e-4, atol=1e-4)
    assert result.as_numpy("cum_log_probs")[0, 0] == pytest.approx(float(lps.sum()), abs=1e-4)
    sampled = [client.infer("tiny", inputs(httpclient, text_input=PROMPT, max_tokens=8, temperature=1.0,
                                            random_seed=1234)).as_numpy("output_ids").tolist() for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_a_batch_of_two_rows(server, reference):
    prompts = [PROMPT, "Inference engines"]
    expected = [greedy(reference, p, 4 + i, ignore_eos=True) for i, p in enumerate(prompts)]
    text = httpclient.InferInput("text_input", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([[p.encode()] for p in prompts], dtype=object))
    length = httpclient.InferInput("max_tokens", [2, 1], "INT32")
    length.set_data_from_numpy(np.array([[4], [5]], dtype=np.int32))
    extra = inputs(httpclient, temperature=0.0)
    extra[0].set_shape([2, 1])
    extra[0].set_data_from_numpy(np.zeros((2, 1), dtype=np.float32))
    pad = httpclient.InferInput("pad_id", [2, 1], "INT32")
    pad.set_data_from_numpy(np.array([[7], [7]], dtype=np.int32))
    ignore = httpclient.InferInput("min_tokens", [2, 1], "INT32")
    ignore.set_data_from_numpy(np.array([[4], [5]], dtype=np.int32))
    result = httpclient.InferenceServerClient(server.http).infer("tiny", [text, length, *extra, pad, ignore])
    assert [t.decode() for t in result.as_numpy("text_output")[:, 0]] == [e.text for e in expected]
    ids = result.as_numpy("output_ids")
    assert ids.shape == (2, 1, 5) and ids[0, 0].tolist() == expected[0].token_ids + [7]
    assert result.as_numpy("sequence_length").tolist() == [[4], [5]]


@pytest.mark.parametrize("doc, status, words", [
    ({"text_input": PROMPT, "max_tokens": 0}, 400, ["max_tokens"]),
    ({"text_input": PROMPT, "runtime_top_p": 2.0}, 400, ["runtime_top_p", "top_p"]),
    ({"text_input": PROMPT, "temperature": -1.0}, 400, ["temperature"]),
    ({"text_input": PROMPT, "beam_width": 4}, 400, ["beam_width"]),
    ({"text_input": PROMPT, "max_tokens": 4, "not_an_input": 1}, 400, ["not_an_input"]),
    ({"text_input": PROMPT, "max_tokens": 4, "top_k": 1, "runtime_top_k": 2}, 400, ["top_k", "runtime_top_k"]),
    ({"max_tokens": 4}, 400, ["text_input", "input_ids"]),
    ({"text_input": "word " * 400, "max_tokens": 4}, 400, ["maximum context length"]),
    ({"text_input": PROMPT, "end_id": 10**6}, 400, ["stop_token_ids"]),
    # A field set through another input is named by that input (SamplingParamsError.field, not the message).
    ({"text_input": PROMPT, "end_id": -3}, 400, ["input 'end_id'", "stop_token_ids must be >= 0"]),
    ({"text_input": PROMPT, "max_tokens": 4, "min_length": 9}, 400, ["input 'min_length'", "min_tokens"]),
])
def test_bad_inputs_get_a_400_naming_the_problem(server, doc, status, words):
    got, body = post(server, "/v2/models/tiny/generate", doc)
    message = json.loads(body)["error"]
    assert got == status and all(w in message for w in words), message
    assert post(server, "/v2/models/tiny/generate", {"text_input": PROMPT, "max_tokens": 2})[0] == 200


def test_wrong_type_and_streaming_a_coupled_model_are_refused(server):
    client = grpcclient.InferenceServerClient(server.grpc)
    wrong = inputs(grpcclient, text_input=PROMPT, max_tokens=2.0)  # FP32, the config says INT32
    with pytest.raises(InferenceServerException, match="max_tokens.*FP32.*INT32") as e:
        client.infer("tiny", wrong)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="not decoupled"):
        client.infer("tiny_config", inputs(grpcclient, text_input=PROMPT, max_tokens=2, stream=True))
    assert client.infer("tiny", inputs(grpcclient, text_input=PROMPT, max_tokens=2)).as_numpy("text_output") is not None


def test_a_client_that_leaves_mid_stream_frees_its_kv_blocks(server):
    aborted = metric(server, "kiln_request_finished", finish_reason="abort")
    body = json.dumps({"text_input": PROMPT, "max_tokens": 200, "min_tokens": 200, "stream": True}).encode()
    host, port = server.http.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v2/models/tiny/generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while received.count(b"data: ") < 2:
            received += s.recv(4096)
        assert kv_blocks_used(server) > 0
    assert wait_for(lambda: kv_blocks_used(server) == 0)
    assert metric(server, "kiln_request_finished", finish_reason="abort") == aborted + 1  # not run to the end


def test_a_cancelled_grpc_stream_frees_its_kv_blocks(server):
    aborted = metric(server, "kiln_request_finished", finish_reason="abort")
    client = grpcclient.InferenceServerClient(server.grpc)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("tiny", inputs(grpcclient, text_input=PROMPT, max_tokens=200, min_tokens=200,
                                             stream=True))
    for _ in range(2):
        result, error = results.get(timeout=30)
        assert error is None
    client.stop_stream(cancel_requests=True)
    client.close()
    assert wait_for(lambda: kv_blocks_used(server) == 0)
    assert metric(server, "kiln_request_finished", finish_reason="abort") == aborted + 1


def test_metrics_count_tokens_and_latencies(server):
    post(server, "/v2/models/tiny/generate", {"text_input": PROMPT, "max_tokens": 3, "min_tokens": 3})
    with urllib.request.urlopen(f"http://{server.metrics}/metrics") as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    tiny = {name: [s for s in f.samples if s.labels.get("model") == "tiny"] for name, f in families.items()}
    assert tiny["kiln_generation_tokens"][0].value >= 3 and tiny["kiln_prompt_tokens"][0].value > 0
    assert tiny["kiln_kv_cache_blocks_total"][0].value > 0
    ttft_count = next(s for s in tiny["kiln_time_to_first_token_seconds"] if s.name.endswith("_count"))
    assert ttft_count.value >= 1
    assert next(s for s in tiny["nv_inference_request_success"]).value >= 1


def test_unload_frees_the_engine_and_load_brings_it_back(server):
    client = httpclient.InferenceServerClient(server.http)
    client.unload_model("tiny_config")
    assert not client.is_model_ready("tiny_config")
    with urllib.request.urlopen(f"http://{server.metrics}/metrics") as r:
        page = r.read().decode()
    assert 'kiln_kv_cache_blocks_total{model="tiny_config"' not in page
    client.load_model("tiny_config")
    result = client.infer("tiny_config", inputs(httpclient, text_input=PROMPT, max_tokens=2))
    assert result.as_numpy("sequence_length")[0, 0] >= 1


def test_a_full_queue_answers_503_on_every_protocol(server):
    import openai
    from concurrent.futures import ThreadPoolExecutor

    client = openai.OpenAI(base_url=f"http://{server.http}/v1", api_key="none", max_retries=0)
    long = {"model": "tiny_queue", "prompt": PROMPT, "max_tokens": 480, "min_tokens": 480, "temperature": 0}

    def raw_openai():
        request = urllib.request.Request(f"http://{server.http}/v1/completions", data=json.dumps(
            {**long, "max_tokens": 1, "min_tokens": 0}).encode(), headers={"Content-Type": "application/json"},
            method="POST")
        try:
            with urllib.request.urlopen(request) as r:
                return r.status, None, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers["Retry-After"], json.loads(e.read())["error"]["message"]

    def generate():
        code, body = post(server, "/v2/models/tiny_queue/generate", {"text_input": PROMPT, "max_tokens": 1})
        return code, None, body.decode()

    def openai_client():
        try:
            client.completions.create(model="tiny_queue", prompt=PROMPT, max_tokens=1)
            return 200, None, ""
        except openai.APIStatusError as e:
            return e.status_code, e.response.headers.get("retry-after"), e.message

    def statistics():
        stats = httpclient.InferenceServerClient(server.http).get_inference_statistics("tiny_queue")
        counts = stats["model_stats"][0]["inference_stats"]
        return counts["success"]["count"], counts["fail"]["count"]

    # Two long requests: one runs, one waits, so the queue (max 1) is full until the first ends (about a second
    # of the tiny engine's decoding). A refusal that finds the queue no longer full is queued behind the second
    # and served after it: that shows as a 200 when both long requests are over, and the round is run again. A
    # 200 while either long request still runs is a real failure.
    for _round in range(4):
        before = statistics()
        with ThreadPoolExecutor(2) as pool:
            running = [pool.submit(post, server, "/v1/completions", long) for _ in range(2)]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and _stat(server, "tiny_queue", "pending") < 1:
                time.sleep(0.02)
            answers = [send() for send in (raw_openai, generate, openai_client)]
            raced = all(f.done() for f in running)
            assert [f.result()[0] for f in running] == [200, 200]
        # The instance is free again once the model's statistics count all five (a response reaches its client
        # a moment before the worker that ran it takes the next request).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(statistics()) - sum(before) < 5:
            time.sleep(0.02)
        served = sum(code == 200 for code, _, _ in answers)
        assert not served or raced, answers
        if not served:
            break
    assert all(code == 503 and "Exceeds maximum queue size" in message for code, _, message in answers), answers
    assert answers[0][1] and answers[2][1]  # the OpenAI answers carry Retry-After (KServe's do not, as Triton's)
    # The OpenAI requests went through the model's own statistics: two succeeded, the refused ones failed.
    after = statistics()
    assert (after[0] - before[0], after[1] - before[1]) == (2, 3)


def _stat(server, model: str, field: str) -> float:
    with urllib.request.urlopen(f"http://{server.metrics}/metrics") as r:
        page = r.read().decode()
    name = {"pending": "nv_inference_pending_request_count"}[field]
    family = next(f for f in text_string_to_metric_families(page) if f.name == name)
    return next(s.value for s in family.samples if s.labels["model"] == model)
