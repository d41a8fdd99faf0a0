"""KServe v2 over HTTP (Starlette), with Triton's extensions: binary tensor data, classification,
model repository, statistics, system shared memory, request parameters, and generate
(``generate``: one JSON response; ``generate_stream``: server-sent events, one per response).

Only wire translation lives here: a JSON (+ binary) body becomes an ``InferenceRequest``; an
``InferenceResponse`` becomes JSON (+ binary). Every rule is the server's. Errors are
``{"error": "..."}`` with the status Triton gives the error's code.
"""
from __future__ import annotations

import base64
import binascii

import contextlib
import gzip
import logging
import zlib
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kiln.server import access, datatypes
from kiln.server.access import AccessPolicy
from kiln.server.core import InferenceRequest, InferenceResponse, RequestedOutput, ShmRef, Tensor
from kiln.server.errors import Code, ServerError, shown
from kiln.server.limits import Limits
from kiln.server.protocols import json_body
from kiln.server.protocols.disconnect import EventStream, sse_event, unless_disconnected
from kiln.server.protocols.proto_json import to_json
from kiln.server.server import InferenceServer, parse_version

log = logging.getLogger("kiln.server")
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY, JSON, SHM = "binary", "json", "shm"


def create_app(server: InferenceServer, policy: AccessPolicy, limits: Limits) -> Starlette:
    api = _Api(server, limits)
    model = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version}"
    # Inference first: a router tries its routes in order, and these are the ones every request takes.
    routes = [(access.INFERENCE, prefix + "/infer", api.infer, "POST") for prefix in (model, versioned)] + [
        (access.HEALTH, "/v2/health/live", api.live, "GET"),
        (access.HEALTH, "/v2/health/ready", api.ready, "GET"),
        (access.METADATA, "/v2", api.server_metadata, "GET"),
        (access.STATISTICS, "/v2/models/stats", api.statistics, "GET"),
        (access.MODEL_REPOSITORY, "/v2/repository/index", api.repository_index, "POST"),
        (access.MODEL_REPOSITORY, "/v2/repository/models/{model}/load", api.load, "POST"),
        (access.MODEL_REPOSITORY, "/v2/repository/models/{model}/unload", api.unload, "POST"),
        (access.SHARED_MEMORY, "/v2/systemsharedmemory/status", api.shm_status, "GET"),
        (access.SHARED_MEMORY, "/v2/systemsharedmemory/region/{region}/status", api.shm_status, "GET"),
        (access.SHARED_MEMORY, "/v2/systemsharedmemory/region/{region}/register", api.shm_register, "POST"),
        (access.SHARED_MEMORY, "/v2/systemsharedmemory/region/{region}/unregister", api.shm_unregister, "POST"),
        (access.SHARED_MEMORY, "/v2/systemsharedmemory/unregister", api.shm_unregister, "POST"),
        (access.LOGGING, "/v2/logging", api.logging, "GET,POST"),
        (access.TRACE, "/v2/trace/setting", api.trace_setting, "GET,POST"),
        (access.TRACE, "/v2/models/{model}/trace/setting", api.trace_setting, "GET,POST"),
        (access.SHARED_MEMORY, "/v2/cudasharedmemory/status", api.cuda_shm_status, "GET"),
        (access.SHARED_MEMORY, "/v2/cudasharedmemory/region/{region}/status", api.cuda_shm_status, "GET"),
        (access.SHARED_MEMORY, "/v2/cudasharedmemory/region/{region}/register", api.cuda_shm_register, "POST"),
        (access.SHARED_MEMORY, "/v2/cudasharedmemory/region/{region}/unregister", api.cuda_shm_unregister, "POST"),
        (access.SHARED_MEMORY, "/v2/cudasharedmemory/unregister", api.cuda_shm_unregister, "POST"),
    ]
    for prefix in (model, versioned):
        routes += [
            (access.METADATA, prefix, api.model_metadata, "GET"),
            (access.HEALTH, prefix + "/ready", api.model_ready, "GET"),
            (access.MODEL_CONFIG, prefix + "/config", api.model_config, "GET"),
            (access.STATISTICS, prefix + "/stats", api.statistics, "GET"),
            (access.INFERENCE, prefix + "/generate", api.generate, "POST"),
            (access.INFERENCE, prefix + "/generate_stream", api.generate_stream, "POST"),
        ]
    return Starlette(routes=[Route(path, access.guard_http(policy, group, fn), methods=methods.split(","))
                             for group, path, fn, methods in routes],
                     exception_handlers={ServerError: _server_error, HTTPException: _http_error,
                                         Exception: _unexpected_error})


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _server_error(request: Request, e: ServerError) -> Response:
    return _error(e.message, e.code.http_status)


