"""The ``kiln`` backend: a kiln engine served as a decoupled Triton model, with TensorRT-LLM's tensor names.

A model folder is an engine folder (``engine.json`` in the folder itself, served as version 1, or in
a version folder), or a folder whose ``config.pbtxt`` says ``backend: "kiln"`` and names the engine
with the parameter ``engine_dir`` (TensorRT-LLM's ``gpt_model_path`` is read too; a relative path is
taken from the model folder), with an empty version folder ``1``. A config with no inputs and
outputs, or no config at all, is completed from the engine: every input and output of ``tensors``,
``max_batch_size`` = the engine's, and ``model_transaction_policy { decoupled: true }`` unless the
config sets a policy. A config that lists inputs or outputs may use only those of ``tensors`` (any
integer or float type for numbers); what it leaves out (all inputs, or all outputs) is filled in.

Each instance runs one ``AsyncLLM`` (``ServedLLM``), which batches in flight by itself, so an instance
takes many requests at once (parameter ``max_concurrency``, default 1024); the batch rows of one
request are generated side by side. A streamed request (input ``stream``) gets a response per engine
step with that step's new text and tokens, the last one final; otherwise one response with the whole
text. A client that goes away cancels ``execute``, which aborts its engine requests and frees their
KV blocks.

Other parameters: ``RuntimeConfig``'s fields (``kv_cache_memory``, ``gpu_memory_utilization``,
``enable_prefix_caching``, ``max_batch_size``, ...), ``exclude_input_in_output`` (that input's
default; true unless set), ``generation_config`` ("auto": a request that leaves temperature, top-p,
top-k, min-p or the repetition penalty unset gets the model's own value, from its generation config as
the engine recorded it; "none": kiln's) and ``override_generation_config`` (a JSON object of those
defaults, over either). An unknown parameter is an error.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.engine import ENGINE_FILE, read_engine
from kiln.errors import KilnError, RequestError
from kiln.server import config as cfg
from kiln.server.backends.base import Backend, InstanceSpec, ModelContext, ModelInstance
from kiln.server.backends.kiln import tensors
from kiln.server.backends.kiln.generation import Generation, GenerationRelay, Relay
from kiln.server.backends.kiln.served_llm import ServedLLM, metric_families
from kiln.server.core import InferenceRequest
from kiln.server.errors import ServerError

ENGINE_PARAMETERS = ("engine_dir", "gpt_model_path")
DEFAULT_MAX_CONCURRENCY = 1024
_OWN_PARAMETERS = (*ENGINE_PARAMETERS, "max_concurrency", "exclude_input_in_output", "generation_config",
                   "override_generation_config")


class KilnBackend(Backend):
    name = "kiln"
    platforms = ("kiln",)
    default_model_filename = ENGINE_FILE
    path_parameters = ENGINE_PARAMETERS
    takes_generation = True

    @classmethod
    def complete_config(cls, config: cfg.ModelConfig, version_dir: Path) -> None:
        super().complete_config(config, version_dir)
        written = bool(config.input or config.output)  # then its max_batch_size and policy are the config's
        tensors.check_config(config)
        tensors.fill_config(config)
        if written:
            return
        # The version folder's parent is the model folder whenever a parameter names the engine.
        path = _engine_path(config, version_dir.parent, version_dir)
        try:
            engine = read_engine(path, need_weights=False)
        except KilnError as e:
            raise ServerError.invalid(f"model '{config.name}': {e}") from None
        config.max_batch_size = engine.build.max_batch_size
        if not config.HasField("model_transaction_policy"):
            config.model_transaction_policy.decoupled = True

    def __init__(self, context: ModelContext):
        super().__init__(context)
        self.engine = _engine_path(context.config, context.model_dir, context.version_dir)
        params = context.parameters
        self.options = _runtime_options(params, context.name)
        self.exclude_input = _parse(params.get("exclude_input_in_output", "true"), "bool",
                                    "exclude_input_in_output", context.name)
        self.max_concurrency = _parse(params.get("max_concurrency", str(DEFAULT_MAX_CONCURRENCY)), "int",
                                      "max_concurrency", context.name)
        self.sampling_defaults = _sampling_defaults(self.engine, params, context.name)
        self.instances: list[KilnInstance] = []
        self.created = time.time()  # what OpenAI's model list reports as the model's creation time

    def create_instance(self, spec: InstanceSpec) -> KilnInstance:
        device = f"cuda:{spec.device_id}" if spec.kind == "gpu" else "cpu"
        try:
            llm = ServedLLM(self.engine, device, self.options)
        except (KilnError, ValueError, TypeError) as e:
            raise ServerError.invalid(f"cannot load engine {self.engine}: {e}") from None
        instance = KilnInstance(spec, self, llm)
        self.instances.append(instance)
        return instance

    def llm(self) -> ServedLLM:
        """The least busy instance's engine, for what a protocol reads from it (the tokenizer, the context length);
        requests go through the model's scheduler, as typed ``Generation`` requests or as tensors."""
        live = [i.llm for i in self.instances if i.llm is not None]
        if not live:
            raise ServerError.unavailable(f"model '{self.context.name}' is unloading")
        return min(live, key=lambda llm: llm.load)

    def metric_families(self):
        llms = [i.llm for i in self.instances if i.llm is not None]
        return metric_families(llms, [self.context.name, str(self.context.version)]) if llms else ()

    def close(self) -> None:
        self.instances.clear()


