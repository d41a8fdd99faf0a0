"""Execute calls through one Python model's process, driven blocking from this process: the round trip of
the hand-off alone (no server, no event loop), and the model process's CPU per call.

    PYTHONPATH=. python3 benchmarks/python_stub_round_trip.py [--calls 8000]

The model is `simple` (``triton_side_by_side.py``'s: INPUT0 + INPUT1, INPUT0 - INPUT1, INT32 [1, 16]),
written to a temporary folder; each call is one ``execute`` message and its ``execute_done``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_side_by_side as sbs  # noqa: E402

from kiln.server.backends.python.process import StubProcess  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=8000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiln-stub-round-trip-") as tmp:
        (Path(tmp) / "1").mkdir()
        (Path(tmp) / "1/model.py").write_text(sbs.SIMPLE_MODEL.format(execute_s=0))
        process = StubProcess("model 'simple' instance 'simple_0'")
        try:
            init = {"op": "init", "name": "simple", "version_dir": str(Path(tmp) / "1"), "model_file": "model.py",
                    "decoupled": False, "args": {"model_config": "{}"}}
            reply = process.request(init, "init_done")
            if reply["error"] is not None:
                sys.exit(reply["error"])
            a = np.arange(16, dtype=np.int32).reshape(1, 16)

            def call(n: int) -> dict:
                message = {"op": "execute", "call": n, "requests": [
                    {"key": n, "id": "", "correlation_id": 0, "inputs": [("INPUT0", a), ("INPUT1", a)],
                     "outputs": ["OUTPUT0", "OUTPUT1"], "parameters": "{}", "flags": 0}]}
                return process.request(message, "execute_done")

            for n in range(500):  # warm up
                call(n)
            model = psutil.Process(process.proc.pid)
            before, wall = model.cpu_times(), time.perf_counter()
            for n in range(args.calls):
                done = call(n)
            wall, after = time.perf_counter() - wall, model.cpu_times()
            outputs = dict(done["responses"][0]["outputs"])
            assert outputs["OUTPUT0"].tolist() == (2 * a).tolist(), outputs
            print(f"round trip {1e6 * wall / args.calls:.0f} us; the model process's CPU "
                  f"{1e6 * (after.user - before.user) / args.calls:.0f} us user + "
                  f"{1e6 * (after.system - before.system) / args.calls:.0f} us system a call")
        finally:
            process.stop(5)


if __name__ == "__main__":
    main()
