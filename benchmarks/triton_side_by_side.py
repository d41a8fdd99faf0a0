"""kiln serve against the real Triton Inference Server on Triton's `simple` model, measured by Triton's own
perf_analyzer, one server at a time on this machine.

    python3 benchmarks/triton_side_by_side.py setup            # once: Triton and perf_analyzer, unpacked privately
    python3 benchmarks/triton_side_by_side.py run [OUT_DIR]    # default OUT_DIR: benchmarks/results/triton_simple

``setup`` installs nothing system-wide. Into PEERS (default ~/.cache/kiln/peers/triton-2.51) it downloads
and unpacks:
  * the Triton server 2.51 with its Python backend and stubs, from the ``nvidia-pytriton`` 0.7.0 wheel;
  * perf_analyzer from the ``tritonclient`` 2.51.0 manylinux wheel (the newest whose binary runs on glibc
    2.36: 2.53 and later ask for glibc 2.38), with the two libraries that binary wants and the wheel lacks:
    libcudart.so.12 (the ``nvidia-cuda-runtime-cu12`` wheel) and libb64.so.0d (Debian's ``libb64-0d``,
    fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``, not installed).
Triton's Python stub embeds the libpython it was linked against; it runs with this interpreter's
(LD_LIBRARY_PATH points at it) but with numpy 1.26: the stub is built against numpy 1.x, and with numpy 2
every output it returns is empty (the client cannot even reshape it), which perf_analyzer does not notice. Its
interpreter ignores PYTHONHOME and PYTHONPATH and takes its prefix from the `python3` it finds on PATH, so
Triton starts with PEERS/stub-home/bin first on PATH (setup's comments say what stub-home holds).

``run`` writes a model repository with `simple` as a Python-backend model (Triton's example model: INPUT0,
INPUT1 INT32 [16], max_batch_size 8, OUTPUT0 = sum, OUTPUT1 = difference; one CPU instance), starts
Triton on it, runs perf_analyzer over HTTP and gRPC, with and without system shared memory, at each
concurrency, stops Triton, then does the same with ``kiln serve --model-repository``. Around each
perf_analyzer run it reads the server's CPU time (the server and its model processes, with psutil) and its
statistics' inference count: the server's CPU per inference, which on a small box (perf_analyzer shares it)
decides the throughput once the server is busy. It writes OUT_DIR/{triton,kiln}-{http,grpc}{,-shm}-c{C}.csv
(perf_analyzer's own CSV, with its text output in .txt), the servers' logs, load.txt (the machine's load as
each half starts and ends) and summary.md (inferences/s and server CPU per inference side by side).

Environment: PEERS; CONCURRENCY (default "1 2 4 8"); MEASUREMENT_MS (perf_analyzer's window, default 2000);
SERVERS (default "triton kiln"); CONFIGS (default "http http-shm grpc grpc-shm"); EXECUTE_MS (default 0: the
model sleeps this long in each ``execute``, as one waiting on a device would, so that the servers' own cost
per request can be set beside a model's).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(os.environ.get("PEERS", Path.home() / ".cache/kiln/peers/triton-2.51"))
PYTRITON = "nvidia-pytriton==0.7.0"
TRITONCLIENT = "tritonclient==2.51.0"
STUB_NUMPY = "numpy==1.26.4"  # the Python stub of Triton 2.51 is built against numpy 1.x (pytriton asks numpy<2)
CUDART = "nvidia-cuda-runtime-cu12==12.9.79"

SIMPLE_CONFIG = """name: "simple"
backend: "python"
max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

SIMPLE_MODEL = """import time

import triton_python_backend_utils as pb_utils

EXECUTE_S = {execute_s}


class TritonPythonModel:
    def execute(self, requests):
        if EXECUTE_S:
            time.sleep(EXECUTE_S)  # a model that waits on its device this long a call
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor("OUTPUT0", a + b), pb_utils.Tensor("OUTPUT1", a - b)]))
        return responses
"""


