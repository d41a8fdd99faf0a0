"""``triton_python_backend_utils`` as kiln provides it: the API a Triton Python-backend ``model.py``
imports (``import triton_python_backend_utils as pb_utils``), with the names, signatures and error
messages its users know from Triton.

It lives in the model's own process, where kiln's stub (``kiln_python_stub.py``) binds it to the
connection to the server: responses, BLS calls, cancellation queries and log lines travel through
that binding. Outside such a process (a unit test importing a ``model.py``) the plain parts work:
tensors, responses, errors, the config helpers and the auto-complete ``ModelConfig``.

Differences from Triton: tensors live in host memory (``is_cpu()`` is always true; ``from_dlpack`` of a
GPU tensor copies it to the host); BF16 tensors are numpy arrays of ``ml_dtypes.bfloat16``; custom
metrics, ``load_model``/``unload_model`` from a model and request rescheduling are not offered.
"""
from __future__ import annotations

import enum
import json
import struct
import sys
import threading
from typing import Any

import numpy as np

# -- constants ------------------------------------------------------------------------------------------

TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2
TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_RELEASE_ALL = 1
TRITONSERVER_REQUEST_RELEASE_RESCHEDULE = 2


class MemoryType(enum.IntEnum):
    TRITONSERVER_MEMORY_GPU = 0
    TRITONSERVER_MEMORY_CPU = 1


TRITONSERVER_MEMORY_GPU = MemoryType.TRITONSERVER_MEMORY_GPU
TRITONSERVER_MEMORY_CPU = MemoryType.TRITONSERVER_MEMORY_CPU

# Triton's TRITONSERVER_DataType numbers, their protocol names and numpy dtypes (BF16: ml_dtypes, on demand).
_TYPES: list[tuple[int, str, Any]] = [
    (1, "BOOL", np.bool_), (2, "UINT8", np.uint8), (3, "UINT16", np.uint16), (4, "UINT32", np.uint32),
    (5, "UINT64", np.uint64), (6, "INT8", np.int8), (7, "INT16", np.int16), (8, "INT32", np.int32),
    (9, "INT64", np.int64), (10, "FP16", np.float16), (11, "FP32", np.float32), (12, "FP64", np.float64),
    (13, "BYTES", np.object_), (14, "BF16", None),
]
_NAME_OF = {number: name for number, name, _ in _TYPES}
_NUMPY_OF = {number: dtype for number, _, dtype in _TYPES}
_BYTES, _BF16 = 13, 14

TRITON_STRING_TO_NUMPY = {f"TYPE_{'STRING' if name == 'BYTES' else name}": (bool if name == "BOOL" else dtype)
                          for _, name, dtype in _TYPES if dtype is not None}


def triton_to_numpy_type(data_type: int):
    if data_type == _BF16:
        import ml_dtypes

        return ml_dtypes.bfloat16
    return _NUMPY_OF.get(data_type)


def numpy_to_triton_type(data_type) -> int | None:
    try:
        dtype = np.dtype(data_type)
    except TypeError:
        return None
    if dtype in _TRITON_TYPE_OF:  # every tensor a model makes asks: answered once per dtype
        return _TRITON_TYPE_OF[dtype]
    number = None
    if dtype.kind in ("O", "S", "U"):
        number = _BYTES
    elif dtype.name == "bfloat16":
        number = _BF16
    else:
        for n, _, candidate in _TYPES:
            if candidate is not None and candidate is not np.object_ and dtype == np.dtype(candidate):
                number = n
                break
    _TRITON_TYPE_OF[dtype] = number
    return number


_TRITON_TYPE_OF: dict[np.dtype, int | None] = {}


def triton_string_to_numpy(triton_type_string: str):
    return TRITON_STRING_TO_NUMPY[triton_type_string]


