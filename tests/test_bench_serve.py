"""``kiln bench serve`` against a real ``kiln serve`` subprocess on ephemeral ports: the table, the JSON,
token counting, failed requests, errors before the run, and no process left behind.

Triton's ``generate_stream`` is driven against a decoupled Python-backend model that streams its prompt's
words back (``ECHO``), which can fail on demand; every protocol (OpenAI completions and chat, Triton's
generate_stream through the kiln backend) against ``kiln serve`` with a tiny kiln engine.
"""
from __future__ import annotations

import json

import psutil
import pytest
from server_harness import ServerProcess, write_config

from kiln.cli.main import main
from kiln.engine import read_engine
from kiln.runtime.tokenizer import EngineTokenizer

PCT_KEYS = ("p50", "p90", "p99", "mean", "min", "max")
LIMIT = 32  # the echo model refuses to make more tokens than this

# A decoupled model as Triton users write one: text_input, max_tokens -> one response a word (the
# prompt's words in turn), each with the new text (and the new token's id, where the config asks for
# output_ids); "fail-midway" in a prompt fails the request after two responses.
ECHO = '''
import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.with_ids = any(o["name"] == "output_ids" for o in config["output"])

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self.generate, args=(request, request.get_response_sender())).start()
        return None

    def generate(self, request, sender):
        text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0].decode()
        n = int(pb_utils.get_input_tensor_by_name(request, "max_tokens").as_numpy().reshape(-1)[0])
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if n > %(limit)d:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"max_tokens {n} is more than this model makes (%(limit)d)", pb_utils.TritonError.INVALID_ARG)),
                flags=final)
            return
        words = text.split() or ["empty"]
        for i in range(n):
            if i == 2 and "fail-midway" in text:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError("failed midway")), flags=final)
                return
            time.sleep(0.002)
            outputs = [pb_utils.Tensor("text_output", np.array([(" " + words[i %% len(words)]).encode()],
                                                               dtype=np.object_))]
            if self.with_ids:
                outputs.append(pb_utils.Tensor("output_ids", np.array([i], dtype=np.int32)))
            sender.send(pb_utils.InferenceResponse(outputs))
        sender.send(flags=final)
''' % {"limit": LIMIT}

