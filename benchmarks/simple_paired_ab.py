"""Two kiln trees served side by side on `simple` over HTTP, in alternating short bursts: a comparison of
server changes that holds on a box whose speed drifts more than the change (each pair of bursts is measured
within seconds, and the median of the pairs' ratios is reported).

    python3 benchmarks/simple_paired_ab.py TREE_A TREE_B [--concurrency 8] [--bursts 12] [--seconds 1.5] [--json]

TREE_A and TREE_B are kiln source trees (``git worktree add /tmp/kiln-base HEAD``, and this checkout); each
server runs with its tree first on PYTHONPATH, pinned to CPU 0, with `simple` (the model
``triton_side_by_side.py`` writes) in a repository of its own; the client (asyncio, 8 kept-alive connections,
binary tensors as perf_analyzer sends them, or JSON ones with ``--json``) and the model processes share CPU 1.
Prints each tree's inferences/s per burst, the server process's CPU per inference (its model process not
counted), and the B/A ratio of each pair.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_side_by_side as sbs  # noqa: E402


def request_bytes(port: int, binary: bool) -> bytes:
    inputs = [{"name": f"INPUT{i}", "datatype": "INT32", "shape": [1, 16]} for i in range(2)]
    if binary:
        for i in inputs:
            i["parameters"] = {"binary_data_size": 64}
        outputs = [{"name": f"OUTPUT{i}", "parameters": {"binary_data": True}} for i in range(2)]
        head = json.dumps({"inputs": inputs, "outputs": outputs}).encode()
        body = head + np.arange(16, dtype=np.int32).tobytes() * 2
        extra = f"Inference-Header-Content-Length: {len(head)}\r\n"
    else:
        for i in inputs:
            i["data"] = list(range(16))
        body, extra = json.dumps({"inputs": inputs}).encode(), ""
    return (f"POST /v2/models/simple/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"{extra}Content-Length: {len(body)}\r\n\r\n").encode() + body


async def burst(port: int, message: bytes, concurrency: int, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def connection() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < stop:
            writer.write(message)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            done += 1
        writer.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return done / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs=2, type=Path)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--bursts", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--json", action="store_true", help="JSON tensors instead of binary ones")
    args = parser.parse_args()
    if os.cpu_count() < 2:
        sys.exit("needs two CPUs: the servers on one, the client and the model processes on the other")
    os.sched_setaffinity(0, {1})
    servers = []
    with tempfile.TemporaryDirectory(prefix="kiln-simple-ab-") as tmp:
        repo = Path(tmp) / "repository"
        (repo / "simple/1").mkdir(parents=True)
        (repo / "simple/config.pbtxt").write_text(sbs.SIMPLE_CONFIG)
        (repo / "simple/1/model.py").write_text(sbs.SIMPLE_MODEL.format(execute_s=0))
        try:
            for i, tree in enumerate(args.trees):
                os.environ["PYTHONPATH"] = str(tree.resolve())
                ports = sbs._free_ports(3)
                (Path(tmp) / str(i)).mkdir()
                proc = sbs._start("kiln", repo, Path(tmp) / str(i), ports)
                servers.append((proc, ports[0]))
                sbs._check_simple("kiln", ports[0])
                psutil.Process(proc.pid).cpu_affinity([0])  # its model process stays on CPU 1
            rates: list[list[float]] = [[], []]
            cpu_us: list[list[float]] = [[], []]

            async def run() -> None:
                messages = [request_bytes(port, not args.json) for _, port in servers]
                for i, (_, port) in enumerate(servers):
                    await burst(port, messages[i], args.concurrency, 0.5)  # warm up
                for b in range(args.bursts):
                    for i in ((0, 1) if b % 2 == 0 else (1, 0)):
                        server = psutil.Process(servers[i][0].pid)
                        before = sum(server.cpu_times()[:2])
                        rate = await burst(servers[i][1], messages[i], args.concurrency, args.seconds)
                        rates[i].append(rate)
                        cpu_us[i].append(1e6 * (sum(server.cpu_times()[:2]) - before) / (rate * args.seconds))

            uvloop.run(run())
        finally:
            for proc, _ in servers:
                sbs._stop(proc)
    for i, tree in enumerate(args.trees):
        print(f"{tree}: inferences/s median {statistics.median(rates[i]):,.0f} {[round(r) for r in rates[i]]}; "
              f"server CPU per inference median {statistics.median(cpu_us[i]):.0f} us")
    ratios = [b / a for a, b in zip(*rates)]
    print(f"B/A per pair: median {statistics.median(ratios):.3f} {[round(r, 2) for r in ratios]}")


if __name__ == "__main__":
    main()
