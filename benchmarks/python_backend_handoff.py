"""How fast a Python model's tensors travel between the server and the model's process, by size, without
any protocol: ``InferenceServer.infer_one`` on an identity model (INPUT0 -> OUTPUT0, FP32) of the Python
backend, one request at a time, on uvloop as ``kiln serve`` runs.

    PYTHONPATH=. python3 benchmarks/python_backend_handoff.py [--sizes-mib 0.0625,1,16,64] [--seconds 3]
        [--ring-mib N]   (the shared-memory ring per direction; 0: every tensor on the socket)

Prints, for each tensor size, milliseconds per request (the tensor goes to the process and back) and the
rate in GB/s counting both directions.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import uvloop

from kiln.server.backends.python import process
from kiln.server.core import InferenceRequest, Tensor
from kiln.server.server import InferenceServer, ServerOptions

MODEL = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", pb_utils.get_input_tensor_by_name(
            r, "INPUT0").as_numpy())]) for r in requests]
'''
CONFIG = '''backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
'''


async def measure(sizes_mib: list[float], seconds: float) -> None:
    with tempfile.TemporaryDirectory() as repo:
        (Path(repo) / "identity/1").mkdir(parents=True)
        (Path(repo) / "identity/1/model.py").write_text(MODEL)
        (Path(repo) / "identity/config.pbtxt").write_text(CONFIG)
        server = InferenceServer(ServerOptions(Path(repo)))
        await server.start()
        try:
            for mib in sizes_mib:
                n = int(mib * (1 << 20)) // 4
                data = np.arange(n, dtype=np.float32)
                request = InferenceRequest("identity", -1, "", [Tensor("INPUT0", "FP32", [n], data)], [])
                response = await server.infer_one(request)  # checked, and warms up
                assert np.array_equal(np.asarray(response.outputs[0].data).reshape(-1), data)
                del response  # an output held stops the ring's space from being reused (wire.Ring)
                count, started = 0, time.perf_counter()
                while time.perf_counter() - started < seconds:
                    request = InferenceRequest("identity", -1, "", [Tensor("INPUT0", "FP32", [n], data)], [])
                    await server.infer_one(request)
                    count += 1
                wall = (time.perf_counter() - started) / count
                print(f"{mib:>8g} MiB: {1e3 * wall:8.2f} ms per request, {2 * n * 4 / wall / 1e9:6.2f} GB/s "
                      f"(both ways), {count} requests")
        finally:
            await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mib", default="0.0625,1,16,64")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--ring-mib", type=int, default=None, help="default: the server's (process.RING_BYTES)")
    args = parser.parse_args()
    if args.ring_mib is not None:
        process.RING_BYTES = args.ring_mib << 20
    uvloop.run(measure([float(s) for s in args.sizes_mib.split(",")], args.seconds))


if __name__ == "__main__":
    main()
