"""Choosing among an op's implementations by timing them on the device at hand, cached per machine.

The fastest kernel differs between machines: on one 2-core CPU oneDNN's inner product decodes
SmolLM2 1.5x faster than the default float32 GEMM, on another it is slower. So the ops that have
more than one implementation for the device are timed where the engine runs (the runtime does it at
load on a CPU; the GPU builder can do it at build time): every candidate that supports the device
and dtype does the op's work of one forward pass at the model's real weight shapes, and the fastest
is kept, cached under the machine's description so that later loads skip the timing.

Timing on a machine that does other work is noisy, so the choice is made to hold:

- candidates run in interleaved rounds and each keeps its fastest round: other work only adds time,
  and interleaving shows every candidate the same conditions. With one thread, the thread's CPU
  time is measured, which the time other processes hold the core does not inflate;
- on a CPU every candidate is timed with one thread and with all. The runtime runs with fewer
  threads when other processes keep cores busy (``kiln/runtime/cpu_threads.py``), so a candidate is
  judged twice: at its best thread count (a quiet machine) and at one thread (a busy one), and the
  choice is the one whose worst slowdown against the fastest of either is smallest: never a kernel
  that wins only while every core is free. A multi-thread pass far slower than the same candidate
  alone means the machine is busy now; then nothing more is timed with several threads at this load;
- the plan's own choice stays unless another candidate is more than 10% better by that measure;
- a choice that the candidates' median rounds would not also make (noise decided it), or that was
  made on a busy machine, is used for this load but not cached: the next load times again.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator

import torch

from kiln.fsutil import replace_file_atomically
from kiln.ops.registry import REFERENCE, Implementation, Op
from kiln.weight_formats import FLOAT, block_format, random_packed

log = logging.getLogger(__name__)

# The timed weights span at least this many times the last-level cache, so that they stream from
# memory as in a real forward pass instead of sitting in the cache.
CACHE_MULTIPLE = 2
DEFAULT_CACHE_BYTES = 32 << 20
# With more threads than one, passes this many times slower than alone, and at least this much
# slower (waiting for a core costs scheduler time slices), mean that other work holds a core.
COLLAPSE = 3.0
COLLAPSE_MIN_S = 0.002
# The plan's own choice is kept unless another candidate is this much better.
KEEP_MARGIN = 0.10


@dataclass(frozen=True, slots=True)
class WeightWorkload:
    """An op's work in one forward pass: ``fn(x[rows, in], weight)`` for each weight it reads.

    ``linear`` and ``logits`` have this form; ``weight_shapes`` lists [out, in] of every weight in
    the order the model reads them, ``rows`` the token counts per call to time at (decode batches).
    """

    weight_shapes: tuple[tuple[int, int], ...]
    rows: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.weight_shapes or not self.rows:
            raise ValueError(f"a workload needs weights and rows, got {self}")

    def describe(self) -> dict:
        """Shapes with their counts, in first-seen order: the cache key's part for the work."""
        counts: dict[tuple[int, int], int] = {}
        for shape in self.weight_shapes:
            counts[shape] = counts.get(shape, 0) + 1
        return {"weights": [[*shape, n] for shape, n in counts.items()], "rows": list(self.rows)}


@dataclass(frozen=True, slots=True)
class Candidate:
    impl: Implementation
    config: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.impl.name + (json.dumps(self.config, sort_keys=True) if self.config else "")


def candidates(op: Op, device: torch.device, dtype: torch.dtype) -> list[Candidate]:
    """Every implementation of ``op`` (with each of its tunable configs) that can run on ``device`` in ``dtype``.

    A packed-weight op's reference decodes its weights to floats (several times their bytes, so it reads
    several times the memory of any kernel of the format): it is a candidate only where no kernel runs,
    which also spares the load the time of decoding sample weights for it.
    """
    found = [Candidate(impl, dict(config)) for impl in op.impls.values() if impl.supports(device, dtype)
             for config in (impl.configs or ({},))]
    kernels = [c for c in found if c.impl.name != REFERENCE]
    return kernels if op.weight_format != FLOAT and kernels else found


@dataclass(slots=True)
class Choice:
    op: str
    impl: str
    config: dict
    # Reused from this machine's cache; nothing was timed now.
    cached: bool
    # The rounds agreed, so the choice is cached for the next load.
    stable: bool
    # Per condition ("threads=2 rows=1"), per candidate: seconds of one forward pass's work, best round.
    seconds: dict[str, dict[str, float]]
    # Wall time this choice took at load (0 when cached).
    tuning_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.cached:
            return f"{self.op}={self.impl} (cached)"
        if not self.seconds:
            return f"{self.op}={self.impl} (only candidate)"
        times = "; ".join(f"{cond}: " + ", ".join(f"{name} {s * 1e3:.1f} ms" for name, s in by_impl.items())
                          for cond, by_impl in self.seconds.items())
        noisy = "" if self.stable else ", noisy: will be timed again"
        return f"{self.op}={self.impl} (timed in {self.tuning_s:.2f} s{noisy}: {times})"


