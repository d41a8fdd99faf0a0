"""The op registry: every op a model runs has a reference implementation and may have plugins.

An op is a name ("rms_norm", "paged_attention", ...) with a plain-PyTorch reference that defines
what is correct. A plugin is another implementation of the same op (a Triton kernel, a user's own)
that declares where it can run. The builder records in the engine's plan which implementation each
op uses; the runtime binds an ``OpTable`` from that plan, falling back to the reference where a
recorded plugin cannot run on the device at hand (``fallbacks`` lists them for the loader's warning).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

REFERENCE = "reference"

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Implementation:
    op: str
    name: str
    fn: Callable[..., Any]
    # Says whether this implementation can run on a device and dtype.
    supports: Callable[[torch.device, torch.dtype], bool]
    # Tunable configurations a tuner may time (keyword arguments of ``fn``, e.g. block sizes); the
    # first is what ``fn`` does when called without one. Empty for the reference.
    configs: tuple[dict, ...] = ()
    # Converts a weight, once at load, into the form this implementation reads (e.g. a blocked layout, a
    # packed format decoded to the compute dtype): ``prepare(weight, dtype)`` with the model's compute
    # dtype; it may return any object ``fn`` takes. None: the weight is used as the engine stores it.
    prepare: Callable[[torch.Tensor, torch.dtype], Any] | None = None
    # True when a decode step through it reads nothing from the host, so a CUDA graph can replay it.
    graph_safe: bool = False

    def with_config(self, config: dict | None) -> Callable[..., Any]:
        """``fn`` with ``config``'s entries bound as keyword arguments (``fn`` itself for none).

        Raises ValueError naming the keys that none of ``configs`` has.
        """
        if not config:
            return self.fn
        known = {key for c in self.configs for key in c}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"{self.op}:{self.name} takes no config keys {unknown}; it takes {sorted(known)}")
        return functools.partial(self.fn, **config)


@dataclass(slots=True)
class Op:
    name: str
    doc: str
    impls: dict[str, Implementation] = field(default_factory=dict)
    # The format of the weights it multiplies by (kiln.weight_formats): "float", or a packed one such as
    # "q4_k" for the ops that read packed weights; the tuner makes sample weights of this format.
    weight_format: str = "float"

    @property
    def reference(self) -> Implementation:
        return self.impls[REFERENCE]


_OPS: dict[str, Op] = {}


def _always(device: torch.device, dtype: torch.dtype) -> bool:
    return True


def reference(name: str, graph_safe: bool = True, prepare: Callable[[torch.Tensor, torch.dtype], Any] | None = None,
              weight_format: str = "float") -> Callable[[Callable], Callable]:
    """Declare ``fn`` as the reference implementation of op ``name`` (which this creates)."""

    def wrap(fn: Callable) -> Callable:
        if name in _OPS:
            raise ValueError(f"op {name!r} is already registered")
        _OPS[name] = Op(name, (fn.__doc__ or "").strip().split("\n")[0], weight_format=weight_format)
        _OPS[name].impls[REFERENCE] = Implementation(name, REFERENCE, fn, _always, prepare=prepare,
                                                     graph_safe=graph_safe)
        return fn

    return wrap


def plugin(
    op_name: str,
    impl_name: str,
    supports: Callable[[torch.device, torch.dtype], bool] = _always,
    configs: tuple[dict, ...] = (),
    prepare: Callable[[torch.Tensor, torch.dtype], Any] | None = None,
    graph_safe: bool = False,
) -> Callable[[Callable], Callable]:
    """Register ``fn`` as another implementation of an existing op."""

    def wrap(fn: Callable) -> Callable:
        op = get_op(op_name)
        if impl_name in op.impls:
            raise ValueError(f"op {op_name!r} already has an implementation named {impl_name!r}")
        op.impls[impl_name] = Implementation(op_name, impl_name, fn, supports, tuple(configs), prepare, graph_safe)
        return fn

    return wrap


def get_op(name: str) -> Op:
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; registered: {sorted(_OPS)}") from None


def all_ops() -> dict[str, Op]:
    return dict(_OPS)


class OpTable:
    """The implementations one model instance calls, bound once from a plan.

    ``table.rms_norm(x, w, eps)`` calls whichever implementation the plan chose, so layers never
    branch on devices or kernels themselves.
    """

    def __init__(self, plan: dict[str, dict] | None, device: torch.device, dtype: torch.dtype):
        self.dtype = dtype  # the compute dtype
        self.choices: dict[str, str] = {}
        self._prepare: dict[str, Callable[[torch.Tensor, torch.dtype], Any] | None] = {}
        # For each op, whether its bound implementation can be captured in a CUDA graph.
        self.graph_safe_ops: dict[str, bool] = {}
        # "op:impl" entries of the plan that cannot run here and fell back to the reference.
        self.fallbacks: list[str] = []
        for name, op in _OPS.items():
            entry = (plan or {}).get(name, {})
            impl_name = entry.get("impl", REFERENCE)
            impl = op.impls.get(impl_name)
            if impl is None or not impl.supports(device, dtype):
                if impl_name != REFERENCE:
                    self.fallbacks.append(f"{name}:{impl_name}")
                impl = op.reference
            try:
                fn = impl.with_config(entry.get("config") if impl.name == impl_name else None)
            except ValueError as e:  # a plan from another kiln version: its defaults still run
                log.warning("%s; using its default config", e)
                fn = impl.fn
            setattr(self, name, fn)
            self.choices[name] = impl.name
            self._prepare[name] = impl.prepare
            self.graph_safe_ops[name] = impl.graph_safe

    @property
    def graph_safe(self) -> bool:
        """Whether every bound implementation can be captured in a CUDA graph."""
        return all(self.graph_safe_ops.values())

    def prepare_weight(self, op: str, weight: torch.Tensor) -> Any:
        """``weight`` in the form the bound implementation of ``op`` reads."""
        prepare = self._prepare[op]
        return weight if prepare is None else prepare(weight, self.dtype)

    def __getattr__(self, name: str) -> Any:  # only reached for ops not bound above
        raise AttributeError(f"no op {name!r} in this table; registered: {sorted(_OPS)}")