async def _http_error(request: Request, e: HTTPException) -> Response:
    return _error(e.detail, e.status_code)


async def _unexpected_error(request: Request, e: Exception) -> Response:
    log.error("HTTP %s %s failed", request.method, request.url.path, exc_info=e)
    return _error(f"internal error: {type(e).__name__} (the server's log has the details)", 500)


class _Api:
    def __init__(self, server: InferenceServer, limits: Limits):
        self.server = server
        self.limits = limits

    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def ready(self, request: Request) -> Response:
        return Response(status_code=200 if self.server.ready else 400)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse(to_json(self.server.metadata()))

    async def model_metadata(self, request: Request) -> Response:
        p = request.path_params
        return JSONResponse(to_json(self.server.model_metadata(p["model"], p.get("version", ""))))

    async def model_ready(self, request: Request) -> Response:
        p = request.path_params
        return Response(status_code=200 if self.server.model_ready(p["model"], p.get("version", "")) else 400)

    async def model_config(self, request: Request) -> Response:
        p = request.path_params
        return JSONResponse(to_json(self.server.model_config(p["model"], p.get("version", "")), defaults=True))

    async def statistics(self, request: Request) -> Response:
        p = request.path_params
        return JSONResponse(to_json(self.server.statistics(p.get("model", ""), p.get("version", "")), defaults=True))

    async def repository_index(self, request: Request) -> Response:
        body = await _json_body(request)
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise ServerError.invalid("'ready' must be a boolean")
        return JSONResponse([to_json(m) for m in self.server.repository_index(ready).models])

    async def load(self, request: Request) -> Response:
        params = _parameters(await _json_body(request))
        files = {}
        for key, value in params.items():
            if key.startswith("file:"):  # the file's content, base64 (Triton's HTTP form)
                try:
                    files[key[5:]] = base64.b64decode(value, validate=True)
                except (TypeError, ValueError, binascii.Error):
                    raise ServerError.invalid(f"parameter '{shown(key)}' must be the file's content in base64") \
                        from None
        config = params.get("config")
        if config is not None and not isinstance(config, str):
            raise ServerError.invalid("parameter 'config' must be a string holding the model configuration JSON")
        await self.server.load(request.path_params["model"], config, files)
        return Response(status_code=200)

    async def unload(self, request: Request) -> Response:
        dependents = _parameters(await _json_body(request)).get("unload_dependents", False)
        if not isinstance(dependents, bool):
            raise ServerError.invalid("parameter 'unload_dependents' must be a boolean")
        await self.server.unload(request.path_params["model"], dependents)
        return Response(status_code=200)

    async def shm_status(self, request: Request) -> Response:
        regions = self.server.shm_status(request.path_params.get("region", ""))
        return JSONResponse([{"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
                             for r in regions])

    async def shm_register(self, request: Request) -> Response:
        body = await _json_body(request)
        try:
            key, offset, size = body["key"], body.get("offset", 0), body["byte_size"]
        except KeyError as e:
            raise ServerError.invalid(f"shared memory register request needs '{e.args[0]}'") from None
        if not isinstance(key, str) or not _is_int(offset) or not _is_int(size):
            raise ServerError.invalid("shared memory register request needs a string 'key' and integer "
                                      "'offset' and 'byte_size'")
        self.server.shm_register(request.path_params["region"], key, offset, size)
        return Response(status_code=200)

    async def shm_unregister(self, request: Request) -> Response:
        self.server.shm_unregister(request.path_params.get("region", ""))
        return Response(status_code=200)

    async def logging(self, request: Request) -> Response:
        """Triton's logging extension: GET the settings, POST some of them (``log_settings``)."""
        settings = self.server.log_settings
        if request.method == "GET":
            return JSONResponse(dict(settings.values))
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise ServerError.invalid("the log settings are a JSON object")
        return JSONResponse(settings.update(body))

    async def trace_setting(self, request: Request) -> Response:
        """Triton's trace extension: GET the settings (the server's, or a model's), POST some (``trace.py``)."""
        model = request.path_params.get("model")
        if model is not None:
            self.server.repository.get(model)  # an unknown model is a 404, as Triton answers
        if request.method == "GET":
            return JSONResponse(self.server.trace.get(model))
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise ServerError.invalid("the trace settings are a JSON object")
        return JSONResponse(self.server.trace.update(body, model))

    async def cuda_shm_status(self, request: Request) -> Response:
        regions = self.server.cuda_shm_status(request.path_params.get("region", ""))
        return JSONResponse([{"name": r.name, "device_id": r.device_id, "byte_size": r.byte_size} for r in regions])

    async def cuda_shm_register(self, request: Request) -> Response:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise ServerError.invalid("the CUDA shared memory register request is a JSON object")
        handle, device_id, size = body.get("raw_handle"), body.get("device_id", 0), body.get("byte_size")
        b64 = handle.get("b64") if isinstance(handle, dict) else None
        if not isinstance(b64, str) or not _is_int(device_id) or not _is_int(size):
            raise ServerError.invalid("a CUDA shared memory register request needs 'raw_handle' as "
                                      "{\"b64\": base64 string}, and integer 'device_id' and 'byte_size'")
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise ServerError.invalid("'raw_handle' of the CUDA shared memory register request is not base64") \
                from None
        self.server.cuda_shm_register(request.path_params["region"], raw, device_id, size)
        return Response(status_code=200)

    async def cuda_shm_unregister(self, request: Request) -> Response:
        self.server.cuda_shm_unregister(request.path_params.get("region", ""))
        return Response(status_code=200)

    async def infer(self, request: Request) -> Response:
        p = request.path_params
        body = _decompress(await request.body(), request.headers.get("content-encoding"),
                           self.limits.max_request_size)
        ireq, kinds, default_kind = _parse_infer(p["model"], p.get("version", ""), body,
                                                 request.headers.get(HEADER_LENGTH))
        response = await unless_disconnected(request, self.server.infer_one(ireq))
        content, headers = _encode_infer(response, kinds, default_kind)
        encoding = _accepted_encoding(request.headers.get("accept-encoding", ""))
        if encoding is not None:
            content = gzip.compress(content) if encoding == "gzip" else zlib.compress(content)
            headers["Content-Encoding"] = encoding
        return Response(content, headers=headers)

    async def generate(self, request: Request) -> Response:
        ireq = await self._generate_request(request)
        response = await unless_disconnected(request, self.server.infer_one(ireq))
        return JSONResponse(_generate_json(response))

    async def generate_stream(self, request: Request) -> Response:
        ireq = await self._generate_request(request)
        responses = self.server.infer(ireq)
        try:
            first = await anext(responses)  # errors before the first response get a status code
            if first.error is not None and first.final:
                raise first.error
        except BaseException:
            await responses.aclose()
            raise

        async def events():
            async with contextlib.aclosing(responses):
                response = first
                while True:
                    if response.error is not None:
                        yield sse_event({"error": response.error.message})
                    elif not response.flag_only:
                        yield sse_event(_generate_json(response))
                    if response.final:
                        return
                    response = await anext(responses)

        return EventStream(events(), responses.aclose)

    async def _generate_request(self, request: Request) -> InferenceRequest:
        p = request.path_params
        model, version = p["model"], p.get("version", "")
        doc = await _json_body(request)
        inputs = self.server.input_metadata(model, version)
        tensors, parameters = [], {}
        for key, value in {**_parameters(doc), **{k: v for k, v in doc.items() if k != "parameters"}}.items():
            if key in inputs:
                tensors.append(_generate_tensor(key, value, inputs[key]))
            elif key != "id":
                parameters[key] = value
        request_id = doc.get("id", "")
        if not isinstance(request_id, str):
            raise ServerError.invalid("Unable to parse 'id': it must be a string")
        return InferenceRequest(model, parse_version(version), request_id, tensors, parameters=parameters)


# -- generate: JSON fields <-> tensors ----------------------------------------------------------------

def _generate_tensor(name: str, value: Any, meta) -> Tensor:
    """A JSON value (scalar or list) as the named input, shaped as Triton's generate extension does:
    the fixed dims divide the element count, the innermost variable dim takes the rest, others are 1."""
    values = value if isinstance(value, list) else [value]
    shape = list(meta.shape)
    count = len(values)
    for d in shape:
        if d != -1:
            if d == 0 or count % d:
                raise ServerError.invalid(f"The schema can not convert input '{name}' to tensor with proper shape")
            count //= d
    for i in reversed(range(len(shape))):
        if shape[i] == -1:
            shape[i], count = count, 1
    if count != 1:
        raise ServerError.invalid(f"The schema can not convert input '{name}' to tensor with proper shape")
    return Tensor(name, meta.datatype, shape, values)


def _generate_json(response: InferenceResponse) -> dict[str, Any]:
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": str(response.model_version)}
    if response.id:
        doc["id"] = response.id
    doc.update(response.parameters)
    for t in response.outputs:
        data = datatypes.to_list(t.data, datatypes.BY_NAME[t.datatype], f"output '{t.name}'")
        doc[t.name] = data[0] if len(data) == 1 else data
    return doc


# -- infer: wire -> InferenceRequest ------------------------------------------------------------------

def _parse_infer(model: str, version: str, body: bytes, header_length: str | None
                 ) -> tuple[InferenceRequest, dict[str, str], str]:
    """The request, each requested output's kind (binary, JSON, shared memory) and the default kind."""
    if header_length is None:
        head, binary = body, memoryview(b"")
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise ServerError.invalid(f"Unable to parse '{HEADER_LENGTH}': '{header_length}'") from None
        if not 0 <= n <= len(body):
            raise ServerError.invalid(f"{HEADER_LENGTH} is {n} but the request body has {len(body)} bytes")
        head, binary = body[:n], memoryview(body)[n:]
    doc = json_body.loads(head)
    if not isinstance(doc, dict):
        raise ServerError.invalid("the request JSON must be an object")

    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise ServerError.invalid("Unable to parse 'id': it must be a string")
    parameters = dict(_parameters(doc))
    binary_output = parameters.pop("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise ServerError.invalid("Unable to parse 'binary_data_output': it must be a boolean")

    inputs_doc = doc.get("inputs")
    if not isinstance(inputs_doc, list):
        raise ServerError.invalid("the request JSON needs an 'inputs' list")
    offset = 0
    inputs = []
    for i, item in enumerate(inputs_doc):
        tensor, used = _parse_input(item, i, binary, offset)
        offset += used
        inputs.append(tensor)
    if offset != len(binary):
        raise ServerError.invalid(
            f"the request carries {len(binary)} bytes of binary data but its inputs' 'binary_data_size' add up "
            f"to {offset}")

    default_kind = BINARY if binary_output else JSON
    outputs, kinds = [], {}
    outputs_doc = doc.get("outputs", [])
    if not isinstance(outputs_doc, list):
        raise ServerError.invalid("'outputs' must be a list")
    for item in outputs_doc:
        output, kind = _parse_output(item, default_kind)
        outputs.append(output)
        kinds[output.name] = kind
    request = InferenceRequest(model, parse_version(version), request_id, inputs, outputs, parameters)
    return request, kinds, default_kind


def _parse_input(item: Any, index: int, binary: memoryview, offset: int) -> tuple[Tensor, int]:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise ServerError.invalid(f"input {index} of the request needs a 'name'")
    name = item["name"]
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise ServerError.invalid(f"Unable to parse 'shape' of input '{name}': it must be a list of integers")
    dtype = item.get("datatype")
    if not isinstance(dtype, str):
        raise ServerError.invalid(f"Unable to parse 'datatype' of input '{name}'")
    params = _parameters(item)
    has_binary = "binary_data_size" in params
    has_shm = "shared_memory_region" in params
    has_data = "data" in item
    if has_binary + has_shm + has_data != 1:
        raise ServerError.invalid(
            f"input '{name}' must give exactly one of 'data', 'binary_data_size' in 'parameters', "
            "'shared_memory_region' in 'parameters'")
    if has_data:
        data = item["data"]
        if not isinstance(data, list):
            raise ServerError.invalid(f"Unable to parse 'data' of input '{name}': it must be a list")
        return Tensor(name, dtype, shape, data), 0
    if has_shm:
        return Tensor(name, dtype, shape, _shm_ref(params, f"input '{name}'")), 0
    size = params["binary_data_size"]
    if not _is_int(size) or size < 0:
        raise ServerError.invalid(f"Unable to parse 'binary_data_size' of input '{name}'")
    if offset + size > len(binary):
        raise ServerError.invalid(
            f"unexpected end of binary data for input '{name}': it needs {size} bytes at offset {offset} but the "
            f"request has {len(binary)} bytes of binary data")
    return Tensor(name, dtype, shape, binary[offset:offset + size]), size


def _parse_output(item: Any, default_kind: str) -> tuple[RequestedOutput, str]:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise ServerError.invalid("each requested output needs a 'name'")
    name = item["name"]
    params = _parameters(item)
    output = RequestedOutput(name)
    kind = default_kind
    if "binary_data" in params:
        if not isinstance(params["binary_data"], bool):
            raise ServerError.invalid(f"Unable to parse 'binary_data' of output '{name}'")
        kind = BINARY if params["binary_data"] else JSON
    output.class_count = params.get("classification", 0)  # checked on admission, for both protocols
    if "shared_memory_region" in params:
        if params.get("binary_data") is True:
            raise ServerError.invalid("Output can't set both 'shared_memory_region' and 'binary_data'")
        output.shm = _shm_ref(params, f"output '{name}'")
        kind = SHM
    return output, kind


def _shm_ref(params: dict, what: str) -> ShmRef:
    region, size = params.get("shared_memory_region"), params.get("shared_memory_byte_size")
    offset = params.get("shared_memory_offset", 0)
    if not isinstance(region, str) or not _is_int(size) or not _is_int(offset):
        raise ServerError.invalid(
            f"{what} needs 'shared_memory_region' (string) and 'shared_memory_byte_size' (integer), and an "
            "optional integer 'shared_memory_offset'")
    return ShmRef(region, size, offset)


# -- infer: InferenceResponse -> wire -----------------------------------------------------------------


def _encode_infer(response: InferenceResponse, kinds: dict[str, str], default_kind: str
                  ) -> tuple[bytes, dict[str, str]]:
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": str(response.model_version)}
    if response.id:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    outputs, blobs = [], []
    for t in response.outputs:
        out: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if not isinstance(t.data, ShmRef):
            dtype = datatypes.BY_NAME[t.datatype]
            if kinds.get(t.name, default_kind) == BINARY:
                raw = datatypes.to_raw(t.data, dtype)
                out["parameters"] = {"binary_data_size": len(raw)}
                blobs.append(raw)
            else:
                out["data"] = datatypes.to_list(t.data, dtype, f"output '{t.name}'")
        outputs.append(out)
    doc["outputs"] = outputs
    head = msgspec.json.encode(doc)  # compact UTF-8, in C: a tenth of the json module's time here
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


# -- helpers ------------------------------------------------------------------------------------------

async def _json_body(request: Request) -> dict:
    body = await request.body()
    if not body.strip():
        return {}
    doc = json_body.loads(body)
    if not isinstance(doc, dict):
        raise ServerError.invalid("the request JSON must be an object")
    return doc


def _parameters(doc: dict) -> dict:
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise ServerError.invalid("'parameters' must be a JSON object")
    return params


def _decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body as sent, inflated when ``encoding`` says so; no more than ``limit`` bytes either way."""
    if encoding in (None, "", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ServerError.unsupported(f"unsupported Content-Encoding '{shown(encoding)}' (gzip, deflate)")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
        if len(out) <= limit and not inflater.eof:
            out += inflater.flush()
    except zlib.error as e:
        raise ServerError.invalid(f"cannot decompress the {encoding} request body: {e}") from None
    if len(out) > limit:
        raise ServerError(Code.TOO_LARGE, f"the {encoding} request body inflates past the server's limit of "
                                          f"{limit} bytes (--max-request-size)")
    if not inflater.eof:
        raise ServerError.invalid(f"cannot decompress the {encoding} request body: it ends early")
    return out


def _accepted_encoding(accept: str) -> str | None:
    names = [part.split(";")[0].strip() for part in accept.split(",")]
    return next((n for n in names if n in ("gzip", "deflate")), None)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
