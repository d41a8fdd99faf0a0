"""Ensembles (``platform: "ensemble"``): a pipeline of other models, any DAG, as Triton's ensemble scheduler runs it.

``ensemble_scheduling { step [ { model_name, model_version, input_map { key: STEP_INPUT value: TENSOR },
output_map { key: STEP_OUTPUT value: TENSOR } } ] }`` names the ensemble's tensors: its own inputs and outputs,
and the ones steps hand each other. A step runs as soon as every tensor it reads exists, as an ordinary request to
its model (through that model's queue, batcher and instances, so each step counts in its own model's statistics),
with the ensemble request's id and parameters. Each response of a step sets the tensors it maps and runs the steps
that read them and are now ready: a decoupled step that answers N times runs its consumers N times, in order
(the next response waits for the consumers of this one), so a stream stays a stream through the ensemble. A
decoupled ensemble sends a response whenever every output the request asked for has a new value (as Triton's
does: a response of a step that sets some of them waits for the steps that set the rest); an ordinary one
answers once, at the end, with each output's last value. A step that fails fails the request with its message
("in ensemble 'E', ..."). An optional ensemble input the request leaves out is left out of the steps that read it.

Loading checks what Triton's ``ensemble_utils.cc`` checks: every tensor comes from one place (an ensemble input
or one step's output), every step's input can be produced and every ensemble output is, the steps form no cycle,
each mapped name is an input or output of the step's model, each required input of a step is mapped, the data
types agree across every connection, and the ensemble's ``max_batch_size`` is no larger than a step's.
The repository loads a step's model before the ensemble when it is not loaded yet.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from kiln.server import config as cfg
from kiln.server.backends.base import Backend, InstanceSpec, ModelContext, ModelInstance
from kiln.server.config import ModelConfig, mc
from kiln.server.core import InferenceRequest, InferenceResponse, RequestedOutput, Tensor
from kiln.server.errors import ServerError

# Ensemble requests in flight at once (each is mostly waiting on its steps' models, which have their own limits).
MAX_CONCURRENCY = 1024


@dataclass(frozen=True, slots=True)
class Step:
    index: int
    model: str
    version: int  # -1: the latest ready version
    inputs: dict[str, str]  # the step model's input -> the ensemble tensor it reads
    outputs: dict[str, str]  # the step model's output -> the ensemble tensor it sets

    @property
    def label(self) -> str:
        return f"step {self.index} ('{self.model}')"


def step_models(config: ModelConfig) -> list[tuple[str, int]]:
    """(model name, version) of each step, for the repository to load first."""
    return [(s.model_name, s.model_version) for s in config.ensemble_scheduling.step]


class Graph:
    """An ensemble's steps and tensors, checked for the shape of a DAG (see the module's docstring)."""

    def __init__(self, config: ModelConfig):
        name = config.name
        self.name = name
        if not config.ensemble_scheduling.step:
            raise ServerError.invalid(f"ensemble '{name}' must have at least one step in 'ensemble_scheduling'")
        for field in ("dynamic_batching", "sequence_batching"):
            if config.HasField(field):
                raise ServerError.invalid(f"ensemble '{name}' cannot set '{field}': an ensemble has no batcher of "
                                          "its own; its steps' models batch")
        self.inputs = {io.name: io for io in config.input}
        self.outputs = {io.name: io for io in config.output}
        self.steps: list[Step] = []
        producer: dict[str, str] = {t: "an ensemble input" for t in self.inputs}
        for i, s in enumerate(config.ensemble_scheduling.step):
            if not s.model_name:
                raise ServerError.invalid(f"step {i} of ensemble '{name}' must name a model ('model_name')")
            step = Step(i, s.model_name, s.model_version if s.model_version > 0 else -1,
                        dict(sorted(s.input_map.items())), dict(sorted(s.output_map.items())))
            if not step.inputs or not step.outputs:
                raise ServerError.invalid(f"{step.label} of ensemble '{name}' must map at least one input and one "
                                          "output ('input_map', 'output_map')")
            for tensor in step.outputs.values():
                if tensor in producer:
                    raise ServerError.invalid(f"ensemble tensor '{tensor}' of '{name}' is the output of {step.label}"
                                              f" and of {producer[tensor]}: a tensor has one producer")
                producer[tensor] = step.label
            self.steps.append(step)
        read = {t for step in self.steps for t in step.inputs.values()}
        unmade = sorted(read - producer.keys())
        if unmade:
            raise ServerError.invalid(f"ensemble '{name}': no ensemble input or step output gives tensor(s) "
                                      f"{', '.join(repr(t) for t in unmade)}")
        for tensor in self.inputs:
            if tensor not in read:
                raise ServerError.invalid(f"ensemble input '{tensor}' of '{name}' is read by no step")
        for tensor in self.outputs:
            if producer.get(tensor, "an ensemble input") == "an ensemble input":
                raise ServerError.invalid(f"ensemble output '{tensor}' of '{name}' is the output of no step")
        self._check_acyclic()

    def _check_acyclic(self) -> None:
        made_by = {t: step for step in self.steps for t in step.outputs.values()}
        state: dict[int, int] = {}  # 1: on the path being walked, 2: done

        def walk(step: Step, path: list[str]) -> None:
            if state.get(step.index) == 2:
                return
            if state.get(step.index) == 1:
                raise ServerError.invalid(f"ensemble '{self.name}' has a cycle: {' -> '.join(path + [step.label])}")
            state[step.index] = 1
            for tensor in step.inputs.values():
                if tensor in made_by:
                    walk(made_by[tensor], path + [step.label])
            state[step.index] = 2

        for step in self.steps:
            walk(step, [])

    def check_steps(self, config: ModelConfig, lookup: Callable[[str, int], ModelConfig]) -> None:
        """Check each step against its model's config (the model must be loaded)."""
        kinds: dict[str, tuple[int, str]] = {t: (io.data_type, f"ensemble input '{t}'") for t, io in self.inputs.items()}
        wanted: list[tuple[str, int, str]] = []  # (tensor, data type, where it is read)
        for step in self.steps:
            try:
                model = lookup(step.model, step.version)
            except ServerError as e:
                raise ServerError.invalid(f"{step.label} of ensemble '{self.name}': {e.message}") from None
            if config.max_batch_size > model.max_batch_size:
                raise ServerError.invalid(
                    f"ensemble '{self.name}' allows maximum batch size {config.max_batch_size}, but it contains "
                    f"model '{step.model}' which only allows maximum batch size to be {model.max_batch_size}")
            step_inputs = {io.name: io for io in model.input}
            step_outputs = {io.name: io for io in model.output}
            for key, tensor in step.inputs.items():
                if key not in step_inputs:
                    raise ServerError.invalid(f"{step.label} of ensemble '{self.name}' maps '{key}', which is no "
                                              f"input of model '{step.model}' ({', '.join(step_inputs)})")
                wanted.append((tensor, step_inputs[key].data_type, f"input '{key}' of {step.label}"))
            missing = [io.name for io in model.input if not io.optional and io.name not in step.inputs]
            if missing:
                raise ServerError.invalid(f"{step.label} of ensemble '{self.name}' leaves required input(s) "
                                          f"{', '.join(missing)} of model '{step.model}' unmapped")
            for key, tensor in step.outputs.items():
                if key not in step_outputs:
                    raise ServerError.invalid(f"{step.label} of ensemble '{self.name}' maps '{key}', which is no "
                                              f"output of model '{step.model}' ({', '.join(step_outputs)})")
                kinds[tensor] = (step_outputs[key].data_type, f"output '{key}' of {step.label}")
        wanted += [(t, io.data_type, f"ensemble output '{t}'") for t, io in self.outputs.items()]
        for tensor, data_type, where in wanted:
            have, source = kinds[tensor]
            if have != data_type:
                raise ServerError.invalid(
                    f"ensemble '{self.name}': tensor '{tensor}' is {mc.DataType.Name(have)} as {source} but "
                    f"{mc.DataType.Name(data_type)} as {where}")

    def consumers(self, tensors) -> list[Step]:
        return [s for s in self.steps if any(t in tensors for t in s.inputs.values())]


