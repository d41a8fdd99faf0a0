"""Structured outputs (llguidance) in the engine: every constrained answer of the real SmolLM2 model parses and
validates (``jsonschema``) against its schema (bounded strings and integers, so that an answer ends within
its token budget: the grammar keeps an unbounded number going as long as the model wants), matches its regex, is one of its choices or derives from its
grammar; greedy, sampled, n>1, beside unconstrained requests (which come out as they do alone), with async
scheduling, and with stop strings."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from kiln.errors import RequestError
from kiln.runtime import LLM, SamplingParams
from kiln.runtime.structured_output import StructuredOutput

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object",
     "properties": {"city": {"type": "string", "maxLength": 20},
                    "country": {"enum": ["France", "Italy", "Spain"]},
                    "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
                    "location": {"type": "object",
                                 "properties": {"lat": {"type": "integer", "minimum": -90, "maximum": 90},
                                                "lon": {"type": "integer", "minimum": -180, "maximum": 180}},
                                 "required": ["lat", "lon"], "additionalProperties": False}},
     "required": ["city", "country", "location"], "additionalProperties": False},
    {"type": "array", "items": {"type": "object", "properties": {"step": {"type": "integer", "minimum": 1, "maximum": 9},
                                                                 "done": {"type": "boolean"}},
                                "required": ["step", "done"], "additionalProperties": False},
     "minItems": 1, "maxItems": 3},
]
QUESTION = "Describe Paris as JSON: its city name, country, a few landmarks and its location."


@pytest.fixture(scope="module")
def llm(smollm2_engine):
    llm = LLM(smollm2_engine, device="cpu")
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def chat_ids(llm):
    return llm.tokenizer.encode_chat([{"role": "user", "content": QUESTION}])


def _json(schema: dict, flexible: bool = False) -> StructuredOutput:
    return StructuredOutput("json", json.dumps(schema), whitespace_flexible=flexible)


@pytest.mark.parametrize("flexible", [False, True])
def test_every_schema_answer_validates_greedy_and_sampled(llm, chat_ids, flexible):
    prompts, params = [], []
    for schema in SCHEMAS:
        for seed in (None, 1, 2):
            prompts.append(chat_ids)
            params.append(SamplingParams(max_tokens=120, temperature=0 if seed is None else 0.8, seed=seed,
                                         structured=_json(schema, flexible)))
    outs = llm.generate(prompts, params)
    for out, p in zip(outs, params):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (c.text, c.finish_reason)
        assert c.stop_reason is None or c.stop_reason in llm.tokenizer.eos_token_ids
        jsonschema.validate(json.loads(c.text), json.loads(p.structured.spec))


def test_constrained_beside_free_requests_and_n_choices(llm, chat_ids):
    """Masks touch only their own rows: the free requests of a mixed batch answer as they do alone."""
    free = SamplingParams(max_tokens=24, temperature=0)
    alone = [o.outputs[0].token_ids for o in llm.generate([chat_ids, chat_ids[:9]], [free, free])]
    n = SamplingParams(max_tokens=120, temperature=0.9, seed=7, n=3, structured=_json(SCHEMAS[0]))
    mixed = llm.generate([chat_ids, chat_ids, chat_ids[:9]], [free, n, free])
    assert [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids] == alone
    assert len(mixed[1].outputs) == 3
    for c in mixed[1].outputs:
        jsonschema.validate(json.loads(c.text), SCHEMAS[0])


def test_regex_choice_and_grammars(llm, chat_ids):
    cases = [
        (StructuredOutput("regex", r"[0-9]{3}-[a-z]{2,8}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,8}", t)),
        (StructuredOutput("choice", json.dumps(["Paris", "London", "Rome"])), lambda t: t in ("Paris", "London", "Rome")),
        (StructuredOutput("grammar", 'root ::= "yes" | "no" | "maybe " [0-9]'),
         lambda t: re.fullmatch(r"yes|no|maybe [0-9]", t)),
        (StructuredOutput("grammar", 'start: item ("," item)*\nitem: /[a-z]{1,6}/'),
         lambda t: re.fullmatch(r"[a-z]{1,6}(,[a-z]{1,6})*", t)),
        (StructuredOutput("json_object"), lambda t: isinstance(json.loads(t), dict)),
    ]
    params = [SamplingParams(max_tokens=60, temperature=t, seed=3, structured=so) for so, _ in cases for t in (0, 1)]
    outs = llm.generate([chat_ids] * len(params), params)
    for out, p in zip(outs, params):
        check = next(f for so, f in cases if so is p.structured)
        text = out.outputs[0].text
        if out.outputs[0].finish_reason == "stop":
            assert check(text), (p.structured, text)
        else:  # an open-ended grammar may run to max_tokens; what there is still follows it
            assert p.structured.kind in ("grammar", "json_object"), (p.structured, text)


def test_async_scheduling_takes_the_same_tokens(smollm2_engine, chat_ids):
    """With the step's tokens still on the device while the next is launched, a grammar's mask waits for
    them: the answer is the synchronous one."""
    params = [SamplingParams(max_tokens=80, temperature=0, structured=_json(s)) for s in SCHEMAS]
    sync = LLM(smollm2_engine, device="cpu", async_scheduling=False)
    try:
        expected = [o.outputs[0].text for o in sync.generate([chat_ids] * 3, params)]
    finally:
        sync.shutdown()
    overlapped = LLM(smollm2_engine, device="cpu", async_scheduling=True)
    try:
        assert [o.outputs[0].text for o in overlapped.generate([chat_ids] * 3, params)] == expected
    finally:
        overlapped.shutdown()
    for text, schema in zip(expected, SCHEMAS):
        jsonschema.validate(json.loads(text), schema)


def test_stop_strings_and_logprobs_with_a_schema(llm, chat_ids):
    """A stop string may cut the constrained text (as vLLM does); logprobs are of the masked distribution, so
    the chosen token's logprob is finite and leads the top tokens (tokens the grammar forbids are -inf)."""
    so = StructuredOutput("json", json.dumps(SCHEMAS[1]))
    full = llm.generate([chat_ids], SamplingParams(max_tokens=120, temperature=0, structured=so))[0].outputs[0].text
    cut = llm.generate([chat_ids], SamplingParams(max_tokens=120, temperature=0, structured=so, stop=['"country"'],
                                                  logprobs=3))[0].outputs[0]
    assert cut.finish_reason == "stop" and full.startswith(cut.text) and '"country"' in full
    for lp in cut.logprobs:  # greedy: the chosen token is the best of what the grammar allowed
        assert lp.logprob > -1e30 and lp.top[0] == (lp.token_id, lp.logprob)


