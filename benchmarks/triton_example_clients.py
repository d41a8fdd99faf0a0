"""tritonclient's own example clients against kiln serve and against the real Triton server, one at a time.

    python3 benchmarks/triton_example_clients.py EXAMPLES_DIR [OUT_DIR]

EXAMPLES_DIR is ``src/python/examples`` of a checkout of github.com/triton-inference-server/client at the
branch of the Triton release compared (``r24.10`` for Triton 2.51: later clients test fixes 2.51 lacks, and
one of them takes 2.51 down). The clients ship in no package, so neither this repository nor CI carries
them. Triton and its Python backend come from ``python3 benchmarks/triton_side_by_side.py setup``.

The repository written here holds, as Python-backend models, the models the clients call, with the behaviour
they check (Triton's own are TensorFlow, ONNX and custom C++ QA models):
  simple, simple_int8      INPUT0, INPUT1 [16] -> OUTPUT0 = sum, OUTPUT1 = difference (INT32 / INT8)
  simple_string            the same on BYTES holding decimal integers
  simple_identity          BYTES [-1] -> the same
  simple_sequence          sequence batcher (START, READY): OUTPUT = INPUT + START
  simple_dyna_sequence     (START, END, READY, CORRID UINT64): OUTPUT = INPUT + START, plus CORRID on END
  simple_string_dyna_sequence  (CORRID STRING): OUTPUT accumulates INPUT; END adds int(CORRID)
  repeat_int32             decoupled: one response per element of IN (OUT, IDX) after DELAY[i] ms, then WAIT ms
Each server runs in explicit model-control mode with every model loaded (the model-control clients load and
unload `simple`). A client passes when it exits 0 within 120 s. Clients for models not written here (image
classification, ensembles of image models, the memory-growth test) are skipped. OUT_DIR (default
benchmarks/results/triton_example_clients) gets each client's output per server and summary.md.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_side_by_side as peers  # noqa: E402

SKIPPED = {"image_client.py", "grpc_image_client.py", "ensemble_image_client.py", "grpc_client.py",
           "memory_growth_test.py"}

# simple_string: the sum and difference of decimal integers held as bytes (simple and simple_int8 run the
# benchmark's own `simple` model, peers.SIMPLE_MODEL).
STRING_ADD_SUB = """import numpy as np
import triton_python_backend_utils as pb_utils


def as_text(values, shape):
    return np.array([str(v).encode() for v in values.reshape(-1)], dtype=np.object_).reshape(shape)


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            x = a.astype(np.int64)
            y = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy().astype(np.int64)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", as_text(x + y, a.shape)),
                                                         pb_utils.Tensor("OUTPUT1", as_text(x - y, a.shape))]))
        return responses
"""

IDENTITY = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy())]) for r in requests]
"""

SEQUENCE = """import numpy as np
import triton_python_backend_utils as pb_utils

KIND = "{kind}"


class TritonPythonModel:
    def initialize(self, args):
        self.totals = {{}}

    def execute(self, requests):
        responses = []
        for request in requests:
            value = int(pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy().reshape(-1)[0])
            start = int(pb_utils.get_input_tensor_by_name(request, "START").as_numpy().reshape(-1)[0])
            end = pb_utils.get_input_tensor_by_name(request, "END")
            end = int(end.as_numpy().reshape(-1)[0]) if end is not None else 0
            corrid = pb_utils.get_input_tensor_by_name(request, "CORRID")
            corrid = corrid.as_numpy().reshape(-1)[0] if corrid is not None else 0
            if isinstance(corrid, bytes):
                corrid = corrid.decode()
            if KIND == "accumulate":
                key = request.correlation_id()
                total = (0 if start else self.totals.get(key, 0)) + value
                self.totals[key] = total
                out = total + (int(corrid) if end else 0)
                if end:
                    self.totals.pop(key, None)
            else:
                out = value + start + (int(corrid) if end and KIND == "dyna" else 0)
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor("OUTPUT", np.array([[out]], dtype=np.int32))]))
        return responses
"""

REPEAT = """import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self.repeat, args=(request,), daemon=True).start()
        return None

    def repeat(self, request):
        sender = request.get_response_sender()
        values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
        delays = pb_utils.get_input_tensor_by_name(request, "DELAY").as_numpy()
        wait = int(pb_utils.get_input_tensor_by_name(request, "WAIT").as_numpy()[0])
        for i, value in enumerate(values):
            time.sleep(int(delays[i]) / 1000)
            sender.send(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUT", np.array([value], dtype=np.int32)),
                pb_utils.Tensor("IDX", np.array([i], dtype=np.uint32))]))
        time.sleep(wait / 1000)
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
"""


def _add_sub_config(name: str, dtype: str) -> str:
    def io(prefix: str) -> str:
        return ",\n".join(f'  {{ name: "{prefix}{i}" data_type: {dtype} dims: [ 16 ] }}' for i in range(2))

    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 8\n'
            f'input [\n{io("INPUT")}\n]\noutput [\n{io("OUTPUT")}\n]\n')


