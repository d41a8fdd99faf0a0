"""A fixed-shape step's op calls, recorded once and replayed without the model's Python: a CPU's step graph.

A SmolLM2 decode step on a CPU is about 350 dispatcher calls (kiln's C++ kernels, a few views) under some
thousands of lines' worth of Python: module calls, the plugins' argument checks, the forward context. On a
2-vCPU box that Python is also slowed by the spinning OpenMP thread of the step's parallel kernels beside it
(the serial part of a step ran about twice as long at 2 threads as at 1). So, as CUDA graphs do on a GPU,
``record`` runs the step once under a ``TorchDispatchMode`` that sees every dispatcher call with its arguments,
and ``RecordedStep.replay`` later makes the same calls over the same persistent step buffers: each argument is
either a tensor that existed before the step (weights, KV caches, the step's input buffers: read afresh at
every replay) or an earlier call's output. Where kiln's CPU extension is built, the calls are replayed from C++
(``cpu_layer_ops/step_program.cpp``: each call's argument stack built once, no Python between the calls);
elsewhere, or for an argument that program does not take, by a Python loop over the same calls.

A recording is refused (``NotRecordable``, the step then runs eagerly) where replaying could differ from
running the model: a call returns something other than tensors (Python may branch on the value), or a call
reads a tensor that the forward made outside the dispatcher (from numpy, say: its values would be frozen).
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

log = logging.getLogger(__name__)

# Where an argument comes from at replay: (call index, output index or None for a call's single tensor).
Source = tuple[int, "int | None"]


_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


class NotRecordable(Exception):
    """The step cannot be replayed from a recording; the message says which call and why."""


@dataclass(slots=True)
class _Call:
    overload: Any  # the torch OpOverload: its schema
    op: Callable[..., Any]
    args: list[Any]  # the positional arguments, earlier outputs filled in at each replay
    kwargs: dict[str, Any]
    # (container, key, source): container[key] = the source's output, before the call.
    inputs: list[tuple[Any, Any, Source]]


class RecordedStep:
    """The calls of one recorded forward, and which output is its result."""

    def __init__(self, calls: list[_Call], result: Source):
        self.calls = calls
        self.result = result
        # The calls as a C++ StepProgram; None: replayed by the Python loop (no extension, or an argument
        # that the program does not take).
        self.program = _compile(calls, result)

    def replay(self) -> torch.Tensor:
        if self.program is not None:
            return self.program.run()
        return self.replay_in_python()

    def replay_in_python(self) -> torch.Tensor:
        outs: list[Any] = [None] * len(self.calls)
        for i, call in enumerate(self.calls):
            for container, key, (j, k) in call.inputs:
                container[key] = outs[j] if k is None else outs[j][k]
            outs[i] = call.op(*call.args, **call.kwargs)
        for call in self.calls:  # the templates keep no activations between steps
            for container, key, _ in call.inputs:
                container[key] = None
        j, k = self.result
        return outs[j] if k is None else outs[j][k]


class _Recorder(TorchDispatchMode):
    def __init__(self, before: set[int]):
        super().__init__()
        self.before = before  # ids of the tensors alive when the forward began
        self.calls: list[_Call] = []
        self.made: dict[int, Source] = {}  # id of an output tensor -> where replay finds it
        self.keep: list[Any] = []  # every output, so that no id is reused while recording
        self.refused: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.refused is None:
            try:
                self._record(func, args, kwargs, out)
            except NotRecordable as e:
                self.refused = str(e)
        return out

    def _record(self, func, args, kwargs, out) -> None:
        index = len(self.calls)
        call = _Call(func, getattr(func, "_op", func), list(args), dict(kwargs), [])
        for container, keys in ((call.args, range(len(call.args))), (call.kwargs, list(call.kwargs))):
            for key in keys:
                value = container[key]
                if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
                    value = container[key] = list(value)  # a tensor list (cat, index): its own slots
                    for j, v in enumerate(value):
                        self._source(func, v, value, j, call)
                else:
                    self._source(func, value, container, key, call)
        outputs = list(out) if isinstance(out, (list, tuple)) else [out]
        for j, o in enumerate(outputs):
            if not isinstance(o, torch.Tensor):
                raise NotRecordable(f"{func} returned {type(o).__name__}, which the forward may act on")
            self.made[id(o)] = (index, None if isinstance(out, torch.Tensor) else j)
            self.keep.append(o)
        self.calls.append(call)

    def _source(self, func, value: Any, container: Any, key: Any, call: _Call) -> None:
        if not isinstance(value, torch.Tensor):
            return
        made = self.made.get(id(value))
        if made is not None:
            container[key] = None
            call.inputs.append((container, key, made))
        elif id(value) not in self.before:
            raise NotRecordable(f"{func} reads a tensor of shape {tuple(value.shape)} that the forward made "
                                "outside the dispatcher; its values would be frozen into the recording")


def record(forward: Callable[[], torch.Tensor]) -> tuple[RecordedStep, torch.Tensor]:
    """Run ``forward`` once, recording its calls; return the recording (replayed from C++ where it can be) and
    this run's result. Raises NotRecordable (after the run) where a replay could differ from running ``forward``."""
    # Exact types, not isinstance (twice as fast over a large heap): a tensor of another subclass that the
    # forward reads is taken for a new one, and the recording refused (the safe side).
    before = {id(o) for o in gc.get_objects() if type(o) in _TENSOR_TYPES}
    recorder = _Recorder(before)
    with recorder:
        result = forward()
    if recorder.refused is not None:
        raise NotRecordable(recorder.refused)
    source = recorder.made.get(id(result)) if isinstance(result, torch.Tensor) else None
    if source is None:
        raise NotRecordable("the forward's result is not the output of one of its calls")
    return RecordedStep(recorder.calls, source), result