class KilnInstance(ModelInstance):
    cancel_execute = True

    def __init__(self, spec: InstanceSpec, backend: KilnBackend, llm: ServedLLM):
        super().__init__(spec)
        self.max_concurrency = backend.max_concurrency
        self.config = backend.context.config
        self.batched = self.config.max_batch_size > 0
        self.exclude_input = backend.exclude_input
        self.sampling_defaults = backend.sampling_defaults
        self.llm: ServedLLM | None = llm
        self._ids = itertools.count()
        self._prefix = f"triton-{uuid.uuid4().hex[:8]}"

    async def execute(self, requests: list[InferenceRequest]) -> None:
        await asyncio.gather(*(self._serve(r) for r in requests))

    async def _serve(self, request: InferenceRequest) -> None:
        """A request's engine requests, their outputs relayed to its responses as the engine makes them: a typed
        ``Generation`` (the OpenAI routes), or tensors (a response per step when streaming, else one at the end)."""
        try:
            if request.payload is not None:
                gen = request.payload
                if not isinstance(gen, Generation):
                    raise ServerError.invalid(f"model '{self.config.name}' takes tensors or a Generation, not a "
                                              f"{type(gen).__name__}")
                relay: Relay = GenerationRelay(request, self.llm, len(gen.prompts))
                parts = [(ids, sp, f"{gen.request_id}-{i}") for i, (ids, sp) in enumerate(zip(gen.prompts, gen.params))]
            else:
                jobs = tensors.read_jobs(request, self.llm.tokenizer, self.batched, self.exclude_input,
                                         self.sampling_defaults)
                if jobs.stream and not cfg.is_decoupled(self.config):
                    raise ServerError.invalid(
                        f"model '{self.config.name}' is not decoupled, so it cannot stream: send 'stream' false, "
                        "or set model_transaction_policy { decoupled: true } in its config")
                relay = _TensorRelay(request, self.llm, jobs, self.batched)
                parts = [(job.prompt, job.params, f"{self._prefix}-{next(self._ids)}") for job in jobs.rows]
        except (ServerError, RequestError) as e:
            request.respond(error=e if isinstance(e, ServerError) else ServerError.invalid(str(e)))
            return
        try:
            for i, (prompt, params, engine_id) in enumerate(parts):
                if request.priority_level:  # a model with priority levels: its engine admits a higher level first
                    params = dataclasses.replace(params, priority=request.priority_level)
                await relay.start(i, prompt, params, engine_id)
            await relay.done
            if not request.final_sent:  # cancelled beside others of its batch: the final flag ends it now
                request.respond(None)
        except RequestError as e:
            request.respond(error=ServerError.invalid(str(e)))
        finally:
            if not relay.done.done() or relay.done.cancelled():  # failed to start, or cancelled (awaiting the
                relay.stop()                                       # future from a cancelled task cancels it too)

    def close(self) -> None:
        super().close()
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None


