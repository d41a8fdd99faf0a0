"""Checking the JSON documents kiln reads (engine.json, a checkpoint's config.json, a Hugging Face
config.json, a safetensors header) against a small schema, with errors that name the key path:
``build.max_seq_len is missing``, ``model.num_layers must be an integer, got "3"``.

A schema is a tree of ``Spec`` objects; ``record_of`` derives one from a dataclass's fields so that
a config class stays the only owner of its keys and their types.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import KilnError

_MAX_PROBLEMS = 8


class Spec:
    what = "a value"

    def check(self, value: Any, path: str, problems: list[str]) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Scalar(Spec):
    types: tuple[type, ...]
    what: str

    def check(self, value: Any, path: str, problems: list[str]) -> None:
        # NOTE: JSON true/false are Python bools, which are also ints; an integer field must not take them.
        if not isinstance(value, self.types) or (isinstance(value, bool) and bool not in self.types):
            problems.append(f"{_name(path)} must be {self.what}, got {_show(value)}")


INT = Scalar((int,), "an integer")
NUMBER = Scalar((int, float), "a number")
BOOL = Scalar((bool,), "true or false")
STR = Scalar((str,), "a string")


@dataclass(frozen=True)
class AtLeast(Spec):
    inner: Spec
    minimum: int | float

    @property
    def what(self) -> str:
        return f"{self.inner.what} of at least {self.minimum}"

    def check(self, value: Any, path: str, problems: list[str]) -> None:
        found: list[str] = []
        self.inner.check(value, path, found)
        if found:
            problems.extend(found)
        elif value < self.minimum:
            problems.append(f"{_name(path)} must be at least {self.minimum}, got {_show(value)}")


COUNT = AtLeast(INT, 1)


class Anything(Spec):
    def check(self, value: Any, path: str, problems: list[str]) -> None:
        pass


ANY = Anything()


@dataclass(frozen=True)
class Nullable(Spec):
    inner: Spec

    @property
    def what(self) -> str:
        return f"{self.inner.what} or null"

    def check(self, value: Any, path: str, problems: list[str]) -> None:
        if value is not None:
            self.inner.check(value, path, problems)


@dataclass(frozen=True)
class AnyOf(Spec):
    options: tuple[Spec, ...]
    described: str = ""  # what the message says a value must be (default: each option's kind, joined by "or")

    @property
    def what(self) -> str:
        return self.described or " or ".join(o.what for o in self.options)

    def check(self, value: Any, path: str, problems: list[str]) -> None:
        for option in self.options:
            found: list[str] = []
            option.check(value, path, found)
            if not found:
                return
        problems.append(f"{_name(path)} must be {self.what}, got {_show(value)}")


@dataclass(frozen=True)
class ListOf(Spec):
    item: Spec

    @property
    def what(self) -> str:
        return "a list"

    def check(self, value: Any, path: str, problems: list[str]) -> None:
        if not isinstance(value, list):
            problems.append(f"{_name(path)} must be a list, got {_show(value)}")
            return
        for i, item in enumerate(value):
            self.item.check(item, f"{path}[{i}]", problems)


@dataclass(frozen=True)
class DictOf(Spec):
    value: Spec = ANY

    @property
    def what(self) -> str:
        return "an object"

    def check(self, value: Any, path: str, problems: list[str]) -> None:
        if not isinstance(value, dict):
            problems.append(f"{_name(path)} must be an object, got {_show(value)}")
            return
        for key, item in value.items():
            self.value.check(item, _join(path, key), problems)


@dataclass(frozen=True)
class Record(Spec):
    """An object with known keys; ``closed`` refuses keys it does not list."""

    required: dict[str, Spec]
    optional: dict[str, Spec] = field(default_factory=dict)
    closed: bool = False

    @property
    def what(self) -> str:
        return "an object"

    def check(self, value: Any, path: str, problems: list[str]) -> None:
        if not isinstance(value, dict):
            problems.append(f"{_name(path)} must be an object, got {_show(value)}")
            return
        for key, spec in self.required.items():
            if key not in value:
                problems.append(f"{_join(path, key)} is missing")
            else:
                spec.check(value[key], _join(path, key), problems)
        for key, spec in self.optional.items():
            if key in value:
                spec.check(value[key], _join(path, key), problems)
        if self.closed:
            for key in value:
                if key not in self.required and key not in self.optional:
                    problems.append(f"{_join(path, key)} is not a known key")


def record_of(cls: type, all_required: bool = False) -> Record:
    """The schema of a dataclass's fields as a closed record, from their type hints.

    With ``all_required`` a field's default does not make its key optional: a document written by
    kiln has every key, and a missing one must not be silently replaced by today's default.
    """
    hints = typing.get_type_hints(cls)
    required: dict[str, Spec] = {}
    optional: dict[str, Spec] = {}
    for f in dataclasses.fields(cls):
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        (optional if has_default and not all_required else required)[f.name] = _spec_of(hints[f.name], cls)
    return Record(required, optional, closed=True)


def _spec_of(hint: Any, owner: type) -> Spec:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = _spec_of(rest[0], owner) if len(rest) == 1 else AnyOf(tuple(_spec_of(a, owner) for a in rest))
        return Nullable(inner) if len(rest) < len(args) else inner
    if hint is bool:
        return BOOL
    if hint is int:
        return INT
    if hint is float:
        return NUMBER
    if hint is str:
        return STR
    if hint is dict or origin is dict:
        return DictOf(_spec_of(args[1], owner) if args else ANY)
    if origin in (list, tuple) or hint in (list, tuple):
        return ListOf(_spec_of(args[0], owner) if args else ANY)
    raise TypeError(f"{owner.__name__}: no JSON schema for type {hint!r}")


def validate(document: Any, spec: Spec, where: str, error: type[KilnError]) -> None:
    """Raise ``error`` listing what in ``document`` does not fit ``spec`` (``where`` names the file)."""
    problems: list[str] = []
    spec.check(document, "", problems)
    if problems:
        more = f" (and {len(problems) - _MAX_PROBLEMS} more)" if len(problems) > _MAX_PROBLEMS else ""
        raise error(f"{where}: " + "; ".join(problems[:_MAX_PROBLEMS]) + more)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _name(path: str) -> str:
    return path or "the document"


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= 40 else text[:37] + "..."
