"""A fixed-shape step's op calls, recorded once and replayed without the model's Python: a CPU's step graph.

A SmolLM2 decode step on a CPU is about 350 dispatcher calls (kiln's C++ kernels, a few views) under some
thousands of lines' worth of Python: module calls, the plugins' argument checks, the forward context. On a
2-vCPU box that Python is also slowed by the spinning OpenMP thread of the step's parallel kernels beside it
(the serial part of a step ran about twice as long at 2 threads as at 1). So, as CUDA graphs do on a GPU,
``record`` runs the step once under a ``TorchDispatchMode`` that sees every dispatcher call with its arguments,
and ``RecordedStep.replay`` later makes the same calls over the same persistent step buffers: each argument is
either a tensor that existed before the step (weights, KV caches, the step's input buffers: read afresh at
every replay) or an earlier call's output.

A recording is refused (``NotRecordable``, the step then runs eagerly) where replaying could differ from
running the model: a call returns something other than tensors (Python may branch on the value), or a call
reads a tensor that the forward made outside the dispatcher (from numpy, say: its values would be frozen).
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Where an argument comes from at replay: (call index, output index or None for a call's single tensor).
Source = tuple[int, "int | None"]


class NotRecordable(Exception):
    """The step cannot be replayed from a recording; the message says which call and why."""


@dataclass(slots=True)
class _Call:
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

    def replay(self) -> torch.Tensor:
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
        call = _Call(getattr(func, "_op", func), list(args), dict(kwargs), [])
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
    """Run ``forward`` once, recording its calls; return the recording and this run's result. Raises
    NotRecordable (after the run) where a replay could differ from running ``forward``."""
    before = {id(o) for o in gc.get_objects() if issubclass(type(o), torch.Tensor)}
    recorder = _Recorder(before)
    with recorder:
        result = forward()
    if recorder.refused is not None:
        raise NotRecordable(recorder.refused)
    source = recorder.made.get(id(result)) if isinstance(result, torch.Tensor) else None
    if source is None:
        raise NotRecordable("the forward's result is not the output of one of its calls")
    return RecordedStep(recorder.calls, source), result
