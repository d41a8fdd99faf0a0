"""The serving protocols ``kiln bench serve`` speaks, each a streamed HTTP POST read as server-sent events.

- ``openai-completions``: ``POST /v1/completions``, ``choices[0].text`` per chunk, ``data: [DONE]`` at
  the end (a stream that ends without it was cut short), the token counts in the last chunk's
  ``usage`` (asked for with ``stream_options.include_usage``).
- ``openai-chat``: ``POST /v1/chat/completions``, the prompt as one user message,
  ``choices[0].delta.content`` per chunk; otherwise as completions.
- ``triton-generate``: Triton's generate extension, ``POST /v2/models/NAME/generate_stream`` with
  TensorRT-LLM's field names (``text_input``, ``max_tokens``, ``stream``, ``min_length``): an event per
  response with the new ``text_output`` (and, where the model returns them, the new ``output_ids``), an
  ``{"error": ...}`` event for a failed one, and the stream's end after the last.

``send`` times one request: its start, the arrival of every event that carries output, and the end of
the stream. A request fails (``RequestRecord.error``) on a status other than 200, an error event, a
broken connection, a timeout, an OpenAI stream without ``[DONE]`` or without a ``finish_reason``, or a
stream with no output; it never raises.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

BACKENDS = ("openai-completions", "openai-chat", "triton-generate")


@dataclass(slots=True)
class Delta:
    """What one event carries: new text, the number of new tokens when the server says, usage, an error."""

    text: str = ""
    tokens: int | None = None
    usage: dict | None = None
    error: str | None = None
    finish_reason: str | None = None


class Protocol:
    name: str
    default_endpoint: str
    ends_with_done = False  # the stream's last event is "[DONE]"

    def endpoint(self, model: str) -> str:
        return self.default_endpoint.format(model=model)

    def payload(self, model: str, prompt: str, max_tokens: int, exact: bool) -> dict[str, Any]:
        raise NotImplementedError

    def parse(self, event: Any) -> Delta:
        """The event's delta; an event that is not a JSON object, or that carries an error, is an error."""
        if not isinstance(event, dict):
            return Delta(error=f"unexpected event {str(event)[:200]}")
        if event.get("error") is not None:
            return Delta(error=_error_text(event["error"]))
        return self.parse_event(event)

    def parse_event(self, event: dict) -> Delta:
        raise NotImplementedError


class OpenAICompletions(Protocol):
    name = "openai-completions"
    default_endpoint = "/v1/completions"
    ends_with_done = True

    def payload(self, model: str, prompt: str, max_tokens: int, exact: bool) -> dict[str, Any]:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}
        if exact:
            # vLLM's names; servers without them (OpenAI's own) ignore or refuse them.
            body.update(ignore_eos=True, min_tokens=max_tokens)
        return body

    def parse_event(self, event: dict) -> Delta:
        usage = event.get("usage")
        choices = event.get("choices") or []
        return Delta(text=self._text(choices[0]) if choices else "",
                     usage=usage if isinstance(usage, dict) and "completion_tokens" in usage else None,
                     finish_reason=choices[0].get("finish_reason") if choices else None)

    @staticmethod
    def _text(choice: dict) -> str:
        return choice.get("text") or ""


class OpenAIChat(OpenAICompletions):
    name = "openai-chat"
    default_endpoint = "/v1/chat/completions"

    def payload(self, model: str, prompt: str, max_tokens: int, exact: bool) -> dict[str, Any]:
        body = super().payload(model, prompt, max_tokens, exact)
        del body["prompt"]
        return {"messages": [{"role": "user", "content": prompt}], **body}

    @staticmethod
    def _text(choice: dict) -> str:
        return (choice.get("delta") or {}).get("content") or ""


class TritonGenerate(Protocol):
    name = "triton-generate"
    default_endpoint = "/v2/models/{model}/generate_stream"

    def payload(self, model: str, prompt: str, max_tokens: int, exact: bool) -> dict[str, Any]:
        body = {"text_input": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0.0}
        if exact:
            body["min_length"] = max_tokens  # TensorRT-LLM's name (kiln's backend reads it too)
        return body

    def parse_event(self, event: dict) -> Delta:
        text = event.get("text_output", "")
        if isinstance(text, list):  # a [1]-shaped output may come as a list
            text = "".join(str(t) for t in text)
        ids = event.get("output_ids")
        tokens = None if ids is None else len(_flatten(ids))
        return Delta(text=str(text), tokens=tokens)


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (OpenAICompletions(), OpenAIChat(), TritonGenerate())}


def _flatten(value: Any) -> list:
    if isinstance(value, list):
        return [x for v in value for x in _flatten(v)]
    return [value]


def _error_text(error: Any) -> str:
    """An error body's message: OpenAI's ``{"message": ...}``, Triton's string, or the JSON itself."""
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])
    return error if isinstance(error, str) else json.dumps(error)


