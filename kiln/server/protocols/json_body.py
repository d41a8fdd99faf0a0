"""Request bodies read as JSON, strictly, for every HTTP protocol: anything that is not JSON, or that
Python's parser turns into an exception of its own, is a 400 that says what is wrong.

Refused: bytes that are not UTF-8 JSON; ``NaN`` and ``Infinity`` (Python reads them, JSON has no such
values); integers of more than 4,300 digits (Python's limit); nesting deeper than the interpreter's
recursion limit; strings holding an unpaired surrogate escape (``"\\ud800"``), which is no text any
tokenizer, file name or response can carry.

JSON parsing holds the interpreter's lock, so a body is parsed where it is read; the body limit
(``--max-request-size``) bounds what that costs.
"""
from __future__ import annotations

import json
import re
from typing import Any

from kiln.server.errors import ServerError

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def loads(raw: bytes | str, what: str = "the request") -> Any:
    try:
        # As json.loads reads bytes (its encoding detection), with one decoder made once.
        text = raw.decode(json.detect_encoding(raw), "surrogatepass") if isinstance(raw, (bytes, bytearray)) else raw
        doc = _DECODER.decode(text)
    except RecursionError:
        raise ServerError.invalid(f"{what} JSON is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ServerError.invalid(f"failed to parse {what} JSON: {e}") from None
    except ValueError as e:  # _no_constant, and Python's limit on integer digits
        raise ServerError.invalid(f"failed to parse {what} JSON: {e}") from None
    raw_bytes = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if _SURROGATE_ESCAPE.search(raw_bytes) and _has_lone_surrogate(doc):
        raise ServerError.invalid(f"{what} JSON holds a string with an unpaired surrogate escape (\\ud800-\\udfff), "
                                  "which is not text")
    return doc


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def _has_lone_surrogate(doc: Any) -> bool:
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
