"""Turn what a backend replied into the response a client gets: the requested outputs, checked
against the config's data types, in the config's dims (undoing an output ``reshape``), as top-k
classes when asked (Triton's classification extension), and written into shared memory when asked."""
from __future__ import annotations

import numpy as np

from kiln.server import datatypes
from kiln.server import config as cfg
from kiln.server.config import WILDCARD, ModelConfig, is_decoupled
from kiln.server.core import InferenceRequest, InferenceResponse, Reply, ShmRef, Tensor
from kiln.server.errors import ServerError
from kiln.server.shm import SharedMemoryManager


class OutputBuilder:
    def __init__(self, config: ModelConfig, version: int, labels: dict[str, list[str]], shm: SharedMemoryManager):
        self.config = config
        self.version = version
        self.labels = labels
        self.shm = shm
        self.decoupled = is_decoupled(config)
        # Per output, what each response checks it against: its data type, its config dims (the batch
        # dimension goes in front where the model batches) and whether the config reshapes it. Read once.
        self._specs = {io.name: (datatypes.by_config(io.data_type), list(io.dims), io.HasField("reshape"))
                       for io in config.output}
        self._batched = config.max_batch_size > 0

    def response(self, request: InferenceRequest, reply: Reply) -> InferenceResponse:
        response = InferenceResponse(self.config.name, self.version, request.id, parameters=reply.parameters,
                                     final=reply.final, error=reply.error)
        if reply.error is not None:
            return response
        if reply.payload is not None:
            response.payload = reply.payload
            return response
        if reply.outputs is None:
            response.flag_only = True
            return response
        try:
            response.outputs = self._outputs(request, reply.outputs)
        except ServerError as e:
            response.outputs, response.error = [], e
        return response

    def _outputs(self, request: InferenceRequest, produced: dict[str, np.ndarray]) -> list[Tensor]:
        model = self.config.name
        requested = {o.name: o for o in request.outputs}
        out = []
        for name in request.output_names:
            if name not in produced:
                if self.decoupled:
                    continue  # a streamed response may carry only some outputs
                raise ServerError.internal(f"model '{model}' did not produce output '{name}'")
            dtype, io_dims, reshape = self._specs[name]
            array = _coerce(np.asarray(produced[name]) if not isinstance(produced[name], np.ndarray)
                            else produced[name], dtype, name, model)
            dims = [request.batch_size, *io_dims] if self._batched else io_dims
            if reshape and dims.count(WILDCARD) <= 1 and array.size == _known_size(dims, array.size):
                array = array.reshape(dims)
            _check_shape(array, dims, name, model)
            ro = requested.get(name)
            if ro is not None and ro.class_count > 0:
                array = _classify(array, ro.class_count, self.labels.get(name), self._batched)
                dtype = datatypes.BY_NAME["BYTES"]
            tensor = Tensor(name, dtype.name, list(array.shape), array)
            if ro is not None and ro.shm is not None:
                raw = datatypes.to_raw(array, dtype)
                self.shm.write(ro.shm, raw, f"output '{name}'")
                tensor.data = ShmRef(ro.shm.region, len(raw), ro.shm.offset)
            out.append(tensor)
        return out


def _known_size(dims: list[int], size: int) -> int:
    """The element count ``dims`` describe, a wildcard taking what ``size`` leaves it (-1 if it cannot)."""
    known = int(np.prod([d for d in dims if d != WILDCARD]))
    if WILDCARD not in dims:
        return known
    return size if known and size % known == 0 else -1


def _check_shape(array: np.ndarray, expected: list[int], name: str, model: str) -> None:
    """A model's output must have the shape its config declares (-1: any size there)."""
    shape = array.shape
    if len(shape) == len(expected):
        for e, d in zip(expected, shape):  # a plain loop: this runs for every output of every response
            if e != d and e != WILDCARD:
                break
        else:
            return
    raise ServerError.internal(f"model '{model}' produced output '{name}' of shape {list(shape)}, but its config "
                               f"declares {expected}")


def read_labels(config: ModelConfig, model_dir) -> dict[str, list[str]]:
    labels = {}
    for io in config.output:
        if io.label_filename:
            path = cfg.file_inside(model_dir, io.label_filename, f"label_filename of output '{io.name}'")
            try:
                labels[io.name] = path.read_text().splitlines()
            except OSError as e:
                raise ServerError.invalid(f"cannot read label file {path} of output '{io.name}': {e}") from None
    return labels


def _coerce(array: np.ndarray, dtype: datatypes.DataType, name: str, model: str) -> np.ndarray:
    if array.dtype == dtype.numpy:
        return array
    if dtype.name == "BYTES" and array.dtype.kind in ("S", "U", "O"):
        return np.array([x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in array.reshape(-1)],
                        dtype=object).reshape(array.shape)
    raise ServerError.internal(
        f"unexpected datatype {array.dtype} for inference output '{name}' of model '{model}', expecting "
        f"{datatypes.config_name(dtype.config)}")


def _classify(array: np.ndarray, k: int, labels: list[str] | None, batched: bool) -> np.ndarray:
    if array.dtype == object:
        raise ServerError.invalid("classification needs a numeric output, not BYTES")
    rows = array.reshape(array.shape[0], -1) if batched and array.ndim > 0 else array.reshape(1, -1)
    k = min(k, rows.shape[1])
    out = np.empty((rows.shape[0], k), dtype=object)
    for b, row in enumerate(rows):
        top = np.argsort(-row.astype(np.float64), kind="stable")[:k]
        for j, idx in enumerate(top):
            text = f"{float(row[idx]):f}:{idx}"
            if labels is not None and idx < len(labels):
                text += f":{labels[idx]}"
            out[b, j] = text.encode("utf-8")
    return out if batched else out[0]
