"""Triton's trace extension: which requests are traced, set for the server and per model while it runs (HTTP
``/v2/trace/setting`` and ``/v2/models/NAME/trace/setting``, gRPC ``TraceSetting``), and the traces written in
Triton's JSON shape.

Settings (Triton's names; values are strings, ``trace_level`` a list): ``trace_level`` (``OFF``, or
``TIMESTAMPS``; ``TENSORS`` is refused: kiln records no tensors), ``trace_rate`` (trace one request in this many),
``trace_count`` (stop after this many traces; -1: no limit), ``log_frequency`` (write the traces to a new file
``TRACE_FILE.N`` every this many; 0: one file, ``TRACE_FILE``, when the server stops), ``trace_file`` and
``trace_mode`` (``triton``). A model's setting overrides the server's until it is cleared (set to null); a
cleared server setting takes its value at start. kiln writes traces only to the file the operator named at
start (``kiln serve --trace-file``): a client may not name a path, so ``trace_file`` is refused unless it is that
file; without one, tracing cannot be turned on.

A trace is two objects of the file's JSON list, as Triton writes them: ``{"id", "model_name", "model_version",
"request_id"}`` and ``{"id", "timestamps": [{"name", "ns"}, ...]}`` with REQUEST_START, QUEUE_START,
COMPUTE_START, COMPUTE_INPUT_END, COMPUTE_OUTPUT_START, COMPUTE_END and REQUEST_END (monotonic nanoseconds).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from kiln.server.core import InferenceRequest
from kiln.server.errors import ServerError, shown

NAMES = ("trace_file", "trace_level", "trace_rate", "trace_count", "log_frequency", "trace_mode")
LEVELS = ("OFF", "TIMESTAMPS")
MAX_BUFFERED = 100_000  # log_frequency 0 keeps traces until the server stops: at most this many


class TraceSettings:
    def __init__(self, trace_file: Path | None = None):
        self.file = trace_file
        self.defaults = {"trace_file": str(trace_file or ""), "trace_level": ["OFF"], "trace_rate": "1000",
                         "trace_count": "-1", "log_frequency": "0", "trace_mode": "triton"}
        self.server = dict(self.defaults)
        self.models: dict[str, dict] = {}
        self._seen: dict[str, int] = {}  # requests admitted per model, for trace_rate
        self._traced = 0  # traces taken since trace_count was last set
        self._next_id = 1
        self._buffer: list[dict] = []
        self._files_written = 0

    # -- settings ------------------------------------------------------------------------------------

    def get(self, model: str | None = None) -> dict:
        return {**self.server, **(self.models.get(model, {}) if model else {})}

    def update(self, changes: dict, model: str | None = None) -> dict:
        """Apply ``changes`` (all or none; a null value clears the setting) and return the settings in force."""
        checked = {name: self._check(name, value) for name, value in changes.items()}
        target = self.models.setdefault(model, {}) if model else self.server
        for name, value in checked.items():
            if value is None:
                if model:
                    target.pop(name, None)
                else:
                    target[name] = self.defaults[name]
            else:
                target[name] = value
        if "trace_count" in checked:
            self._traced = 0
        if model and not target:
            self.models.pop(model, None)
        return self.get(model)

    def _check(self, name: str, value):
        if name not in NAMES:
            raise ServerError.invalid(f"unknown trace setting '{shown(str(name))}' (the settings are "
                                      f"{', '.join(NAMES)})")
        if value is None:
            return None
        if name == "trace_level":
            levels = value if isinstance(value, list) else [value]
            if not levels or not all(isinstance(v, str) for v in levels):
                raise ServerError.invalid("trace_level must be a list of levels (OFF, TIMESTAMPS)")
            bad = [v for v in levels if v not in LEVELS]
            if bad:
                raise ServerError.invalid(f"trace_level {shown(str(bad))} is not one kiln records (OFF, TIMESTAMPS: "
                                          "kiln keeps no tensors)")
            if "OFF" in levels and len(levels) > 1:
                raise ServerError.invalid("trace_level OFF goes alone")
            if levels != ["OFF"] and self.file is None:
                raise ServerError.invalid("tracing needs a trace file, which the server is started with "
                                          "(kiln serve --trace-file PATH)")
            return levels
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, str):
            raise ServerError.invalid(f"trace setting '{name}' must be a string, got {shown(repr(value))}")
        if name == "trace_file":
            if value not in ("", str(self.file or "")):
                raise ServerError.invalid("kiln writes traces only to the file it was started with (--trace-file); "
                                          "it opens no file a client names")
            return str(self.file or "")
        if name == "trace_mode":
            if value != "triton":
                raise ServerError.invalid("trace_mode must be 'triton' (kiln does not export OpenTelemetry)")
            return value
        low = {"trace_rate": 1, "trace_count": -1, "log_frequency": 0}[name]
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < low or number >= 2**31:
            raise ServerError.invalid(f"trace setting '{name}' must be an integer >= {low}, got '{shown(value)}'")
        return str(number)

    # -- tracing -------------------------------------------------------------------------------------

    def sample(self, model: str) -> bool:
        """Whether the request just admitted to ``model`` is traced."""
        settings = self.get(model)
        if settings["trace_level"] == ["OFF"] or self.file is None:
            return False
        count = int(settings["trace_count"])
        if count != -1 and self._traced >= count:
            return False
        seen = self._seen[model] = self._seen.get(model, 0) + 1
        if (seen - 1) % int(settings["trace_rate"]):
            return False
        self._traced += 1
        return True

    def record(self, request: InferenceRequest) -> None:
        """Add a traced request's timestamps (once it has its final response)."""
        trace_id, self._next_id = self._next_id, self._next_id + 1
        stamps = [("REQUEST_START", request.received_ns), ("QUEUE_START", request.queued_ns)]
        end = request.compute_end_ns
        if end:
            start = request.queued_ns + request.queue_ns
            times = request.compute
            input_end = min(start + times.input_ns, end) if times is not None else start
            output_start = max(input_end, end - times.output_ns) if times is not None else end
            stamps += [("COMPUTE_START", start), ("COMPUTE_INPUT_END", input_end),
                       ("COMPUTE_OUTPUT_START", output_start), ("COMPUTE_END", end)]
        # The request is released once it has its final response and its execution has returned.
        stamps.append(("REQUEST_END", max(request.final_ns, end)))
        self._buffer += [{"id": trace_id, "model_name": request.model_name, "model_version": request.model_version,
                          "request_id": request.id},
                         {"id": trace_id, "timestamps": [{"name": n, "ns": ns} for n, ns in stamps if ns]}]
        frequency = int(self.get(request.model_name)["log_frequency"])
        if frequency and len(self._buffer) >= 2 * frequency:
            self.flush()
        elif not frequency and len(self._buffer) > 2 * MAX_BUFFERED:
            del self._buffer[:2]

    def flush(self, closing: bool = False) -> None:
        """Write the traces kept: to ``FILE.N`` (``log_frequency`` > 0), or to ``FILE`` when the server stops."""
        if self.file is None or not self._buffer:
            return
        if closing and not self._files_written:
            path = self.file
        else:
            path = self.file.with_name(f"{self.file.name}.{self._files_written}")
            self._files_written += 1
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(self._buffer))
        os.replace(tmp, path)
        self._buffer = []