def test_bad_constraints_are_refused_when_the_params_are_made(llm):
    for so in (StructuredOutput("regex", "(a"), StructuredOutput("json", "{not json"),
               StructuredOutput("json", json.dumps({"type": "object", "properties": {"a": {"$ref": "#/missing"}}})),
               StructuredOutput("choice", "[]"), StructuredOutput("grammar", "root ::= undefined_rule")):
        with pytest.raises(ValueError, match="not valid"):
            SamplingParams(structured=so)
    with pytest.raises(ValueError, match="kind"):
        StructuredOutput("xml", "<a/>")
    with pytest.raises((ValueError, RequestError)):
        llm.generate(["hi"], SamplingParams(structured="json"))


# -- served: the openai client as it is, and Triton's generate route with TensorRT-LLM's guide inputs -------

@pytest.fixture(scope="module")
def server(smollm2_server):
    return smollm2_server


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://{server.http}/v1", api_key="none", max_retries=0, timeout=120)


def test_openai_response_format_json_schema_streamed_and_not(client):
    schema = SCHEMAS[1]
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model="smol", messages=messages, response_format=fmt, n=2,
                                           temperature=0.8, seed=5, max_tokens=150)
    assert len(whole.choices) == 2
    for choice in whole.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)
    stream = client.chat.completions.create(model="smol", messages=messages, response_format=fmt, temperature=0,
                                            max_tokens=150, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), schema)
    loose = client.chat.completions.create(model="smol", messages=messages, response_format={"type": "json_object"},
                                           temperature=0, max_tokens=150)
    assert loose.choices[0].finish_reason != "stop" or isinstance(json.loads(loose.choices[0].message.content), dict)


def test_openai_structured_outputs_on_completions(client):
    choice = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=8,
                                       extra_body={"structured_outputs": {"choice": ["Paris", "Lyon", "Nice"]}})
    assert choice.choices[0].text in ("Paris", "Lyon", "Nice") and choice.choices[0].finish_reason == "stop"
    regex = client.completions.create(model="smol", prompt="A phone number: ", max_tokens=20, temperature=0,
                                      extra_body={"structured_outputs": {"regex": r"[0-9]{3}-[0-9]{4}"}})
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", regex.choices[0].text)
    cut = client.completions.create(model="smol", prompt="A phone number: ", max_tokens=20, temperature=0, stop=["-"],
                                    extra_body={"structured_outputs": {"regex": r"[0-9]{3}-[0-9]{4}"}})
    assert cut.choices[0].text == regex.choices[0].text[:3] and cut.choices[0].finish_reason == "stop"


def _status(call) -> tuple[int, dict]:
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value.status_code, info.value.body