def serialize_byte_tensor(input_tensor: np.ndarray) -> bytes | None:
    """Each element as a 4-byte little-endian length and its bytes, in C order (Triton's BYTES layout)."""
    if input_tensor.size == 0:
        return b""
    if input_tensor.dtype != np.object_ and input_tensor.dtype.type != np.bytes_:
        return None
    parts = []
    for item in input_tensor.reshape(-1):
        b = _as_bytes(item)
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def deserialize_bytes_tensor(encoded_tensor) -> np.ndarray:
    """The inverse of :func:`serialize_byte_tensor`: a 1-D object array of bytes."""
    view = memoryview(encoded_tensor).cast("B")
    out, offset = [], 0
    while offset < len(view):
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        out.append(bytes(view[offset:offset + length]))
        offset += length
    return np.array(out, dtype=np.object_)


def _as_bytes(item: Any) -> bytes:
    # As Triton: bytes stay as they are, anything else is written as its str() in UTF-8.
    if isinstance(item, bytes):
        return item
    if isinstance(item, (np.bytes_, bytearray, memoryview)):
        return bytes(item)
    return str(item).encode("utf-8")


def _bytes_array(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.object_ and all(type(x) is bytes for x in array.reshape(-1)):
        return array
    out = np.empty(array.shape, dtype=np.object_)
    flat = out.reshape(-1)
    for i, item in enumerate(array.reshape(-1)):
        flat[i] = _as_bytes(item)
    return out


# -- errors ---------------------------------------------------------------------------------------------

class _ErrorCode(enum.IntEnum):
    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7


class TritonError:
    """An error a model puts in a response: ``TritonError("message", TritonError.NOT_FOUND)``."""

    UNKNOWN = _ErrorCode.UNKNOWN
    INTERNAL = _ErrorCode.INTERNAL
    NOT_FOUND = _ErrorCode.NOT_FOUND
    INVALID_ARG = _ErrorCode.INVALID_ARG
    UNAVAILABLE = _ErrorCode.UNAVAILABLE
    UNSUPPORTED = _ErrorCode.UNSUPPORTED
    ALREADY_EXISTS = _ErrorCode.ALREADY_EXISTS
    CANCELLED = _ErrorCode.CANCELLED

    def __init__(self, message: str, code: int = _ErrorCode.INTERNAL):
        if message is None:
            raise TypeError("TritonError needs a message")
        try:
            self._code = _ErrorCode(int(code))
        except ValueError:
            raise TritonModelException(f"TritonError code {code!r} is not one of Triton's error codes") from None
        self._message = str(message)

    def code(self) -> _ErrorCode:
        return self._code

    def message(self) -> str:
        return self._message

    def __str__(self) -> str:
        return self._message

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, {self._code.name})"


class TritonModelException(Exception):
    """Raised by the API for a misuse, and by models to fail the requests of an ``execute`` call."""

    def __init__(self, msg: str = ""):
        super().__init__(msg)
        self._msg = msg

    def message(self) -> str:
        return self._msg


# -- tensors --------------------------------------------------------------------------------------------

class Tensor:
    """A named tensor: ``Tensor("OUTPUT0", numpy_array)``. BYTES tensors are object arrays of bytes (str
    elements are accepted and stored as UTF-8)."""

    def __init__(self, name: str, numpy_array):
        if not isinstance(name, str) or not name:
            raise TritonModelException("Tensor name cannot be an empty string.")
        array = numpy_array if isinstance(numpy_array, np.ndarray) else np.asarray(numpy_array)
        dtype = numpy_to_triton_type(array.dtype)
        if dtype is None:
            raise TritonModelException(
                f"Tensor '{name}': numpy dtype {array.dtype} has no Triton data type (for BYTES use np.object_)")
        if dtype == _BYTES:
            array = _bytes_array(array)
        elif not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        self._name = name
        self._array = array
        self._dtype = dtype

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def triton_dtype(self) -> int:
        return self._dtype

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def is_cpu(self) -> bool:
        return True

    def to_dlpack(self):
        if self._dtype == _BYTES:
            raise TritonModelException("DLPack does not have support for string tensors.")
        return self._array.__dlpack__()

    def __dlpack__(self, stream=None, **kwargs):
        return self.to_dlpack()

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU

    @staticmethod
    def from_dlpack(name: str, tensor) -> Tensor:
        """A tensor from a DLPack capsule or an object with ``__dlpack__`` (a torch tensor); GPU data is
        copied to host memory."""
        if not isinstance(name, str) or not name:
            raise TritonModelException("Tensor name cannot be an empty string.")
        source = _Capsule(tensor) if type(tensor).__name__ == "PyCapsule" else tensor
        if not hasattr(source, "__dlpack__") or not hasattr(source, "__dlpack_device__"):
            raise TritonModelException(
                "Provided tensor is not supported. Tensor must be a DLPack capsule or have `__dlpack__` and "
                "`__dlpack_device__` attributes")
        try:
            if source.__dlpack_device__()[0] == 1:
                return Tensor(name, np.from_dlpack(source))
        except (BufferError, TypeError, RuntimeError):
            pass  # a dtype numpy cannot take (bfloat16): through torch below
        return Tensor(name, _via_torch(tensor))


