"""Triton's tensor data types and the conversions between wire data and numpy arrays.

A tensor's data is a numpy array in the data type's *storage* dtype: the numpy dtype of the same
name, ``ml_dtypes.bfloat16`` for BF16 (what ``tritonclient`` uses too), and an object array of
``bytes`` for BYTES. On the wire, fixed-size types are little-endian and row-major; BYTES elements
are each a 4-byte little-endian length followed by the bytes (Triton's serialization, the same in the
HTTP binary extension, gRPC ``raw_*_contents`` and shared memory).
"""
from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from kiln.server.errors import ServerError


@dataclass(frozen=True, slots=True)
class DataType:
    name: str  # the protocol's name: "FP32", "BYTES", ...
    config: int  # the model config enum: model_config_pb2.TYPE_FP32, ...
    numpy: np.dtype  # storage dtype (object for BYTES)

    @property
    def itemsize(self) -> int | None:
        """Bytes per element; None for BYTES, whose elements vary in size."""
        return None if self.name == "BYTES" else self.numpy.itemsize


_TYPES = [
    DataType("BOOL", mc.TYPE_BOOL, np.dtype(np.bool_)),
    DataType("UINT8", mc.TYPE_UINT8, np.dtype(np.uint8)),
    DataType("UINT16", mc.TYPE_UINT16, np.dtype(np.uint16)),
    DataType("UINT32", mc.TYPE_UINT32, np.dtype(np.uint32)),
    DataType("UINT64", mc.TYPE_UINT64, np.dtype(np.uint64)),
    DataType("INT8", mc.TYPE_INT8, np.dtype(np.int8)),
    DataType("INT16", mc.TYPE_INT16, np.dtype(np.int16)),
    DataType("INT32", mc.TYPE_INT32, np.dtype(np.int32)),
    DataType("INT64", mc.TYPE_INT64, np.dtype(np.int64)),
    DataType("FP16", mc.TYPE_FP16, np.dtype(np.float16)),
    DataType("FP32", mc.TYPE_FP32, np.dtype(np.float32)),
    DataType("FP64", mc.TYPE_FP64, np.dtype(np.float64)),
    DataType("BF16", mc.TYPE_BF16, np.dtype(ml_dtypes.bfloat16)),
    DataType("BYTES", mc.TYPE_STRING, np.dtype(object)),
]
BY_NAME: dict[str, DataType] = {t.name: t for t in _TYPES}
BY_CONFIG: dict[int, DataType] = {t.config: t for t in _TYPES}


def by_name(name: str) -> DataType:
    try:
        return BY_NAME[name]
    except (KeyError, TypeError):
        raise ServerError.invalid(f"invalid datatype '{name}'; expected one of {', '.join(BY_NAME)}") from None


def by_config(value: int) -> DataType:
    try:
        return BY_CONFIG[value]
    except KeyError:
        raise ServerError.invalid(f"unsupported model config data type {mc.DataType.Name(value)}") from None


def config_name(value: int) -> str:
    return mc.DataType.Name(value)


def element_count(shape: list[int]) -> int:
    return math.prod(shape)


def from_raw(dtype: DataType, shape: list[int], raw: bytes | memoryview, what: str) -> np.ndarray:
    """Decode the wire bytes of a tensor of ``shape``; ``what`` names it in errors ("input 'X' for model 'M'")."""
    count = element_count(shape)
    if dtype.itemsize is None:
        return _deserialize_bytes(raw, count, what).reshape(shape)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise ServerError.invalid(f"input byte size mismatch for {what}. Expected {expected}, got {len(raw)}")
    return np.frombuffer(raw, dtype=dtype.numpy).reshape(shape)


def to_raw(array: np.ndarray, dtype: DataType) -> bytes:
    """The wire bytes of ``array`` (already in ``dtype``'s storage dtype)."""
    if dtype.itemsize is None:
        return serialize_bytes(array)
    return np.ascontiguousarray(array).tobytes()


def byte_size(array: np.ndarray, dtype: DataType) -> int:
    if dtype.itemsize is None:
        return sum(4 + len(_as_bytes(x)) for x in array.reshape(-1))
    return array.size * dtype.itemsize


# The kinds of numpy array (``dtype.kind``) a JSON list may parse as, for each kind of data type: integers
# for integer types (never "5", 2.5 or true), numbers for floating types, booleans for BOOL.
_JSON_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}


