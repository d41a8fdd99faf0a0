"""Tool calling on the chat API: the family parsers (Hermes/Qwen, Llama 3 JSON, Mistral) and their streaming
hold-back, and, served with the real SmolLM2 and driven by the ``openai`` client as it is, calls forced by
``tool_choice`` (required, a named function) whose arguments always parse and validate against the tool's
schema, streamed deltas that join into the same calls, tool-call history in the messages, and the errors."""
from __future__ import annotations

import json

import jsonschema
import pytest

from kiln.server.protocols.tool_calls import (AutoStream, Call, HermesParser, Llama3JsonParser, MistralParser,
                                              parser_for)

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a zone",
                                           "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


def test_hermes_parser():
    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
    content, calls = HermesParser().parse(text)
    assert content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"zone": "CET"})]
    # An unterminated last call (max_tokens) still parses when its JSON is whole; broken JSON stays content.
    assert HermesParser().parse('<tool_call>{"name": "f", "arguments": {}}')[1] == [Call("f", "{}")]
    assert HermesParser().parse('<tool_call>{"name": "f", "argu') == ('<tool_call>{"name": "f", "argu', [])
    assert HermesParser().parse("no calls here") == ("no calls here", [])


def test_llama3_json_parser():
    text = '<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}; {"name": "f", "parameters": {}}'
    content, calls = Llama3JsonParser().parse(text)
    assert content is None and calls == [Call("get_time", '{"zone": "UTC"}'), Call("f", "{}")]
    assert Llama3JsonParser().parse(' {"name": "g", "parameters": {"a": 1}}')[1] == [Call("g", '{"a": 1}')]
    assert Llama3JsonParser().parse("The answer is {1, 2}.") == ("The answer is {1, 2}.", [])


def test_mistral_parser():
    old = 'Sure. [TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "PST"}}]'
    assert MistralParser().parse(old) == ("Sure.", [Call("get_time", '{"zone": "PST"}')])
    new = '[TOOL_CALLS]get_time[ARGS]{"zone": "UTC"}[TOOL_CALLS]f[ARGS]{}'
    assert MistralParser().parse(new)[1] == [Call("get_time", '{"zone": "UTC"}'), Call("f", "{}")]


def test_parser_for_the_template():
    assert isinstance(parser_for("{% if tools %}<tool_call>{% endif %}"), HermesParser)
    assert isinstance(parser_for("{{ '[TOOL_CALLS]' }}"), MistralParser)
    assert isinstance(parser_for("<|start_header_id|>ipython<|end_header_id|>"), Llama3JsonParser)
    assert isinstance(parser_for(None), HermesParser)


@pytest.mark.parametrize("parser, text, content, calls", [
    (HermesParser(), 'Hi there. <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>', "Hi there. ",
     [Call("f", '{"x": 1}')]),
    (HermesParser(), "a < b, and <tool_ is no call", "a < b, and <tool_ is no call", []),
    (Llama3JsonParser(), '{"name": "f", "parameters": {"x": 2}}', "", [Call("f", '{"x": 2}')]),
    (Llama3JsonParser(), "Plain words.", "Plain words.", []),
    (MistralParser(), 'Ok [TOOL_CALLS][{"name": "f", "arguments": {}}]', "Ok ", [Call("f", "{}")]),
])
def test_auto_stream_holds_back_only_what_may_be_a_call(parser, text, content, calls):
    for step in (1, 3, 7):
        stream = AutoStream(parser)
        sent = "".join(stream.feed(text[i:i + step]) for i in range(0, len(text), step))
        rest, found = stream.finish()
        assert sent + rest == content and found == calls
        if not calls:  # plain text is held back at most a marker's length
            assert len(rest) < 16


# -- served ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(smollm2_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://{smollm2_server.http}/v1", api_key="none", max_retries=0, timeout=120)


def _checked(calls) -> list[tuple[str, dict]]:
    out = []
    for call in calls:
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        out.append((call.function.name, arguments))
    return out


def _streamed_calls(stream) -> tuple[list, str | None]:
    """The tool calls of a streamed answer, joined from their deltas by index, as OpenAI's clients join them."""
    calls: dict[int, dict] = {}
    reason = None
    for chunk in stream:
        for choice in chunk.choices:
            reason = choice.finish_reason or reason
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = d.id or call["id"]
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
    assert all(c["id"] for c in calls.values())
    return [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())], reason


def test_required_calls_parse_validate_and_stream_the_same(client):
    chat = client.chat.completions.create
    for temperature, seed in ((0, None), (0.9, 1)):
        answer = chat(model="smol", messages=ASK, tools=TOOLS, tool_choice="required", temperature=temperature,
                      seed=seed, max_tokens=200)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        _checked(choice.message.tool_calls)
    whole = chat(model="smol", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=200)
    streamed, reason = _streamed_calls(chat(model="smol", messages=ASK, tools=TOOLS, tool_choice="required",
                                            temperature=0, max_tokens=200, stream=True))
    assert reason == "tool_calls" and streamed == _checked(whole.choices[0].message.tool_calls)
    single = chat(model="smol", messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                  temperature=0.9, seed=3, max_tokens=200)
    assert len(single.choices[0].message.tool_calls) == 1


def test_named_function_streams_its_arguments(client):
    chat = client.chat.completions.create
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole = chat(model="smol", messages=ASK, tools=TOOLS, tool_choice=named, temperature=0, max_tokens=120, n=2)
    for choice in whole.choices:
        assert choice.finish_reason == "stop" and choice.message.content is None
        assert [name for name, _ in _checked(choice.message.tool_calls)] == ["get_weather"]
    stream = chat(model="smol", messages=ASK, tools=TOOLS, tool_choice=named, temperature=0, max_tokens=120,
                  stream=True)
    streamed, _ = _streamed_calls(stream)
    assert streamed == _checked(whole.choices[0].message.tool_calls)


def test_tool_history_and_auto(client):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    answer = client.chat.completions.create(model="smol", messages=history, tools=TOOLS, temperature=0,
                                            max_tokens=40)
    choice = answer.choices[0]
    # SmolLM2-135M's template shows no tools, so under "auto" it answers in words; whatever it says parses.
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls
    plain = client.chat.completions.create(model="smol", messages=ASK, tools=TOOLS, tool_choice="none",
                                           temperature=0, max_tokens=20)
    assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls


def test_tool_errors(client):
    openai = pytest.importorskip("openai")
    chat = client.chat.completions.create
    cases = [
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(tools=TOOLS + TOOLS[:1]), "tools"),
        (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "tool_choice"),
        (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            chat(model="smol", messages=ASK, max_tokens=5, **kwargs)
        assert param in (e.value.body.get("param") or "") + e.value.body["message"], e.value.body
