"""The backend interface: what a backend implements so the server can load, run and unload its models.

Terms are Triton's. A *backend* is a kind of model (``onnxruntime``, ``pytorch``, ``python``, ``kiln``):
one :class:`Backend` subclass, registered in ``kiln.server.backends``. A *model* is one loaded version
of a model folder: one :class:`Backend` object. An *instance* is one copy of it that executes
requests (the config's ``instance_group``): one :class:`ModelInstance`.

Life of a model version
-----------------------
1. ``Backend.detect(folder)``: a config with neither ``backend`` nor ``platform`` is given to the
   first backend that recognizes the latest version folder (``model.onnx``, ``model.pt``; the kiln
   backend: an engine's ``engine.json``). A model folder with no version folders that a backend
   recognizes as it is (an engine folder dropped into the repository) is served as version 1.
2. ``Backend.complete_config(config, version_dir)``: fill in what ``config.pbtxt`` left out (inputs,
   outputs, ``max_batch_size``, ``platform``, ``model_transaction_policy``, parameters), before the
   config is checked; the result is the config clients see. A model folder may have no
   ``config.pbtxt`` at all: a kiln engine folder fills its whole config from the engine.
3. ``Backend(context)``: load what the instances share (weights, an engine). Blocking: the server
   calls it in a worker thread, so a slow load never stalls the protocols.
4. ``create_instance(spec)``: one per instance (``count`` per group, per GPU for KIND_GPU); blocking,
   in a worker thread. ``gpus()`` tells the server which GPUs the backend can use (KIND_AUTO). Then
   ``await ModelInstance.start()`` on the event loop, for what must bind to it.
5. ``ModelInstance.execute(requests)``: a coroutine on the server's event loop; see below.
6. Unload: the server stops routing to the version, waits until every request has its final
   response, awaits each ``ModelInstance.stop()`` on the loop, then calls each ``close()`` and
   ``Backend.close()`` in a worker thread; they must release every reference to weights and sessions,
   so memory returns to where it was.

Executing requests
------------------
- ``execute`` gets 1..N requests. N > 1 only with ``dynamic_batching`` and ``max_batch_size > 0``;
  the requests of one call then have the same inputs with the same shapes after the batch dimension.
- ``request.input(name)`` is a numpy array in the storage dtype (``ml_dtypes.bfloat16`` for BF16, an
  object array of ``bytes`` for BYTES), batch dimension first when ``max_batch_size > 0``, already in
  the config's ``reshape``. ``request.output_names`` are the outputs to produce (others are dropped);
  ``request.parameters`` are the request's parameters; ``request.batch_size`` its batch (0: none).
- Answer with ``request.respond(outputs={name: array}, parameters=..., error=..., final=True)``, from
  any thread. An ordinary model responds exactly once per request. A decoupled model
  (``model_transaction_policy { decoupled: true }``) responds zero or more times with ``final=False``
  and then once with ``final=True``; ``respond(final=True)`` with no outputs sends the final flag alone.
  The server checks each output against the config (data type; shape, reversing an output
  ``reshape``), keeps the requested ones, writes shared-memory outputs and counts statistics.
- Raising from ``execute`` (a :class:`~kiln.server.errors.ServerError` for a message the user should
  read; anything else is reported as an internal error) fails every request of the call that has no
  final response yet. To fail one request, ``respond(error=...)``.
- Return :class:`~kiln.server.stats.ComputeTimes` (input / infer / output nanoseconds) for the
  statistics, or None to count the whole call as compute-infer time.
- Concurrency: the scheduler runs at most ``max_concurrency`` calls of one instance at once (1, as
  Triton does), and hands it ``calls_ahead`` more while those run (0 by default): calls it holds and starts
  as soon as a running one ends, so that it does not wait on the server's loop between two. A request whose
  wait in the queue has a limit (its ``timeout``) is not handed ahead: it waits in the queue, where its
  limit holds. A request handed ahead whose client leaves before it runs is no longer dropped from the
  queue: it runs, with ``cancelled`` set. An instance that batches in flight by itself (the kiln backend
  over ``AsyncLLM``) raises ``max_concurrency``. Blocking work belongs off the loop:
  ``await self.run_blocking(fn, *args)`` runs it on the instance's own thread. A decoupled instance may
  return before its final responses (its requests stay in flight, and unload waits for them); the
  scheduler then gives it the next call.
- Cancellation: ``request.cancelled`` turns True when the client goes away (HTTP disconnect, gRPC
  cancel, stream closed). A backend checks it between steps and ends the request with
  ``respond(final=True)`` or an error; one that does not within the server's grace period has its
  instance ``reclaim``-ed. With ``cancel_execute = True`` the server also cancels the
  ``execute`` coroutine (``asyncio.CancelledError``) once every request of the call is cancelled: the
  natural tool for asyncio backends (abort the engine request in a ``finally``).

Metrics
-------
``Backend.metric_families()`` returns ``prometheus_client`` metric families (e.g. KV-cache usage,
tokens per second); the metrics page collects them at each scrape, next to Triton's per-model ones.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from kiln.server import config as cfg
from kiln.server.devices import cuda_devices

if TYPE_CHECKING:
    from prometheus_client import Metric

    from kiln.server.core import InferenceRequest, InferenceResponse
    from kiln.server.stats import ComputeTimes


@dataclass(frozen=True, slots=True)
class ModelContext:
    """What a backend is given to load one model version."""

    name: str
    version: int
    config: cfg.ModelConfig  # complete, normalized and checked; do not change it
    model_dir: Path
    version_dir: Path
    # The server's own infer (every response of a request to any model; raises ServerError when it is
    # refused), for models that call other models: the python backend's BLS. None outside a server.
    infer: Callable[[InferenceRequest], AsyncIterator[InferenceResponse]] | None = None
    # The config of another loaded model (name, version; -1 the latest), for ensembles to check their steps;
    # raises ServerError when it is not loaded. None outside a server.
    lookup: Callable[[str, int], cfg.ModelConfig] | None = None

    @property
    def parameters(self) -> dict[str, str]:
        return cfg.parameters(self.config)


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    name: str  # "<group name>_<index>", unique within the model
    kind: str  # "cpu" or "gpu"
    device_id: int | None  # the GPU for kind "gpu"


class ModelInstance(ABC):
    max_concurrency: ClassVar[int] = 1
    # Calls the instance takes beyond ``max_concurrency`` while those run, to start each the moment the one
    # before it ends (a Python model's process holds them in order).
    calls_ahead: ClassVar[int] = 0
    cancel_execute: ClassVar[bool] = False

    def __init__(self, spec: InstanceSpec):
        self.spec = spec
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None

    @abstractmethod
    async def execute(self, requests: list[InferenceRequest]) -> ComputeTimes | None:
        ...

    async def start(self) -> None:
        """On the event loop, after every instance is created and before the first request (an asyncio
        engine starts its loop-bound parts here)."""

    async def stop(self) -> None:
        """On the event loop, after the last request and before ``close``."""

    async def reclaim(self) -> None:
        """Make the requests this instance holds end, after they outlived their cancellation by the grace
        period (a model that never sends a decoupled request's final response). The default does nothing:
        an instance whose ``execute`` is cancelled with its requests needs nothing more. The python backend
        stops its process, which fails what it held; the next request starts it again."""

    async def run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on this instance's own thread (created on first use)."""
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=self.spec.name)
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def close(self) -> None:
        """Release everything the instance holds (called once, off the loop, after its last request)."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None


class Backend(ABC):
    name: ClassVar[str]  # the config's `backend`
    platforms: ClassVar[tuple[str, ...]] = ()  # config `platform` values it serves; the first is reported
    default_model_filename: ClassVar[str | None] = None
    default_cpu_instance_count: ClassVar[int] = 1
    # Config parameters that name files or folders: a config sent with a load request may name them only
    # inside the model's folder (a config.pbtxt in the repository is the operator's, and may name any).
    path_parameters: ClassVar[tuple[str, ...]] = ()
    # Takes typed ``Generation`` requests (token ids and SamplingParams per prompt: backends/kiln/generation.py)
    # and offers ``llm()`` (its tokenizer and max_seq_len), ``sampling_defaults`` and ``created``: the models the
    # OpenAI routes serve. The others are reached through tensors only.
    takes_generation: ClassVar[bool] = False

    @classmethod
    def detect(cls, version_dir: Path) -> bool:
        return cls.default_model_filename is not None and (version_dir / cls.default_model_filename).exists()

    @classmethod
    def complete_config(cls, config: cfg.ModelConfig, version_dir: Path) -> None:
        """Fill in what config.pbtxt left out (called before checks; ``config.name`` is set)."""
        if not config.platform and cls.platforms:
            config.platform = cls.platforms[0]

    @classmethod
    def gpus(cls) -> list[int]:
        """GPU ids this backend can run instances on (KIND_AUTO picks GPU when non-empty): the machine's."""
        return list(cuda_devices())

    def __init__(self, context: ModelContext):
        self.context = context

    @abstractmethod
    def create_instance(self, spec: InstanceSpec) -> ModelInstance:
        ...

    @classmethod
    def model_path(cls, config: cfg.ModelConfig, version_dir: Path) -> Path:
        """The version's model file: the config's ``default_model_filename`` (inside the version folder), or
        the backend's default."""
        return cfg.file_inside(version_dir, config.default_model_filename or cls.default_model_filename or "",
                               "default_model_filename")

    def model_file(self) -> Path:
        return self.model_path(self.context.config, self.context.version_dir)

    def metric_families(self) -> Iterable[Metric]:
        return ()

    def close(self) -> None:
        """Release what the model version shares (after every instance is closed)."""
