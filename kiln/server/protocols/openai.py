"""OpenAI's API (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``) on the server's HTTP port.

Requests and responses are the pydantic models of ``openai_models``; one serving class per endpoint.
A request names a model of the repository served by the kiln backend and becomes one ``InferenceRequest``
carrying a typed ``Generation`` (token ids and ``SamplingParams``), which goes through the model's admission,
queue (its limit and priorities), instances and statistics as a KServe request does, to the instance's engine;
so the Triton protocols and this one share one engine per model, its LLM metrics and the model's statistics.
A streamed response is server-sent events, one chunk per engine step (or per few, when the server is busier
than its engine), ending with ``data: [DONE]``; a client that goes away mid-stream cancels its request, which
aborts its engine requests and frees their KV blocks.

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a malformed
body, an invalid value or a prompt longer than the engine allows; 401 for a missing or wrong API key
(when the server has one); 404 for an unknown model; 500 when the engine fails a request.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import to_json
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kiln.errors import PromptTooLong, RequestError
from kiln.runtime.async_llm import merge_outputs
from kiln.runtime.sampling_params import SamplingParamsError
from kiln.runtime.tokenizer import LONG_TEXT
from kiln.server import access
from kiln.server.access import AccessPolicy
from kiln.server.backends.kiln.generation import Generation
from kiln.server.backends.kiln.served_llm import ServedLLM
from kiln.server.core import InferenceRequest
from kiln.server.errors import Code, ServerError
from kiln.server.model import ServedModel
from kiln.server.protocols import json_body, tool_calls
from kiln.server.protocols import openai_models as api
from kiln.server.protocols.disconnect import EventStream, sse_event, unless_disconnected
from kiln.server.server import InferenceServer

log = logging.getLogger("kiln.server")
R = TypeVar("R", bound=BaseModel)
# JSON has no -inf: the log probability of a token the sampler could never pick is written as this.
MIN_LOGPROB = -9999.0
_OPENAI_CODES = {Code.UNAUTHENTICATED: "invalid_api_key", Code.PERMISSION_DENIED: "permission_denied",
                 Code.TOO_LARGE: "request_too_large", Code.REQUEST_TIMEOUT: "request_timeout"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers
        self.info = api.ErrorInfo(message=message, param=param, code=code,
                                  type=type or ("server_error" if status >= 500 else "invalid_request_error"))

    @classmethod
    def invalid(cls, message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
        return cls(400, message, param, code)

    @classmethod
    def from_server_error(cls, e: ServerError) -> OpenAIError:
        # A full queue or a model that is not ready: the openai package retries after Retry-After.
        headers = {"Retry-After": "1"} if e.code == Code.UNAVAILABLE else None
        return cls(e.code.http_status, e.message, code=_OPENAI_CODES.get(e.code), headers=headers)

    def response(self) -> JSONResponse:
        return JSONResponse(api.ErrorResponse(error=self.info).model_dump(), status_code=self.status,
                            headers=self.headers)


def create_app(server: InferenceServer, policy: AccessPolicy) -> Starlette:
    """The OpenAI routes, to be mounted at ``/v1``, each checked by ``policy`` (the model list is the
    ``metadata`` group, the completions ``inference``)."""
    base = _Serving(server)
    routes = [
        Route("/models", access.guard_http(policy, access.METADATA, ModelsServing(base).serve), methods=["GET"]),
        Route("/completions", access.guard_http(policy, access.INFERENCE, CompletionServing(base).serve),
              methods=["POST"]),
        Route("/chat/completions", access.guard_http(policy, access.INFERENCE, ChatServing(base).serve),
              methods=["POST"]),
        Route("/responses", access.guard_http(policy, access.INFERENCE, ResponsesServing(base).serve),
              methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={
        OpenAIError: _openai_error, ServerError: _server_error, HTTPException: _http_error,
        Exception: _unexpected_error})


def create_root_app(server: InferenceServer, policy: AccessPolicy) -> Starlette:
    """vLLM's routes beside the API, at the root: ``/health`` (200 once the server is ready, else 503; the
    ``health`` group), ``/tokenize`` and ``/detokenize`` (``inference``) and ``/version`` (``metadata``)."""
    base = _Serving(server)
    tokens = TokenizeServing(base)
    routes = [
        Route("/health", access.guard_http(policy, access.HEALTH, _health(server)), methods=["GET"]),
        Route("/version", access.guard_http(policy, access.METADATA, _version), methods=["GET"]),
        Route("/tokenize", access.guard_http(policy, access.INFERENCE, tokens.tokenize), methods=["POST"]),
        Route("/detokenize", access.guard_http(policy, access.INFERENCE, tokens.detokenize), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={
        OpenAIError: _openai_error, ServerError: _server_error, HTTPException: _http_error,
        Exception: _unexpected_error})


def _health(server: InferenceServer):
    async def health(request: Request) -> Response:
        return Response(status_code=200 if server.ready else 503)

    return health


async def _version(request: Request) -> Response:
    from kiln.version import __version__

    return JSONResponse({"version": __version__})


async def _openai_error(request: Request, e: OpenAIError) -> Response:
    return e.response()


async def _server_error(request: Request, e: ServerError) -> Response:
    return OpenAIError.from_server_error(e).response()


async def _http_error(request: Request, e: HTTPException) -> Response:
    return OpenAIError(e.status_code, str(e.detail)).response()


async def _unexpected_error(request: Request, e: Exception) -> Response:
    log.error("OpenAI %s %s failed", request.method, request.url.path, exc_info=e)
    return OpenAIError(500, f"internal error: {type(e).__name__} (the server's log has the details)").response()


class _Serving:
    """What every endpoint does first: read the body, find the model."""

    def __init__(self, server: InferenceServer):
        self.server = server

    async def parse(self, request: Request, model: type[R]) -> R:
        doc = json_body.loads(await request.body(), "the request body")
        try:
            return model.model_validate(doc)
        except ValidationError as e:
            raise _validation_error(e) from None
        except RecursionError:
            raise OpenAIError.invalid("the request body is nested too deeply") from None

    def model(self, name: str) -> ServedModel:
        """The ready model ``name``, of a backend that takes typed ``Generation`` requests (the kiln backend)
        (503 while it or the server's startup models load, 404 otherwise)."""
        try:
            model = self.server.repository.get(name)
        except ServerError:
            model = None
        if model is None and (not self.server.ready or self.server.repository.is_loading(name)):
            # Clients retry a 503 (the openai package does, after Retry-After): a request sent while
            # `kiln serve` builds or loads its model gets its answer once the model is ready.
            raise OpenAIError(503, f"The model `{name}` is loading; retry shortly.", "model", "model_loading",
                              headers={"Retry-After": "2"})
        if model is None or not model.backend.takes_generation:
            names = ", ".join(self.model_names()) or "none"
            raise OpenAIError(404, f"The model `{name}` does not exist (served: {names}).", "model",
                              "model_not_found")
        return model

    def model_names(self) -> list[str]:
        return sorted({m.name for m in self.server.repository.served() if m.backend.takes_generation})


class ModelsServing:
    """``GET /v1/models``: the ready models of the kiln backend."""

    def __init__(self, base: _Serving):
        self.base = base

    async def serve(self, request: Request) -> Response:
        cards = []
        for name in self.base.model_names():
            model = self.base.model(name)
            cards.append(api.ModelCard(id=name, created=int(model.backend.created),
                                       max_model_len=model.backend.llm().max_seq_len))
        return JSONResponse(api.ModelList(data=cards).model_dump())


class TokenizeServing:
    """``POST /tokenize`` and ``POST /detokenize`` (vLLM's): the model's own tokenizer and chat template."""

    def __init__(self, base: _Serving):
        self.base = base

    def _llm(self, name: str | None) -> ServedLLM:
        if name is None:
            names = self.base.model_names()
            if len(names) != 1:
                raise OpenAIError.invalid(f"name the model: the server serves {len(names)} ({', '.join(names)})",
                                          "model")
            name = names[0]
        return self.base.model(name).backend.llm()

    async def tokenize(self, request: Request) -> Response:
        body = await self.base.parse(request, api.TokenizeRequest)
        if (body.prompt is None) == (body.messages is None):
            raise OpenAIError.invalid("give a prompt or messages, not both", "prompt")
        llm = self._llm(body.model)
        tokenizer = llm.tokenizer
        try:
            if body.prompt is not None:
                special = True if body.add_special_tokens is None else body.add_special_tokens
                ids = await asyncio.to_thread(tokenizer.encode, body.prompt, special)
            else:
                text = tokenizer.apply_chat_template(tool_calls.template_messages(body.messages),
                                                     body.add_generation_prompt)
                ids = await asyncio.to_thread(tokenizer.encode, text, bool(body.add_special_tokens))
        except RequestError as e:
            raise OpenAIError.invalid(str(e), "prompt" if body.prompt is not None else "messages") from None
        strs = [tokenizer.token_text(t) or "" for t in ids] if body.return_token_strs else None
        return JSONResponse(api.TokenizeResponse(count=len(ids), max_model_len=llm.max_seq_len, tokens=ids,
                                                 token_strs=strs).model_dump(exclude_none=True))

    async def detokenize(self, request: Request) -> Response:
        body = await self.base.parse(request, api.DetokenizeRequest)
        tokenizer = self._llm(body.model).tokenizer
        vocab = tokenizer.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise OpenAIError.invalid(f"token ids out of range [0, {vocab}): {bad[:5]}", "tokens")
        return JSONResponse(api.DetokenizeResponse(prompt=tokenizer.decode(body.tokens, skip_special_tokens=False))
                            .model_dump())


@dataclass(slots=True)
class _Prompt:
    ids: list[int]
    text: str  # for echo


class _Generation:
    """One API request: its prompts (each with ``n`` completions) generated side by side by the model, as one
    ``InferenceRequest`` carrying a typed ``Generation`` through the model's admission, queue and instances."""

    def __init__(self, model: ServedModel, prompts: list[_Prompt], params: list, prefix: str):
        self.model = model
        self.prompts = prompts
        self.params = params
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.n = params[0].n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.ids) for p in self.prompts)

    async def outputs(self) -> AsyncIterator[tuple[int, Any]]:
        """(prompt index, RequestOutput) as the engine produces them (a prompt's outputs that queued up while the
        reader was busy joined into one); closing it cancels the request, which aborts what still runs."""
        request = InferenceRequest(self.model.name, self.model.version, self.id, payload=Generation(
            [p.ids for p in self.prompts], self.params, self.id))
        async with contextlib.aclosing(self.model.infer(request)) as responses:
            async for response in responses:
                if response.error is not None:
                    raise response.error
                for item in _joined(response.payload or []):
                    yield item

    async def finals(self, request: Request) -> list:
        """Every prompt's final output (a client that disconnects first cancels them)."""
        try:
            return await unless_disconnected(request, self._collect())
        except BaseException as e:
            raise _engine_error(e) from None

    async def _collect(self) -> list:
        finals: list = [None] * len(self.prompts)
        async with contextlib.aclosing(self.outputs()) as outputs:
            async for i, out in outputs:
                if out.finished:
                    finals[i] = out
        return finals

    async def stream(self, chunks: Callable[[int, Any], list[BaseModel | dict]],
                     usage_chunk: Callable[[], BaseModel] | None, done: bool = True) -> Response:
        """Server-sent events: ``chunks(i, output)`` for each engine output, then ``usage_chunk()`` (if any),
        then ``[DONE]`` (unless not ``done``: the Responses API's stream ends with its own event). Errors
        before the first output get a status code; later ones an error event."""
        outputs = self.outputs()
        try:
            first = await anext(outputs)
        except BaseException as e:
            await outputs.aclose()
            raise _engine_error(e) from None

        async def events() -> AsyncIterator[bytes]:
            try:
                for chunk in chunks(*first):
                    yield sse_event(chunk)
                async for i, out in outputs:
                    for chunk in chunks(i, out):
                        yield sse_event(chunk)
                if usage_chunk is not None:
                    yield sse_event(usage_chunk())
            except ServerError as e:
                yield sse_event(api.ErrorResponse(error=_engine_error(e).info))
            finally:
                await outputs.aclose()
            if done:
                yield b"data: [DONE]\n\n"

        return EventStream(events(), outputs.aclose)