def _sequence_config(name: str, controls: list[tuple[str, str]], corrid: str | None) -> str:
    lines = [f'name: "{name}"', 'backend: "python"', "max_batch_size: 8", "sequence_batching {",
             "  max_sequence_idle_microseconds: 5000000", "  oldest { max_candidate_sequences: 8 }",
             "  control_input ["]
    entries = [f'    {{ name: "{n}" control [ {{ kind: {kind} int32_false_true: [ 0, 1 ] }} ] }}'
               for n, kind in controls]
    if corrid is not None:
        entries.append(f'    {{ name: "CORRID" control [ {{ kind: CONTROL_SEQUENCE_CORRID data_type: {corrid} }} ] }}')
    lines += [",\n".join(entries), "  ]", "}",
              'input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]',
              'output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]']
    return "\n".join(lines) + "\n"


REPEAT_CONFIG = """name: "repeat_int32"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [
  { name: "IN" data_type: TYPE_INT32 dims: [ -1 ] },
  { name: "DELAY" data_type: TYPE_UINT32 dims: [ -1 ] },
  { name: "WAIT" data_type: TYPE_UINT32 dims: [ 1 ] }
]
output [
  { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "IDX" data_type: TYPE_UINT32 dims: [ 1 ] }
]
"""


def write_repository(repo: Path) -> list[str]:
    models = {
        "simple": (_add_sub_config("simple", "TYPE_INT32"), peers.SIMPLE_MODEL),
        "simple_int8": (_add_sub_config("simple_int8", "TYPE_INT8"), peers.SIMPLE_MODEL),
        "simple_string": (_add_sub_config("simple_string", "TYPE_STRING"), STRING_ADD_SUB),
        "simple_identity": ('name: "simple_identity"\nbackend: "python"\nmax_batch_size: 8\n'
                            'input [ { name: "INPUT0" data_type: TYPE_STRING dims: [ -1 ] } ]\n'
                            'output [ { name: "OUTPUT0" data_type: TYPE_STRING dims: [ -1 ] } ]\n', IDENTITY),
        "simple_sequence": (_sequence_config("simple_sequence", [("START", "CONTROL_SEQUENCE_START"),
                                                                 ("READY", "CONTROL_SEQUENCE_READY")], None),
                            SEQUENCE.format(kind="plain")),
        "simple_dyna_sequence": (_sequence_config("simple_dyna_sequence", [
            ("START", "CONTROL_SEQUENCE_START"), ("END", "CONTROL_SEQUENCE_END"),
            ("READY", "CONTROL_SEQUENCE_READY")], "TYPE_UINT64"), SEQUENCE.format(kind="dyna")),
        "simple_string_dyna_sequence": (_sequence_config("simple_string_dyna_sequence", [
            ("START", "CONTROL_SEQUENCE_START"), ("END", "CONTROL_SEQUENCE_END"),
            ("READY", "CONTROL_SEQUENCE_READY")], "TYPE_STRING"), SEQUENCE.format(kind="accumulate")),
        "repeat_int32": (REPEAT_CONFIG, REPEAT),
    }
    for name, (config, source) in models.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(config)
        (repo / name / "1" / "model.py").write_text(source)
    return list(models)


def _clients(examples: Path) -> list[Path]:
    """The clients in name order, those that load and unload `simple` last (the others need it loaded)."""
    return sorted((p for p in examples.glob("*.py") if p.name not in SKIPPED),
                  key=lambda p: ("model_control" in p.name, p.name))


def run(examples: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    clients = _clients(examples)
    if not clients:
        sys.exit(f"no example clients in {examples}")
    results: dict[str, dict[str, bool]] = {}
    with tempfile.TemporaryDirectory(prefix="kiln-triton-examples-") as tmp:
        repo = Path(tmp) / "repository"
        models = write_repository(repo)
        for kind in os.environ.get("SERVERS", "triton kiln").split():
            ports = peers._free_ports(3)
            if kind == "triton":
                extra = ["--model-control-mode=explicit", "--load-model=*"]
            else:
                extra = ["--model-control-mode", "explicit"] + [a for m in models for a in ("--load-model", m)]
            proc = peers._start(kind, repo, out, ports, extra)
            try:
                for client in clients:
                    url = f"localhost:{ports[1] if 'grpc' in client.name else ports[0]}"
                    args = [sys.executable, str(client), "-u", url]
                    try:
                        done = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp)
                        ok, text = done.returncode == 0, done.stdout + done.stderr
                    except subprocess.TimeoutExpired as e:
                        ok, text = False, f"timed out after 120 s\n{e.stdout or ''}{e.stderr or ''}"
                    results.setdefault(client.name, {})[kind] = ok
                    (out / f"{kind}-{client.stem}.txt").write_text(text)
                    print(f"{kind} {client.name}: {'pass' if ok else 'FAIL'}", flush=True)
            finally:
                peers._stop(proc)
    servers = os.environ.get("SERVERS", "triton kiln").split()
    lines = [f"tritonclient's example clients ({examples}), each server in turn; "
             "command: `python3 benchmarks/triton_example_clients.py EXAMPLES_DIR`", "",
             "| client | " + " | ".join(servers) + " |", "|---|" + "---|" * len(servers)]
    for name in sorted(results):
        lines.append(f"| {name} | " + " | ".join("pass" if results[name].get(s) else "FAIL" for s in servers) + " |")
    lines.append("| **passed** | " + " | ".join(
        f"{sum(r.get(s, False) for r in results.values())} of {len(results)}" for s in servers) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    run(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2
        else peers.ROOT / "benchmarks/results/triton_example_clients")
