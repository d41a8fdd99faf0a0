"""Triton's logging extension: the server's log settings, read and changed while it runs (HTTP ``/v2/logging``,
gRPC ``LogSettings``), with Triton's names and types.

- ``log_info``, ``log_warning``, ``log_error`` (bool): whether the server logs messages of that severity;
- ``log_verbose_level`` (uint): above 0 the server also logs its verbose messages (every request, as
  ``kiln serve --log-verbose``);
- ``log_format`` ("default" or "ISO8601"): a line starts with its severity, or with an ISO 8601 time first;
- ``log_file`` (string): Triton writes the log to this file; kiln logs to its standard error only, and refuses
  to open a file a client names (the empty string is taken).

A change takes effect at once, for every message of the ``kiln.server`` logger. An unknown name, a value of
another type or a value out of range is refused (400 / INVALID_ARGUMENT) and changes nothing.
"""
from __future__ import annotations

import logging

from kiln.server.errors import ServerError, shown

LOGGER = "kiln.server"
KINDS = {"log_file": str, "log_info": bool, "log_warning": bool, "log_error": bool, "log_verbose_level": int,
         "log_format": str}
FORMATS = {"default": "%(levelname)s %(message)s", "ISO8601": "%(asctime)s %(levelname)s %(message)s"}


class LogSettings:
    def __init__(self, verbose: int = 0):
        self.values: dict[str, object] = {"log_file": "", "log_info": True, "log_warning": True, "log_error": True,
                                          "log_verbose_level": max(int(verbose), 0), "log_format": "default"}
        self._filter = _SeverityFilter(self)
        logging.getLogger(LOGGER).addFilter(self._filter)
        self._set_level()

    def close(self) -> None:
        logging.getLogger(LOGGER).removeFilter(self._filter)

    def update(self, changes: dict[str, object]) -> dict[str, object]:
        """Apply ``changes`` (all or none) and return every setting."""
        for name, value in changes.items():
            kind = KINDS.get(name)
            if kind is None:
                raise ServerError.invalid(f"unknown log setting '{shown(name)}' (the settings are "
                                          f"{', '.join(KINDS)})")
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ServerError.invalid(f"log setting '{name}' must be a {kind.__name__}, got {value!r}")
        if changes.get("log_file"):
            raise ServerError.invalid("kiln logs to its standard error; it opens no log file a client names "
                                      "(log_file must be empty)")
        if "log_format" in changes and changes["log_format"] not in FORMATS:
            raise ServerError.invalid(f"log_format must be one of {', '.join(FORMATS)}, got "
                                      f"'{shown(str(changes['log_format']))}'")
        if "log_verbose_level" in changes and not 0 <= changes["log_verbose_level"] < 2**32:
            raise ServerError.invalid("log_verbose_level must be an unsigned 32-bit integer")
        self.values.update(changes)
        self._set_level()
        if "log_format" in changes:  # (at start the handlers keep the CLI's format, which is "default")
            formatter = logging.Formatter(FORMATS[str(self.values["log_format"])])
            for handler in logging.getLogger().handlers:
                handler.setFormatter(formatter)
        return dict(self.values)

    @property
    def verbose(self) -> bool:
        return bool(self.values["log_verbose_level"])

    def allows(self, levelno: int) -> bool:
        v = self.values
        if levelno >= logging.ERROR:
            return bool(v["log_error"])
        if levelno >= logging.WARNING:
            return bool(v["log_warning"])
        if levelno >= logging.INFO:
            return bool(v["log_info"])
        return self.verbose

    def _set_level(self) -> None:
        logging.getLogger(LOGGER).setLevel(logging.DEBUG if self.verbose else logging.INFO)


class _SeverityFilter(logging.Filter):
    def __init__(self, settings: LogSettings):
        super().__init__()
        self.settings = settings

    def filter(self, record: logging.LogRecord) -> bool:
        return self.settings.allows(record.levelno)
