"""``kiln serve`` with no arguments: the bundled SmolLM2-135M-Instruct, built into the engine cache on
the first start and found there on the next, answering OpenAI's ``openai`` client and the ``curl``
command it prints."""
from __future__ import annotations

import json
import re
import time
import urllib.request

import pytest
from server_harness import ServerProcess

openai = pytest.importorskip("openai")


@pytest.mark.slow
def test_kiln_serve_with_no_arguments(tmp_path):
    env = {"KILN_CACHE": str(tmp_path)}
    first = ServerProcess(None, env=env, ready_timeout=600)
    try:
        assert "building an engine" in first.log
        # The printed curl command, as a user would paste it (its JSON body, sent the same way).
        command = next(line for line in first.lines if line.strip().startswith("curl "))
        url = re.search(r"curl (\S+)", command).group(1)
        body = json.loads(re.search(r"-d '(.*)'$", command).group(1))
        request = urllib.request.Request(url, data=json.dumps({**body, "temperature": 0}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.loads(r.read())
        assert "Paris" in answer["choices"][0]["message"]["content"]
    finally:
        first.stop()
    start = time.monotonic()
    second = ServerProcess(None, env=env, ready_timeout=120)
    try:
        ready = time.monotonic() - start
        assert "building an engine" not in second.log
        assert ready < 30, f"a cached start took {ready:.1f} s"
        client = openai.OpenAI(base_url=f"http://{second.http}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
        stream = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=16,
                                                messages=[{"role": "user", "content": "What is the capital of France?"}],
                                                stream=True)
        assert "Paris" in "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        # The Triton protocols reach the same engine under the same name.
        prompt = "The capital of France is"
        completion = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=8,
                                               temperature=0)
        request = urllib.request.Request(f"http://{second.http}/v2/models/SmolLM2-135M-Instruct/generate",
                                         data=json.dumps({"text_input": prompt, "max_tokens": 8,
                                                          "temperature": 0.0}).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=120) as r:
            assert json.loads(r.read())["text_output"] == completion.choices[0].text
    finally:
        second.stop()