def from_list(dtype: DataType, shape: list[int], data: list, what: str) -> np.ndarray:
    """A tensor from JSON ``data`` or gRPC typed contents: a flat or nested list of ``prod(shape)`` values."""
    count = element_count(shape)
    try:
        if dtype.name == "BYTES":
            values = list(_flatten(data))
            array = np.empty(len(values), dtype=object)
            for i, v in enumerate(values):
                if isinstance(v, str):
                    v = v.encode("utf-8")
                elif not isinstance(v, bytes):
                    raise ValueError(f"element {i} is {type(v).__name__}, not a string")
                array[i] = v
        else:
            parsed = np.asarray(data)
            if dtype.numpy.kind == "u" and parsed.dtype.kind in "fO" and _all_ints(data):
                parsed = np.asarray(data, dtype=object)  # integers past int64 (numpy would make floats)
                parsed = parsed.astype(np.uint64) if parsed.size and parsed.min() >= 0 else parsed
            allowed = _JSON_KINDS[dtype.numpy.kind if dtype.name != "BF16" else "f"]
            if parsed.size and parsed.dtype.kind not in allowed:
                raise ValueError(f"it holds {_kind_name(parsed.dtype)}, not {_kind_name(dtype.numpy)}")
            if dtype.numpy.kind in "iu" and parsed.size:
                info = _iinfo(dtype.numpy)
                if parsed.size < 64:  # a few values (most JSON tensors): faster in Python than numpy's reductions
                    values = parsed.ravel().tolist()
                    low, high = min(values), max(values)
                else:
                    low, high = parsed.min(), parsed.max()
                if low < info.min or high > info.max:
                    raise ValueError(f"a value is outside [{info.min}, {info.max}]")
            array = parsed.astype(np.float32).astype(dtype.numpy) if dtype.name in ("FP16", "BF16") \
                else parsed.astype(dtype.numpy)
    except (ValueError, TypeError, OverflowError) as e:
        raise ServerError.invalid(f"unable to parse the data of {what} as {dtype.name}: {e}") from None
    if array.size != count:
        raise ServerError.invalid(
            f"unexpected number of elements in the data of {what}: shape {list(shape)} needs {count}, got {array.size}")
    return array.reshape(shape)


@functools.cache
def _iinfo(dtype: np.dtype) -> np.iinfo:
    return np.iinfo(dtype)


def to_list(array: np.ndarray, dtype: DataType, what: str) -> list:
    """A flat list for JSON (Triton writes tensors flat, in row-major order)."""
    flat = array.reshape(-1)
    if dtype.name == "BYTES":
        try:
            return [_as_bytes(x).decode("utf-8") for x in flat]
        except UnicodeDecodeError:
            raise ServerError.invalid(
                f"{what} holds bytes that are not UTF-8 text; request it as binary data") from None
    if dtype.name in ("FP16", "BF16"):
        flat = flat.astype(np.float32)
    values = flat.tolist()
    # A few values (a streamed token's outputs) are checked faster in Python than through numpy.
    if flat.dtype.kind == "f" and not (all(map(math.isfinite, values)) if len(values) < 64
                                       else np.isfinite(flat).all()):
        raise ServerError.invalid(f"{what} holds NaN or infinity, which JSON cannot carry; request it as binary "
                                  "data")
    return values


def serialize_bytes(array: np.ndarray) -> bytes:
    parts = []
    for x in array.reshape(-1):
        b = _as_bytes(x)
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def _as_bytes(x) -> bytes:
    if isinstance(x, bytes):
        return x
    if isinstance(x, str):
        return x.encode("utf-8")
    if isinstance(x, (np.bytes_, bytearray, memoryview)):
        return bytes(x)
    return str(x).encode("utf-8")


def _deserialize_bytes(raw: bytes | memoryview, count: int, what: str) -> np.ndarray:
    # The elements are read into a list first and counted against the shape at the end: nothing is sized
    # from the declared shape (each element takes at least its 4-byte length, so the list is bounded by
    # the bytes that arrived).
    raw = memoryview(raw).cast("B")
    values: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if len(raw) - offset < 4:
            raise ServerError.invalid(
                f"incomplete string length indicator for {what}, expecting 4 bytes but only "
                f"{len(raw) - offset} bytes available")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if length > len(raw) - offset:
            raise ServerError.invalid(
                f"incomplete string data for {what}: element {len(values)} says {length} bytes but only "
                f"{len(raw) - offset} remain")
        values.append(bytes(raw[offset:offset + length]))
        offset += length
    if len(values) != count:
        raise ServerError.invalid(f"unexpected number of string elements {len(values)} for {what}, expecting {count}")
    out = np.empty(count, dtype=object)
    out[:] = values
    return out


def _all_ints(data) -> bool:
    return all(isinstance(x, int) and not isinstance(x, bool) for x in _flatten(data))


def _kind_name(dtype: np.dtype) -> str:
    return {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers", "U": "strings"}.get(
        dtype.kind, "values of mixed types or out of range")


def _flatten(data):
    if isinstance(data, (list, tuple)):
        for x in data:
            yield from _flatten(x)
    else:
        yield data
