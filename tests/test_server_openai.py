"""OpenAI's API on ``kiln serve MODEL``, driven by the official ``openai`` package as it is: a tiny engine
served in a subprocess (one for the module, with an API key), greedy results checked against
``LLM.generate`` / ``LLM.chat`` on the same engine."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from server_harness import ServerProcess, wait_for

openai = pytest.importorskip("openai")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from kiln.runtime import LLM, SamplingParams  # noqa: E402

KEY = "sk-kiln-test"
PROMPT = "The quick brown fox"
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a fox."},
    {"role": "assistant", "content": "Reynard."},
    {"role": "user", "content": "And a dog?"},
]


@pytest.fixture(scope="module")
def engine(engine_dir):
    return engine_dir("llama")


@pytest.fixture(scope="module")
def reference(engine):
    llm = LLM(engine, device="cpu")
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    s = ServerProcess(None, str(engine), "--served-model-name", "tiny", env={"KILN_API_KEY": KEY}, ready_timeout=120)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://{server.http}/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(reference, prompt, max_tokens, chat=False, **kw):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, **kw)
    return (reference.chat([prompt], params) if chat else reference.generate([prompt], params))[0]


def metric(server, name, model="tiny", **labels) -> float:
    # The server has an API key: the metrics page asks for it too.
    request = urllib.request.Request(f"http://{server.metrics}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request) as r:
        page = r.read().decode()
    family = next(f for f in text_string_to_metric_families(page) if f.name == name)
    return next(s.value for s in family.samples
                if s.labels.get("model") == model and labels.items() <= s.labels.items())



SLOW_INIT = """
import time


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(4)

    def execute(self, requests):
        return []