_MEMORY_FORMATS = {torch.contiguous_format: 0, torch.preserve_format: 1, torch.channels_last: 2,
                   torch.channels_last_3d: 3}  # c10::MemoryFormat's values


class _NotCompilable(Exception):
    pass


def _compile(calls: list[_Call], result: Source):
    """``calls`` as a C++ StepProgram (step_program.cpp, whose header gives the spec's codes), or None."""
    from kiln.ops import cpu_layer_ops

    program = cpu_layer_ops.step_program()
    if program is None:
        return None

    def where(source: Source) -> list[int]:
        j, k = source
        if k is None:
            return [j, 0, -1]
        # Output k of several returned values, or element k of the one list returned.
        return [j, k, -1] if len(calls[j].overload._schema.returns) > 1 else [j, 0, k]

    try:
        for call in calls:
            holes = {(id(container), key): source for container, key, source in call.inputs}
            tensors: list[torch.Tensor] = []
            floats: list[float] = []
            spec: list[int] = []

            def tensor_like(value: Any, container: Any, key: Any) -> list[int]:
                source = holes.get((id(container), key))
                if source is not None:
                    return [2, *where(source)]
                if value is None:
                    return [0]
                if isinstance(value, torch.Tensor):
                    tensors.append(value)
                    return [1, len(tensors) - 1]
                raise _NotCompilable(f"{type(value).__name__} in a tensor list")

            schema = call.overload._schema
            for i, arg in enumerate(schema.arguments):
                if i < len(call.args):
                    container, key = call.args, i
                elif arg.name in call.kwargs:
                    container, key = call.kwargs, arg.name
                elif arg.has_default_value():
                    container, key = None, None
                else:
                    raise _NotCompilable(f"{schema.name} without its argument {arg.name}")
                value = container[key] if container is not None else arg.default_value
                if (container is not None and (id(container), key) in holes) or isinstance(value, torch.Tensor) \
                        or value is None:
                    spec += tensor_like(value, container, key)
                elif str(arg.type) == "Tensor" and type(value) in (int, float):  # a wrapped number
                    if type(value) is int:
                        spec += [12, value]
                    else:
                        floats.append(value)
                        spec += [13, len(floats) - 1]
                elif isinstance(value, bool):
                    spec += [5, int(value)]
                elif isinstance(value, int) and not str(arg.type).startswith("float"):
                    spec += [3, value]
                elif isinstance(value, (int, float)):
                    floats.append(float(value))
                    spec += [4, len(floats) - 1]
                elif isinstance(value, torch.dtype):
                    tensors.append(torch.empty(0, dtype=value))
                    spec += [8, len(tensors) - 1]
                elif isinstance(value, torch.memory_format):
                    spec += [9, _MEMORY_FORMATS[value]]
                elif isinstance(value, torch.device) and value.type == "cpu":
                    spec += [10]
                elif value is torch.strided:
                    spec += [11]
                elif isinstance(value, (list, tuple)) and "Tensor" in str(arg.type):
                    spec += [7, len(value)]
                    for e, element in enumerate(value):
                        spec += tensor_like(element, value, e)
                elif isinstance(value, (list, tuple)) and all(type(v) is int for v in value):
                    spec += [6, len(value), *value]
                else:
                    raise _NotCompilable(f"{schema.name}'s {arg.name} of type {arg.type}: {type(value).__name__}")
            program.add(schema.name, schema.overload_name, tensors, floats, spec)
        program.set_result(*where(result))
    except _NotCompilable as e:
        log.info("a recorded step is replayed in Python: %s", e)
        return None
    return program
