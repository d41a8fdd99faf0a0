"""What the tensor-in, tensor-out backends (onnxruntime, pytorch) share: run a batch of requests as
one model call on the instance's thread, then split the outputs back per request."""
from __future__ import annotations

import time
from abc import abstractmethod

import numpy as np

from kiln.server.backends.base import InstanceSpec, ModelInstance
from kiln.server.config import ModelConfig
from kiln.server.core import InferenceRequest
from kiln.server.errors import ServerError
from kiln.server.stats import ComputeTimes


class TensorInstance(ModelInstance):
    def __init__(self, spec: InstanceSpec, config: ModelConfig):
        super().__init__(spec)
        self.config = config
        self._output_order = [o.name for o in config.output]

    @abstractmethod
    def compute(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        """Run the model once (on the instance's thread)."""

    async def execute(self, requests: list[InferenceRequest]) -> ComputeTimes:
        return await self.run_blocking(self._execute, requests)

    def _execute(self, requests: list[InferenceRequest]) -> ComputeTimes:
        t0 = time.monotonic_ns()
        if len(requests) == 1:
            inputs = {n: t.data for n, t in requests[0].inputs.items()}
        else:
            inputs = {n: np.concatenate([r.inputs[n].data for r in requests]) for n in requests[0].inputs}
        wanted = {n for r in requests for n in r.output_names}
        names = [n for n in self._output_order if n in wanted]
        t1 = time.monotonic_ns()
        outputs = self.compute(inputs, names)
        t2 = time.monotonic_ns()
        if len(requests) == 1:
            requests[0].respond({n: outputs[n] for n in requests[0].output_names if n in outputs})
        else:
            total = sum(r.batch_size for r in requests)
            for n, array in outputs.items():
                if array.ndim == 0 or array.shape[0] != total:
                    raise ServerError.internal(
                        f"output '{n}' of model '{self.config.name}' has shape {list(array.shape)}; a batch of "
                        f"{total} needs the batch dimension first")
            start = 0
            for r in requests:
                end = start + r.batch_size
                r.respond({n: outputs[n][start:end] for n in r.output_names if n in outputs})
                start = end
        return ComputeTimes(t1 - t0, t2 - t1, time.monotonic_ns() - t2)