class EnsembleBackend(Backend):
    name = "ensemble"
    platforms = ("ensemble",)

    @classmethod
    def detect(cls, version_dir: Path) -> bool:
        return False  # only a config says a model is an ensemble

    @classmethod
    def gpus(cls) -> list[int]:
        return []  # it runs on the event loop; its steps' models have their devices

    def __init__(self, context: ModelContext):
        super().__init__(context)
        self.graph = self.check(context.config, context.lookup)

    @staticmethod
    def check(config: ModelConfig, lookup: Callable[[str, int], ModelConfig] | None) -> Graph:
        """The ensemble's graph, checked; and against its steps' models where ``lookup`` finds their configs."""
        graph = Graph(config)
        if lookup is not None:
            graph.check_steps(config, lookup)
        return graph

    def create_instance(self, spec: InstanceSpec) -> ModelInstance:
        return EnsembleInstance(spec, self.graph, self.context)


class EnsembleInstance(ModelInstance):
    cancel_execute = True  # a client that leaves cancels the steps in flight
    max_concurrency = MAX_CONCURRENCY

    def __init__(self, spec: InstanceSpec, graph: Graph, context: ModelContext):
        super().__init__(spec)
        self.graph = graph
        self.context = context
        self.decoupled = cfg.is_decoupled(context.config)

    async def execute(self, requests: list[InferenceRequest]) -> None:
        if self.context.infer is None:
            raise ServerError.unavailable(f"ensemble '{self.graph.name}' runs only in a server")
        await asyncio.gather(*(self._serve(r) for r in requests))

    async def _serve(self, request: InferenceRequest) -> None:
        run = _Run(self.graph, request, self.context.infer, self.decoupled)
        try:
            await run.feed({name: t for name, t in request.inputs.items()})
        except ServerError as e:
            if not request.final_sent:
                request.respond(error=e)
            return
        if self.decoupled:
            left = {t: run.values[t].data for t in run.fresh}
            request.respond(left or None, final=True)
            return
        request.respond({name: run.values[name].data for name in self.graph.outputs if name in run.values})