class _Capsule:
    """A bare DLPack capsule as an object numpy.from_dlpack accepts (a CPU tensor's capsule)."""

    def __init__(self, capsule):
        self.capsule = capsule

    def __dlpack__(self, stream=None, **kwargs):
        return self.capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)


def _via_torch(tensor) -> np.ndarray:
    try:
        import torch
    except ImportError:
        raise TritonModelException("this DLPack tensor is not on the CPU or not in a numpy dtype; reading it "
                                   "needs torch, which is not installed") from None
    t = torch.utils.dlpack.from_dlpack(tensor).detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _parameters_json(parameters, what: str) -> str:
    if parameters is None:
        return "{}"
    if isinstance(parameters, str):
        try:
            parameters = json.loads(parameters)
        except json.JSONDecodeError as e:
            raise TritonModelException(f"{what} parameters are not valid JSON: {e}") from None
    if not isinstance(parameters, dict):
        raise TritonModelException(f"{what} parameters must be a dict, not {type(parameters).__name__}")
    for key, value in parameters.items():
        if not isinstance(key, str):
            raise TritonModelException(f"Expect parameters keys to have type str, found type {type(key)}")
        if not isinstance(value, (bool, int, str)):
            raise TritonModelException(
                f"Expect parameters values to have type bool/int/str, found type {type(value)}")
    return json.dumps(parameters)


# -- requests and responses -----------------------------------------------------------------------------

class InferenceResponse:
    """A response: output tensors, or an error that fails its request with the error's message."""

    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None,
                 parameters: dict | str | None = None):
        output_tensors = [] if output_tensors is None else output_tensors
        if not isinstance(output_tensors, list):
            raise TritonModelException('"output_tensors" must be a list.')
        for t in output_tensors:
            if not isinstance(t, Tensor):
                raise TritonModelException(f"output_tensors must hold pb_utils.Tensor objects, found {type(t)}")
        if error is not None and not isinstance(error, TritonError):
            error = TritonError(str(error))
        self._output_tensors = output_tensors
        self._error = error
        self._parameters = _parameters_json(parameters, "response")

    def output_tensors(self) -> list[Tensor]:
        return self._output_tensors

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> str:
        return self._parameters


class PreferredMemory:
    def __init__(self, preferred_memory_type: int = TRITONSERVER_MEMORY_CPU, preferred_device_id: int = 0):
        self.preferred_memory_type = preferred_memory_type
        self.preferred_device_id = preferred_device_id


class InferenceTrace:
    def get_context(self) -> str | None:
        return None


