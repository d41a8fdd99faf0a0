"""Busy neighbours: other processes that keep CPU cores busy while a benchmark measures.

Users run kiln on machines that do other work, and a CPU engine that is fast only on an idle
machine is not fast. ``kiln bench --busy-neighbours N`` starts N of these for the whole run (kiln's
load and measurement, then transformers'), and stops them when the run ends, also on error.

Each neighbour is a Python interpreter spinning in a loop: one core's worth of pure CPU work, no
memory traffic and no threads, the simplest steady competitor for a core. It also exits by itself
when the process that started it is gone, so a benchmark killed hard leaves nothing spinning.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Iterator

from kiln.errors import KilnError

# Spin, and look up now and then (every few milliseconds) whether the parent is still there.
SPIN = """
import os, sys
parent = int(sys.argv[1])
while os.getppid() == parent:
    for _ in range(100_000):
        pass
"""
DESCRIPTION = "Python processes, each spinning in a loop on one core"


@contextlib.contextmanager
def busy_neighbours(n: int) -> Iterator[list[subprocess.Popen]]:
    """Run the block with ``n`` spinning neighbour processes; kill and reap them all afterwards."""
    if n < 0:
        raise KilnError(f"--busy-neighbours must be at least 0, got {n}")
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-S", "-c", SPIN, str(os.getpid())],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
