"""The inference server as the protocols see it: one object with every operation of the KServe v2
protocol and Triton's extensions, in internal types (protobuf messages from Triton's own
``service_pb2`` / ``model_config_pb2`` for metadata, and ``core`` types for inference), so the HTTP and
gRPC adapters only translate wire formats."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from tritonclient.grpc import service_pb2 as pb

from kiln.server.config import ModelConfig
from kiln.server.core import InferenceRequest, InferenceResponse
from kiln.server.errors import ServerError
from kiln.server.log_settings import LogSettings
from kiln.server.trace import TraceSettings
from kiln.server.limits import Limits
from kiln.server.model import ServedModel, TensorMeta
from kiln.server.repository import ModelRepository
from kiln.server.shm import Region, SharedMemoryManager
from kiln.version import __version__

EXTENSIONS = ["classification", "sequence", "model_repository", "model_repository(unload_dependents)",
              "schedule_policy", "model_configuration", "system_shared_memory", "cuda_shared_memory",
              "binary_tensor_data", "parameters", "statistics", "trace", "logging"]


@dataclass
class ServerOptions:
    model_repository: Path
    model_control_mode: str = "none"
    load_models: list[str] = field(default_factory=list)
    repository_poll_secs: float = 15.0
    limits: Limits = field(default_factory=Limits)
    log_verbose: int = 0  # the logging extension's log_verbose_level at start
    trace_file: Path | None = None  # the trace extension's one file (clients may not name one)


class InferenceServer:
    def __init__(self, options: ServerOptions):
        self.options = options
        limits = options.limits
        self.shm = SharedMemoryManager(limits.shm_max_regions, limits.shm_max_bytes)
        self.trace = TraceSettings(options.trace_file)
        self.repository = ModelRepository(options.model_repository, options.model_control_mode, self.shm,
                                          options.load_models, options.repository_poll_secs, self.infer,
                                          limits.cancel_grace, self.trace)
        self.log_settings = LogSettings(options.log_verbose)
        self.ready = False
        self._poller: asyncio.Task | None = None

    async def start(self) -> None:
        await self.repository.start()
        if self.options.model_control_mode == "poll":
            self._poller = asyncio.create_task(self.repository.poll_forever())
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await self.repository.close()
        self.trace.flush(closing=True)
        self.shm.close()
        self.log_settings.close()

    # -- health and metadata -------------------------------------------------------------------------

    def metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="kiln", version=__version__, extensions=EXTENSIONS)

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            return self.repository.get(name, parse_version(version)).ready
        except ServerError:
            return False

    def model_metadata(self, name: str, version: str = "") -> pb.ModelMetadataResponse:
        model = self.repository.get(name, parse_version(version))
        versions = [model] if version else self.repository.versions(name)
        config = model.config

        def tensors(metas):
            return [pb.ModelMetadataResponse.TensorMetadata(name=m.name, datatype=m.datatype, shape=m.shape)
                    for m in metas]

        return pb.ModelMetadataResponse(name=name, versions=[str(m.version) for m in versions],
                                        platform=config.platform or config.backend,
                                        inputs=tensors(model.input_metas), outputs=tensors(model.output_metas))

    def input_metadata(self, name: str, version: str = "") -> dict[str, TensorMeta]:
        """The model's inputs by name (``model_metadata``'s, without building its message)."""
        return self.repository.get(name, parse_version(version)).input_by_name

    def model_config(self, name: str, version: str = "") -> ModelConfig:
        return self.repository.get(name, parse_version(version)).config

    def statistics(self, name: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        if not name:
            models = self.repository.served()
        elif version:
            models = [self.repository.get(name, parse_version(version))]
        else:
            models = self.repository.versions(name)
            if not models:
                raise ServerError.not_found(f"requested model '{name}' is not available")
        return pb.ModelStatisticsResponse(model_stats=[m.stats.proto() for m in models])

    # -- repository ----------------------------------------------------------------------------------

    def repository_index(self, ready_only: bool = False) -> pb.RepositoryIndexResponse:
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=n, version=v, state=s, reason=r)
            for n, v, s, r in self.repository.index(ready_only)])

    async def load(self, name: str, config_json: str | None = None, files: dict[str, bytes] | None = None) -> None:
        await self.repository.load(name, config_json, files)

    async def unload(self, name: str, dependents: bool = False) -> None:
        await self.repository.unload(name, dependents)

    # -- shared memory -------------------------------------------------------------------------------

    def shm_register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self.shm.register(name, key, offset, byte_size)

    def shm_unregister(self, name: str = "") -> None:
        self.shm.unregister(name)

    def shm_status(self, name: str = "") -> list[Region]:
        return self.shm.status(name)

    def cuda_shm_register(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        self.shm.register_cuda(name, raw_handle, device_id, byte_size)

    def cuda_shm_unregister(self, name: str = "") -> None:
        self.shm.unregister(name, cuda=True)

    def cuda_shm_status(self, name: str = "") -> list[Region]:
        return self.shm.status(name, cuda=True)

    # -- inference -----------------------------------------------------------------------------------

    def infer(self, request: InferenceRequest) -> AsyncIterator[InferenceResponse]:
        """Every response of ``request`` (an async generator to close); the last is final. Raises
        ServerError when it is refused: at once when its model is not served, else as it is admitted."""
        model: ServedModel = self.repository.get(request.model_name, request.model_version)
        return model.infer(request)

    async def infer_one(self, request: InferenceRequest) -> InferenceResponse:
        """The single response of a request/response protocol (HTTP infer, gRPC ModelInfer).

        A decoupled model may answer through it when it sends exactly one response; more is an error
        that points to the streaming protocols.
        """
        result: InferenceResponse | None = None
        async with contextlib.aclosing(self.infer(request)) as responses:
            async for response in responses:
                if response.error is not None:
                    raise response.error
                if response.flag_only:
                    continue
                if result is not None:
                    raise ServerError.unsupported(
                        f"model '{request.model_name}' sent more than one response to a request; this endpoint "
                        "carries exactly one (use generate_stream or gRPC ModelStreamInfer)")
                result = response
        if result is None:
            raise ServerError.internal(f"model '{request.model_name}' sent no response")
        return result


def parse_version(version: str | int) -> int:
    """A protocol's version string: "" is the latest (-1)."""
    if version in ("", None, -1):
        return -1
    try:
        v = int(version)
    except (TypeError, ValueError):
        v = -2
    if v < 0:
        raise ServerError.invalid(f"'{version}' is not a valid model version")
    return v
