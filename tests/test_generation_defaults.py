"""The model's own sampling defaults: a Hugging Face folder's generation_config.json is recorded in the engine at
build (its EOS ids join the engine's), ``LLM`` takes them when no params are given, and the server applies them
to a request that leaves a field unset (``generation_config`` "auto"), or kiln's (``none``), with
``override_generation_config`` on top: over OpenAI's API (the ``openai`` client) and Triton's generate route."""
from __future__ import annotations

import json
import shutil
import urllib.request

import pytest
from server_harness import ServerProcess

from kiln.builder import build
from kiln.engine import BuildConfig, read_engine
from kiln.runtime import LLM, SamplingParams
from kiln.server.errors import ServerError

GENERATION = {"temperature": 0.0, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1, "do_sample": True,
              "max_new_tokens": 99, "eos_token_id": [7, 9]}
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def engine(hf_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("with-generation-config") / "hf"
    shutil.copytree(hf_model_dir("llama"), folder)
    (folder / "generation_config.json").write_text(json.dumps(GENERATION))
    return build(folder, tmp_path_factory.mktemp("engine") / "engine", BuildConfig(max_seq_len=128), progress=False)


def test_the_build_records_the_generation_config(engine):
    facts = read_engine(engine, need_weights=False).tokenizer
    assert facts["sampling_defaults"] == {"temperature": 0.0, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}
    assert {7, 9} <= set(facts["eos_token_ids"])


def test_llm_without_params_takes_the_model_defaults(engine):
    llm = LLM(engine, device="cpu")
    try:
        assert llm.tokenizer.sampling_defaults["temperature"] == 0.0
        # The model's default temperature is 0: no params is greedy, as the explicit greedy params are.
        explicit = SamplingParams(temperature=0, top_p=0.8, top_k=20, repetition_penalty=1.1)
        assert llm.generate([PROMPT])[0].outputs[0].token_ids == \
            llm.generate([PROMPT], explicit)[0].outputs[0].token_ids
    finally:
        llm.shutdown()


def test_an_engine_without_a_generation_config_has_none(engine_dir):
    assert "sampling_defaults" not in read_engine(engine_dir("llama"), need_weights=False).tokenizer


def test_backend_parameters(engine):
    from kiln.server.backends.kiln.backend import _sampling_defaults

    auto = _sampling_defaults(engine, {}, "m")
    assert auto == {"temperature": 0.0, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}
    assert _sampling_defaults(engine, {"generation_config": "none"}, "m") == {}
    assert _sampling_defaults(engine, {"override_generation_config": '{"temperature": 0.7}'}, "m")["temperature"] == 0.7
    for params, message in (({"generation_config": "vllm"}, "'auto'"),
                            ({"override_generation_config": "{nope"}, "not JSON"),
                            ({"override_generation_config": '{"max_tokens": 5}'}, "a JSON object of"),
                            ({"override_generation_config": '{"temperature": -1}'}, "temperature")):
        with pytest.raises(ServerError, match=message):
            _sampling_defaults(engine, params, "m")


@pytest.fixture(scope="module")
def servers(engine):
    """The engine served with its defaults (temperature 0) and with kiln's (temperature 1)."""
    model = ServerProcess(None, str(engine), "--served-model-name", "m", ready_timeout=120)
    try:
        plain = ServerProcess(None, str(engine), "--served-model-name", "m", "--generation-config", "none",
                              "--override-generation-config", '{"top_k": 3}', ready_timeout=120)
    except BaseException:
        model.stop()
        raise
    yield model, plain
    model.stop()
    plain.stop()


def _generate(server, **fields) -> dict:
    body = json.dumps({"text_input": PROMPT, "max_tokens": 12, **fields}).encode()
    request = urllib.request.Request(f"http://{server.http}/v2/models/m/generate", body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read())


def test_served_requests_take_the_model_defaults_unless_they_say(servers, engine):
    openai = pytest.importorskip("openai")
    model, plain = servers
    llm = LLM(engine, device="cpu")
    try:
        greedy = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, top_p=0.8, top_k=20,
                                                        repetition_penalty=1.1, ignore_eos=True))[0].outputs[0]
    finally:
        llm.shutdown()
    client = openai.OpenAI(base_url=f"http://{model.http}/v1", api_key="none", max_retries=0)
    # No temperature: the model's 0, so the answer is the greedy one, every time.
    answers = {client.completions.create(model="m", prompt=PROMPT, max_tokens=12, extra_body={"ignore_eos": True})
               .choices[0].text for _ in range(3)}
    assert answers == {greedy.text}
    assert _generate(model, min_tokens=12)["output_ids"] == greedy.token_ids
    # A request's own temperature wins; kiln's defaults (temperature 1) sample: answers differ by seed.
    sampled = {client.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=s)
               .choices[0].text for s in range(4)}
    assert len(sampled) > 1
    plain_client = openai.OpenAI(base_url=f"http://{plain.http}/v1", api_key="none", max_retries=0)
    unset = {plain_client.completions.create(model="m", prompt=PROMPT, max_tokens=12, seed=s).choices[0].text
             for s in range(4)}
    assert len(unset) > 1
    assert len({_generate(plain, seed=s)["text_output"] for s in range(4)}) > 1