class _TensorRelay(Relay):
    """Tensor requests: a batch row a part; streaming, each output's new tokens as a response (the last final
    when the request has one row), joined into the response before while nobody has read that one (a reader
    that falls behind gets fewer, longer deltas: ``InferenceRequest.amend``); otherwise every row's whole result
    at the end."""

    def __init__(self, request: InferenceRequest, llm: ServedLLM, jobs: tensors.Jobs, batched: bool):
        super().__init__(request, llm, len(jobs.rows))
        self.jobs = jobs
        self.rows = [_Row(job) for job in jobs.rows]
        self.batched = batched
        self.names = request.output_names
        self.context = "context_ids" in self.names
        self._unread: tuple[int, _Row] | None = None  # the part and delta of the last response sent

    def output(self, part: int, out) -> None:
        row, c = self.rows[part], out.outputs[0]
        logprobs = row.add_logprobs(c.delta_logprobs)
        if self.jobs.stream:
            final = len(self.rows) == 1 and out.finished
            if c.delta_token_ids:
                unread = self._unread
                if unread is not None and unread[0] == part and self.request.amendable():  # join the unread delta
                    before = unread[1]
                    delta = _Row(row.job, before.text + c.delta_text, before.ids + c.delta_token_ids,
                                 before.logprobs + logprobs, row.cum, before.context)
                    self.request.amend(_outputs([delta], self.names, self.batched), final)
                else:
                    context = (_context(out.prompt_token_ids, c.token_ids, len(c.delta_token_ids)) if self.context
                               else [])
                    delta = _Row(row.job, c.delta_text, c.delta_token_ids, logprobs, row.cum, context)
                    self.request.respond(_outputs([delta], self.names, self.batched), final=final)
                self._unread = (part, delta)
            elif final:
                self.request.respond(None, final=True)
        if out.finished and not self.jobs.stream:  # the whole result, for the one response at the end
            row.text, row.ids = c.text, c.token_ids
            row.context = _context(out.prompt_token_ids, c.token_ids, len(c.token_ids)) if self.context else []
            if not row.job.exclude_input:
                prompt = out.prompt_token_ids
                row.text = (row.job.prompt if isinstance(row.job.prompt, str)
                            else self.llm.tokenizer.decode(prompt)) + row.text
                row.ids = prompt + row.ids
                row.context = []

    def finish(self) -> None:
        if not self.request.final_sent:
            self.request.respond(None if self.jobs.stream else _outputs(self.rows, self.names, self.batched))


@dataclass(slots=True)
class _Row:
    """A batch row's result, or one step's part of it."""

    job: tensors.Job
    text: str = ""
    ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)  # of the generated tokens
    cum: float = 0.0
    context: list[int] = dataclasses.field(default_factory=list)  # the tokens before ``ids`` (``context_ids``)

    def add_logprobs(self, logprobs) -> list[float]:
        """Take a step's log probabilities (when they were asked for); return them."""
        if not self.job.return_log_probs or not logprobs:
            return []
        values = [lp.logprob for lp in logprobs]
        self.logprobs.extend(values)
        self.cum += sum(values)
        return values


def _outputs(rows: list[_Row], names: list[str], batched: bool) -> dict[str, np.ndarray]:
    """The outputs ``names`` (those the request asked for) of ``rows``, stacked on the batch dimension;
    ``output_ids`` rows padded with their ``pad_id``, ``context_ids`` rows on the left with -1."""
    n = len(rows)
    out = {}
    for name in names:
        if name == "text_output":
            array = np.array([[r.text.encode("utf-8")] for r in rows], dtype=object)
        elif name == "output_ids":
            width = max(len(r.ids) for r in rows)
            array = np.array([r.ids + [r.job.pad_id] * (width - len(r.ids)) for r in rows],
                             dtype=np.int32).reshape(n, 1, width)
        elif name == "context_ids":
            width = max(len(r.context) for r in rows)
            array = np.array([[-1] * (width - len(r.context)) + r.context for r in rows],
                             dtype=np.int32).reshape(n, 1, width)
        elif name == "sequence_length":
            array = np.array([[len(r.ids)] for r in rows], dtype=np.int32)
        elif name == "cum_log_probs":
            array = np.array([[r.cum] for r in rows], dtype=np.float32)
        elif name == "output_log_probs":
            width = max(len(r.logprobs) for r in rows)
            array = np.array([r.logprobs + [0.0] * (width - len(r.logprobs)) for r in rows],
                             dtype=np.float32).reshape(n, 1, width)
        elif name == "batch_index":
            array = np.array([[r.job.row] for r in rows], dtype=np.int32)
        else:
            continue
        out[name] = array if batched else array[0]
    return out


