"""kiln's C++ extensions for the CPU: compiled at first use for the machine's own instruction set, cached.

Each extension (``kiln/ops/cpu_gguf``: matrix products over GGUF blocks; ``kiln/ops/cpu_layer_ops``: attention,
norms, rotary, SwiGLU) is a folder of C++ sources registering torch dispatcher ops. It is built with ``-march=native``
(or the ``march_env`` variable's gcc -march value, e.g. ``haswell`` or ``x86-64``, which is how tests reach
the AVX2 and scalar paths on a machine that has better) under ``<kiln cache>/torch_extensions/<hash>``, the
hash taken over the CPU's flags, the sources, torch, Python and the compiler flags, so another CPU or
changed sources build their own. ``load()`` never raises: a machine without a compiler or ninja runs the
ops' other implementations, with one warning.

Processes that build the same extension at once take turns on an ``flock`` of the build folder, which the
kernel drops when its holder dies; holding it, a process removes torch's own ``lock`` file if one is there.
That file (``torch.utils.file_baton``) is how torch serializes builds, but it outlives a build that was killed
(a Ctrl-C during the first start), and every later build would wait on it forever.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

import torch

from kiln.cache import cache_dir

log = logging.getLogger("kiln.ops.cpp_extension")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86, ARM
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _reason(e: Exception) -> str:
    # A failed build's message is ninja's log: the compiler's commands, then what went wrong.
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for key in ("error:", "not found", "No such file", "fatal"):
        hit = next((ln for ln in lines if key in ln), None)
        if hit:
            return hit[:300]
    return (lines[-1] if lines else type(e).__name__)[:300]


class CppExtension:
    """One extension: ``load()`` compiles (or finds compiled) and loads it once per process, then calls
    ``on_load`` (which registers fakes, looks ops up, and returns a description such as the ISA path);
    it returns that description, or None where the build failed."""

    def __init__(self, name: str, folder: Path, sources: tuple[str, ...], headers: tuple[str, ...],
                 march_env: str, on_load: Callable[[], str], what: str):
        self.name, self.folder, self.sources, self.headers = name, folder, sources, headers
        self.march_env, self.on_load, self.what = march_env, on_load, what
        self._lock = threading.Lock()
        self._outcome: list[str | None] = []  # the one outcome of the first load

    def load(self) -> str | None:
        with self._lock:  # two threads' first calls: one builds and loads, the other waits for it
            if not self._outcome:
                self._outcome.append(self._load_once())
            return self._outcome[0]

    def available(self) -> bool:
        return self.load() is not None

    def _key(self, cflags: list[str]) -> str:
        h = hashlib.sha256()
        for part in (_cpu_flags(), torch.__version__, sys.version, os.environ.get("CXX", "c++"), " ".join(cflags)):
            h.update(part.encode() + b"\0")
        for name in self.sources + self.headers:
            h.update((self.folder / name).read_bytes())
        return h.hexdigest()[:12]

    def _load_once(self) -> str | None:
        try:
            described = self._build(os.environ.get(self.march_env, "native"))
        except Exception as e:  # noqa: BLE001  (a compiler, ninja or header missing: all mean "not here")
            log.warning("%s unavailable, could not build the extension: %s", self.what, _reason(e))
            return None
        log.info("%s built for %s", self.what, described)
        return described

    def _build(self, march: str) -> str:
        from torch.utils import cpp_extension

        cflags = compile_flags(march)
        key = self._key(cflags)
        build_dir = cache_dir() / "torch_extensions" / key
        build_dir.mkdir(parents=True, exist_ok=True)
        with _builder_turn(build_dir):
            (build_dir / TORCH_LOCK).unlink(missing_ok=True)  # stale: no other builder runs (module docstring)
            cpp_extension.load(
                name=f"{self.name}_{key}",
                sources=[str(self.folder / s) for s in self.sources],
                extra_cflags=cflags,
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
        return self.on_load()


def compile_flags(march: str) -> list[str]:
    """The compiler flags of every kiln extension for a gcc ``-march`` value (they are part of the build's key).

    -fopenmp: at::parallel_for runs its body in an OpenMP region only where the including file is compiled with
    OpenMP; the link then reuses the libgomp torch has already loaded. -fno-trapping-math: no kernel enables
    floating-point traps, and with them assumed GCC 12 does not if-convert a clamp (std::min / std::max, a
    ternary), so every loop through vector_math.h's exp (SwiGLU, the softmaxes) stayed scalar ("control flow in
    loop"). It changes no result: each value takes the same operations, only several at once.
    """
    return ["-O3", f"-march={march}", "-fopenmp", "-fno-trapping-math"]


TORCH_LOCK = "lock"  # torch.utils.cpp_extension's FileBaton in a build folder


@contextlib.contextmanager
def _builder_turn(build_dir: Path) -> Iterator[None]:
    """This process's turn to build in ``build_dir``: an exclusive ``flock``, released on exit or death."""
    fd = os.open(build_dir / "kiln-build.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock
