"""Protobuf messages as the JSON Triton's HTTP API writes: field names as in the .proto, and 64-bit
integers as numbers (protobuf's JSON mapping writes them as strings)."""
from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


def to_json(message: Message, defaults: bool = False) -> dict[str, Any]:
    """``defaults``: also write fields left at their default (Triton does for model configs)."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=defaults)
    _fix(data, message.DESCRIPTOR)
    return data


def _fix(data: dict, descriptor: Descriptor) -> None:
    for f in descriptor.fields:
        if f.name not in data:
            continue
        value = data[f.name]
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            value_field = f.message_type.fields_by_name["value"]
            for k, v in value.items():
                if value_field.message_type is not None:
                    _fix(v, value_field.message_type)
                elif value_field.type in _INT64:
                    value[k] = int(v)
        elif f.message_type is not None:
            for item in (value if isinstance(value, list) else [value]):
                _fix(item, f.message_type)
        elif f.type in _INT64:
            data[f.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