def _joined(items: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """A response's (prompt index, output) items with each run of one prompt's outputs joined into one."""
    out: list[tuple[int, Any]] = []
    for i, item in items:
        if out and out[-1][0] == i and not out[-1][1].finished:
            out[-1] = (i, merge_outputs(out[-1][1], item))
        else:
            out.append((i, item))
    return out


class CompletionServing:
    """``POST /v1/completions``."""

    def __init__(self, base: _Serving):
        self.base = base

    async def serve(self, request: Request) -> Response:
        body = await self.base.parse(request, api.CompletionRequest)
        model = self.base.model(body.model)
        llm = model.backend.llm()
        prompts = [_Prompt(ids, text) for ids, text in await _completion_prompts(body.prompt, llm)]
        # echo with logprobs shows the prompt's tokens with their logprobs too, as OpenAI's legacy API did.
        echoed = body.logprobs if body.echo else None
        asked = [k for k in (echoed, body.prompt_logprobs) if k is not None]
        prompt_logprobs = max(asked) if asked else None
        params = [_sampling_params(body, model.backend.sampling_defaults,
                                   _max_tokens(body.max_tokens, len(p.ids), llm.max_seq_len, "prompt"),
                                   body.logprobs, prompt_logprobs) for p in prompts]
        generation = _Generation(model, prompts, params, "cmpl")
        render = _CompletionRender(generation, body.echo, llm.tokenizer, body.logprobs, body.prompt_logprobs)
        return await _respond(request, body, generation, render)


class ChatServing:
    """``POST /v1/chat/completions``, through the engine's own chat template."""

    def __init__(self, base: _Serving):
        self.base = base

    async def serve(self, request: Request) -> Response:
        body = await self.base.parse(request, api.ChatCompletionRequest)
        model = self.base.model(body.model)
        llm = model.backend.llm()
        if body.top_logprobs is not None and not body.logprobs:
            raise OpenAIError.invalid("top_logprobs needs logprobs: true", "top_logprobs")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise OpenAIError.invalid("give max_tokens or max_completion_tokens, not both", "max_tokens")
        tools = _ToolMode.of(body, llm.tokenizer.chat_template)
        shown = [t.model_dump(exclude_none=True) for t in body.tools] if tools.shown else None
        ids = await _encode_chat(llm, tool_calls.template_messages(body.messages), "messages", shown)
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = _sampling_params(body, model.backend.sampling_defaults,
                                  _max_tokens(requested, len(ids), llm.max_seq_len, "messages"),
                                  (body.top_logprobs or 0) if body.logprobs else None, body.prompt_logprobs,
                                  constraint=tools.constraint)
        generation = _Generation(model, [_Prompt(ids, "")], [params], "chatcmpl")
        render = _ChatRender(generation, llm.tokenizer, tools, body.prompt_logprobs)
        return await _respond(request, body, generation, render)


class _ToolMode:
    """How a chat request's answer becomes tool calls (``tool_calls``): "none", "auto", "required" or
    "named"; the constraint that enforces the last two; the parser of the model's format for "auto"."""

    def __init__(self, mode: str, parser: tool_calls.ToolParser | None = None, constraint=None,
                 name: str | None = None):
        self.mode, self.parser, self.constraint, self.name = mode, parser, constraint, name

    @property
    def shown(self) -> bool:
        """The tools go into the prompt (through the chat template)."""
        return self.mode != "none"

    @classmethod
    def of(cls, body: api.ChatCompletionRequest, chat_template: str | None) -> _ToolMode:
        choice = body.tool_choice
        if not body.tools:
            if choice not in (None, "none"):
                raise OpenAIError.invalid("tool_choice needs tools", "tool_choice")
            return cls("none")
        names = [t.function.name for t in body.tools]
        if len(set(names)) != len(names):
            raise OpenAIError.invalid(f"tools have the same name twice: {sorted(names)}", "tools")
        if choice == "none":
            return cls("none")
        if choice is None or choice == "auto":
            return cls("auto", tool_calls.parser_for(chat_template))
        if body.response_format is not None or body.structured_outputs is not None:
            raise OpenAIError.invalid("a forced tool call (tool_choice required or a named function) takes no "
                                      "response_format or structured_outputs", "tool_choice")
        if choice == "required":
            constraint = tool_calls.required_constraint(body.tools, body.parallel_tool_calls)
            mode = cls("required", constraint=constraint)
        else:
            tool = next((t for t in body.tools if t.function.name == choice.function.name), None)
            if tool is None:
                raise OpenAIError.invalid(f"tool_choice names the function {choice.function.name!r}, which is not "
                                          f"among the tools ({', '.join(names)})", "tool_choice")
            mode = cls("named", constraint=tool_calls.named_constraint(tool), name=tool.function.name)
        try:
            mode.constraint.check()
        except ValueError as e:
            raise OpenAIError.invalid(f"a tool's parameters are not a usable JSON schema: {e}", "tools") from None
        return mode


class ResponsesServing:
    """``POST /v1/responses``: OpenAI's Responses API, stateless (no ``store``, no ``previous_response_id``):
    ``instructions`` and ``input`` (text or messages) through the chat template, one text answer (JSON under
    ``text.format``), streamed as the API's typed events."""

    def __init__(self, base: _Serving):
        self.base = base

    async def serve(self, request: Request) -> Response:
        body = await self.base.parse(request, api.ResponsesRequest)
        if body.store:
            raise OpenAIError.invalid("kiln keeps no responses: send store false (or leave it out)", "store")
        model = self.base.model(body.model)
        llm = model.backend.llm()
        messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
        if isinstance(body.input, str):
            messages.append({"role": "user", "content": body.input})
        else:
            messages += [{"role": tool_calls.template_role(m.role), "content": m.text()} for m in body.input]
        if not messages:
            raise OpenAIError.invalid("input is empty", "input")
        ids = await _encode_chat(llm, messages, "input")
        fmt = body.text.format if body.text is not None else None
        constraint = None
        if fmt is not None and fmt.type != "text":
            try:
                constraint = _json_format(fmt.json_schema if fmt.type == "json_schema" else None)
                constraint.check()
            except ValueError as e:
                raise OpenAIError.invalid(str(e), "text.format") from None
        params = _responses_params(body, model.backend.sampling_defaults,
                                   _max_tokens(body.max_output_tokens, len(ids), llm.max_seq_len, "input"), constraint)
        generation = _Generation(model, [_Prompt(ids, "")], [params], "resp")
        render = _ResponsesRender(generation, body)
        if body.stream:
            return await generation.stream(render.events, None, done=False)
        finals = await generation.finals(request)
        return JSONResponse(render.response(finals[0].outputs[0]).model_dump(mode="json"))


def _responses_params(body: api.ResponsesRequest, defaults: dict, max_tokens: int, constraint):
    from kiln.runtime import SamplingParams

    kwargs: dict[str, Any] = {"max_tokens": max_tokens, "structured": constraint,
                              **_given_or_default(body, ("temperature", "top_p", "top_k", "min_p",
                                                         "repetition_penalty"), defaults)}
    if body.seed is not None:
        kwargs["seed"] = body.seed % 2**64
    try:
        return SamplingParams(**kwargs)
    except SamplingParamsError as e:
        raise OpenAIError.invalid(str(e), e.field if e.field in type(body).model_fields else None) from None


class _ResponsesRender:
    """A Responses API answer: the response object, or its stream of typed events (``response.created``, the
    message's ``output_text.delta`` events, ..., ``response.completed`` or ``response.incomplete``)."""

    def __init__(self, generation: _Generation, body: api.ResponsesRequest):
        self.g = generation
        self.body = body
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.sequence = 0
        self.started = False

    def response(self, c, status: str | None = None) -> api.ResponseObject:
        body = self.body
        incomplete = c is not None and c.finish_reason == "length"
        if status is None:
            status = "incomplete" if incomplete else "completed"
        output = [] if c is None else [api.OutputMessage(id=self.message_id, status=status,
                                                         content=[api.OutputText(text=c.text)])]
        usage = None
        if c is not None:
            done = len(c.token_ids)
            usage = api.ResponseUsage(input_tokens=self.g.prompt_tokens, output_tokens=done,
                                      total_tokens=self.g.prompt_tokens + done)
        fmt = {"format": body.text.format.model_dump(by_alias=True, exclude_none=True)} if (
            body.text is not None and body.text.format is not None) else {"format": {"type": "text"}}
        return api.ResponseObject(
            id=self.g.id, created_at=self.g.created, status=status, model=self.g.model.name, output=output,
            usage=usage, incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
            instructions=body.instructions, max_output_tokens=body.max_output_tokens,
            temperature=body.temperature, top_p=body.top_p, text=fmt, metadata=body.metadata or {})

    def _event(self, kind: str, **fields) -> dict:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    def events(self, prompt: int, out) -> list[dict]:
        c = out.outputs[0]
        events = []
        if not self.started:
            self.started = True
            shell = self.response(None, "in_progress").model_dump(mode="json")
            item = {"type": "message", "id": self.message_id, "status": "in_progress", "role": "assistant",
                    "content": []}
            part = {"type": "output_text", "text": "", "annotations": []}
            events += [self._event("response.created", response=shell),
                       self._event("response.in_progress", response=shell),
                       self._event("response.output_item.added", output_index=0, item=item),
                       self._event("response.content_part.added", item_id=self.message_id, output_index=0,
                                   content_index=0, part=part)]
        if c.delta_text:
            events.append(self._event("response.output_text.delta", item_id=self.message_id, output_index=0,
                                      content_index=0, delta=c.delta_text, logprobs=[]))
        if c.finished:
            final = self.response(c)
            item = final.output[0].model_dump(mode="json")
            events += [self._event("response.output_text.done", item_id=self.message_id, output_index=0,
                                   content_index=0, text=c.text, logprobs=[]),
                       self._event("response.content_part.done", item_id=self.message_id, output_index=0,
                                   content_index=0, part=item["content"][0]),
                       self._event("response.output_item.done", output_index=0, item=item),
                       self._event(f"response.{final.status}", response=final.model_dump(mode="json"))]
        return events


async def _respond(request: Request, body, generation: _Generation, render: _Render) -> Response:
    """A completion or chat answer: server-sent events of ``render``'s chunks (and its usage chunk when
    ``stream_options.include_usage``), or one JSON response once every choice has finished."""
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return await generation.stream(render.chunks, render.usage_chunk if include_usage else None)
    if body.stream_options is not None:
        raise OpenAIError.invalid("stream_options needs stream: true", "stream_options")
    finals = await generation.finals(request)
    return JSONResponse(render.response(finals).model_dump(mode="json"))


# -- rendering engine outputs ---------------------------------------------------------------------------

class _Render:
    def __init__(self, generation: _Generation, tokenizer):
        self.g = generation
        self.tokenizer = tokenizer
        self.completion_tokens: dict[int, int] = {}  # choice index -> tokens so far
        self.finished: set[int] = set()
        self._token_text: dict[int, str] = {}

    def choice_index(self, prompt: int, completion) -> int:
        return prompt * self.g.n + completion.index

    def usage(self) -> api.Usage:
        done = sum(self.completion_tokens.values())
        return api.Usage(prompt_tokens=self.g.prompt_tokens, completion_tokens=done,
                         total_tokens=self.g.prompt_tokens + done)

    def count(self, finals: list) -> None:
        for i, out in enumerate(finals):
            for c in out.outputs:
                self.completion_tokens[self.choice_index(i, c)] = len(c.token_ids)

    def prompt_logprobs(self, output, k: int | None) -> api.PromptLogprobs | None:
        """vLLM's ``prompt_logprobs`` of a prompt's output (None unless the request asked): per prompt token,
        it and the ``k`` most likely tokens in its place."""
        if k is None or output.prompt_logprobs is None:
            return None
        out: api.PromptLogprobs = []
        for token_id, lp in zip(output.prompt_token_ids, output.prompt_logprobs):
            if lp is None:
                out.append(None)
                continue
            top = lp.top[:k]
            ranks = {t: r for r, (t, _) in enumerate(lp.top, 1)}
            entry = {str(t): api.PromptLogprob(logprob=max(v, MIN_LOGPROB), rank=r, decoded_token=self.token(t))
                     for r, (t, v) in enumerate(top, 1)}
            entry[str(token_id)] = api.PromptLogprob(logprob=max(lp.logprob, MIN_LOGPROB), rank=ranks.get(token_id),
                                                     decoded_token=self.token(token_id))
            out.append(entry)
        return out

    def token(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def updates(self, prompt: int, out) -> list[tuple[int, Any, bool]]:
        """(choice index, completion, it finished now) for the completions this output changed."""
        changed = []
        for c in out.outputs:
            index = self.choice_index(prompt, c)
            if index in self.finished:
                continue
            self.completion_tokens[index] = len(c.token_ids)
            if c.finished:
                self.finished.add(index)
            if c.delta_text or c.delta_token_ids or c.finished:
                changed.append((index, c, c.finished))
        return changed


class _CompletionRender(_Render):
    def __init__(self, generation: _Generation, echo: bool, tokenizer, logprobs: int | None = None,
                 prompt_logprobs: int | None = None):
        super().__init__(generation, tokenizer)
        self.echo = echo
        self.echo_top = logprobs or 0  # the top tokens an echoed prompt shows (the engine may have more)
        self.prompt_top = prompt_logprobs
        self.offsets: dict[int, int] = {}  # choice index -> text offset of its next token
        self.started: set[int] = set()

    def logprobs(self, index: int, logprobs, start: int, out: api.CompletionLogprobs | None = None
                 ) -> api.CompletionLogprobs | None:
        """The completion's tokens (appended to ``out``, if given), their text offsets from ``start``
        (or where the choice's previous tokens ended)."""
        if logprobs is None:
            return None
        out = api.CompletionLogprobs() if out is None else out
        offset = self.offsets.get(index, start)
        for lp in logprobs:
            text = self.token(lp.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(max(lp.logprob, MIN_LOGPROB))
            out.top_logprobs.append({self.token(t): max(v, MIN_LOGPROB) for t, v in lp.top})
            out.text_offset.append(offset)
            offset += len(text)
        self.offsets[index] = offset
        return out

    def echoed(self, index: int, output, logprobs) -> api.CompletionLogprobs | None:
        """With echo: the prompt's tokens first (the first has no logprob, as OpenAI's), then ``logprobs``."""
        if logprobs is None or output.prompt_logprobs is None:
            return self.logprobs(index, logprobs, 0)
        prompt = api.CompletionLogprobs()
        offset = 0
        for token_id, lp in zip(output.prompt_token_ids, output.prompt_logprobs):
            text = self.token(token_id)
            prompt.tokens.append(text)
            prompt.token_logprobs.append(None if lp is None else max(lp.logprob, MIN_LOGPROB))
            prompt.top_logprobs.append(None if lp is None else {self.token(t): max(v, MIN_LOGPROB)
                                                                for t, v in lp.top[:self.echo_top]})
            prompt.text_offset.append(offset)
            offset += len(text)
        self.offsets[index] = offset
        return self.logprobs(index, logprobs, offset, prompt)

    def response(self, finals: list) -> api.CompletionResponse:
        self.count(finals)
        choices = []
        for i, out in enumerate(finals):
            prefix = self.g.prompts[i].text if self.echo else ""
            for c in out.outputs:
                index = self.choice_index(i, c)
                logprobs = (self.echoed(index, out, c.logprobs) if self.echo
                            else self.logprobs(index, c.logprobs, 0))
                choices.append(api.CompletionChoice(index=index, text=prefix + c.text, finish_reason=c.finish_reason,
                                                    logprobs=logprobs,
                                                    prompt_logprobs=self.prompt_logprobs(out, self.prompt_top)))
        choices.sort(key=lambda c: c.index)
        return api.CompletionResponse(id=self.g.id, created=self.g.created, model=self.g.model.name,
                                      choices=choices, usage=self.usage())

    def chunks(self, prompt: int, out) -> list[api.CompletionResponse]:
        chunks = []
        for index, c, finished in self.updates(prompt, out):
            text = c.delta_text
            first = index not in self.started
            if self.echo and first:
                text = self.g.prompts[prompt].text + text
                logprobs = self.echoed(index, out, c.delta_logprobs)
            else:
                logprobs = self.logprobs(index, c.delta_logprobs, 0)
            self.started.add(index)
            chunks.append(api.CompletionResponse(
                id=self.g.id, created=self.g.created, model=self.g.model.name,
                choices=[api.CompletionChoice(index=index, text=text, finish_reason=c.finish_reason,
                                              logprobs=logprobs, prompt_logprobs=self.prompt_logprobs(
                                                  out, self.prompt_top if first else None))]))
        return chunks

    def usage_chunk(self) -> api.CompletionResponse:
        return api.CompletionResponse(id=self.g.id, created=self.g.created, model=self.g.model.name, choices=[],
                                      usage=self.usage())


class _ChatRender(_Render):
    def __init__(self, generation: _Generation, tokenizer, tools: _ToolMode, prompt_logprobs: int | None = None):
        super().__init__(generation, tokenizer)
        self.tools = tools
        self.prompt_top = prompt_logprobs
        self.started: set[int] = set()
        self.held: dict[int, str] = {}  # choice index -> the text of a "required" answer so far
        self.auto: dict[int, tool_calls.AutoStream] = {}
        self.call_ids: dict[int, str] = {}  # choice index -> the id of its named call
        self.sent_prompt = False  # a stream's prompt logprobs go in its first chunk that has them

    def logprobs(self, logprobs) -> api.ChatLogprobs | None:
        if logprobs is None:
            return None

        def entry(token_id: int, logprob: float) -> dict:
            text = self.token(token_id)
            return {"token": text, "logprob": max(logprob, MIN_LOGPROB), "bytes": list(text.encode("utf-8"))}

        return api.ChatLogprobs(content=[
            api.TokenLogprob(**entry(lp.token_id, lp.logprob),
                             top_logprobs=[api.TopLogprob(**entry(t, v)) for t, v in lp.top])
            for lp in logprobs])

    def _calls(self, text: str) -> tuple[str | None, list[tool_calls.Call]]:
        """A whole answer's (content, calls) under the request's tool choice."""
        mode = self.tools.mode
        if mode == "auto":
            return self.tools.parser.parse(text)
        if mode == "required":
            calls = tool_calls.parse_required(text)
            return (None, calls) if calls else (text, [])
        if mode == "named":
            return None, [tool_calls.Call(self.tools.name, text)]
        return text, []

    def _finish_reason(self, reason: str | None, calls: list) -> str | None:
        # OpenAI: "tool_calls" when the model chose to call (auto, required); a named call ends with "stop".
        if calls and reason == "stop" and self.tools.mode in ("auto", "required"):
            return "tool_calls"
        return reason

    def response(self, finals: list) -> api.ChatCompletionResponse:
        self.count(finals)
        out = finals[0]
        choices = []
        for c in out.outputs:
            content, calls = self._calls(c.text)
            message = api.AssistantMessage(content=content, tool_calls=[
                api.AssistantToolCall(id=tool_calls.call_id(), function=api.CalledFunction(name=k.name,
                                                                                          arguments=k.arguments))
                for k in calls])
            choices.append(api.ChatChoice(index=c.index, message=message, logprobs=self.logprobs(c.logprobs),
                                          finish_reason=self._finish_reason(c.finish_reason, calls)))
        return api.ChatCompletionResponse(id=self.g.id, created=self.g.created, model=self.g.model.name,
                                          choices=choices, usage=self.usage(),
                                          prompt_logprobs=self.prompt_logprobs(out, self.prompt_top))

    def chunks(self, prompt: int, out) -> list[api.ChatCompletionChunk]:
        choices = []
        for index, c, finished in self.updates(prompt, out):
            if index not in self.started:  # OpenAI's first chunk of a choice names the role
                self.started.add(index)
                first = api.Delta(role="assistant", content="")
                if self.tools.mode == "named":  # the call's name and id come first, its arguments stream
                    self.call_ids[index] = tool_calls.call_id()
                    first = api.Delta(role="assistant", tool_calls=[api.DeltaToolCall(
                        index=0, id=self.call_ids[index], type="function",
                        function=api.DeltaFunction(name=self.tools.name))])
                choices.append(api.ChatChunkChoice(index=index, delta=first))
            if c.delta_text or c.delta_logprobs or finished:
                delta, reason = self._delta(index, c.delta_text, finished, c.finish_reason)
                if delta.content is None and delta.tool_calls is None and reason is None and not c.delta_logprobs:
                    continue  # text held back (a tool call may be beginning)
                choices.append(api.ChatChunkChoice(index=index, delta=delta, finish_reason=reason,
                                                   logprobs=self.logprobs(c.delta_logprobs)))
        chunks = [api.ChatCompletionChunk(id=self.g.id, created=self.g.created, model=self.g.model.name,
                                          choices=[choice]) for choice in choices]
        if chunks and self.prompt_top is not None and not self.sent_prompt:
            chunks[0].prompt_logprobs = self.prompt_logprobs(out, self.prompt_top)
            self.sent_prompt = chunks[0].prompt_logprobs is not None
        return chunks

    def _delta(self, index: int, text: str, finished: bool, reason: str | None) -> tuple[api.Delta, str | None]:
        """One streamed step of a choice: its content or tool-call delta, and its finish reason."""
        mode = self.tools.mode
        if mode == "none":
            return api.Delta(content=text or None), reason
        if mode == "named":
            calls = [api.DeltaToolCall(index=0, function=api.DeltaFunction(arguments=text))] if text else None
            return api.Delta(tool_calls=calls), reason
        calls: list[tool_calls.Call] = []
        if mode == "required":
            self.held[index] = self.held.get(index, "") + text
            content = ""
            if finished:
                content, calls = self._calls(self.held.pop(index))
                content = content or ""
        else:
            stream = self.auto.setdefault(index, tool_calls.AutoStream(self.tools.parser))
            content = stream.feed(text)
            if finished:
                rest, calls = stream.finish()
                content += rest
        deltas = [api.DeltaToolCall(index=i, id=tool_calls.call_id(), type="function",
                                    function=api.DeltaFunction(name=k.name, arguments=k.arguments))
                  for i, k in enumerate(calls)]
        return api.Delta(content=content or None, tool_calls=deltas or None), self._finish_reason(reason, calls)

    def usage_chunk(self) -> api.ChatCompletionChunk:
        return api.ChatCompletionChunk(id=self.g.id, created=self.g.created, model=self.g.model.name, choices=[],
                                       usage=self.usage())


# -- requests to engine inputs --------------------------------------------------------------------------

async def _completion_prompts(prompt, llm: ServedLLM) -> list[tuple[list[int], str]]:
    """(token ids, text) of each prompt: a string, a list of strings, token ids, or a list of those."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise OpenAIError.invalid("prompt is empty", "prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    tokenizer = llm.tokenizer
    out = []
    for p in prompt:
        if isinstance(p, str):
            try:
                if len(p) >= LONG_TEXT:  # off the loop (see LONG_TEXT)
                    ids = await asyncio.to_thread(tokenizer.encode, p, True, llm.max_seq_len)
                else:
                    ids = tokenizer.encode(p, max_tokens=llm.max_seq_len)
            except PromptTooLong as e:
                raise OpenAIError.invalid(str(e), "prompt", "context_length_exceeded") from None
            except RequestError as e:
                raise OpenAIError.invalid(str(e), "prompt") from None
            out.append((ids, p))
        else:
            if not p:
                raise OpenAIError.invalid("prompt is empty", "prompt")
            vocab = tokenizer.vocab_size
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise OpenAIError.invalid(f"prompt token ids out of range [0, {vocab}): {bad[:5]}", "prompt")
            out.append((list(p), tokenizer.decode(list(p), skip_special_tokens=False)))
    return out


def _max_tokens(requested: int | None, prompt_tokens: int, max_seq_len: int, prompt_name: str) -> int:
    """The completion's token budget: as asked, else (OpenAI's default) what is left of max_seq_len; checked by
    the engine's own context-length rule, here so the answer names the parameter."""
    from kiln.runtime.scheduler import context_length_error

    max_tokens = requested if requested is not None else max(max_seq_len - prompt_tokens, 1)
    too_long = context_length_error(prompt_tokens, max_tokens, max_seq_len)
    if too_long is not None:
        raise OpenAIError.invalid(str(too_long), prompt_name, "context_length_exceeded")
    return max_tokens


def _sampling_params(body: api.SamplingRequest, defaults: dict, max_tokens: int, logprobs: int | None,
                     prompt_logprobs: int | None = None, constraint=None):
    from kiln.runtime import SamplingParams

    kwargs: dict[str, Any] = dict(max_tokens=max_tokens, n=body.n, stop=body.stop, ignore_eos=body.ignore_eos,
                                  min_tokens=body.min_tokens, skip_special_tokens=body.skip_special_tokens,
                                  logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                  stop_token_ids=body.stop_token_ids or [], logit_bias=body.logit_bias,
                                  cache_salt=body.cache_salt, priority=body.priority)
    kwargs.update(_given_or_default(body, ("temperature", "top_p", "presence_penalty", "frequency_penalty",
                                           "top_k", "min_p", "repetition_penalty"), defaults))
    if body.seed is not None:
        kwargs["seed"] = body.seed % 2**64
    kwargs["structured"] = constraint if constraint is not None else _structured_output(body)
    try:
        return SamplingParams(**kwargs)
    except SamplingParamsError as e:
        raise OpenAIError.invalid(str(e), e.field if e.field in type(body).model_fields else None) from None


def _given_or_default(body, names: tuple[str, ...], defaults: dict) -> dict[str, Any]:
    """Each named sampling field as the request gives it, else the model's own default (its generation config,
    as vLLM applies them); fields that are neither are left out (kiln's default)."""
    out = {}
    for name in names:
        value = getattr(body, name)
        if value is None:
            value = defaults.get(name)
        if value is not None:
            out[name] = value
    return out


async def _encode_chat(llm: ServedLLM, messages: list[dict], param: str, tools: list[dict] | None = None
                       ) -> list[int]:
    """The prompt of ``messages`` through the engine's chat template; a 400 naming ``param`` if it cannot be."""
    try:
        if sum(len(m["content"]) for m in messages) >= LONG_TEXT:  # off the loop (see LONG_TEXT)
            return await asyncio.to_thread(llm.tokenizer.encode_chat, messages, llm.max_seq_len, tools)
        return llm.tokenizer.encode_chat(messages, llm.max_seq_len, tools)
    except PromptTooLong as e:
        raise OpenAIError.invalid(str(e), param, "context_length_exceeded") from None
    except RequestError as e:
        raise OpenAIError.invalid(str(e), param) from None


def _structured_output(body: api.SamplingRequest):
    """The request's constraint on its output (``response_format`` or ``structured_outputs``), checked, or
    None."""
    fmt, so = body.response_format, body.structured_outputs
    if fmt is not None and so is not None:
        raise OpenAIError.invalid("give response_format or structured_outputs, not both", "response_format")
    param = "response_format" if fmt is not None else "structured_outputs"
    try:
        constraint = (_response_format(fmt) if fmt is not None
                      else _structured_outputs(so) if so is not None else None)
        if constraint is not None:
            constraint.check()
    except ValueError as e:
        raise OpenAIError.invalid(str(e), param) from None
    return constraint


def _response_format(fmt: api.ResponseFormat):
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return _json_format(None)
    if fmt.json_schema is None:
        raise OpenAIError.invalid("response_format of type json_schema needs its json_schema", "response_format")
    return _json_format(fmt.json_schema.json_schema)


def _json_format(schema: dict | None):
    """JSON output: matching ``schema``, or any JSON object when there is none."""
    from kiln.runtime.structured_output import StructuredOutput

    return StructuredOutput("json_object") if schema is None else StructuredOutput("json", to_json(schema).decode())


def _structured_outputs(so: api.StructuredOutputs):
    from kiln.runtime.structured_output import StructuredOutput

    given = [name for name in ("json_", "regex", "choice", "grammar", "json_object")
             if getattr(so, name) not in (None, False)]
    if len(given) != 1:
        raise OpenAIError.invalid("structured_outputs takes exactly one of json, regex, choice, grammar and "
                                  f"json_object; got {len(given)}", "structured_outputs")
    flexible = not so.disable_any_whitespace
    kind = given[0]
    if kind == "json_":
        spec = so.json_ if isinstance(so.json_, str) else to_json(so.json_).decode()
        return StructuredOutput("json", spec, flexible)
    if kind == "json_object":
        return StructuredOutput("json_object", "", flexible)
    if kind == "choice":
        return StructuredOutput("choice", to_json(so.choice).decode())
    return StructuredOutput(kind, getattr(so, kind))


def _validation_error(e: ValidationError) -> OpenAIError:
    errors = e.errors()
    first = errors[0]
    if first["type"] == "extra_forbidden":  # the field's own name, whatever it begins with
        param = str(first["loc"][-1])
        return OpenAIError.invalid(f"Unrecognized request argument supplied: {param}", param)
    # Union members appear in the location by their type ("str", "list[int]"): the field's name is the rest.
    param = ".".join(str(part) for part in first["loc"] if not str(part).startswith(("list[", "str", "int")))
    same = [err for err in errors if err["loc"][:1] == first["loc"][:1]]
    detail = first["msg"] if len(same) == 1 else "; or ".join(sorted({err["msg"] for err in same}))
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) or first["type"] == "missing" else f" (got {got!r})"
    return OpenAIError.invalid(f"{param or 'request'}: {detail}{shown}", param or None)


def _engine_error(e: BaseException) -> BaseException:
    """The error a request that failed at or after submission answers with (the model's ServerError: the kiln
    backend maps the engine's errors to codes)."""
    if isinstance(e, ServerError):
        return OpenAIError.from_server_error(e)
    return e
