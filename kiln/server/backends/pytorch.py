"""The ``pytorch`` backend: a TorchScript ``model.pt`` (``torch.jit.save``), one copy per instance.

As Triton's: ``platform: "pytorch_libtorch"``. Inputs named ``<name>__<index>`` (``INPUT__0``) are
passed to ``forward`` by that index, other names by ``forward``'s argument names; outputs named
``<name>__<index>`` (``OUTPUT__0``) take that element of the returned tuple (or the tensor itself),
other names are taken in config order. BYTES inputs are passed as ``List[str]`` and ``List[str]``
outputs returned as BYTES. Parameter ``INFERENCE_MODE`` (default true) runs under
``torch.inference_mode``, otherwise ``torch.no_grad``. The config must list the inputs and outputs:
TorchScript does not carry their types and shapes.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from kiln.server import config as cfg
from kiln.server.backends.base import Backend, InstanceSpec, ModelContext
from kiln.server.backends.tensor import TensorInstance
from kiln.server.errors import ServerError

_INDEXED = re.compile(r"^.+__(\d+)$")


class PyTorchBackend(Backend):
    name = "pytorch"
    platforms = ("pytorch_libtorch",)
    default_model_filename = "model.pt"

    @classmethod
    def complete_config(cls, config: cfg.ModelConfig, version_dir: Path) -> None:
        super().complete_config(config, version_dir)
        if not config.input or not config.output:
            raise ServerError.invalid(
                f"model '{config.name}' (pytorch) must list its inputs and outputs in config.pbtxt: "
                "TorchScript does not record their types and shapes")

    def create_instance(self, spec: InstanceSpec) -> PyTorchInstance:
        return PyTorchInstance(spec, self.context, self.model_file())


class PyTorchInstance(TensorInstance):
    def __init__(self, spec: InstanceSpec, context: ModelContext, path: Path):
        import torch

        super().__init__(spec, context.config)
        self.device = torch.device("cuda", spec.device_id) if spec.kind == "gpu" else torch.device("cpu")
        if not path.is_file():
            raise ServerError.invalid(f"model file {path} of '{context.name}' does not exist")
        try:
            self.module = torch.jit.load(str(path), map_location=self.device).eval()
        except Exception as e:
            raise ServerError.invalid(f"torch.jit.load cannot load {path}: {e}") from None
        self.inference_mode = context.parameters.get("INFERENCE_MODE", "true").lower() in ("true", "1", "yes")
        self._input_slots = self._map_inputs(context.config)
        self._output_slots = {o.name: _index(o.name, i) for i, o in enumerate(context.config.output)}

    def _map_inputs(self, config: cfg.ModelConfig) -> dict[str, int]:
        names = [io.name for io in config.input]
        if all(_INDEXED.match(n) for n in names):
            return {n: int(_INDEXED.match(n).group(1)) for n in names}
        args = [a.name for a in self.module.forward.schema.arguments][1:]  # drop self
        missing = [n for n in names if n not in args]
        if missing:
            raise ServerError.invalid(
                f"input(s) {missing} of model '{config.name}' are neither named <name>__<index> nor arguments "
                f"of forward({', '.join(args)})")
        return {n: args.index(n) for n in names}

    def compute(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        import torch

        args: list = [None] * (max(self._input_slots.values(), default=-1) + 1)
        for name, array in inputs.items():
            args[self._input_slots[name]] = _to_torch(array, self.device)
        try:
            with torch.inference_mode() if self.inference_mode else torch.no_grad():
                result = self.module(*args)
        except Exception as e:
            raise ServerError.internal(f"model '{self.config.name}' (pytorch) failed: {e}") from None
        results = list(result) if isinstance(result, (tuple, list)) and not _is_str_list(result) else [result]
        out = {}
        for name in output_names:
            slot = self._output_slots[name]
            if slot >= len(results):
                raise ServerError.internal(
                    f"model '{self.config.name}' returned {len(results)} output(s); output '{name}' needs "
                    f"index {slot}")
            out[name] = _to_numpy(results[slot])
        return out

    def close(self) -> None:
        super().close()
        self.module = None
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


def _index(name: str, position: int) -> int:
    m = _INDEXED.match(name)
    return int(m.group(1)) if m else position


def _is_str_list(x) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) for s in x) and len(x) > 0


def _to_torch(array: np.ndarray, device):
    import torch

    if array.dtype == object:
        return [b.decode("utf-8", errors="replace") for b in array.reshape(-1)]
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16).to(device)
    return torch.from_numpy(np.array(array)).to(device)  # a writable copy: wire buffers are read-only


def _to_numpy(value) -> np.ndarray:
    import ml_dtypes
    import torch

    if isinstance(value, list):
        return np.array([s.encode("utf-8") if isinstance(s, str) else s for s in value], dtype=object)
    if not isinstance(value, torch.Tensor):
        raise ServerError.internal(f"a pytorch model returned {type(value).__name__}, not a tensor")
    t = value.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
