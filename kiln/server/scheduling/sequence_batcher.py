"""Triton's sequence batcher (``sequence_batching``) for stateful models: the requests of one sequence (one
correlation id: the request parameter ``sequence_id``, an integer or a string) run one after another, in order,
each with the sequence's controls and implicit state as inputs, while requests of other sequences run beside them.

- A sequence begins with a request that sets ``sequence_start`` and ends after one that sets ``sequence_end``; a
  request of a sequence that is not running and sets no start is refused, as Triton refuses it. A sequence that
  gets no request for ``max_sequence_idle_microseconds`` (default 1 s) is released: its slot and state go.
- Strategies: ``direct`` binds a sequence to one slot (an instance's batch row: ``max(1, max_batch_size)`` per
  instance) for its life, and a new sequence waits for a free slot; ``oldest`` lets every instance take the next
  requests of the sequences that have waited longest, at most ``max_candidate_sequences`` sequences at once. A
  batch holds at most one request per sequence, up to ``max_batch_size``.
- Controls (``control_input``): START, END and READY in their ``int32_false_true``, ``fp32_false_true`` or
  ``bool_false_true`` forms, and CORRID (the correlation id, as its ``data_type``: an integer type or STRING),
  given to the model as inputs of shape [1] (after the batch dimension where the model batches).
- Implicit state (``state``): the model reads ``input_name`` and answers ``output_name``; the answer is the next
  request's input. A sequence's first request reads ``initial_state`` (zeros, or the ``data_file`` in the model's
  ``initial_state`` folder) or zeros.

kiln runs stateful models on the python backend (its models read the controls and answer the state by name).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kiln.server import datatypes
from kiln.server.backends.base import ModelInstance
from kiln.server.config import ModelConfig, mc
from kiln.server.core import InferenceRequest, Tensor
from kiln.server.errors import Code, ServerError, shown
from kiln.server.scheduling.scheduler import Scheduler
from kiln.server.stats import ModelStats

log = logging.getLogger("kiln.server")

DEFAULT_IDLE_US = 1_000_000  # Triton's default max_sequence_idle_microseconds
_Kind = mc.ModelSequenceBatching.Control
START, END, READY, CORRID = (_Kind.CONTROL_SEQUENCE_START, _Kind.CONTROL_SEQUENCE_END, _Kind.CONTROL_SEQUENCE_READY,
                             _Kind.CONTROL_SEQUENCE_CORRID)


@dataclass(frozen=True, slots=True)
class Control:
    kind: int
    input: str
    datatype: datatypes.DataType
    values: tuple = ()  # (false, true) for START, END, READY


@dataclass(frozen=True, slots=True)
class State:
    input: str
    output: str
    datatype: datatypes.DataType
    dims: tuple[int, ...]
    initial: np.ndarray


@dataclass(frozen=True)
class SequencePolicy:
    strategy: str  # "direct" or "oldest"
    idle_ns: int
    controls: tuple[Control, ...]
    states: tuple[State, ...]
    max_candidates: int  # oldest: sequences running at once (0: as many as there are slots)

    @classmethod
    def from_config(cls, config: ModelConfig, model_dir: Path) -> SequencePolicy:
        """The config's sequence batching, checked (ServerError naming the field)."""
        sb, name = config.sequence_batching, config.name
        if config.backend != "python":
            raise ServerError.invalid(f"model '{name}' sets sequence_batching: kiln runs stateful models on the "
                                      f"python backend, not '{config.backend}'")
        if sb.iterative_sequence:
            raise ServerError.invalid(f"model '{name}' sets sequence_batching.iterative_sequence, which kiln does "
                                      "not implement")
        declared = {io.name for io in config.input} | {io.name for io in config.output}
        controls = []
        for ci in sb.control_input:
            if not ci.name or ci.name in declared:
                raise ServerError.invalid(f"sequence batching control input '{ci.name}' of model '{name}' must be "
                                          "named, and not be one of the config's inputs (the batcher gives it)")
            if len(ci.control) != 1:
                raise ServerError.invalid(f"sequence batching control input '{ci.name}' of model '{name}' must have "
                                          "exactly one control")
            controls.append(_control(ci.name, ci.control[0], name))
        kinds = [c.kind for c in controls]
        if len(set(kinds)) != len(kinds):
            raise ServerError.invalid(f"model '{name}' has two sequence batching controls of the same kind")
        states = tuple(_state(s, config, model_dir) for s in sb.state)
        if sb.HasField("oldest"):
            strategy, candidates = "oldest", sb.oldest.max_candidate_sequences
        else:
            strategy, candidates = "direct", 0
        idle = sb.max_sequence_idle_microseconds or DEFAULT_IDLE_US
        return cls(strategy, idle * 1000, tuple(controls), states, candidates)


