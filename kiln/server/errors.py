"""The server's one error type: a code and a message a user can read.

Errors are data. Everything below the protocols raises :class:`ServerError`; each protocol adapter maps
its :class:`Code` to its own status (HTTP status, gRPC status code) and puts the message in its body, so
HTTP and gRPC report the same failure the same way. The codes are Triton's (``TRITONSERVER_Error_Code``)
and so are the mappings.
"""
from __future__ import annotations

import enum

from kiln.errors import KilnError


class Code(enum.Enum):
    # value: (HTTP status, gRPC status code name), as Triton maps them.
    UNKNOWN = (400, "UNKNOWN")
    INTERNAL = (500, "INTERNAL")
    NOT_FOUND = (404, "NOT_FOUND")
    INVALID_ARG = (400, "INVALID_ARGUMENT")
    UNAVAILABLE = (503, "UNAVAILABLE")
    UNSUPPORTED = (501, "UNIMPLEMENTED")
    ALREADY_EXISTS = (400, "ALREADY_EXISTS")
    CANCELLED = (400, "CANCELLED")
    # kiln's, for the edge (Triton answers these outside its error codes): no or a wrong key, a key that
    # does not open this API, a body or message over the server's limit.
    UNAUTHENTICATED = (401, "UNAUTHENTICATED")
    PERMISSION_DENIED = (403, "PERMISSION_DENIED")
    TOO_LARGE = (413, "RESOURCE_EXHAUSTED")
    REQUEST_TIMEOUT = (408, "DEADLINE_EXCEEDED")

    @property
    def http_status(self) -> int:
        return self.value[0]

    @property
    def grpc_name(self) -> str:
        return self.value[1]


class ServerError(KilnError):
    """A request, model or repository operation that cannot be done as asked."""

    def __init__(self, code: Code, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def invalid(cls, message: str) -> "ServerError":
        return cls(Code.INVALID_ARG, message)

    @classmethod
    def not_found(cls, message: str) -> "ServerError":
        return cls(Code.NOT_FOUND, message)

    @classmethod
    def unavailable(cls, message: str) -> "ServerError":
        return cls(Code.UNAVAILABLE, message)

    @classmethod
    def internal(cls, message: str) -> "ServerError":
        return cls(Code.INTERNAL, message)

    @classmethod
    def unsupported(cls, message: str) -> "ServerError":
        return cls(Code.UNSUPPORTED, message)


def shown(text: str, limit: int = 64) -> str:
    """A name a client sent, as an error message shows it: at most ``limit`` characters, with control
    characters and lone surrogates escaped (so the message is printable and encodes as UTF-8)."""
    escaped = "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                      for c in text[:limit])
    return escaped + ("..." if len(text) > limit else "")