def _context(prompt: list[int], output: list[int], new: int) -> list[int]:
    """The last ``tensors.CONTEXT_TOKENS`` tokens before the last ``new`` of ``output`` (prompt tokens first)."""
    before = len(output) - new
    tail = output[max(0, before - tensors.CONTEXT_TOKENS):before]
    if len(tail) < tensors.CONTEXT_TOKENS:
        tail = prompt[max(0, len(prompt) - (tensors.CONTEXT_TOKENS - len(tail))):] + tail
    return tail


def _engine_path(config: cfg.ModelConfig, model_dir: Path, version_dir: Path) -> Path:
    """The engine a model serves: the one its parameters name, else its version folder."""
    params = cfg.parameters(config)
    named = [params[k] for k in ENGINE_PARAMETERS if params.get(k)]
    if len(named) > 1:
        raise ServerError.invalid(f"model '{config.name}' names its engine twice ({', '.join(ENGINE_PARAMETERS)})")
    path = (model_dir / named[0]) if named else version_dir
    if not (path / ENGINE_FILE).is_file():
        raise ServerError.invalid(f"model '{config.name}': {path} is not a kiln engine (it has no {ENGINE_FILE})")
    return path


def _runtime_options(params: dict[str, str], model: str) -> dict:
    """The config's parameters that are RuntimeConfig fields, parsed by their field's type."""
    from kiln.runtime import RuntimeConfig

    fields = {f.name: f.type for f in dataclasses.fields(RuntimeConfig) if f.name != "device"}
    unknown = sorted(set(params) - set(fields) - set(_OWN_PARAMETERS))
    if unknown:
        raise ServerError.invalid(
            f"model '{model}': unknown parameter(s) {', '.join(unknown)}; the kiln backend reads "
            f"{', '.join([*_OWN_PARAMETERS, *fields])}")
    return {k: _parse(v, fields[k], k, model) for k, v in params.items() if k in fields}


def _sampling_defaults(engine: Path, params: dict[str, str], model: str) -> dict:
    """What a request that leaves a sampling field unset gets: the model's own defaults (its generation config,
    recorded in the engine at build) with parameter ``generation_config`` "auto" (the default), kiln's with
    "none"; then parameter ``override_generation_config`` (a JSON object, e.g. ``{"temperature": 0.5}``) on top."""
    import json

    from kiln.checkpoint.checkpoint import SAMPLING_DEFAULTS
    from kiln.runtime import SamplingParams

    source = params.get("generation_config", "auto").strip().lower()
    if source not in ("auto", "none"):
        raise ServerError.invalid(f"model '{model}': parameter 'generation_config' is 'auto' (the model's own "
                                  f"sampling defaults) or 'none' (kiln's), got '{source}'")
    defaults = {}
    if source == "auto":
        try:
            defaults = dict(read_engine(engine, need_weights=False).tokenizer.get("sampling_defaults") or {})
        except KilnError as e:
            raise ServerError.invalid(f"model '{model}': {e}") from None
    override = params.get("override_generation_config", "").strip()
    if override:
        try:
            extra = json.loads(override)
        except json.JSONDecodeError as e:
            raise ServerError.invalid(f"model '{model}': parameter 'override_generation_config' is not JSON: "
                                      f"{e}") from None
        unknown = sorted(set(extra) - set(SAMPLING_DEFAULTS)) if isinstance(extra, dict) else None
        if unknown is None or unknown:
            raise ServerError.invalid(f"model '{model}': parameter 'override_generation_config' is a JSON object of "
                                      f"{', '.join(SAMPLING_DEFAULTS)}; got {override[:200]}")
        defaults.update(extra)
    try:
        SamplingParams(**defaults)
    except ValueError as e:
        raise ServerError.invalid(f"model '{model}': the sampling defaults {defaults}: {e}") from None
    return defaults


def _parse(text: str, kind: str, name: str, model: str):
    """A parameter's string as the type ``kind`` names (a dataclass field's annotation, e.g. "int | None")."""
    value = text.strip().lower()
    if "None" in kind and value in ("", "none", "null"):
        return None
    try:
        if "bool" in kind:
            if value not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value in ("true", "1", "yes")
        if "int" in kind:
            return int(value)
        if "float" in kind:
            return float(value)
    except ValueError:
        raise ServerError.invalid(f"model '{model}': parameter '{name}' must be {kind}, got '{text}'") from None
    return text.strip()
