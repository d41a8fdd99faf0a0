"""The server's own cost per request, without any protocol: ``InferenceServer.infer_one`` called in the
process, at a concurrency, on a repository's model, on uvloop as ``kiln serve`` runs.

    PYTHONPATH=. python3 benchmarks/server_core_cost.py REPOSITORY [--model simple] [--concurrency 8]
        [--requests 10000]

The model takes INPUT0 and INPUT1, INT32 [1, 16] (the `simple` model `benchmarks/triton_side_by_side.py`
writes). Prints requests/s and the server process's CPU time per request (its model processes not
counted): what admission, scheduling, the hand-off to the model and the response cost, the floor under
every protocol's figure.
"""
from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import numpy as np
import uvloop

from kiln.server.core import InferenceRequest, Tensor
from kiln.server.server import InferenceServer, ServerOptions


async def measure(repository: Path, model: str, concurrency: int, requests: int) -> None:
    server = InferenceServer(ServerOptions(repository))
    await server.start()
    try:
        data = np.arange(16, dtype=np.int32).reshape(1, 16)

        async def one() -> None:
            inputs = [Tensor(name, "INT32", [1, 16], data.copy()) for name in ("INPUT0", "INPUT1")]
            await server.infer_one(InferenceRequest(model, -1, "", inputs, []))

        async def worker(n: int) -> None:
            for _ in range(n):
                await one()

        await asyncio.gather(*(worker(20) for _ in range(concurrency)))  # warm up
        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        done = requests // concurrency * concurrency
        print(f"concurrency {concurrency}: {done / wall:,.0f} requests/s, server CPU {1e6 * cpu / done:.0f} us "
              "per request")
    finally:
        await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repository", type=Path)
    parser.add_argument("--model", default="simple")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=10000)
    args = parser.parse_args()
    uvloop.run(measure(args.repository, args.model, args.concurrency, args.requests))


if __name__ == "__main__":
    main()