class InferenceRequest:
    """A request: given to ``execute`` by the server, or built by the model to call another model (BLS):
    ``InferenceRequest(model_name="m", inputs=[...], requested_output_names=[...]).exec()``."""

    def __init__(self, request_id: str = "", correlation_id: int | str = 0, inputs: list[Tensor] | None = None,
                 requested_output_names: list[str] | None = None, model_name: str | None = None,
                 model_version: int = -1, flags: int = 0, timeout: int = 0,
                 preferred_memory: PreferredMemory | None = None, trace: InferenceTrace | None = None,
                 parameters: dict | str | None = None):
        if not isinstance(model_name, str) or not model_name:
            raise TypeError("InferenceRequest needs model_name, the model to call")
        if inputs is None or not isinstance(inputs, list) or not all(isinstance(t, Tensor) for t in inputs):
            raise TypeError("InferenceRequest needs inputs, a list of pb_utils.Tensor")
        if not isinstance(correlation_id, (int, str)):
            raise TritonModelException("Correlation ID must be integer or string")
        names = list(requested_output_names or [])
        for n in names:
            if not isinstance(n, str) or not n:
                raise TritonModelException(
                    f"Requested output name for request with id '{request_id}' and model name '{model_name}' "
                    "should not be empty.")
        self._request_id = str(request_id)
        self._correlation_id = correlation_id
        self._inputs = list(inputs)
        self._requested_output_names = names
        self._model_name = model_name
        self._model_version = int(model_version)
        self._flags = int(flags)
        self._timeout = int(timeout)
        self._parameters = _parameters_json(parameters, "request")
        self._trace = trace or InferenceTrace()
        self._sender: InferenceResponseSender | None = None
        self._key = 0  # the server's handle of a request it gave to execute; 0 for a BLS request

    @classmethod
    def _from_server(cls, key: int, request_id: str, correlation_id: int | str, inputs: list[Tensor],
                     requested_output_names: list[str], parameters: str, flags: int,
                     decoupled: bool) -> InferenceRequest:
        self = cls.__new__(cls)
        self._request_id = request_id
        self._correlation_id = correlation_id
        self._inputs = inputs
        self._requested_output_names = requested_output_names
        self._model_name = ""
        self._model_version = -1
        self._flags = flags
        self._timeout = 0
        self._parameters = parameters
        self._trace = InferenceTrace()
        self._key = key
        self._sender = InferenceResponseSender(key, requested_output_names, decoupled)
        return self

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self) -> int | str:
        return self._correlation_id

    def requested_output_names(self) -> list[str]:
        return self._requested_output_names

    def flags(self) -> int:
        return self._flags

    def set_flags(self, flags: int) -> None:
        self._flags = int(flags)

    def timeout(self) -> int:
        return self._timeout

    def parameters(self) -> str:
        return self._parameters

    def trace(self) -> InferenceTrace:
        return self._trace

    def get_response_sender(self) -> InferenceResponseSender:
        if self._sender is None:
            raise TritonModelException("a BLS request has no response sender; only requests given to execute do")
        return self._sender

    def is_cancelled(self) -> bool:
        return self._sender is not None and self._sender.is_cancelled()

    def set_release_flags(self, flags: int) -> None:
        if flags != TRITONSERVER_REQUEST_RELEASE_ALL:
            raise TritonModelException("kiln's python backend does not reschedule requests: the only release flag "
                                       "is TRITONSERVER_REQUEST_RELEASE_ALL")

    def exec(self, decoupled: bool = False):
        """Run this request on its model through the server: its response, or with ``decoupled=True`` a
        :class:`ResponseIterator` over every response (the last may be empty, carrying only the final flag).
        Errors come back in the response (``has_error()``), as in Triton."""
        call = _bound().infer(self)
        return ResponseIterator(call) if decoupled else call.single()

    def async_exec(self, decoupled: bool = False):
        """:meth:`exec` as an awaitable, for ``async def execute``: the request is sent at once, and the
        awaitable resolves when the response (decoupled: the first response) is there."""
        import asyncio

        call = _bound().infer(self)
        return call.future(asyncio.get_running_loop(), decoupled)


class ResponseIterator:
    """The responses of a BLS call made with ``exec(decoupled=True)``, each as it arrives."""

    def __init__(self, call):
        self._call = call
        self._index = 0

    def __iter__(self) -> ResponseIterator:
        return self

    def __next__(self) -> InferenceResponse:
        response = self._call.get(self._index)
        if response is None:
            raise StopIteration
        self._index += 1
        return response

    def cancel(self) -> None:
        """Ask the called model to stop (it sees ``is_cancelled()``); the remaining responses still arrive."""
        self._call.cancel()


