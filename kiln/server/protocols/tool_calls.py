"""Tool calling for the chat API: the tools a request offers, the calls a model's answer makes.

``tool_choice`` decides how an answer becomes calls, as vLLM does it:

- ``"required"`` and a named function are enforced with a structured output (``runtime/structured_output``):
  the answer is a JSON array of ``{"name", "parameters"}`` objects, one per call, whose names are the
  tools' and whose parameters match each tool's schema (``required_constraint``), or, for a named
  function, the arguments object itself (``named_constraint``). So the arguments always parse and fit.
- ``"auto"`` (the default when tools are given) lets the model answer freely; a parser of its family's
  format finds the calls in the text (``parser_for``: Hermes / Qwen ``<tool_call>{...}</tool_call>``,
  Llama 3.x JSON ``{"name", "parameters"}``, Mistral ``[TOOL_CALLS]...``), and the text before them is
  the message's content. A stream holds back text from where a call may begin (``AutoStream``).
- ``"none"``: a plain answer; the tools are not shown to the model.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from kiln.runtime.structured_output import StructuredOutput


@dataclass(frozen=True, slots=True)
class Call:
    name: str
    arguments: str  # JSON text


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _schema(tool) -> dict:
    return tool.function.parameters if tool.function.parameters is not None else {"type": "object"}


def required_constraint(tools: list, parallel: bool) -> StructuredOutput:
    """The answer is a JSON array of calls of these tools (one call unless ``parallel``)."""
    one = [{"type": "object", "properties": {"name": {"const": t.function.name}, "parameters": _schema(t)},
            "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema = {"type": "array", "items": {"anyOf": one}, "minItems": 1, **({} if parallel else {"maxItems": 1})}
    return StructuredOutput("json", json.dumps(schema))


def named_constraint(tool) -> StructuredOutput:
    """The answer is the named tool's arguments object."""
    return StructuredOutput("json", json.dumps(_schema(tool)))


