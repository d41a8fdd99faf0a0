"""KServe v2 over gRPC: the ``inference.GRPCInferenceService`` that ``tritonclient`` ships
(``tritonclient.grpc.service_pb2_grpc``), served by ``grpc.aio`` on the server's event loop.

Only wire translation lives here. Errors become the gRPC status Triton gives their code. Inputs come
as ``raw_input_contents`` (one per input that is not in shared memory, in order) or typed
``contents``; every output goes back in ``raw_output_contents`` (empty for shared-memory outputs, so
the indices line up, as Triton does). ``ModelStreamInfer`` serves decoupled models (zero or more
responses per request) and ordinary ones; errors travel in the stream's ``error_message``.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from kiln.server import access, datatypes
from kiln.server.access import AccessPolicy
from kiln.server.core import InferenceRequest, InferenceResponse, RequestedOutput, ShmRef, Tensor
from kiln.server.errors import ServerError
from kiln.server.limits import Limits
from kiln.server.server import InferenceServer, parse_version

log = logging.getLogger("kiln.server")
EMPTY_FINAL = "triton_enable_empty_final_response"
_CONTENTS = {  # datatype -> typed contents field
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
MAX_SEND = 2**31 - 1
# Each method's API group (access.py), as Triton's restricted-protocol groups them.
GROUPS = {
    "ServerLive": access.HEALTH, "ServerReady": access.HEALTH, "ModelReady": access.HEALTH,
    "ServerMetadata": access.METADATA, "ModelMetadata": access.METADATA,
    "ModelInfer": access.INFERENCE, "ModelStreamInfer": access.INFERENCE,
    "ModelConfig": access.MODEL_CONFIG, "ModelStatistics": access.STATISTICS,
    "RepositoryIndex": access.MODEL_REPOSITORY, "RepositoryModelLoad": access.MODEL_REPOSITORY,
    "RepositoryModelUnload": access.MODEL_REPOSITORY,
    "SystemSharedMemoryStatus": access.SHARED_MEMORY, "SystemSharedMemoryRegister": access.SHARED_MEMORY,
    "SystemSharedMemoryUnregister": access.SHARED_MEMORY, "CudaSharedMemoryStatus": access.SHARED_MEMORY,
    "CudaSharedMemoryRegister": access.SHARED_MEMORY, "CudaSharedMemoryUnregister": access.SHARED_MEMORY,
    "TraceSetting": access.TRACE, "LogSettings": access.LOGGING,
}
_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


def create_server(server: InferenceServer, policy: AccessPolicy, limits: Limits) -> grpc.aio.Server:
    options = [("grpc.max_send_message_length", MAX_SEND),
               ("grpc.max_receive_message_length", limits.max_request_size),
               ("grpc.max_allowed_incoming_connections", limits.max_connections),
               ("grpc.max_connection_idle_ms", int(limits.idle_timeout * 1000)),
               ("grpc.server_handshake_timeout_ms", int(limits.header_timeout * 1000))]
    grpc_server = grpc.aio.server(options=options)
    grpc_server.add_generic_rpc_handlers((_handlers(GrpcService(server, policy)),))
    return grpc_server


def _handlers(service: GrpcService) -> grpc.GenericRpcHandler:
    """The service's methods, as tritonclient's generated code registers them, but with requests parsed
    leniently: a message that is not protobuf reaches the method as ``Malformed`` (an INVALID_ARGUMENT
    answer), where grpcio would log a traceback and answer INTERNAL."""
    handlers = {}
    for method in _SERVICE.methods:
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        make = grpc.stream_stream_rpc_method_handler if method.client_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(service, method.name), request_deserializer=_lenient(request),
                                     response_serializer=response.SerializeToString)
    return grpc.method_handlers_generic_handler(_SERVICE.full_name, handlers)


@dataclass(frozen=True, slots=True)
class Malformed:
    message_type: str
    error: str

    def as_error(self) -> ServerError:
        return ServerError.invalid(f"the request is not a valid {self.message_type} message: {self.error}")


def _lenient(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception as e:  # protobuf's DecodeError, and what its C++ parser raises
            return Malformed(message_class.DESCRIPTOR.full_name, str(e) or type(e).__name__)

    return parse


def _metadata(context) -> dict[str, str]:
    return {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def _unary(method):
    group = GROUPS[method.__name__]

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            self.policy.check(group, _metadata(context).get, grpc=True)
            if isinstance(request, Malformed):
                raise request.as_error()
            return await method(self, request, context)
        except ServerError as e:
            await context.abort(grpc.StatusCode[e.code.grpc_name], e.message)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:
            log.exception("gRPC %s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"internal error: {type(e).__name__} (the server's log has the details)")

    return wrapper


class GrpcService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, server: InferenceServer, policy: AccessPolicy):
        self.server = server
        self.policy = policy

    @_unary
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @_unary
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.server.ready)

    @_unary
    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.server.model_ready(request.name, request.version))

    @_unary
    async def ServerMetadata(self, request, context):
        return self.server.metadata()

    @_unary
    async def ModelMetadata(self, request, context):
        return self.server.model_metadata(request.name, request.version)

    @_unary
    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=self.server.model_config(request.name, request.version))

    @_unary
    async def ModelStatistics(self, request, context):
        return self.server.statistics(request.name, request.version)

    @_unary
    async def RepositoryIndex(self, request, context):
        return self.server.repository_index(request.ready)

    @_unary
    async def RepositoryModelLoad(self, request, context):
        files = {k[5:]: v.bytes_param for k, v in request.parameters.items() if k.startswith("file:")}
        config = request.parameters["config"].string_param if "config" in request.parameters else None
        await self.server.load(request.model_name, config, files)
        return pb.RepositoryModelLoadResponse()

    @_unary
    async def RepositoryModelUnload(self, request, context):
        dependents = request.parameters.get("unload_dependents")
        if dependents is not None and dependents.WhichOneof("parameter_choice") != "bool_param":
            raise ServerError.invalid("parameter 'unload_dependents' must be a boolean")
        await self.server.unload(request.model_name, dependents is not None and dependents.bool_param)
        return pb.RepositoryModelUnloadResponse()

    @_unary
    async def SystemSharedMemoryStatus(self, request, context):
        return pb.SystemSharedMemoryStatusResponse(regions={
            r.name: pb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size)
            for r in self.server.shm_status(request.name)})

    @_unary
    async def SystemSharedMemoryRegister(self, request, context):
        self.server.shm_register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @_unary
    async def SystemSharedMemoryUnregister(self, request, context):
        self.server.shm_unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @_unary
    async def LogSettings(self, request, context):
        changes = {}
        for name, value in request.settings.items():
            which = value.WhichOneof("parameter_choice")
            changes[name] = getattr(value, which) if which else None
        values = self.server.log_settings.update(changes)  # no changes: the settings as they are
        return pb.LogSettingsResponse(settings={name: _log_value(v) for name, v in values.items()})

    @_unary
    async def TraceSetting(self, request, context):
        model = request.model_name or None
        if model is not None:
            self.server.repository.get(model)
        # An empty value clears the setting, as Triton reads it.
        changes = {name: (list(v.value) if name == "trace_level" else v.value[0]) if v.value else None
                   for name, v in request.settings.items()}
        values = self.server.trace.update(changes, model) if changes else self.server.trace.get(model)
        return pb.TraceSettingResponse(settings={
            name: pb.TraceSettingResponse.SettingValue(value=v if isinstance(v, list) else [v])
            for name, v in values.items()})

    @_unary
    async def CudaSharedMemoryStatus(self, request, context):
        return pb.CudaSharedMemoryStatusResponse(regions={
            r.name: pb.CudaSharedMemoryStatusResponse.RegionStatus(
                name=r.name, device_id=r.device_id, byte_size=r.byte_size)
            for r in self.server.cuda_shm_status(request.name)})

    @_unary
    async def CudaSharedMemoryRegister(self, request, context):
        self.server.cuda_shm_register(request.name, request.raw_handle, request.device_id, request.byte_size)
        return pb.CudaSharedMemoryRegisterResponse()

    @_unary
    async def CudaSharedMemoryUnregister(self, request, context):
        self.server.cuda_shm_unregister(request.name)
        return pb.CudaSharedMemoryUnregisterResponse()

    @_unary
    async def ModelInfer(self, request, context):
        request = _request(request)
        _empty_final(request)  # accepted as Triton does (perf_analyzer sends it); a unary call has one response
        return _response(await self.server.infer_one(request))

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        try:
            self.policy.check(access.INFERENCE, _metadata(context).get, grpc=True)
        except ServerError as e:
            await context.abort(grpc.StatusCode[e.code.grpc_name], e.message)
        out: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task] = set()

        async def serve(message: pb.ModelInferRequest | Malformed) -> None:
            try:
                if isinstance(message, Malformed):
                    raise message.as_error()
                request = _request(message)
                empty_final = _empty_final(request)
                async with contextlib.aclosing(self.server.infer(request)) as responses:
                    async for r in responses:
                        if r.error is not None:
                            out.put_nowait(pb.ModelStreamInferResponse(error_message=r.error.message))
                        elif not r.flag_only or empty_final:
                            wire = _response(r)
                            if empty_final:
                                wire.parameters["triton_final_response"].bool_param = r.final
                            out.put_nowait(pb.ModelStreamInferResponse(infer_response=wire))
            except ServerError as e:
                out.put_nowait(pb.ModelStreamInferResponse(error_message=e.message))
            except Exception as e:  # a fault of the server's: the stream still answers the request
                log.exception("gRPC ModelStreamInfer failed")
                out.put_nowait(pb.ModelStreamInferResponse(
                    error_message=f"internal error: {type(e).__name__} (the server's log has the details)"))

        async def read() -> None:
            try:
                async for message in request_iterator:
                    task = asyncio.create_task(serve(message))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:
                    await asyncio.gather(*running)
            finally:
                out.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await out.get()) is not None:
                yield item
            await reader
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()


def _empty_final(request: InferenceRequest) -> bool:
    """Take Triton's one reserved request parameter off the request (other ``triton_`` keys are refused
    at admission): on a stream, a final response with no outputs is sent when the flag asks for it."""
    value = request.parameters.pop(EMPTY_FINAL, False)
    if not isinstance(value, bool):
        raise ServerError.invalid(f"invalid value type for '{EMPTY_FINAL}' parameter, expected bool_param.")
    return value


def _request(message: pb.ModelInferRequest) -> InferenceRequest:
    model = message.model_name
    raw = message.raw_input_contents
    inputs, index = [], 0
    for t in message.inputs:
        params = _params(t.parameters)
        shape = list(t.shape)
        if "shared_memory_region" in params:
            if t.HasField("contents"):
                raise ServerError.invalid(f"unexpected 'content' provided when using shared memory for input tensor "
                                          f"'{t.name}' for model '{model}'")
            data: Any = _shm_ref(params, f"input '{t.name}'")
        elif t.HasField("contents"):
            if raw:
                raise ServerError.invalid(f"contents field must not be specified when using raw_input_contents for "
                                          f"'{t.name}' for model '{model}'")
            data = _typed_contents(t, model)
        elif index < len(raw):
            data = raw[index]
            index += 1
        else:
            raise ServerError.invalid(
                f"unable to find data for input tensor '{t.name}' for model '{model}' in request.")
        inputs.append(Tensor(t.name, t.datatype, shape, data))
    if index != len(raw):
        raise ServerError.invalid(f"the request has {len(raw)} raw_input_contents but {index} inputs read raw data")
    outputs = []
    for o in message.outputs:
        params = _params(o.parameters)
        output = RequestedOutput(o.name, class_count=params.get("classification", 0))  # checked on admission
        if "shared_memory_region" in params:
            output.shm = _shm_ref(params, f"output '{o.name}'")
        outputs.append(output)
    return InferenceRequest(model, parse_version(message.model_version), message.id, inputs, outputs,
                            _params(message.parameters))


def _typed_contents(t, model: str) -> list:
    field = _CONTENTS.get(t.datatype)
    present = [f.name for f, _ in t.contents.ListFields()]
    if field is None or any(name != field for name in present):
        raise ServerError.invalid(
            f"unexpected explicit tensor data {present} for input tensor '{t.name}' for model '{model}' of type "
            f"'{t.datatype}'" + (f"; expected {field}" if field else "; send it in raw_input_contents"))
    return list(getattr(t.contents, field))


def _response(r: InferenceResponse) -> pb.ModelInferResponse:
    wire = pb.ModelInferResponse(model_name=r.model_name, model_version=str(r.model_version), id=r.id)
    for key, value in r.parameters.items():
        _set_param(wire.parameters[key], value)
    for t in r.outputs:
        wire.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        wire.raw_output_contents.append(
            b"" if isinstance(t.data, ShmRef) else datatypes.to_raw(t.data, datatypes.BY_NAME[t.datatype]))
    return wire


def _params(params) -> dict[str, Any]:
    return {k: getattr(v, v.WhichOneof("parameter_choice")) if v.WhichOneof("parameter_choice") else None
            for k, v in params.items()}


def _set_param(param: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)


def _shm_ref(params: dict, what: str) -> ShmRef:
    region, size = params.get("shared_memory_region"), params.get("shared_memory_byte_size")
    offset = params.get("shared_memory_offset", 0)
    if not isinstance(region, str) or not isinstance(size, int) or not isinstance(offset, int):
        raise ServerError.invalid(f"{what} needs 'shared_memory_region' and 'shared_memory_byte_size'")
    return ShmRef(region, size, offset)


def _log_value(value: object) -> pb.LogSettingsResponse.SettingValue:
    if isinstance(value, bool):
        return pb.LogSettingsResponse.SettingValue(bool_param=value)
    if isinstance(value, int):
        return pb.LogSettingsResponse.SettingValue(uint32_param=value)
    return pb.LogSettingsResponse.SettingValue(string_param=str(value))
