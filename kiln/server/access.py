"""Who may call which API: Triton's API groups, the server's key, restricted APIs, and browsers.

Every HTTP route and gRPC method belongs to one group, Triton's (``health``, ``metadata``, ``inference``,
``shared-memory``, ``model-config``, ``model-repository``, ``statistics``, ``trace``, ``logging``) or
kiln's ``metrics`` (the metrics page); the OpenAI routes are ``inference`` and ``metadata`` (the model
list). HTTP and gRPC keep the same rules:

- A group named by a restriction (``--restricted-api GROUPS:KEY=VALUE``, Triton's
  ``--http-restricted-api`` and ``--grpc-restricted-protocol`` in one flag) needs the header (HTTP) or
  metadata entry (gRPC; also as ``triton-grpc-protocol-KEY``, as Triton's gRPC endpoint takes it)
  ``KEY: VALUE``; else 403 / ``PERMISSION_DENIED``. So the control plane
  (``model-repository``, ``shared-memory``) can have a key of its own.
- Any other group but ``health``, when the server has an API key (``--api-key``), needs
  ``Authorization: Bearer KEY``; else 401 / ``UNAUTHENTICATED``. Health stays open for probes.
- Without either, a group is open, as in Triton.

Browsers: an HTTP request that carries an ``Origin`` header (every cross-site ``fetch`` and form post
does) is refused with 403 unless that origin is allowed (``--allowed-origins``, which also answers
CORS preflights), or it is the server's own origin reached by an IP address or ``localhost`` (a name
could be an attacker's, rebound to this machine). So a web page in the operator's browser cannot
load a model, register shared memory or run inference, keyed or not. (The body's Content-Type is not
what decides: ``curl -d`` and Python's urllib send JSON as a form type, and browsers send an
``Origin`` whatever the type. A body must be a JSON object, whatever its Content-Type says.)
"""
from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kiln.server.errors import Code, ServerError, shown

HEALTH, METADATA, INFERENCE, SHARED_MEMORY = "health", "metadata", "inference", "shared-memory"
MODEL_CONFIG, MODEL_REPOSITORY, STATISTICS = "model-config", "model-repository", "statistics"
TRACE, LOGGING, METRICS = "trace", "logging", "metrics"
GRPC_KEY_PREFIX = "triton-grpc-protocol-"
GROUPS = (HEALTH, METADATA, INFERENCE, SHARED_MEMORY, MODEL_CONFIG, MODEL_REPOSITORY, STATISTICS, TRACE, LOGGING,
          METRICS)


@dataclass(frozen=True, slots=True)
class Restriction:
    groups: frozenset[str]
    key: str  # lower case: HTTP headers and gRPC metadata keys are case-insensitive
    value: str

    @classmethod
    def parse(cls, text: str) -> Restriction:
        """``GROUP[,GROUP...]:KEY=VALUE``, as Triton's ``--http-restricted-api`` takes it."""
        groups, sep, rest = text.partition(":")
        key, eq, value = rest.partition("=")
        names = [g.strip() for g in groups.split(",") if g.strip()]
        if not sep or not eq or not names or not key.strip() or not value:
            raise ValueError(f"'{text}' is not GROUP[,GROUP...]:KEY=VALUE (for example "
                             "model-repository,shared-memory:admin-key=SECRET)")
        unknown = [g for g in names if g not in GROUPS]
        if unknown:
            raise ValueError(f"unknown API group(s) {', '.join(unknown)} in '{text}'; the groups are "
                             f"{', '.join(GROUPS)}")
        return cls(frozenset(names), key.strip().lower(), value)


class AccessPolicy:
    def __init__(self, api_key: str | None = None, restrictions: Iterable[Restriction] = (),
                 allowed_origins: Iterable[str] = ()):
        self.api_key = api_key or None
        self.restrictions: dict[str, Restriction] = {}
        for r in restrictions:
            for group in r.groups:
                if group in self.restrictions:
                    raise ValueError(f"API group '{group}' is restricted twice")
                self.restrictions[group] = r
        self.allowed_origins = frozenset(o.rstrip("/") for o in allowed_origins)

    def check(self, group: str, header: Callable[[str], str | None], grpc: bool = False) -> None:
        """Raise unless the request, whose header (or gRPC metadata) ``header(name)`` returns, may call ``group``."""
        restriction = self.restrictions.get(group)
        if restriction is not None:
            # gRPC clients of Triton send the key with the prefix Triton's gRPC endpoint asks for.
            given = header(restriction.key)
            if given is None and grpc:
                given = header(GRPC_KEY_PREFIX + restriction.key)
            if not _same(given, restriction.value):
                raise ServerError(Code.PERMISSION_DENIED, f"This {'protocol' if grpc else 'API'} is restricted, "
                                                          f"expecting header '{restriction.key}'")
        elif self.api_key is not None and group != HEALTH:
            if not _same(header("authorization"), f"Bearer {self.api_key}"):
                raise ServerError(Code.UNAUTHENTICATED,
                                  "Incorrect API key provided: send it as 'Authorization: Bearer <key>'")

    def check_origin(self, origin: str | None, scheme: str, host: str | None) -> None:
        """Raise for a browser request (one with an ``Origin``) from anywhere but an allowed origin."""
        if origin is None or "*" in self.allowed_origins or origin.rstrip("/") in self.allowed_origins:
            return
        if host is not None and origin == f"{scheme}://{host}" and _is_local_name(host):
            return
        raise ServerError(Code.PERMISSION_DENIED,
                          f"cross-origin request from '{shown(origin)}' refused: a web page may call this server "
                          "only from an origin the server allows (kiln serve --allowed-origins)")


def guard_http(policy: AccessPolicy, group: str, endpoint):
    """A Starlette endpoint that checks the request's access to ``group`` before ``endpoint`` runs."""

    async def guarded(request):
        policy.check(group, request.headers.get)
        return await endpoint(request)

    return guarded


def _same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


def _is_local_name(host: str) -> bool:
    """A Host header naming an IP address or localhost: a name no attacker's DNS can rebind."""
    if host.startswith("["):  # [IPv6]:port
        name = host[1:host.find("]")] if "]" in host else host
    else:
        name = host.split(":")[0] if host.count(":") == 1 else host
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