ECHO_CONFIG = """
backend: "python"
model_transaction_policy { decoupled: true }
input [ { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] },
        { name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] },
        { name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true } ]
output [ { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] } %s ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""


def _echo_model(root, name: str, with_ids: bool) -> None:
    (root / name / "1").mkdir(parents=True)
    (root / name / "1" / "model.py").write_text(ECHO)
    ids = ', { name: "output_ids" data_type: TYPE_INT32 dims: [ -1 ] }' if with_ids else ""
    write_config(root / name, ECHO_CONFIG % ids)


def _stop_and_check(server: ServerProcess) -> None:
    """Stop the server; neither it nor any process it started may be left."""
    children = psutil.Process(server.proc.pid).children(recursive=True)
    server.stop()
    assert server.proc.poll() is not None
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"processes left behind: {[p.pid for p in alive]}"


@pytest.fixture(scope="module")
def triton_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("repository")
    _echo_model(root, "echo", with_ids=False)
    _echo_model(root, "echo_ids", with_ids=True)
    server = ServerProcess(root)
    yield server
    _stop_and_check(server)


@pytest.fixture(scope="module")
def tokenizer_dir(engine_dir):
    return engine_dir("llama")


def bench(capsys, tmp_path, *args: str) -> tuple[int, dict | None, str, str]:
    out = tmp_path / "serve.json"
    out.unlink(missing_ok=True)
    code = main(["bench", "serve", *args, "--json", str(out)])
    captured = capsys.readouterr()
    return code, json.loads(out.read_text()) if out.exists() else None, captured.out, captured.err


def check_percentiles(s: dict) -> None:
    assert set(s) == set(PCT_KEYS)
    assert 0 < s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
    assert s["min"] <= s["mean"] <= s["max"]


def test_triton_generate_table_and_json(triton_server, tokenizer_dir, capsys, tmp_path):
    url = f"http://{triton_server.http}"
    code, doc, table, err = bench(
        capsys, tmp_path, "--url", url, "--backend", "triton-generate", "--model", "echo_ids",
        "--tokenizer", str(tokenizer_dir), "--input-len", "12", "--output-len", "6", "--num-prompts", "8",
        "--max-concurrency", "3", "--request-rate", "200", "--seed", "5", "--label", "echo")
    assert code == 0
    assert doc["benchmark"] == "serve"
    assert doc["command"].startswith("kiln bench serve --url ") and "--num-prompts 8" in doc["command"]
    server = doc["server"]
    assert server["url"] == url and server["backend"] == "triton-generate" and server["model"] == "echo_ids"
    assert server["endpoint"] == url + "/v2/models/echo_ids/generate_stream" and server["label"] == "echo"
    assert server["name"] == "kiln"
    assert doc["dataset"]["kind"] == "synthetic" and doc["dataset"]["seed"] == 5
    assert doc["dataset"]["num_requests"] == 8 and doc["dataset"]["input_len"]["max"] <= 12
    settings = doc["settings"]
    assert settings["request_rate"] == 200 and settings["max_concurrency"] == 3 and settings["exact_lengths"]
    assert settings["tokenizer"] == str(tokenizer_dir.resolve())

    r = doc["results"]
    assert r["num_requests"] == r["completed"] == 8 and r["failed"] == 0 and r["errors"] == []
    # The model returns output_ids: the server's count, one token an event, exactly as asked.
    assert r["output_tokens_counted_by"] == {"output_ids": 8}
    assert r["total_output_tokens"] == 8 * 6
    assert r["output_len"] == {"min": 6, "mean": 6.0, "max": 6, "asked_mean": 6.0, "not_as_asked": 0}
    assert r["total_input_tokens"] == sum(q["input_len"] for q in doc["requests"])
    assert 1 <= r["peak_concurrency"] <= 3
    assert r["request_throughput"] == pytest.approx(8 / r["duration_s"])
    assert r["output_throughput"] == pytest.approx(48 / r["duration_s"])
    assert r["total_token_throughput"] == pytest.approx((r["total_input_tokens"] + 48) / r["duration_s"])
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        check_percentiles(r[key])
    assert r["ttft_ms"]["max"] <= r["e2e_latency_ms"]["max"]
    # Every request has 6 tokens, so 5 gaps; its stream ends after its last token.
    assert r["tpot_ms"]["mean"] >= r["itl_ms"]["mean"]
    assert len(doc["requests"]) == 8
    assert all(q["output_len"] == 6 and q["error"] is None and q["ttft_ms"] <= q["e2e_ms"] for q in doc["requests"])

    for text in ("kiln bench serve", "triton-generate, model echo_ids", "time to first token",
                 "time per output token", "inter-token latency", "end to end", "output tokens/s",
                 "at most 3 in flight", "output_ids (8)", "8 / 0"):
        assert text in table, text
    assert "8/8" in err  # the progress bar


def test_token_counts_by_tokenizer_and_by_chunks(triton_server, tokenizer_dir, capsys, tmp_path):
    """A model that returns text only: its tokens are counted by the tokenizer, or one an event."""
    url = f"http://{triton_server.http}"
    prompt = "hello world again"
    dataset = tmp_path / "one.jsonl"
    dataset.write_text(json.dumps({"prompt": prompt, "output_tokens": 5}) + "\n")
    common = ["--url", url, "--backend", "triton-generate", "--model", "echo", "--tokenizer", str(tokenizer_dir),
              "--dataset", str(dataset), "--warmup", "0", "--no-progress"]
    code, doc, _, err = bench(capsys, tmp_path, *common)
    assert code == 0 and "req/s" not in err
    tok = EngineTokenizer(read_engine(tokenizer_dir))
    expected = len(tok.encode(" hello world again hello world", add_special_tokens=False))
    r = doc["results"]
    assert r["output_tokens_counted_by"] == {"tokenizer": 1} and r["total_output_tokens"] == expected
    assert r["total_input_tokens"] == len(tok.encode(prompt))
    assert doc["settings"]["warmup"] == 0

    code, doc, _, _ = bench(capsys, tmp_path, *common, "--count-tokens", "chunks")
    assert doc["results"]["output_tokens_counted_by"] == {"chunks": 1}
    assert doc["results"]["total_output_tokens"] == 5


def test_failed_requests_are_counted_and_the_run_goes_on(triton_server, tokenizer_dir, capsys, tmp_path):
    url = f"http://{triton_server.http}"
    lines = [{"prompt": "a fine request", "output_tokens": 4},
             {"prompt": "too long an answer", "output_tokens": LIMIT + 1},
             {"prompt": "this one will fail-midway", "output_tokens": 6},
             {"prompt": "another fine request", "output_tokens": 3},
             {"prompt": "too long again", "output_tokens": LIMIT + 1}]
    dataset = tmp_path / "mixed.jsonl"
    dataset.write_text("".join(json.dumps(x) + "\n" for x in lines))
    code, doc, table, _ = bench(capsys, tmp_path, "--url", url, "--backend", "triton-generate", "--model", "echo",
                                "--tokenizer", str(tokenizer_dir), "--dataset", str(dataset), "--max-concurrency",
                                "2")
    assert code == 0
    r = doc["results"]
    assert r["num_requests"] == 5 and r["completed"] == 2 and r["failed"] == 3
    errors = {e["error"]: e["requests"] for e in r["errors"]}
    assert errors.pop("failed midway") == 1
    # Refused before its first response: a status code (as Triton answers), not an error event.
    assert errors == {f"HTTP 400: max_tokens {LIMIT + 1} is more than this model makes ({LIMIT})": 2}
    assert [q["error"] is None for q in doc["requests"]] == [True, False, False, True, False]
    assert doc["requests"][1]["output_len"] is None and doc["requests"][1]["ttft_ms"] is None
    assert r["output_len"]["asked_mean"] == 3.5  # of the completed requests
    check_percentiles(r["ttft_ms"])
    assert "requests completed / failed" in table and "2 / 3" in table
    assert "failed requests" in table and "1 x failed midway" in table


def test_a_run_in_which_every_request_fails(triton_server, tokenizer_dir, capsys, tmp_path):
    """Still a table and a JSON, with the HTTP error of each request, and exit status 1."""
    code, doc, table, _ = bench(capsys, tmp_path, "--url", f"http://{triton_server.http}", "--backend",
                                "triton-generate", "--model", "echo", "--endpoint", "/v2/models/echo/no_such_route",
                                "--tokenizer", str(tokenizer_dir), "--input-len", "4", "--output-len", "2",
                                "--num-prompts", "3", "--warmup", "0")
    assert code == 1
    r = doc["results"]
    assert r["completed"] == 0 and r["failed"] == 3 and r["total_output_tokens"] == 0
    (error,) = r["errors"]
    assert error["requests"] == 3 and error["error"].startswith("HTTP 404")
    assert r["ttft_ms"]["p50"] is None and r["output_len"]["min"] is None
    assert "0 / 3" in table and "3 x HTTP 404" in table


def test_errors_before_the_run(triton_server, tokenizer_dir, capsys, tmp_path):
    url = f"http://{triton_server.http}"
    base = ["--tokenizer", str(tokenizer_dir), "--input-len", "4", "--output-len", "2", "--num-prompts", "2"]
    cases = [
        (["--url", url, "--backend", "triton-generate", "--model", "no_such_model"], "has no model 'no_such_model'"),
        (["--url", url, "--backend", "triton-generate"], "needs --model"),
        (["--url", url, "--backend", "triton-generate", "--model", "echo", "--output-len", str(LIMIT + 1)],
         "the warm-up requests"),
        (["--url", url, "--backend", "triton-generate", "--model", "echo", "--extra-body", "[1]"], "JSON object"),
        (["--url", url, "--backend", "triton-generate", "--model", "echo", "--max-concurrency", "0"],
         "--max-concurrency must be at least 1"),
        (["--url", "127.0.0.1:1"], "must start with http://"),
        (["--url", url, "--dataset", "x.jsonl"], "not both"),
    ]
    for args, message in cases:
        code, doc, _, err = bench(capsys, tmp_path, *base, *args)
        assert code == 1 and doc is None and message in err, (args, err)

    # A port nobody listens on: a clear error, not a table of failures.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    code, doc, _, err = bench(capsys, tmp_path, *base, "--url", f"http://127.0.0.1:{closed}",
                              "--backend", "triton-generate", "--model", "echo")
    assert code == 1 and doc is None and "cannot reach the server" in err


# -- the OpenAI protocols, against kiln serve with a kiln engine -------------------------------------------

@pytest.fixture(scope="module")
def llm_server(tokenizer_dir):
    """``kiln serve`` with the tiny engine: OpenAI's routes and the kiln backend's generate_stream."""
    server = ServerProcess(None, str(tokenizer_dir), "--served-model-name", "tiny", ready_timeout=120)
    yield server
    _stop_and_check(server)


@pytest.mark.parametrize("backend", ["openai-completions", "openai-chat", "triton-generate"])
def test_every_protocol_against_kiln_serve(llm_server, tokenizer_dir, backend, capsys, tmp_path):
    url = f"http://{llm_server.http}"
    model = ["--model", "tiny"] if backend == "triton-generate" else []  # OpenAI: the first model listed
    code, doc, table, _ = bench(capsys, tmp_path, "--url", url, "--backend", backend, *model,
                                "--tokenizer", str(tokenizer_dir), "--input-len", "10", "--output-len", "5",
                                "--num-prompts", "4", "--max-concurrency", "2", "--no-progress")
    assert code == 0
    assert doc["server"]["model"] == "tiny"
    r = doc["results"]
    assert r["completed"] == 4 and r["failed"] == 0
    # kiln counts the tokens itself (OpenAI's usage, the kiln backend's output_ids), and ignore_eos /
    # min_tokens / min_length make every output as long as asked.
    counted_by = "output_ids" if backend == "triton-generate" else "usage"
    assert r["output_tokens_counted_by"] == {counted_by: 4}
    assert r["output_len"]["not_as_asked"] == 0 and r["total_output_tokens"] == 4 * 5
    assert r["finish_reasons"] == ({} if backend == "triton-generate" else {"length": 4})
    # The server's prompt counts are the benchmark tokenizer's, but for the chat template's tokens.
    by_tokenizer = doc["dataset"]["input_len"]["mean"] * 4
    if backend == "openai-chat":
        assert r["total_input_tokens"] > by_tokenizer
    else:
        assert r["total_input_tokens"] == pytest.approx(by_tokenizer, abs=0.1)
    for key in ("ttft_ms", "e2e_latency_ms"):
        check_percentiles(r[key])
    # A server busier than its engine sends the steps a stream fell behind on as one chunk (kiln does), so
    # five tokens from a tiny engine may come in one: no gap between chunks to time, and no figure.
    for key in ("tpot_ms", "itl_ms"):
        if r[key]["min"] is None:
            assert all(v is None for v in r[key].values())
        else:
            check_percentiles(r[key])
    assert "time to first token" in table


# -- the wire formats, on events as servers sent them ------------------------------------------------------

def _events(raw: bytes) -> list[str]:
    import asyncio

    from kiln.bench.clients import sse_events

    async def lines():
        for line in raw.splitlines(keepends=True):
            yield line

    async def collect():
        return [e async for e in sse_events(lines())]

    return asyncio.run(collect())


def test_server_sent_events_are_split_as_the_standard_says():
    raw = (b': a comment\r\ndata: {"a": 1}\r\n\r\nevent: x\ndata: first\ndata:second\n\n\n'
           b'data: [DONE]\n\ndata: no blank line at the end')
    assert _events(raw) == ['{"a": 1}', "first\nsecond", "[DONE]", "no blank line at the end"]


def test_protocols_read_what_servers_send():
    from kiln.bench.clients import PROTOCOLS

    completions, chat, triton = (PROTOCOLS[n] for n in ("openai-completions", "openai-chat", "triton-generate"))
    # llama.cpp's server (llama-cpp-python 0.3), a token and the last chunk
    d = completions.parse({"id": "cmpl-1", "object": "text_completion", "model": "smollm2",
                           "choices": [{"text": " the", "index": 0, "logprobs": None, "finish_reason": None}]})
    assert (d.text, d.tokens, d.usage, d.finish_reason, d.error) == (" the", None, None, None, None)
    assert completions.parse({"choices": [{"text": "", "finish_reason": "length"}]}).finish_reason == "length"
    # the usage chunk (stream_options.include_usage): no choices
    usage = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
    assert completions.parse({"choices": [], "usage": usage}).usage == usage
    assert completions.parse({"choices": [{"text": "x"}], "usage": None}).usage is None
    assert completions.parse({"error": {"message": "too long", "type": "invalid_request_error"}}).error == "too long"
    assert chat.parse({"choices": [{"delta": {"role": "assistant"}, "finish_reason": None}]}).text == ""
    assert chat.parse({"choices": [{"delta": {"content": "Hi"}, "finish_reason": None}]}).text == "Hi"
    # Triton's generate_stream: a [1] output comes as a scalar, longer ones as lists
    d = triton.parse({"model_name": "m", "model_version": "1", "text_output": " w", "output_ids": 7})
    assert (d.text, d.tokens) == (" w", 1)
    assert triton.parse({"text_output": ["a", "b"], "output_ids": [[3, 4]]}).tokens == 2
    assert triton.parse({"text_output": "a"}).tokens is None
    assert triton.parse({"error": "model failed"}).error == "model failed"

    body = completions.payload("m", "hi", 8, exact=True)
    assert body["ignore_eos"] is True and body["min_tokens"] == 8 and body["stream_options"]["include_usage"]
    assert "ignore_eos" not in completions.payload("m", "hi", 8, exact=False)
    assert chat.payload("m", "hi", 8, exact=True)["messages"] == [{"role": "user", "content": "hi"}]
    assert triton.payload("m", "hi", 8, exact=True) == {"text_input": "hi", "max_tokens": 8, "stream": True,
                                                        "temperature": 0.0, "min_length": 8}