@dataclass(slots=True)
class RequestRecord:
    """One request as the client saw it; times are ``time.perf_counter()`` seconds."""

    index: int
    prompt_len: int  # the prompt's tokens by the benchmark's tokenizer
    output_len: int  # the tokens asked for
    start: float = 0.0
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # each event that carried output
    text: str = ""
    server_tokens: int | None = None  # the sum of the events' token counts, when the server gave them
    usage: dict | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


async def sse_events(content: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """The data of each server-sent event (its ``data:`` lines joined), as each event completes;
    ``content`` yields the body's lines (as aiohttp's ``StreamReader`` does)."""
    data: list[str] = []
    async for raw in content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
        # other fields (event:, id:, retry:) and comments (":") carry nothing the benchmark reads
    if data:
        yield "\n".join(data)


async def send(session: aiohttp.ClientSession, url: str, payload: dict, protocol: Protocol,
               record: RequestRecord) -> RequestRecord:
    """POST ``payload`` to ``url`` and read the stream into ``record``; failures land in ``record.error``."""
    record.start = time.perf_counter()
    try:
        async with session.post(url, json=payload) as response:
            if response.status != 200:
                body = await response.text(errors="replace")
                record.error = f"HTTP {response.status}: {_body_error(body)}"
                return record
            done = False
            async for data in sse_events(response.content):
                now = time.perf_counter()
                if data.strip() == "[DONE]":
                    done = True
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    record.error = f"an event is not JSON: {data[:200]!r}"
                    return record
                delta = protocol.parse(event)
                if delta.error is not None:
                    record.error = delta.error
                    return record
                if delta.usage is not None:
                    record.usage = delta.usage
                if delta.finish_reason is not None:
                    record.finish_reason = delta.finish_reason
                if delta.text or delta.tokens:
                    record.chunk_times.append(now)
                    record.text += delta.text
                    if delta.tokens is not None:
                        record.server_tokens = (record.server_tokens or 0) + delta.tokens
            record.end = time.perf_counter()
    except asyncio.TimeoutError:
        record.error = "timed out (--timeout)"
        return record
    except (aiohttp.ClientError, UnicodeDecodeError, OSError) as e:
        record.error = f"{type(e).__name__}: {e}"
        return record
    if protocol.ends_with_done and not done:
        record.error = "the stream ended before its [DONE] event"
    elif protocol.ends_with_done and record.finish_reason is None:
        # llama.cpp's server ends a request that another interrupts this way, for one.
        record.error = "the stream ended without a finish_reason (cut short by the server)"
    elif not record.chunk_times:
        record.error = "the stream ended without output"
    return record


def _body_error(body: str) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return body.strip()[:300] or "(empty body)"
    if isinstance(doc, dict) and "error" in doc:
        return _error_text(doc["error"])[:300]
    if isinstance(doc, dict) and "detail" in doc:  # FastAPI's validation errors
        return json.dumps(doc["detail"])[:300]
    return body.strip()[:300]


async def describe_server(session: aiohttp.ClientSession, base_url: str, protocol: Protocol,
                          model: str | None) -> tuple[str, dict]:
    """The model to ask for and what the server says of itself, before any request is timed.

    OpenAI servers list their models at ``/v1/models`` (the first is the default model); a Triton
    server describes itself at ``/v2`` and the model at ``/v2/models/NAME``. Raises ``KilnError``
    when the server cannot be reached or the model is not there.
    """
    from kiln.errors import KilnError

    async def get(path: str) -> tuple[int, Any]:
        try:
            async with session.get(base_url + path) as response:
                body = await response.text(errors="replace")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise KilnError(f"cannot reach the server at {base_url}: {type(e).__name__}: {e}") from None
        try:
            return response.status, json.loads(body)
        except ValueError:
            return response.status, body

    if protocol.name.startswith("openai"):
        status, doc = await get("/v1/models")
        served = [m.get("id") for m in doc.get("data", []) if isinstance(m, dict)] if isinstance(doc, dict) else []
        if model is None:
            if status != 200 or not served:
                raise KilnError(f"{base_url}/v1/models did not list a model (HTTP {status}); name one with --model")
            model = served[0]
        return model, {"models": served}
    if model is None:
        raise KilnError(f"--backend {protocol.name} needs --model (the name of the model on the server)")
    status, doc = await get(f"/v2/models/{model}")
    if status != 200:
        message = _error_text(doc["error"]) if isinstance(doc, dict) and "error" in doc else str(doc)[:300]
        raise KilnError(f"the server at {base_url} has no model '{model}' ready (HTTP {status}: {message})")
    info: dict = {"model_versions": doc.get("versions") if isinstance(doc, dict) else None}
    status, doc = await get("/v2")
    if status == 200 and isinstance(doc, dict):
        info.update(name=doc.get("name"), version=doc.get("version"))
    return model, info