def test_openai_bad_constraints_are_400_naming_the_field(client):
    chat = client.chat.completions.create
    messages = [{"role": "user", "content": "hi"}]
    status, body = _status(lambda: chat(model="smol", messages=messages,
                                        extra_body={"structured_outputs": {"regex": "(a"}}))
    assert status == 400 and body["param"] == "structured_outputs" and "regex" in body["message"]
    status, body = _status(lambda: chat(model="smol", messages=messages, response_format={"type": "json_object"},
                                        extra_body={"structured_outputs": {"regex": "a"}}))
    assert status == 400 and "not both" in body["message"]
    status, body = _status(lambda: chat(model="smol", messages=messages,
                                        extra_body={"structured_outputs": {"regex": "a", "choice": ["b"]}}))
    assert status == 400 and "exactly one" in body["message"]
    status, body = _status(lambda: chat(model="smol", messages=messages,
                                        extra_body={"structured_outputs": {"whitespace_pattern": " "}}))
    assert status == 400 and "whitespace_pattern" in body["message"]
    status, body = _status(lambda: chat(model="smol", messages=messages,
                                        response_format={"type": "json_schema", "json_schema": {
                                            "name": "x", "schema": {"type": "object", "properties": {
                                                "a": {"$ref": "#/nowhere"}}}}}))
    assert status == 400 and body["param"] == "response_format"


def test_triton_generate_with_tensorrt_llm_guide_inputs(server):
    import urllib.error
    import urllib.request

    def post(doc: dict) -> tuple[int, dict]:
        request = urllib.request.Request(f"http://{server.http}/v2/models/smol/generate", json.dumps(doc).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    schema = SCHEMAS[0]
    status, body = post({"text_input": "A person as JSON: ", "max_tokens": 80, "temperature": 0,
                         "guided_decoding_guide_type": "json_schema", "guided_decoding_guide": json.dumps(schema)})
    assert status == 200, body
    jsonschema.validate(json.loads(body["text_output"]), schema)
    status, body = post({"text_input": "Yes or no? ", "max_tokens": 5, "guided_decoding_guide_type": "choice",
                         "guided_decoding_guide": json.dumps(["yes", "no"])})
    assert status == 200 and body["text_output"] in ("yes", "no")
    status, body = post({"text_input": "x", "guided_decoding_guide_type": "regex", "guided_decoding_guide": "(a"})
    assert status == 400 and "guided_decoding_guide" in body["error"]
    status, body = post({"text_input": "x", "guided_decoding_guide_type": "xml", "guided_decoding_guide": "<a/>"})
    assert status == 400 and "guided_decoding_guide_type" in body["error"]


def test_responses_api_text_json_and_stream(client):
    """``/v1/responses`` through the ``openai`` client: instructions and input, a JSON schema answer, the
    streamed events whose deltas make the final text."""
    answer = client.responses.create(model="smol", instructions="Answer in one word.", input="Capital of France?",
                                     max_output_tokens=8, temperature=0)
    assert answer.status in ("completed", "incomplete") and answer.output_text
    assert answer.usage.output_tokens <= 8 and answer.usage.input_tokens > 5
    schema = SCHEMAS[0]
    structured = client.responses.create(
        model="smol", input=[{"role": "user", "content": "A person as JSON."}], max_output_tokens=80, temperature=0,
        text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}})
    assert structured.status == "completed"
    jsonschema.validate(json.loads(structured.output_text), schema)
    events = list(client.responses.create(model="smol", input="Say hello.", max_output_tokens=12, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="smol", input="x", store=True)


@pytest.mark.parametrize("vocab", [49152, 1000, 77])
def test_the_mask_kernel_and_the_tensor_ops_match_a_plain_reference(vocab):
    """The CPU kernel (a table add per mask byte, a scalar tail) and the tensor ops a GPU runs set exactly the
    logits of disallowed tokens to -inf, in the rows named, and touch nothing else."""
    import torch

    from kiln.runtime import structured_output as so

    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=gen)
    masks = torch.randint(-2**31, 2**31 - 1, (3, (vocab + 31) // 32), dtype=torch.int32, generator=gen)
    masks[0] = 0
    masks[1, ::2] = -1
    rows = [4, 0, 2]
    expected = logits.clone()
    for i, row in enumerate(rows):
        for t in range(vocab):
            if not (int(masks[i, t // 32]) >> (t % 32)) & 1:
                expected[row, t] = float("-inf")
    kernel, ops = logits.clone(), logits.clone()
    so.apply_bitmasks(kernel, rows, masks)
    so.apply_bitmasks_with_tensor_ops(ops, torch.tensor(rows), masks)
    assert torch.equal(kernel, expected) and torch.equal(ops, expected)