class _Run:
    """One ensemble request: the tensors so far and the steps they start."""

    def __init__(self, graph: Graph, request: InferenceRequest,
                 infer: Callable[[InferenceRequest], AsyncIterator[InferenceResponse]], decoupled: bool):
        self.graph = graph
        self.request = request
        self.infer = infer
        self.decoupled = decoupled
        self.values: dict[str, Tensor] = {}
        self.absent = {t for t, io in graph.inputs.items() if io.optional and t not in request.inputs}
        # Decoupled: a response goes out once every output the request asked for has a new value (then they
        # wait for the next); what is left when the steps are done goes out with the final flag.
        self.wanted = set(request.output_names)
        self.fresh: set[str] = set()

    async def feed(self, new: dict[str, Tensor]) -> None:
        """Set ``new`` tensors, send the ensemble outputs among them (decoupled), and run the steps that read
        them and are ready, until they and every step they start have answered."""
        self.values.update(new)
        if self.decoupled:
            self.fresh.update(t for t in new if t in self.wanted)
            if self.fresh and self.fresh == self.wanted and not self.request.cancelled:
                self.request.respond({t: self.values[t].data for t in self.wanted}, final=False)
                self.fresh.clear()
        ready = [s for s in self.graph.consumers(new)
                 if all(t in self.values or t in self.absent for t in s.inputs.values())]
        await asyncio.gather(*(self._run_step(s) for s in ready))

    async def _run_step(self, step: Step) -> None:
        inputs = [Tensor(key, self.values[t].datatype, list(self.values[t].shape), self.values[t].data)
                  for key, t in step.inputs.items() if t in self.values]
        sub = InferenceRequest(step.model, step.version, self.request.id, inputs,
                               [RequestedOutput(name) for name in step.outputs], dict(self.request.parameters))
        try:
            async with contextlib.aclosing(self.infer(sub)) as responses:
                async for response in responses:
                    if response.error is not None:
                        raise response.error
                    new = {step.outputs[t.name]: t for t in response.outputs if t.name in step.outputs}
                    if new:
                        await self.feed(new)
        except ServerError as e:
            if e.message.startswith("in ensemble '"):
                raise  # a later step's, already named
            raise ServerError(e.code, f"in ensemble '{self.graph.name}', {e.message}") from None
