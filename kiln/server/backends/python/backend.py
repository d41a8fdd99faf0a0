"""The ``python`` backend's model: ``model.py`` with Triton's ``TritonPythonModel``, one process per instance.

``auto_complete_config``, when the model defines it, runs in a short-lived process of its own before the
config is checked (as in Triton, nothing it creates survives into ``initialize``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from kiln.server import config as cfg
from kiln.server.backends.base import Backend, InstanceSpec
from kiln.server.backends.python.instance import PythonInstance
from kiln.server.backends.python.process import StubProcess
from kiln.server.errors import ServerError
from kiln.server.protocols.proto_json import to_json

log = logging.getLogger("kiln.server")

AUTO_COMPLETE_TIMEOUT = 60.0


class PythonBackend(Backend):
    name = "python"
    default_model_filename = "model.py"

    @classmethod
    def complete_config(cls, config: cfg.ModelConfig, version_dir: Path) -> None:
        super().complete_config(config, version_dir)
        path = cls.model_path(config, version_dir)
        if not path.is_file():
            raise ServerError.invalid(f"Python model file not found in '{path}'")
        try:
            source = path.read_text(errors="replace")
        except OSError as e:
            raise ServerError.invalid(f"cannot read {path}: {e.strerror}") from None
        if "auto_complete_config" in source:  # only then is a process worth starting
            _auto_complete(config, path)

    def create_instance(self, spec: InstanceSpec) -> PythonInstance:
        return PythonInstance(spec, self.context, self.model_file())


def _auto_complete(config: cfg.ModelConfig, path: Path) -> None:
    label = f"model '{config.name}' (auto_complete_config)"
    process = StubProcess(label, ring_bytes=0)  # no tensors: no shared memory
    try:
        reply = process.request({"op": "auto_complete", "name": config.name, "version_dir": str(path.parent),
                                 "model_file": path.name, "decoupled": False,
                                 "config": json.dumps(to_json(config, defaults=True))}, "auto_complete_done")
    except (EOFError, OSError):
        status = process.exit_status()
        process.kill()
        raise ServerError.invalid(f"the Python process of {label} ended before it answered ({status})") from None
    process.stop(AUTO_COMPLETE_TIMEOUT)
    if reply["error"] is not None:
        log.error("auto_complete_config of model '%s' failed:\n%s", config.name, reply.get("traceback") or "")
        raise ServerError.invalid(f"auto_complete_config of model '{config.name}' failed: {reply['error']}")
    completed = cfg.parse_json(reply["config"])
    config.CopyFrom(completed)
