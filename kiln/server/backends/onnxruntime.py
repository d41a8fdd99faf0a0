"""The ``onnxruntime`` backend: ``model.onnx`` run by ONNX Runtime, one session per instance.

As Triton's: ``platform: "onnxruntime_onnx"``; parameters ``intra_op_thread_count`` and
``inter_op_thread_count``; KIND_GPU runs on the CUDA execution provider when ONNX Runtime has it. A
config without inputs and outputs is completed from the model; with neither ``max_batch_size`` nor
inputs given, a model whose every input and output has a variable first dimension gets
``max_batch_size: 4`` and the dynamic batcher (Triton's default-max-batch-size).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kiln.server import config as cfg
from kiln.server.backends.base import Backend, InstanceSpec, ModelContext
from kiln.server.backends.tensor import TensorInstance
from kiln.server.devices import cuda_devices
from kiln.server.errors import ServerError

DEFAULT_MAX_BATCH_SIZE = 4
_ORT_TYPES = {
    "tensor(bool)": cfg.mc.TYPE_BOOL, "tensor(uint8)": cfg.mc.TYPE_UINT8, "tensor(uint16)": cfg.mc.TYPE_UINT16,
    "tensor(uint32)": cfg.mc.TYPE_UINT32, "tensor(uint64)": cfg.mc.TYPE_UINT64, "tensor(int8)": cfg.mc.TYPE_INT8,
    "tensor(int16)": cfg.mc.TYPE_INT16, "tensor(int32)": cfg.mc.TYPE_INT32, "tensor(int64)": cfg.mc.TYPE_INT64,
    "tensor(float16)": cfg.mc.TYPE_FP16, "tensor(float)": cfg.mc.TYPE_FP32, "tensor(double)": cfg.mc.TYPE_FP64,
    "tensor(bfloat16)": cfg.mc.TYPE_BF16, "tensor(string)": cfg.mc.TYPE_STRING,
}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    platforms = ("onnxruntime_onnx",)
    default_model_filename = "model.onnx"
    default_cpu_instance_count = 2  # Triton's default for onnxruntime KIND_CPU groups

    @classmethod
    def gpus(cls) -> list[int]:
        import onnxruntime as ort

        return list(cuda_devices()) if "CUDAExecutionProvider" in ort.get_available_providers() else []

    @classmethod
    def complete_config(cls, config: cfg.ModelConfig, version_dir: Path) -> None:
        super().complete_config(config, version_dir)
        if config.input and config.output:
            return
        import onnxruntime as ort

        path = cls.model_path(config, version_dir)
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ServerError.invalid(f"ONNX Runtime cannot read {path}: {e}") from None
        ios = {"input": session.get_inputs(), "output": session.get_outputs()}
        batchable = all(io.shape and not isinstance(io.shape[0], int) for v in ios.values() for io in v)
        if not config.input and not config.output and config.max_batch_size == 0 and batchable:
            config.max_batch_size = DEFAULT_MAX_BATCH_SIZE
            config.dynamic_batching.SetInParent()
        skip = 1 if config.max_batch_size > 0 else 0
        for kind, field in (("input", config.input), ("output", config.output)):
            if len(field):
                continue
            for io in ios[kind]:
                if io.type not in _ORT_TYPES:
                    raise ServerError.invalid(f"{kind} '{io.name}' of {path} has unsupported type {io.type}")
                dims = [d if isinstance(d, int) and d >= 0 else cfg.WILDCARD for d in io.shape[skip:]]
                field.add(name=io.name, data_type=_ORT_TYPES[io.type], dims=dims or [1])

    def create_instance(self, spec: InstanceSpec) -> OnnxRuntimeInstance:
        return OnnxRuntimeInstance(spec, self.context, self.model_file())


class OnnxRuntimeInstance(TensorInstance):
    def __init__(self, spec: InstanceSpec, context: ModelContext, path: Path):
        import onnxruntime as ort

        super().__init__(spec, context.config)
        options = ort.SessionOptions()
        params = context.parameters
        for key, attr in (("intra_op_thread_count", "intra_op_num_threads"),
                          ("inter_op_thread_count", "inter_op_num_threads")):
            if params.get(key):
                setattr(options, attr, int(params[key]))
        providers: list = ["CPUExecutionProvider"]
        if spec.kind == "gpu":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": spec.device_id}))
        if not path.is_file():
            raise ServerError.invalid(f"model file {path} of '{context.name}' does not exist")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:
            raise ServerError.invalid(f"ONNX Runtime cannot load {path}: {e}") from None
        self._strings = {io.name for io in self.session.get_inputs() if io.type == "tensor(string)"}

    def compute(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        feeds = {n: _to_text(n, a, self.config.name) if n in self._strings else a for n, a in inputs.items()}
        try:
            results = self.session.run(output_names, feeds)
        except Exception as e:
            raise ServerError.internal(f"onnxruntime failed to run model '{self.config.name}': {e}") from None
        return {n: _from_text(r) if r.dtype == object else r for n, r in zip(output_names, results)}

    def close(self) -> None:
        super().close()
        self.session = None


def _to_text(name: str, array: np.ndarray, model: str) -> np.ndarray:
    # ONNX Runtime's string tensors take str; BYTES arrive as bytes.
    try:
        return np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(array) if array.size else array
    except UnicodeDecodeError:
        raise ServerError.invalid(
            f"input '{name}' for model '{model}' holds bytes that are not UTF-8; ONNX Runtime string "
            "tensors hold text") from None


def _from_text(array: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda s: s.encode("utf-8") if isinstance(s, str) else s, otypes=[object])(array) \
        if array.size else array
