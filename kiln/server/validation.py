"""Admission of an inference request against its model's config, shared by every protocol.

Checks what Triton's ``InferenceRequest::Normalize`` checks, in the same order and with the same
wording where clients read it: unknown or missing inputs, the batch dimension, each input's data
type and shape (-1 in the config matches any size; the request must give every size), the data's
size, and unknown requested outputs. On success every input holds a numpy array in the shape the
backend sees (after the config's ``reshape``), and the request knows its batch size.
"""
from __future__ import annotations

import numpy as np

from kiln.server import datatypes
from kiln.server.config import WILDCARD, ModelConfig
from kiln.server.core import InferenceRequest, ShmRef, Tensor
from kiln.server.errors import ServerError, shown
from kiln.server.shm import SharedMemoryManager

_BATCH_NOTE = (" NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension to be "
               "prepended to each input shape. If you want to specify the full shape including the batch dim in "
               "your input dims config, try setting max_batch_size to zero. See the model configuration docs for "
               "more info on max_batch_size.")


class _InputSpec:
    """One config input as admission checks it (read from the config once, at load)."""
    __slots__ = ("name", "dtype", "dims", "full", "reshape")

    def __init__(self, io, batched: bool):
        self.name = io.name
        self.dtype = datatypes.by_config(io.data_type)
        self.dims = list(io.dims)
        self.full = ([WILDCARD] if batched else []) + self.dims  # the shape an error message shows
        self.reshape = list(io.reshape.shape) if io.HasField("reshape") else None


class Admission:
    """A model's admission rules, read from its config once (at load) and applied to each request."""

    def __init__(self, config: ModelConfig, shm: SharedMemoryManager):
        self.config = config
        self.model = config.name
        self.shm = shm
        self.max_batch_size = config.max_batch_size
        self.inputs = {io.name: _InputSpec(io, config.max_batch_size > 0) for io in config.input}
        self.required = [io.name for io in config.input if not io.optional]
        self.outputs = [io.name for io in config.output]

    def admit(self, request: InferenceRequest) -> None:
        """Check ``request`` and turn its inputs into arrays in the backend's shapes (see the module's docstring)."""
        model = self.model
        parameters = request.parameters
        if parameters:
            for key in parameters:
                if key.startswith("triton_"):
                    raise ServerError.invalid("parameter keys starting with 'triton_' are reserved for Triton usage "
                                              "and should not be specified.")
            for key in ("timeout", "priority"):  # Triton's reserved parameters: microseconds, and a level
                value = parameters.get(key, 0)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ServerError.invalid(
                        f"Unable to parse '{key}': it must be an integer >= 0, got {shown(repr(value))}")
        if request.payload is not None:  # a typed request: its backend checks it
            request.output_names = []
            request.batch_size = 1 if self.max_batch_size > 0 else 0
            return
        inputs = self.inputs
        for name in request.inputs:
            if name not in inputs:
                raise ServerError.invalid(f"unexpected inference input '{shown(name)}' for model '{model}'")
        missing = [name for name in self.required if name not in request.inputs]
        if missing:
            got = "[" + ",".join(f"'{n}'" for n in request.inputs) + "]"
            want = "[" + ",".join(f"'{n}'" for n in missing) + "]"
            count = len(inputs)
            expected = (f"expected {count} inputs" if len(self.required) == count
                        else f"expected number of inputs between {len(self.required)} and {count}")
            raise ServerError.invalid(
                f"{expected} but got {len(request.inputs)} inputs for model '{model}'. Got input(s) {got}, "
                f"but missing required input(s) {want}. Please provide all required input(s).")

        batch = _batch_size(request, self.config)
        for name, tensor in request.inputs.items():
            self._admit_input(tensor, inputs[name], batch)

        outputs = self.outputs
        for o in request.outputs:
            if o.name not in outputs:
                raise ServerError.invalid(f"unexpected inference output '{shown(o.name)}' for model '{model}'")
            if isinstance(o.class_count, bool) or not isinstance(o.class_count, int) or o.class_count < 0:
                raise ServerError.invalid(f"Unable to set 'classification' of output '{o.name}': it must be an "
                                          f"integer >= 0, got {shown(repr(o.class_count))}")
            if o.class_count and o.shm is not None:
                raise ServerError.invalid("Output can't set both 'shared_memory_region' and 'classification'")
        request.output_names = [o.name for o in request.outputs] or outputs
        request.batch_size = batch

    def _admit_input(self, t: Tensor, spec: _InputSpec, batch: int) -> None:
        model = self.model
        dtype = spec.dtype
        if t.datatype != dtype.name:
            raise ServerError.invalid(
                f"inference input '{t.name}' data-type is '{t.datatype}', but model '{model}' expects '{dtype.name}'")
        shape = t.shape
        for d in shape:
            if d < 0:
                raise ServerError.invalid(
                    f"All input dimensions should be specified for input '{t.name}' for model '{model}', got {shape}")
        dims = shape[1:] if self.max_batch_size > 0 else shape
        if len(dims) != len(spec.dims) or any(c != WILDCARD and c != d for c, d in zip(spec.dims, dims)):
            raise ServerError.invalid(
                f"unexpected shape for input '{t.name}' for model '{model}'. Expected {spec.full}, got {shape}."
                + (_BATCH_NOTE if self.max_batch_size > 0 else ""))

        data = t.data
        if isinstance(data, ShmRef):
            data = self.shm.read(data, f"input '{t.name}' for model '{model}'")
        if isinstance(data, (bytes, bytearray, memoryview)):
            array = datatypes.from_raw(dtype, shape, data, f"input '{t.name}' for model '{model}'")
        elif isinstance(data, list):
            array = datatypes.from_list(dtype, shape, data, f"input '{t.name}' for model '{model}'")
        elif isinstance(data, np.ndarray):
            if data.dtype != dtype.numpy or list(data.shape) != shape:
                raise ServerError.invalid(f"input '{t.name}' for model '{model}' holds a {data.dtype} array of "
                                          f"shape {list(data.shape)}")
            array = data
        else:
            raise ServerError.invalid(f"input '{t.name}' for model '{model}' has no data")

        if spec.reshape is not None:
            variable = iter(d for c, d in zip(spec.dims, dims) if c == WILDCARD)
            new = [next(variable) if d == WILDCARD else d for d in spec.reshape]
            array = array.reshape(([batch] if self.max_batch_size > 0 else []) + new)
            t.shape = list(array.shape)
        t.data = array


def _batch_size(request: InferenceRequest, config: ModelConfig) -> int:
    if config.max_batch_size == 0:
        return 0
    batch = None
    for name, t in request.inputs.items():
        if not t.shape:
            raise ServerError.invalid(
                f"input '{name}' has no shape but model requires batch dimension for '{config.name}'")
        if batch is None:
            batch = t.shape[0]
        elif t.shape[0] != batch:
            raise ServerError.invalid(f"input '{name}' batch size does not match other inputs for '{config.name}'")
    batch = batch if batch is not None else 1
    if batch > config.max_batch_size:
        raise ServerError.invalid(
            f"inference request batch-size must be <= {config.max_batch_size} for '{config.name}'")
    if batch < 1:
        raise ServerError.invalid(f"inference request batch-size must be >= 1 for '{config.name}', got {batch}")
    return batch