def _pip_download(spec: str, dest: Path, *extra: str) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "-d", str(dest), *extra, spec], check=True)
    name = spec.split("==")[0].replace("-", "_")
    return max(dest.glob(f"{name}-*.whl"), key=lambda p: p.stat().st_mtime)


def setup() -> None:
    downloads = PEERS / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    server = PEERS / "pytriton"
    if not (server / "pytriton/tritonserver/bin/tritonserver").exists():
        with zipfile.ZipFile(_pip_download(PYTRITON, downloads)) as z:
            z.extractall(server)
    tritonserver = server / "pytriton/tritonserver"
    stubs = tritonserver.glob("python_backend_stubs/*/triton_python_backend_stub")
    for f in [tritonserver / "bin/tritonserver", *stubs]:
        f.chmod(0o755)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = tritonserver / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        sys.exit(f"the Triton wheel has no Python stub for Python {version}")
    shutil.copy2(stub, tritonserver / "backends/python/triton_python_backend_stub")
    # With numpy 2 the stub hands back outputs it cannot read: every output comes back empty. Its embedded
    # interpreter ignores PYTHONHOME and PYTHONPATH and finds its prefix from the `python3` on PATH, so the
    # server runs with PEERS/stub-home/bin first on PATH: a copy of this interpreter's binary there, this
    # interpreter's standard library linked in stub-home/lib, and a site-packages holding numpy 1.26 alone.
    version_dir = f"python{sys.version_info.major}.{sys.version_info.minor}"
    home = PEERS / "stub-home"
    home_lib = home / "lib" / version_dir
    if not (home_lib / "site-packages" / "numpy").exists():
        home_lib.mkdir(parents=True, exist_ok=True)
        for entry in Path(sysconfig.get_paths()["stdlib"]).iterdir():
            link = home_lib / entry.name
            if entry.name != "site-packages" and not link.exists():
                link.symlink_to(entry)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:",
                        "--target", str(home_lib / "site-packages"), STUB_NUMPY], check=True)
    (home / "bin").mkdir(exist_ok=True)
    if not (home / "bin/python3").exists():  # a copy: the interpreter resolves links back to their prefix
        shutil.copy2(os.path.realpath(sys.executable), home / "bin/python3")

    lib = PEERS / "lib"
    lib.mkdir(exist_ok=True)
    binary = PEERS / "bin/perf_analyzer"
    if not binary.exists():
        wheel = _pip_download(TRITONCLIENT, downloads, "--platform", "manylinux1_x86_64")
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith("/bin/perf_analyzer"))
            binary.parent.mkdir(exist_ok=True)
            binary.write_bytes(z.read(member))
        binary.chmod(0o755)
    if not (lib / "libcudart.so.12").exists():
        with zipfile.ZipFile(_pip_download(CUDART, downloads, "--platform", "manylinux2014_x86_64")) as z:
            (lib / "libcudart.so.12").write_bytes(z.read("nvidia/cuda_runtime/lib/libcudart.so.12"))
    if not list(lib.glob("libb64.so.0d*")):
        subprocess.run(["apt-get", "download", "libb64-0d"], cwd=downloads, check=True)
        deb = next(downloads.glob("libb64-0d_*.deb"))
        unpacked = downloads / "libb64"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        for f in unpacked.rglob("libb64.so.0d*"):
            shutil.copy2(f, lib / f.name, follow_symlinks=True)
    out = subprocess.run([str(binary), "--version"], env=_pa_env(), capture_output=True, text=True)
    print(f"perf_analyzer: {binary} ({(out.stdout + out.stderr).strip().splitlines()[0]})")
    print(f"tritonserver: {tritonserver / 'bin/tritonserver'}")