class InferenceResponseSender:
    """Sends the responses of one request: any number with ``send(response)`` and then the final flag
    (``send(flags=TRITONSERVER_RESPONSE_COMPLETE_FINAL)``, alone or with the last response)."""

    def __init__(self, key: int, requested_output_names: list[str], decoupled: bool):
        self._key = key
        self._requested = requested_output_names
        self._decoupled = decoupled
        self._lock = threading.Lock()
        self._closed = False
        self._sent = 0

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        if flags not in (0, TRITONSERVER_RESPONSE_COMPLETE_FINAL):
            raise TritonModelException("Unable to send response. Unsupported flag provided.")
        if flags == 0 and response is None:
            raise TritonModelException(
                "Inference Response object must be provided when the response flags is set to zero.")
        if response is not None and not isinstance(response, InferenceResponse):
            raise TritonModelException(f"send() takes a pb_utils.InferenceResponse, not {type(response)}")
        with self._lock:
            if not self._decoupled:
                if response is not None and self._sent > 0:
                    raise TritonModelException(
                        "Unable to send response. Non-decoupled model cannot send more than one response.")
                if response is None and self._sent == 0:
                    raise TritonModelException(
                        "Unable to send response. Non-decoupled model cannot send complete final before sending "
                        "a response.")
            if self._closed:
                raise TritonModelException("Unable to send response. Response sender has been closed.")
            final = flags == TRITONSERVER_RESPONSE_COMPLETE_FINAL
            self._closed = final
            self._sent += 1
            # Under the lock: the responses of one request reach the server in the order they were sent.
            _bound().send_response(self._key, response, final, self._requested)

    def is_cancelled(self) -> bool:
        return _bound().is_cancelled(self._key)

    def _close(self) -> bool:
        """Close the sender (its execute failed); True when it was still open."""
        with self._lock:
            was_open = not self._closed
            self._closed = True
            return was_open


# -- logging --------------------------------------------------------------------------------------------

class Logger:
    """Log lines into the server's log: ``pb_utils.Logger.log_info("...")``."""

    class LogLevel(enum.IntEnum):
        INFO = 0
        WARNING = 1
        ERROR = 2
        VERBOSE = 3

    INFO = LogLevel.INFO
    WARNING = LogLevel.WARNING
    ERROR = LogLevel.ERROR
    VERBOSE = LogLevel.VERBOSE

    @staticmethod
    def log(message: str, level: LogLevel = LogLevel.INFO) -> None:
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename == __file__:
            frame = frame.f_back
        where = f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}" if frame is not None else ""
        level = Logger.LogLevel(level)
        if _binding is not None:
            _binding.log(level.name.lower(), where, str(message))
        else:
            print(f"{level.name[0]} {where}] {message}", file=sys.stderr, flush=True)

    @staticmethod
    def log_info(message: str) -> None:
        Logger.log(message, Logger.LogLevel.INFO)

    @staticmethod
    def log_warn(message: str) -> None:
        Logger.log(message, Logger.LogLevel.WARNING)

    @staticmethod
    def log_error(message: str) -> None:
        Logger.log(message, Logger.LogLevel.ERROR)

    @staticmethod
    def log_verbose(message: str) -> None:
        Logger.log(message, Logger.LogLevel.VERBOSE)


# -- model config helpers -------------------------------------------------------------------------------

def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    for t in inference_request.inputs():
        if t.name() == name:
            return t
    return None


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    for t in inference_response.output_tensors():
        if t.name() == name:
            return t
    return None


def get_input_config_by_name(model_config: dict, name: str) -> dict | None:
    for io in model_config.get("input", []):
        if io["name"] == name:
            return io
    return None


def get_output_config_by_name(model_config: dict, name: str) -> dict | None:
    for io in model_config.get("output", []):
        if io["name"] == name:
            return io
    return None


def using_decoupled_model_transaction_policy(model_config: dict) -> bool:
    return bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))


def get_model_dir() -> str:
    """The folder ``model.py`` was loaded from (the version folder)."""
    return _bound().model_dir