def _control(input_name: str, c, model: str) -> Control:
    what = f"sequence batching control '{input_name}' of model '{model}'"
    if c.kind == CORRID:
        dtype = datatypes.by_config(c.data_type) if c.data_type != mc.TYPE_INVALID else None
        if dtype is None or dtype.name not in ("UINT64", "INT64", "UINT32", "INT32", "BYTES"):
            raise ServerError.invalid(f"{what}: CONTROL_SEQUENCE_CORRID needs data_type TYPE_UINT64, TYPE_INT64, "
                                      "TYPE_UINT32, TYPE_INT32 or TYPE_STRING")
        return Control(c.kind, input_name, dtype)
    forms = [(f, list(getattr(c, f))) for f in ("int32_false_true", "fp32_false_true", "bool_false_true")
             if len(getattr(c, f))]
    if len(forms) != 1 or len(forms[0][1]) != 2:
        raise ServerError.invalid(f"{what}: give its false and true values in exactly one of int32_false_true, "
                                  "fp32_false_true or bool_false_true")
    form, values = forms[0]
    dtype = datatypes.BY_NAME[{"int32_false_true": "INT32", "fp32_false_true": "FP32", "bool_false_true": "BOOL"}[form]]
    return Control(c.kind, input_name, dtype, tuple(values))


def _state(s, config: ModelConfig, model_dir: Path) -> State:
    what = f"sequence batching state '{s.input_name}' of model '{config.name}'"
    declared = {io.name for io in config.input} | {io.name for io in config.output}
    if not s.input_name or not s.output_name or s.input_name in declared or s.output_name in declared:
        raise ServerError.invalid(f"{what} needs an input_name and an output_name that are not the config's inputs "
                                  "or outputs")
    if s.data_type == mc.TYPE_INVALID or not s.dims or any(d < 1 for d in s.dims):
        raise ServerError.invalid(f"{what} needs a data_type and dims (each >= 1: kiln's state has a fixed shape)")
    dtype = datatypes.by_config(s.data_type)
    dims = tuple(s.dims)
    initial = np.zeros(dims, dtype=dtype.numpy) if dtype.name != "BYTES" else np.full(dims, b"", dtype=object)
    if len(s.initial_state) > 1:
        raise ServerError.invalid(f"{what}: only one initial_state is allowed")
    for init in s.initial_state:
        if init.data_type != s.data_type or tuple(init.dims) != dims:
            raise ServerError.invalid(f"{what}: initial_state must have the state's data_type and dims")
        if init.WhichOneof("state_data") == "data_file":
            from kiln.server.config import file_inside

            path = file_inside(model_dir / "initial_state", init.data_file, f"{what}: data_file")
            try:
                raw = path.read_bytes()
            except OSError as e:
                raise ServerError.invalid(f"{what}: cannot read {path}: {e}") from None
            initial = datatypes.from_raw(dtype, list(dims), raw, f"{what}'s initial state")
    return State(s.input_name, s.output_name, dtype, dims, initial)


@dataclass
class _Sequence:
    corrid: int | str
    instance: ModelInstance | None = None  # direct: the instance of its slot
    queue: deque[InferenceRequest] = field(default_factory=deque)
    running: bool = False  # a request of it is executing
    ending: bool = False  # its END request is queued or running
    last_ns: int = 0
    state: dict[str, np.ndarray] = field(default_factory=dict)
    fresh: bool = True  # no request of it has run yet (its state is the initial one)