def _pa_env() -> dict[str, str]:
    return dict(os.environ, LD_LIBRARY_PATH=str(PEERS / "lib"))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _start(kind: str, repo: Path, out: Path, ports: list[int], extra: list[str] = ()) -> subprocess.Popen:
    http, grpc, metrics = ports
    log = open(out / f"{kind}.log", "w")
    if kind == "triton":
        tritonserver = PEERS / "pytriton/pytriton/tritonserver"
        env = dict(os.environ, PATH=f"{PEERS / 'stub-home/bin'}{os.pathsep}{os.environ.get('PATH', '')}",
                   LD_LIBRARY_PATH=str(sysconfig.get_config_var("LIBDIR")))
        cmd = [str(tritonserver / "bin/tritonserver"), "--model-repository", str(repo),
               "--backend-directory", str(tritonserver / "backends"), "--http-port", str(http),
               "--grpc-port", str(grpc), "--metrics-port", str(metrics), *extra]
    else:
        env = dict(os.environ)
        cmd = [sys.executable, "-c", "from kiln.cli.main import main; main()", "serve", "--model-repository", str(repo),
               "--host", "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc),
               "--metrics-port", str(metrics), *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{kind} ended while starting; see {out / f'{kind}.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/simple/ready", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.5)
    _stop(proc)
    sys.exit(f"{kind} was not ready within 120 s; see {out / f'{kind}.log'}")


def _check_simple(kind: str, http_port: int) -> None:
    """One inference checked before timing: perf_analyzer counts a response with wrong or empty outputs as
    a success (Triton's Python stub under numpy 2 answers so)."""
    a, b = list(range(16)), [3] * 16
    body = json.dumps({"inputs": [{"name": f"INPUT{i}", "datatype": "INT32", "shape": [1, 16], "data": x}
                                  for i, x in enumerate((a, b))]}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v2/models/simple/infer", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        outputs = {o["name"]: o["data"] for o in json.load(r)["outputs"]}
    want = {"OUTPUT0": [x + y for x, y in zip(a, b)], "OUTPUT1": [x - y for x, y in zip(a, b)]}
    if outputs != want:
        sys.exit(f"{kind} answers `simple` wrongly: {outputs} (expected {want})")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _perf_analyzer(config: str, ports: list[int], concurrency: int, csv_path: Path) -> subprocess.CompletedProcess:
    """One perf_analyzer run at one concurrency (a level that does not settle then costs only itself).
    Stable: three windows within 20% of each other (this 2-core box is shared with the client)."""
    protocol = config.split("-")[0]
    url = f"127.0.0.1:{ports[0] if protocol == 'http' else ports[1]}"
    cmd = [str(PEERS / "bin/perf_analyzer"), "-m", "simple", "-u", url, "-i", protocol,
           "--concurrency-range", f"{concurrency}:{concurrency}",
           "--measurement-interval", os.environ.get("MEASUREMENT_MS", "2000"), "--max-trials", "10",
           "--stability-percentage", "20", "-f", str(csv_path)]
    if config.endswith("-shm"):
        cmd += ["--shared-memory", "system"]
    return subprocess.run(cmd, env=_pa_env(), capture_output=True, text=True)


def _cpu_and_count(proc: subprocess.Popen, http_port: int) -> tuple[float, int]:
    """CPU seconds the server's processes (it and its model processes) have spent, and the inferences its
    statistics count for `simple`."""
    import psutil

    root = psutil.Process(proc.pid)
    seconds = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            seconds += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/simple/stats", timeout=10) as r:
        stats = json.load(r)["model_stats"][0]
    return seconds, int(stats["inference_count"])


def _read_csv(path: Path) -> dict[int, float]:
    with open(path) as f:
        return {int(row["Concurrency"]): float(row["Inferences/Second"]) for row in csv.DictReader(f)}


def run(out: Path) -> None:
    if not (PEERS / "bin/perf_analyzer").exists():
        sys.exit(f"run `python3 {Path(__file__).name} setup` first (no perf_analyzer in {PEERS})")
    out.mkdir(parents=True, exist_ok=True)
    concurrency = [int(c) for c in os.environ.get("CONCURRENCY", "1 2 4 8").split()]
    servers = os.environ.get("SERVERS", "triton kiln").split()
    configs = os.environ.get("CONFIGS", "http http-shm grpc grpc-shm").split()
    execute_ms = float(os.environ.get("EXECUTE_MS", "0"))
    results: dict[tuple[str, str], dict[int, float]] = {}
    cpu_us: dict[tuple[str, str, int], float] = {}  # the server's CPU per inference, over the whole perf_analyzer run
    with tempfile.TemporaryDirectory(prefix="kiln-triton-simple-") as tmp, open(out / "load.txt", "w") as load:
        repo = Path(tmp) / "repository"
        (repo / "simple/1").mkdir(parents=True)
        (repo / "simple/config.pbtxt").write_text(SIMPLE_CONFIG)
        (repo / "simple/1/model.py").write_text(SIMPLE_MODEL.format(execute_s=execute_ms / 1000))
        for kind in servers:
            load.write(f"{kind} start: {os.getloadavg()}\n")
            ports = _free_ports(3)
            proc = _start(kind, repo, out, ports)
            try:
                _check_simple(kind, ports[0])
                for config in configs:
                    got = results.setdefault((kind, config), {})
                    for c in concurrency:
                        csv_path = out / f"{kind}-{config}-c{c}.csv"
                        cpu0, count0 = _cpu_and_count(proc, ports[0])
                        done = _perf_analyzer(config, ports, c, csv_path)
                        cpu1, count1 = _cpu_and_count(proc, ports[0])
                        cpu_us[kind, config, c] = 1e6 * (cpu1 - cpu0) / max(count1 - count0, 1)
                        (out / f"{kind}-{config}-c{c}.txt").write_text(done.stdout + done.stderr)
                        if done.returncode != 0 or not csv_path.exists():
                            print(f"{kind} {config} c{c}: perf_analyzer failed (exit {done.returncode}): "
                                  f"{(done.stdout + done.stderr).strip().splitlines()[-1:]}", file=sys.stderr)
                            continue
                        got.update(_read_csv(csv_path))
                    print(kind, config, {c: round(v) for c, v in sorted(got.items())}, flush=True)
            finally:
                _stop(proc)
            load.write(f"{kind} end: {os.getloadavg()}\n")
    _summary(out, results, cpu_us, servers, configs, concurrency, execute_ms)


def _summary(out: Path, results, cpu_us, servers, configs, concurrency, execute_ms: float) -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    model = f"`simple` sleeping {execute_ms:g} ms a call" if execute_ms else "`simple`"
    command = (f"EXECUTE_MS={execute_ms:g} " if execute_ms else "") + "python3 benchmarks/triton_side_by_side.py run"
    lines = [f"perf_analyzer on {model} (Python backend), inferences/s; CPU: {cpu}, {os.cpu_count()} cores; "
             f"command: `{command}`", "",
             "| protocol | concurrency | " + " | ".join(servers) + (" | kiln / Triton |" if len(servers) == 2 else " |")
             + "".join(f" {s} server CPU us/inference |" for s in servers),
             "|---|---:|" + "---:|" * (2 * len(servers) + (len(servers) == 2))]
    for config in configs:
        for c in concurrency:
            values = [results.get((s, config), {}).get(c) for s in servers]
            cells = [f"{v:,.0f}" if v is not None else "-" for v in values]
            if len(servers) == 2:
                by = dict(zip(servers, values))
                ratio = by.get("kiln") / by["triton"] if by.get("kiln") and by.get("triton") else None
                cells.append(f"{ratio:.2f}x" if ratio else "-")
            cells += [f"{cpu_us[s, config, c]:,.0f}" if (s, config, c) in cpu_us else "-" for s in servers]
            lines.append(f"| {config} | {c} | " + " | ".join(cells) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("setup", "run"):
        sys.exit(__doc__)
    if sys.argv[1] == "setup":
        setup()
    else:
        run(Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "benchmarks/results/triton_simple")
