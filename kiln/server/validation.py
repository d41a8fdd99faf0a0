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


def admit(request: InferenceRequest, config: ModelConfig, shm: SharedMemoryManager) -> None:
    model = config.name
    for key in request.parameters:
        if key.startswith("triton_"):
            raise ServerError.invalid(
                "parameter keys starting with 'triton_' are reserved for Triton usage and should not be specified.")
    for key in ("timeout", "priority"):  # Triton's reserved parameters: microseconds, and a level
        value = request.parameters.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ServerError.invalid(f"Unable to parse '{key}': it must be an integer >= 0, got {shown(repr(value))}")
    if request.payload is not None:  # a typed request: its backend checks it
        request.output_names = []
        request.batch_size = 1 if config.max_batch_size > 0 else 0
        return
    inputs = {io.name: io for io in config.input}
    for name in request.inputs:
        if name not in inputs:
            raise ServerError.invalid(f"unexpected inference input '{shown(name)}' for model '{model}'")
    missing = [io.name for io in config.input if not io.optional and io.name not in request.inputs]
    if missing:
        got = "[" + ",".join(f"'{n}'" for n in request.inputs) + "]"
        want = "[" + ",".join(f"'{n}'" for n in missing) + "]"
        required = sum(not io.optional for io in config.input)
        expected = (f"expected {len(config.input)} inputs" if required == len(config.input)
                    else f"expected number of inputs between {required} and {len(config.input)}")
        raise ServerError.invalid(
            f"{expected} but got {len(request.inputs)} inputs for model '{model}'. Got input(s) {got}, "
            f"but missing required input(s) {want}. Please provide all required input(s).")

    batch = _batch_size(request, config)
    for name, tensor in request.inputs.items():
        _admit_input(tensor, inputs[name], config, batch, shm)

    outputs = [io.name for io in config.output]
    for o in request.outputs:
        if o.name not in outputs:
            raise ServerError.invalid(f"unexpected inference output '{shown(o.name)}' for model '{model}'")
        if isinstance(o.class_count, bool) or not isinstance(o.class_count, int) or o.class_count < 0:
            raise ServerError.invalid(f"Unable to set 'classification' of output '{o.name}': it must be an integer "
                                      f">= 0, got {shown(repr(o.class_count))}")
        if o.class_count and o.shm is not None:
            raise ServerError.invalid("Output can't set both 'shared_memory_region' and 'classification'")
    request.output_names = [o.name for o in request.outputs] or outputs
    request.batch_size = batch


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


def _admit_input(t: Tensor, io, config: ModelConfig, batch: int, shm: SharedMemoryManager) -> None:
    model = config.name
    dtype = datatypes.by_config(io.data_type)
    if t.datatype != dtype.name:
        raise ServerError.invalid(
            f"inference input '{t.name}' data-type is '{t.datatype}', but model '{model}' expects '{dtype.name}'")
    if any(d < 0 for d in t.shape):
        raise ServerError.invalid(
            f"All input dimensions should be specified for input '{t.name}' for model '{model}', got {t.shape}")
    dims = t.shape[1:] if config.max_batch_size > 0 else t.shape
    if len(dims) != len(io.dims) or any(c != WILDCARD and c != d for c, d in zip(io.dims, dims)):
        full = ([WILDCARD] if config.max_batch_size > 0 else []) + list(io.dims)
        raise ServerError.invalid(
            f"unexpected shape for input '{t.name}' for model '{model}'. Expected {full}, got {t.shape}."
            + (_BATCH_NOTE if config.max_batch_size > 0 else ""))

    what = f"input '{t.name}' for model '{model}'"
    data = t.data
    if isinstance(data, ShmRef):
        data = shm.read(data, what)
    if isinstance(data, (bytes, bytearray, memoryview)):
        array = datatypes.from_raw(dtype, t.shape, data, what)
    elif isinstance(data, list):
        array = datatypes.from_list(dtype, t.shape, data, what)
    elif isinstance(data, np.ndarray):
        if data.dtype != dtype.numpy or list(data.shape) != t.shape:
            raise ServerError.invalid(f"{what} holds a {data.dtype} array of shape {list(data.shape)}")
        array = data
    else:
        raise ServerError.invalid(f"{what} has no data")

    if io.HasField("reshape"):
        variable = iter(d for c, d in zip(io.dims, dims) if c == WILDCARD)
        shape = [next(variable) if d == WILDCARD else d for d in io.reshape.shape]
        array = array.reshape(([batch] if config.max_batch_size > 0 else []) + shape)
    t.data = array
    t.shape = list(array.shape)