def parse_required(text: str) -> list[Call]:
    """The calls of a ``required`` answer (a JSON array of {"name", "parameters"}); [] if it is not one (an
    answer cut short by max_tokens)."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return []
    return [Call(item["name"], json.dumps(item["parameters"], ensure_ascii=False)) for item in items
            if isinstance(item, dict) and isinstance(item.get("name"), str) and "parameters" in item]


def template_messages(messages: list) -> list[dict]:
    """The chat messages as Hugging Face chat templates read them: an assistant's calls under ``tool_calls``
    with their arguments as objects (OpenAI sends JSON text), a tool's answer with its ``tool_call_id``."""
    out = []
    for m in messages:
        entry = {"role": template_role(m.role), "content": m.text()}
        if m.tool_calls:
            entry["tool_calls"] = [{"id": c.id, "type": "function",
                                    "function": {"name": c.function.name, "arguments": _arguments(c.function)}}
                                   for c in m.tool_calls]
        if m.tool_call_id is not None:
            entry["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            entry["name"] = m.name
        out.append(entry)
    return out


def template_role(role: str) -> str:
    """A message's role as chat templates know it: OpenAI's "developer" is their "system"."""
    return "system" if role == "developer" else role


def _arguments(function) -> object:
    try:
        return json.loads(function.arguments)
    except json.JSONDecodeError:
        return function.arguments


# -- the formats of model families ------------------------------------------------------------------------

def _objects(text: str) -> list[dict] | None:
    """The JSON objects ``text`` holds one after another (separated by whitespace, commas or semicolons, or
    as one array); None if anything else is there."""
    decoder = json.JSONDecoder()
    text = text.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            return None
        return items if all(isinstance(i, dict) for i in items) else None
    found, i = [], 0
    while i < len(text):
        if text[i] in " \t\r\n,;":
            i += 1
            continue
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        found.append(obj)
    return found


def _call(obj: dict, arguments_keys: tuple[str, ...] = ("arguments", "parameters")) -> Call | None:
    name = obj.get("name")
    args = next((obj[k] for k in arguments_keys if k in obj), {})
    if not isinstance(name, str):
        return None
    if isinstance(args, str):
        try:
            json.loads(args)
        except json.JSONDecodeError:
            return None
        return Call(name, args)
    return Call(name, json.dumps(args, ensure_ascii=False))


class ToolParser:
    """Finds a model family's tool calls in an answer."""

    name = ""
    markers: tuple[str, ...] = ()

    def start(self, text: str) -> int | None:
        """Where the calls begin in ``text``, or None if no call has begun."""
        found = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        return min(found) if found else None

    def held(self, text: str) -> int:
        """How many trailing characters of ``text`` (with no call begun) could be the start of a marker."""
        return max((k for m in self.markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)

    def calls(self, text: str) -> list[Call] | None:
        """The calls in ``text`` (which begins where ``start`` said), or None if they do not parse."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, list[Call]]:
        """(the content before the calls, or None if there is none; the calls): the whole text as content and
        no calls when it makes none that parse."""
        begin = self.start(text)
        if begin is not None:
            calls = self.calls(text[begin:])
            if calls:
                return text[:begin].strip() or None, calls
        return text, []


class HermesParser(ToolParser):
    """Hermes, Qwen 2/2.5, SmolLM2: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, repeated."""

    name = "hermes"
    markers = ("<tool_call>",)

    def calls(self, text: str) -> list[Call] | None:
        bodies = re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text, re.DOTALL)
        out = []
        for body in bodies:
            objs = _objects(body)
            if not objs or len(objs) != 1 or (call := _call(objs[0])) is None:
                return None
            out.append(call)
        return out or None


class Llama3JsonParser(ToolParser):
    """Llama 3.1-3.3: the answer is ``{"name": ..., "parameters": {...}}`` (after ``<|python_tag|>``, if any),
    several separated by semicolons."""

    name = "llama3_json"
    markers = ("<|python_tag|>",)

    def start(self, text: str) -> int | None:
        stripped = text.lstrip()
        if stripped.startswith("{"):
            return len(text) - len(stripped)
        return super().start(text)

    def held(self, text: str) -> int:
        if not text.strip() or "<|python_tag|>".startswith(text.lstrip()):
            return len(text)  # nothing but the possible start of an answer that is a call
        return super().held(text)

    def calls(self, text: str) -> list[Call] | None:
        objs = _objects(text.replace("<|python_tag|>", "", 1))
        calls = [_call(o, ("parameters", "arguments")) for o in objs or []]
        return calls if calls and all(calls) else None


class MistralParser(ToolParser):
    """Mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``, or (tokenizer v11)
    ``[TOOL_CALLS]name[ARGS]{...}`` repeated."""

    name = "mistral"
    markers = ("[TOOL_CALLS]",)

    def calls(self, text: str) -> list[Call] | None:
        parts = [p.strip() for p in text.split("[TOOL_CALLS]") if p.strip()]
        out = []
        for part in parts:
            if "[ARGS]" in part:
                name, _, args = part.partition("[ARGS]")
                objs = _objects(args)
                if not objs or len(objs) != 1:
                    return None
                out.append(Call(name.strip(), json.dumps(objs[0], ensure_ascii=False)))
                continue
            objs = _objects(part)
            calls = [_call(o) for o in objs or []]
            if not calls or not all(calls):
                return None
            out.extend(calls)
        return out or None


PARSERS = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}


def parser_for(chat_template: str | None) -> ToolParser:
    """The parser of the format a chat template teaches its model (Hermes' where it shows none)."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return MistralParser()
    if "<|python_tag|>" in template or "ipython" in template:
        return Llama3JsonParser()
    return HermesParser()


class AutoStream:
    """One streamed choice under ``tool_choice: auto``: its text goes out as content until a call may begin;
    from there it is held, and at the end it becomes calls (or, if they do not parse, content after all)."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.text = ""
        self.sent = 0  # characters of text sent as content
        self.begin: int | None = None

    def feed(self, delta: str) -> str:
        """Content to send now for ``delta``."""
        self.text += delta
        if self.begin is None:
            self.begin = self.parser.start(self.text)
        upto = self.begin if self.begin is not None else len(self.text) - self.parser.held(self.text)
        out = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return out

    def finish(self) -> tuple[str, list[Call]]:
        """(the held content still to send, the calls) at the end of the answer."""
        rest = self.text[self.sent:]
        if self.begin is not None:
            calls = self.parser.calls(self.text[self.begin:])
            if calls:
                return self.text[self.sent:self.begin].strip() and self.text[self.sent:self.begin], calls
        return rest, []