class Tuner:
    """Times the candidates of an op on one device and dtype; keeps each choice in a per-machine cache file.

    ``machine`` describes where the timing holds (device name, library versions, threads): a
    different machine gets its own cache file. ``cache_folder`` None: nothing is cached.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, machine: dict, cache_folder: Path | None,
                 budget_s: float = 0.3, max_rounds: int = 8):
        self.device = device
        self.dtype = dtype
        self.machine = machine
        self.budget_s = budget_s
        self.max_rounds = max_rounds
        digest = hashlib.sha256(json.dumps(machine, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.cache_file = cache_folder / f"{digest}.json" if cache_folder is not None else None
        max_threads = torch.get_num_threads() if device.type == "cpu" else 1
        # On a CPU, the thread counts the runtime may run with: all of them, and one on a busy machine.
        self.threads: tuple[int | None, ...] = (max_threads, 1) if max_threads > 1 else (None,)

    def choose(self, op: Op, workload: WeightWorkload, prefer: str | None = None) -> Choice:
        """The candidate of ``op`` for ``workload``: cached, or timed now; ``prefer`` (an implementation
        name, the plan's choice) is kept unless another is clearly faster."""
        cands = candidates(op, self.device, self.dtype)
        if len(cands) == 1:
            return Choice(op.name, cands[0].impl.name, cands[0].config, cached=False, stable=True, seconds={})
        key = {"op": op.name, "dtype": str(self.dtype).removeprefix("torch."), **workload.describe(),
               "candidates": [c.label for c in cands], "prefer": prefer}
        hit = self._cached(key, cands)
        if hit is not None:
            return Choice(op.name, hit.impl.name, hit.config, cached=True, stable=True, seconds={})
        start = time.perf_counter()
        rounds, busy = self._time(cands, workload, op.weight_format)
        preferred = next((c.label for c in cands if c.impl.name == prefer), None)
        seconds = {k: {label: min(ts) for label, ts in by_impl.items() if ts} for k, by_impl in rounds.items()}
        best = most_robust(_targets(seconds, self.threads, workload.rows), preferred)
        chosen = next(c for c in cands if c.label == best)
        # The choice holds if each candidate's typical round (the median) leads to it as well.
        typical = {k: {label: statistics.median(ts) for label, ts in by_impl.items() if ts}
                   for k, by_impl in rounds.items()}
        stable = (not busy and all(len(ts) >= 2 for by_impl in rounds.values() for ts in by_impl.values())
                  and most_robust(_targets(typical, self.threads, workload.rows), preferred) == best)
        report = {_condition(t, r): by_impl for (t, r), by_impl in seconds.items() if by_impl}
        choice = Choice(op.name, chosen.impl.name, chosen.config, cached=False, stable=stable, seconds=report,
                        tuning_s=time.perf_counter() - start)
        if stable:
            self._store(key, chosen)
        return choice

    # ----- timing -----
    def _time(self, cands: list[Candidate], workload: WeightWorkload, weight_format: str = FLOAT
              ) -> tuple[dict[tuple[int | None, int], dict[str, list[float]]], bool]:
        """Each round's seconds of one forward pass's work per (threads, rows) and candidate, and
        whether the machine was found busy. ``weight_format``: the format of the op's weights."""
        packed = None if weight_format == FLOAT else block_format(weight_format)
        weight_bytes = self.dtype.itemsize if packed is None else packed.bytes_per_weight
        sample, scale = _sample(workload.weight_shapes, weight_bytes,
                                CACHE_MULTIPLE * last_level_cache_bytes(self.device))
        weights = [_weight(shape, self.dtype, self.device) if packed is None
                   else random_packed(packed, shape, device=self.device) for shape in sample]
        prepared = {c.label: [c.impl.prepare(w, self.dtype) if c.impl.prepare else w for w in weights]
                    for c in cands}
        del weights
        inputs = {(rows, k): torch.rand(rows, k, dtype=self.dtype, device=self.device)
                  for rows in workload.rows for _, k in sample}

        def run(c: Candidate, rows: int, threads: int | None) -> float:
            # One CPU thread runs the kernel on this thread, so its CPU time measures the kernel and
            # not the time other processes held the core; more threads are judged by the wall clock.
            clock = time.thread_time if threads == 1 else partial(_now, self.device)
            fn, config = c.impl.fn, c.config
            t0 = clock()
            for w, (_, k) in zip(prepared[c.label], sample):
                fn(inputs[(rows, k)], w, **config)
            return clock() - t0

        # One thread first: it is what a busy machine gets, and the yardstick for spotting a collapse.
        conditions = [(t, r) for t in reversed(self.threads) for r in workload.rows]
        rounds: dict[tuple[int | None, int], dict[str, list[float]]] = {k: {c.label: [] for c in cands}
                                                                         for k in conditions}
        busy = False
        with _threads(self.threads[-1]):
            for c in cands:  # the first call of each builds its kernels
                run(c, workload.rows[0], self.threads[-1])
        start = time.perf_counter()
        for i in range(self.max_rounds):
            if i >= 2 and time.perf_counter() - start > self.budget_s:
                break
            # Rotate the order each round, so that no candidate always runs first after a switch.
            order = cands[i % len(cands):] + cands[:i % len(cands)]
            for threads, rows in conditions:
                many = threads not in (None, 1)
                if many and busy:
                    continue
                with _threads(threads):
                    for c in order:
                        seconds = run(c, rows, threads)
                        rounds[(threads, rows)][c.label].append(seconds)
                        alone = rounds.get((1, rows), {}).get(c.label)
                        if many and alone and _collapsed(seconds, min(alone)):
                            # Other work holds a core: the threads wait for it, not for the kernel.
                            # Such passes measure the machine, not the candidates, and each can take
                            # a second: no more of them at this load.
                            busy = True
                            break
        scaled = {k: {label: [t * scale for t in ts] for label, ts in by_impl.items()} for k, by_impl in rounds.items()}
        return scaled, busy

    # ----- the cache -----
    def _entries(self) -> list[dict]:
        if self.cache_file is None or not self.cache_file.is_file():
            return []
        try:
            return list(json.loads(self.cache_file.read_text(encoding="utf-8"))["choices"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring the unreadable tuning cache %s (%s); timing again", self.cache_file, e)
            return []

    def _cached(self, key: dict, cands: list[Candidate]) -> Candidate | None:
        for entry in self._entries():
            if isinstance(entry, dict) and entry.get("key") == key:
                return next((c for c in cands if c.label == entry.get("choice")), None)
        return None

    def _store(self, key: dict, chosen: Candidate) -> None:
        if self.cache_file is None:
            return
        entries = [e for e in self._entries() if isinstance(e, dict) and e.get("key") != key]
        entries.append({"key": key, "choice": chosen.label})
        doc = {"machine": self.machine, "choices": entries}
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            replace_file_atomically(self.cache_file, json.dumps(doc, indent=1, default=str) + "\n")
        except OSError as e:
            log.warning("cannot write the tuning cache %s (%s); the choice holds for this load only",
                        self.cache_file, e)


def _targets(seconds: dict[tuple[int | None, int], dict[str, float]], threads: tuple[int | None, ...],
             rows: tuple[int, ...]) -> list[dict[str, float]]:
    """What each candidate would cost at run time, per row count: on a quiet machine the runtime runs
    it at its best thread count, on a busy one at one thread (``kiln/runtime/cpu_threads.py``)."""
    targets = []
    for r in rows:
        by_threads = [seconds[(t, r)] for t in threads]
        # Every candidate has its one-thread (or only) time; a collapsed condition may lack some.
        labels = seconds[(threads[-1], r)]
        targets.append({label: min(m[label] for m in by_threads if label in m) for label in labels})
        if len(threads) > 1:
            targets.append(seconds[(1, r)])
    return targets


def _collapsed(seconds: float, alone: float) -> bool:
    """Whether a multi-thread pass is so slow against one thread that the threads must be waiting
    for cores (a scheduler time slice is milliseconds)."""
    return seconds > COLLAPSE * alone and seconds - alone > COLLAPSE_MIN_S


def most_robust(targets: list[dict[str, float]], prefer: str | None = None) -> str:
    """The candidate whose worst ratio to the fastest of any target is smallest; ties: least total time,
    then the first listed. ``prefer`` (the plan's own choice) stays unless that ratio is worse than the
    best one's by more than ``KEEP_MARGIN``, so that noise alone never moves a plan."""
    labels = list(targets[0])

    def score(label: str) -> tuple[float, float]:
        worst = max(by_impl[label] / min(by_impl.values()) for by_impl in targets)
        return worst, sum(by_impl[label] for by_impl in targets)

    best = min(labels, key=score)
    if prefer in labels and score(prefer)[0] <= score(best)[0] * (1 + KEEP_MARGIN):
        return prefer
    return best


def last_level_cache_bytes(device: torch.device) -> int:
    """The largest cache in front of the device's memory (CPU: the last-level cache; CUDA: L2)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or DEFAULT_CACHE_BYTES
    if device.type == "cpu":
        sizes = []
        for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
            with contextlib.suppress(OSError, ValueError):
                text = (index / "size").read_text().strip()
                units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
                sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
        if sizes:
            return max(sizes)
    return DEFAULT_CACHE_BYTES


def _sample(shapes: tuple[tuple[int, int], ...], itemsize: float, min_bytes: int
            ) -> tuple[list[tuple[int, int]], float]:
    """The first weights in model order that span ``min_bytes`` (or all), and total bytes / their bytes."""
    sample: list[tuple[int, int]] = []
    sampled = 0
    for shape in shapes:
        if sampled >= min_bytes:
            break
        sample.append(shape)
        sampled += shape[0] * shape[1] * itemsize
    total = sum(o * i for o, i in shapes) * itemsize
    return sample, total / sampled


def _weight(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # One random row repeated: the kernels' speed does not depend on the values, and this fills
    # hundreds of megabytes at copy speed, where a random fill would take most of the time budget.
    return torch.rand(shape[1], dtype=dtype, device=device).expand(shape).contiguous()


def _condition(threads: int | None, rows: int) -> str:
    return f"rows={rows}" if threads is None else f"threads={threads} rows={rows}"


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()