"""


def test_a_request_while_the_models_load_gets_503_and_retry_after(engine, tmp_path):
    """The ports open before the startup models load (live, not yet ready): meanwhile a model that is
    loading answers 503 with Retry-After, which clients such as the openai package retry, not 404."""
    import shutil

    shutil.copytree(engine, tmp_path / "tiny")
    (tmp_path / "slow" / "1").mkdir(parents=True)
    (tmp_path / "slow" / "1" / "model.py").write_text(SLOW_INIT)
    (tmp_path / "slow" / "config.pbtxt").write_text(
        'backend: "python"\ninput [ { name: "IN" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 1 ] } ]\n')
    s = ServerProcess(tmp_path, wait_ready=False, ready_timeout=120)
    try:
        body = json.dumps({"model": "slow", "prompt": "hi", "max_tokens": 1}).encode()
        request = urllib.request.Request(f"http://{s.http}/v1/completions", body,
                                         {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as loading:
            urllib.request.urlopen(request, timeout=30)
        assert loading.value.code == 503 and loading.value.headers["Retry-After"] == "2"
        assert "is loading" in json.loads(loading.value.read())["error"]["message"]
        # The openai client retries until the server is ready, then gets the kiln model's answer.
        # (Retries 2 s apart for up to a minute: a loaded box, or a first start that compiles kiln's CPU kernels,
        # takes longer than the slow model's 4 s.)
        client = openai.OpenAI(base_url=f"http://{s.http}/v1", api_key="unused", max_retries=30, timeout=60)
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].text is not None
        assert wait_for(lambda: "kiln serve is ready" in s.log or "models:" in s.log, 30)
        with pytest.raises(urllib.error.HTTPError) as not_kiln:  # ready: the python model is no LLM
            urllib.request.urlopen(request, timeout=30)
        assert not_kiln.value.code == 404
    finally:
        s.stop()


def test_models_and_the_kserve_view(server, client, engine):
    from kiln.engine import read_engine

    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].model_extra["max_model_len"] == read_engine(engine, need_weights=False).build.max_seq_len
    with urllib.request.urlopen(f"http://{server.http}/v2/models/tiny/ready") as r:
        assert r.status == 200  # the same model, in the Triton protocols' view
    assert "kiln serve is ready: tiny" in server.log and "curl http://" in server.log


def test_completion_matches_llm_generate_and_counts_usage(client, reference):
    expected = greedy(reference, PROMPT, 8, ignore_eos=True)
    result = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    choice = result.choices[0]
    assert choice.text == expected.text and choice.finish_reason == "length" and choice.index == 0
    assert result.usage.prompt_tokens == len(reference.tokenizer.encode(PROMPT))
    assert result.usage.completion_tokens == 8
    assert result.usage.total_tokens == result.usage.prompt_tokens + 8
    assert result.object == "text_completion" and result.model == "tiny"


def test_streamed_completion_concatenates_and_reports_usage(client, reference):
    expected = greedy(reference, PROMPT, 10, ignore_eos=True)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 1 and "".join(texts) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_chat_streamed_deltas_equal_the_content_and_llm_chat(client, reference):
    expected = greedy(reference, CONVERSATION, 12, chat=True)
    whole = client.chat.completions.create(model="tiny", messages=CONVERSATION, max_tokens=12, temperature=0)
    assert whole.choices[0].message.content == expected.text
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len(reference.tokenizer.encode_chat(CONVERSATION))
    assert whole.usage.completion_tokens == len(expected.token_ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=CONVERSATION, max_completion_tokens=12,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_stop_strings_end_the_text(client, reference):
    text = greedy(reference, PROMPT, 16, ignore_eos=True).text
    stop = text[5:8]
    for given in (stop, [stop, "never appears"]):
        result = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=given,
                                           extra_body={"ignore_eos": True})
        assert result.choices[0].text == text[:text.index(stop)]
        assert result.choices[0].finish_reason == "stop"


def test_n_choices_and_seeds(client):
    result = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=7,
                                       extra_body={"ignore_eos": True})
    assert sorted(c.index for c in result.choices) == [0, 1, 2]
    assert len({c.text for c in result.choices}) == 3
    assert result.usage.completion_tokens == 3 * 8
    again = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=7,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in result.choices]
    other = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=8)
    assert [c.text for c in other.choices] != [c.text for c in result.choices]
    # Two prompts, two choices each: indexes run over both.
    batch = client.completions.create(model="tiny", prompt=[PROMPT, "Inference engines"], max_tokens=4, n=2, seed=1)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    chat = client.chat.completions.create(model="tiny", messages=CONVERSATION, max_tokens=6, n=2, seed=3, stream=True)
    indexes = {c.choices[0].index for c in chat}
    assert indexes == {0, 1}


def test_logprobs(client, reference):
    expected = greedy(reference, PROMPT, 5, ignore_eos=True, logprobs=2)
    result = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2,
                                       extra_body={"ignore_eos": True})
    lp = result.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert lp.token_logprobs == pytest.approx([t.logprob for t in expected.outputs[0].logprobs], abs=1e-4)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    chat = client.chat.completions.create(model="tiny", messages=CONVERSATION, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[-1].logprob


def test_echo_with_logprobs_scores_the_prompt(client, reference):
    expected = greedy(reference, PROMPT, 3, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    prompt_ids = expected.prompt_token_ids
    want = [None] + [lp.logprob for lp in expected.prompt_logprobs[1:]]
    want += [lp.logprob for lp in expected.outputs[0].logprobs]
    result = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True,
                                       extra_body={"ignore_eos": True})
    choice = result.choices[0]
    assert choice.text == PROMPT + expected.text
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(prompt_ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(want[1:], abs=1e-4)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    stream = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2,
                                            echo=True, stream=True, extra_body={"ignore_eos": True}))
    streamed = [v for chunk in stream for c in chunk.choices if c.logprobs for v in c.logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(want[1:], abs=1e-4)
    assert "".join(c.text for chunk in stream for c in chunk.choices) == PROMPT + expected.text


def _error_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    return e.value.status_code, e.value.body


def test_errors_have_openai_shape_and_status(server, client):
    status, body = _error_of(lambda: client.completions.create(model="nope", prompt="x"))
    assert status == 404 and body["code"] == "model_not_found" and body["param"] == "model"
    status, body = _error_of(lambda: client.completions.create(model="tiny", prompt="word " * 400, max_tokens=4))
    assert status == 400 and body["code"] == "context_length_exceeded"
    status, body = _error_of(lambda: client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "word " * 400}]))
    assert status == 400 and body["code"] == "context_length_exceeded"
    # One context-length rule (the engine's) and one message, whichever protocol asked: 250 + 10 > 256.
    status, body = _error_of(lambda: client.completions.create(model="tiny", prompt=[5] * 250, max_tokens=10))
    rule = "maximum context length is 256 tokens, but the prompt (250 tokens) plus max_tokens (10) is 260 tokens"
    assert status == 400 and body["code"] == "context_length_exceeded" and rule in body["message"]
    status, text = _call(server, "/v2/models/tiny/generate", {"input_ids": [5] * 250, "max_tokens": 10})
    assert status == 400 and rule in json.loads(text)["error"]
    # The sampling ranges are SamplingParams' (one owner), named by their param; an integer past what the
    # engine core's wire carries is one of them, not a 500.
    for field, value in (("top_k", 10**30), ("top_p", 5), ("min_p", -1), ("cache_salt", ""), ("min_tokens", -3)):
        status, body = _error_of(lambda: client.completions.create(model="tiny", prompt="x", max_tokens=2,
                                                                   extra_body={field: value}))
        assert status == 400 and body["param"] == field and field in body["message"], (field, body)
    status, body = _error_of(lambda: client.completions.create(model="tiny", prompt="x", temperature=3))
    assert status == 400 and body["param"] == "temperature" and "temperature" in body["message"]
    status, body = _error_of(lambda: client.chat.completions.create(model="tiny", messages=CONVERSATION, n=0))
    assert status == 400 and body["param"] == "n"
    status, body = _error_of(lambda: client.chat.completions.create(
        model="tiny", messages=CONVERSATION, extra_body={"tools_of_my_own": 1}))
    assert status == 400 and body["param"] == "tools_of_my_own"
    wrong_key = openai.OpenAI(base_url=f"http://{server.http}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong_key.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    request = urllib.request.Request(f"http://{server.http}/v1/chat/completions", data=b'{"model": "tiny", "mess',
                                     headers={"Authorization": f"Bearer {KEY}"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request)
    error = json.loads(e.value.read())["error"]
    assert e.value.code == 400 and "JSON" in error["message"] and error["type"] == "invalid_request_error"
    # The server keeps serving.
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).choices[0].text is not None


def test_concurrent_streams_some_leaving_and_blocks_freed(server, client):
    def run(i: int):
        leaves = i % 3 == 0
        stream = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"client {i}"}], stream=True, temperature=0.5,
            seed=i, max_tokens=200 if leaves else 16, extra_body={"ignore_eos": True})
        text, reason = "", None
        for n, chunk in enumerate(stream):
            if leaves and n == 3:
                stream.close()  # a client that goes away mid-stream
                return "left", None
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
        return text, reason

    before = metric(server, "nv_inference_request_success")
    aborted = metric(server, "kiln_request_finished", finish_reason="abort")
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(16)))
    stayed = [r for i, r in enumerate(results) if i % 3]
    assert len(stayed) == 10 and all(reason == "length" for _, reason in stayed)
    assert all(r == ("left", None) for i, r in enumerate(results) if i % 3 == 0)
    assert wait_for(lambda: metric(server, "kiln_kv_cache_blocks_used") == 0)
    # The six that left were aborted, not run to their 200 tokens.
    assert metric(server, "kiln_request_finished", finish_reason="abort") == aborted + 6
    assert metric(server, "kiln_num_requests_running") == 0 and metric(server, "kiln_num_requests_waiting") == 0
    # The OpenAI requests are the model's requests: the Triton statistics counted them.
    assert metric(server, "nv_inference_request_success") >= before + 10


def _call(server, path: str, body: dict | None = None, key: str | None = KEY) -> tuple[int, str]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(f"http://{server.http}{path}", json.dumps(body).encode() if body else None,
                                     headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_vllm_routes_tokenize_detokenize_health_version_and_metrics(server, reference):
    status, body = _call(server, "/tokenize", {"model": "tiny", "prompt": PROMPT, "return_token_strs": True})
    doc = json.loads(body)
    ids = reference.tokenizer.encode(PROMPT)
    assert status == 200 and doc["tokens"] == ids and doc["count"] == len(ids) and doc["max_model_len"] == 256
    assert "".join(doc["token_strs"]).replace("Ġ", " ").endswith("fox")
    status, body = _call(server, "/tokenize", {"messages": CONVERSATION})  # the one model, by default
    assert status == 200 and json.loads(body)["tokens"] == reference.tokenizer.encode_chat(CONVERSATION)
    status, body = _call(server, "/detokenize", {"model": "tiny", "tokens": ids})
    assert status == 200 and json.loads(body)["prompt"] == reference.tokenizer.decode(ids, skip_special_tokens=False)
    status, body = _call(server, "/detokenize", {"model": "tiny", "tokens": [10**9]})
    assert status == 400 and json.loads(body)["error"]["param"] == "tokens"
    status, body = _call(server, "/tokenize", {"model": "tiny", "prompt": "x", "messages": CONVERSATION})
    assert status == 400 and "not both" in json.loads(body)["error"]["message"]
    status, _ = _call(server, "/tokenize", {"model": "tiny", "prompt": "x"}, key="sk-wrong")
    assert status == 401
    assert _call(server, "/health", key=None)[0] == 200
    assert json.loads(_call(server, "/version")[1])["version"]
    status, page = _call(server, "/metrics")  # on the API's port too, as vLLM serves it
    assert status == 200 and "nv_inference_request_success" in page
    assert _call(server, "/metrics", key=None)[0] == 401


def test_unknown_fields_are_named_whatever_they_begin_with(client):
    for name in ("str_option", "int_limit", "list[x]", "structured_output"):
        status, body = _error_of(lambda: client.completions.create(model="tiny", prompt="x",
                                                                    extra_body={name: 1}))
        assert status == 400 and body["param"] == name and body["message"].endswith(name)


def test_prompt_logprobs_field_matches_the_engine(client, reference):
    """vLLM's ``prompt_logprobs`` on both endpoints: per prompt token (None first) its logprob and rank among
    the top k, as the engine computed them (which tests/test_prompt_logprobs.py holds against transformers)."""
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3)
    want = reference.generate([PROMPT], params)[0]
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0,
                                    extra_body={"prompt_logprobs": 3}).choices[0].prompt_logprobs
    assert got[0] is None and len(got) == len(want.prompt_token_ids)
    for entry, token, lp in zip(got[1:], want.prompt_token_ids[1:], want.prompt_logprobs[1:]):
        assert entry[str(token)]["logprob"] == pytest.approx(lp.logprob, abs=1e-5)
        ranked = sorted((v["rank"], int(t)) for t, v in entry.items() if v["rank"] is not None)
        assert [t for _, t in ranked][:3] == [t for t, _ in lp.top[:3]]
    chat = client.chat.completions.create(model="tiny", messages=CONVERSATION, max_tokens=2, temperature=0,
                                          extra_body={"prompt_logprobs": 1})
    assert chat.prompt_logprobs[0] is None and len(chat.prompt_logprobs) == len(
        reference.tokenizer.encode_chat(CONVERSATION))
    stream = client.chat.completions.create(model="tiny", messages=CONVERSATION, max_tokens=2, temperature=0,
                                            stream=True, extra_body={"prompt_logprobs": 1})
    firsts = [chunk.prompt_logprobs for chunk in stream if getattr(chunk, "prompt_logprobs", None)]
    assert firsts == [chat.prompt_logprobs]