class SequenceBatcher(Scheduler):
    """The scheduler of a model with ``sequence_batching``: :class:`Scheduler`'s interface and execution, with
    requests queued per sequence instead of in one queue."""

    def __init__(self, model: str, instances: list[ModelInstance], max_batch_size: int, policy: SequencePolicy,
                 stats: ModelStats, decoupled: bool, on_done: Callable[[InferenceRequest], None]):
        super().__init__(model, instances, None, stats, decoupled, on_done)
        self.max_batch_size = max_batch_size
        self.policy = policy
        self._sequences: dict[int | str, _Sequence] = {}
        self._slots = {id(i): max(1, max_batch_size) for i in instances}  # direct: free slots per instance
        self._backlog: deque[_Sequence] = deque()  # sequences waiting for a slot (direct) or a candidate place
        self._changed = asyncio.Event()
        self._reaper: asyncio.Task | None = None

    def _worker_count(self, instance: ModelInstance) -> int:
        return instance.max_concurrency  # no calls ahead: a batch is formed from the slots an instance has free

    def start(self) -> None:
        super().start()
        self._reaper = asyncio.create_task(self._reap_idle(), name=f"{self.model}-idle-sequences")

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        await super().stop()

    # -- requests -----------------------------------------------------------------------------------

    def submit(self, request: InferenceRequest) -> None:
        corrid = self._corrid(request)
        start, end = self._flag(request, "sequence_start"), self._flag(request, "sequence_end")
        seq = self._sequences.get(corrid)
        if (seq is None or seq.ending) and not start:
            raise ServerError.invalid(
                f"inference request for sequence {shown(str(corrid))} to model '{self.model}' must specify the "
                "START flag on the first request of the sequence")
        if seq is None:
            seq = self._sequences[corrid] = _Sequence(corrid)
            self._backlog.append(seq)
        # (A START behind a queued END goes on as a new sequence under the same id once the END has run.)
        request.queued_ns = seq.last_ns = time.monotonic_ns()
        seq.queue.append(request)
        seq.ending = end
        self.stats.pending += 1
        self._changed.set()

    def cancel(self, request: InferenceRequest) -> None:
        seq = self._sequences.get(request.parameters.get("sequence_id"))
        if seq is not None and request in seq.queue:
            seq.queue.remove(request)
            self.stats.pending -= 1
            request.fail(ServerError(Code.CANCELLED, "request cancelled"))
            request.executed = True
            self.on_done(request)
            return
        super().cancel(request)

    def _corrid(self, request: InferenceRequest) -> int | str:
        corrid = request.parameters.get("sequence_id")
        if isinstance(corrid, bool) or not isinstance(corrid, (int, str)) or corrid in (0, ""):
            raise ServerError.invalid(f"inference request to model '{self.model}' must specify a non-zero or "
                                      "non-empty correlation ID")
        for c in self.policy.controls:
            if c.kind == CORRID and (c.datatype.name == "BYTES") != isinstance(corrid, str):
                raise ServerError.invalid(
                    f"sequence_id of a request to model '{self.model}' must be "
                    f"{'a string' if c.datatype.name == 'BYTES' else 'an integer'} (its CORRID control is "
                    f"{c.datatype.name})")
        return corrid

    @staticmethod
    def _flag(request: InferenceRequest, key: str) -> bool:
        value = request.parameters.get(key, False)
        if not isinstance(value, bool):
            raise ServerError.invalid(f"Unable to parse '{key}': it must be a boolean, got {shown(repr(value))}")
        return value

    # -- batches ------------------------------------------------------------------------------------

    def _admit_backlog(self, instance: ModelInstance) -> None:
        """Give waiting sequences a place: a free slot of ``instance`` (direct) or a candidate place (oldest)."""
        while self._backlog:
            seq = self._backlog[0]
            if self._sequences.get(seq.corrid) is not seq:  # released (cancelled) while it waited
                self._backlog.popleft()
                continue
            if self.policy.strategy == "direct":
                if self._slots[id(instance)] == 0:
                    return
                self._slots[id(instance)] -= 1
                seq.instance = instance
            else:
                limit = self.policy.max_candidates or sum(self._slots.values())
                placed = sum(1 for s in self._sequences.values() if s.instance is not None)
                if placed >= limit:
                    return
                seq.instance = instance  # any instance may run it; marks it placed
            self._backlog.popleft()

    def _ready(self, instance: ModelInstance) -> list[_Sequence]:
        """Placed sequences with a request to run on ``instance``, oldest request first."""
        direct = self.policy.strategy == "direct"
        ready = [s for s in self._sequences.values()
                 if s.instance is not None and s.queue and not s.running and (not direct or s.instance is instance)]
        ready.sort(key=lambda s: s.queue[0].queued_ns)
        return ready[:max(1, self.max_batch_size)]

    async def _work(self, instance: ModelInstance) -> None:
        while True:
            self._admit_backlog(instance)
            ready = self._ready(instance)
            if not ready:
                self._changed.clear()
                await self._changed.wait()
                continue
            batch = []
            for seq in ready:
                request = seq.queue.popleft()
                seq.running = True
                self._prepare(seq, request)
                batch.append((seq, request))
            start = time.monotonic_ns()
            for _, r in batch:
                self.stats.pending -= 1
                r.queue_ns = start - r.queued_ns
            try:
                await self._execute(instance, [r for _, r in batch], start)
            finally:
                for seq, request in batch:
                    self._finish(seq, request)
                self._changed.set()

    def _prepare(self, seq: _Sequence, request: InferenceRequest) -> None:
        """Add the controls and the state to the request's inputs."""
        start = self._flag(request, "sequence_start") or seq.fresh
        if start:
            seq.state = {s.input: s.initial for s in self.policy.states}
        batched = self.max_batch_size > 0
        for c in self.policy.controls:
            if c.kind == CORRID:
                value = seq.corrid.encode() if isinstance(seq.corrid, str) else seq.corrid
            else:
                on = {START: start, END: self._flag(request, "sequence_end"), READY: True}[c.kind]
                value = c.values[1 if on else 0]
            array = np.array([value], dtype=c.datatype.numpy)
            request.inputs[c.input] = _tensor(c.input, c.datatype, array, batched)
        for s in self.policy.states:
            array = seq.state.get(s.input, s.initial)
            request.inputs[s.input] = _tensor(s.input, s.datatype, array, batched)
        request.state_outputs = [s.output for s in self.policy.states]
        seq.fresh = False

    def _finish(self, seq: _Sequence, request: InferenceRequest) -> None:
        seq.running = False
        seq.last_ns = time.monotonic_ns()
        for s in self.policy.states:
            out = request.captured.get(s.output)
            if out is not None:
                out = np.asarray(out)
                if self.max_batch_size > 0 and out.shape[:1] == (1,):
                    out = out[0]
                if tuple(out.shape) == s.dims and out.dtype == s.datatype.numpy:
                    seq.state[s.input] = out
                else:
                    log.warning("model '%s' answered state '%s' of shape %s (%s); its config says %s (%s): the "
                                "sequence keeps its last state", self.model, s.output, list(out.shape), out.dtype,
                                list(s.dims), s.datatype.name)
        if self._flag(request, "sequence_end"):
            self._release(seq)

    def _release(self, seq: _Sequence) -> None:
        if seq.queue:  # a START for this id is queued behind the END: it goes on as a new sequence, in its slot
            seq.ending = self._flag(seq.queue[-1], "sequence_end")
            seq.fresh = True
            return
        if self._sequences.get(seq.corrid) is seq:
            del self._sequences[seq.corrid]
        if self.policy.strategy == "direct" and seq.instance is not None:
            self._slots[id(seq.instance)] += 1
        seq.instance = None
        self._changed.set()

    async def _reap_idle(self) -> None:
        """Release sequences with nothing queued or running for longer than the idle limit."""
        interval = min(self.policy.idle_ns / 4e9, 1.0)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic_ns()
            for seq in list(self._sequences.values()):
                if not seq.queue and not seq.running and now - seq.last_ns > self.policy.idle_ns:
                    log.info("model '%s': sequence %s idle for over %.3f s: released", self.model,
                             shown(str(seq.corrid)), self.policy.idle_ns / 1e9)
                    self._release(seq)


def _tensor(name: str, dtype: datatypes.DataType, array: np.ndarray, batched: bool) -> Tensor:
    array = array.reshape((1, *array.shape)) if batched else array
    return Tensor(name, dtype.name, list(array.shape), array)