class ModelConfig:
    """The model configuration given to ``auto_complete_config``: read it with ``as_dict``, complete it with
    the setters; the returned object becomes the model's configuration."""

    def __init__(self, model_config: str | dict):
        self._config = json.loads(model_config) if isinstance(model_config, str) else model_config
        self._config.setdefault("input", [])
        self._config.setdefault("output", [])
        self._config.setdefault("max_batch_size", 0)

    def _name(self) -> str:
        return self._config.get("name", "")

    def as_dict(self) -> dict:
        return self._config

    def set_max_batch_size(self, max_batch_size: int) -> None:
        current = self._config.get("max_batch_size", 0)
        if current > max_batch_size:
            raise ValueError(
                f"configuration specified max_batch_size {current}, but in auto-complete-config function for "
                f"model '{self._name()}' specified max_batch_size {max_batch_size}")
        self._config["max_batch_size"] = max_batch_size

    def set_dynamic_batching(self) -> None:
        for other in ("sequence_batching", "ensemble_scheduling"):
            if other in self._config:
                raise ValueError(
                    f"Configuration specified scheduling_choice as '{other}', but auto-complete-config function "
                    f"for model '{self._name()}' tries to set scheduling_choice as 'dynamic_batching'")
        self._config.setdefault("dynamic_batching", {})

    def add_input(self, input: dict) -> None:
        self._add("input", input, ("name", "data_type", "dims", "optional"))

    def add_output(self, output: dict) -> None:
        self._add("output", output, ("name", "data_type", "dims"))

    def _add(self, kind: str, io: dict, allowed: tuple[str, ...]) -> None:
        model = self._name()
        label = f"{kind} '{io.get('name', '')}' in auto-complete-config function for model '{model}'"
        extra = [k for k in io if k not in allowed]
        if extra:
            raise ValueError(f"{label} contains property other than {', '.join(repr(a) for a in allowed)}.")
        for required in ("name", "data_type", "dims"):
            if required not in io:
                raise ValueError(f"{label} is missing '{required}' property.")
        for current in self._config[kind]:
            if current["name"] != io["name"]:
                continue
            if current.get("data_type", "TYPE_INVALID") not in ("TYPE_INVALID", io["data_type"]):
                raise ValueError(
                    f"unable to load model '{model}', configuration expects datatype {current['data_type']} for "
                    f"{kind} '{io['name']}', model provides {io['data_type']}")
            if current.get("dims") and list(current["dims"]) != list(io["dims"]):
                raise ValueError(
                    f"model '{model}', tensor '{io['name']}': the model expects dims {list(io['dims'])} but the "
                    f"model configuration specifies dims {list(current['dims'])}")
            if "optional" in current and "optional" in io and current["optional"] != io["optional"]:
                raise ValueError(
                    f"model '{model}', tensor '{io['name']}': the model expects optional {io['optional']} but "
                    f"the model configuration specifies optional {current['optional']}")
            current.update(io)
            return
        self._config[kind].append(dict(io))

    def set_model_transaction_policy(self, transaction_policy_dict: dict) -> None:
        extra = [k for k in transaction_policy_dict if k != "decoupled"]
        if extra:
            raise ValueError(f"model transaction property in auto-complete-config function for model "
                             f"'{self._name()}' contains property other than 'decoupled'.")
        policy = self._config.setdefault("model_transaction_policy", {})
        if "decoupled" in transaction_policy_dict:
            wanted = bool(transaction_policy_dict["decoupled"])
            if "decoupled" in policy and bool(policy["decoupled"]) != wanted:
                raise ValueError(f"trying to change decoupled property in auto-complete-config for model "
                                 f"'{self._name()}', which is already set to '{policy['decoupled']}'.")
            policy["decoupled"] = wanted


# -- the binding to the model's process -----------------------------------------------------------------

# Set once by kiln's stub when it loads the model (one model instance per process, as in Triton).
_binding: Any = None


def _bound():
    if _binding is None:
        raise TritonModelException("this call needs a running kiln server: the model is not loaded by kiln's "
                                   "python backend")
    return _binding
