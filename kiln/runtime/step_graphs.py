"""Steps replayed from CUDA graphs captured at load (on a CPU: from recorded op calls), one per step shape.

A step runs every layer over its tokens: on a GPU that is about a thousand small kernels, and for
small steps launching them from Python costs more than running them. So at load the runner captures
the step for a set of fixed shapes into one memory pool, over the persistent buffers of
``StepInputs``; a step then fills the buffers, padded to the smallest shape that holds it, and
replays that graph. Two ladders of shapes:

- decode steps (one token per sequence): every batch size up the ladder 1, 2, 4, ... max_batch_size,
  for block tables of 256, 512, ... max_seq_len tokens (the attention's split decision reads the
  table's width);
- mixed steps (prefill chunks beside decodes) of up to 2048 tokens: token counts of the ladder
  2^k and 1.5 * 2^k above max_batch_size, over max_batch_size + 1 rows (one is always padding), full
  tables. Bigger steps are bound by their matrix products, where launch costs no longer matter and
  padding would, so they run eagerly.

Padding rows write only a dummy KV block that no request owns. The "static" mode runs the same padded,
fixed-shape steps eagerly (to test them without a GPU).

On a CPU ("recorded" mode) a decode step of each shape is recorded the first time it runs, as its dispatcher
calls (``recorded_step``), and replayed after that without the model's Python. The decode ladder there holds
every batch size (a padding row costs a CPU its share of the matrix products' arithmetic) at one table width,
the widest (the CPU attention reads only the blocks a sequence has, so a wider table costs it nothing, and each
recording costs a tenth of a second or more); mixed steps run eagerly (their prefill chunks are bound by the
matrix products). A shape whose recording is refused runs eagerly from then on, with one warning.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from kiln.runtime.recorded_step import NotRecordable, RecordedStep, record
from kiln.runtime.step_clock import StepClock
from kiln.runtime.step_inputs import Batch, PrevTokens, StepBatch, StepInputs, StepShape, padding
from kiln.runtime.to_device import tensor_on

_SMALLEST_CONTEXT = 256
# Steps of more tokens run eagerly (see above).
MAX_GRAPH_TOKENS = 2048

Forward = Callable[[StepBatch], torch.Tensor]
# How StepGraphs runs a shape's steps: "cuda" (captured graphs), "recorded" (CPU: recorded op calls), or
# "static" (eagerly).
GRAPH_KINDS = ("cuda", "recorded", "static")

log = logging.getLogger(__name__)


def batch_ladder(max_batch_size: int) -> list[int]:
    sizes = [1]
    while sizes[-1] < max_batch_size:
        sizes.append(min(sizes[-1] * 2, max_batch_size))
    return sizes


def context_ladder(max_seq_len: int, block_size: int) -> list[int]:
    top = -(-max_seq_len // block_size) * block_size
    sizes = [min(top, max(block_size, _SMALLEST_CONTEXT))]
    while sizes[-1] < top:
        sizes.append(min(sizes[-1] * 2, top))
    return sizes


def token_ladder(max_batch_size: int, max_num_tokens: int) -> list[int]:
    """Token counts of the mixed-step graphs: 2^k and 1.5 * 2^k between max_batch_size + 1 and the cap."""
    top = min(max_num_tokens, MAX_GRAPH_TOKENS)
    sizes, k = [], 1
    while k <= top:
        sizes += [n for n in (k, k + k // 2) if max_batch_size + 1 < n <= top]
        k *= 2
    return sorted(set(sizes))


class StepGraphs:
    """``forward(step)`` computes float32 logits of every row's last token; it is captured per shape."""

    def __init__(self, forward: Forward, inputs: StepInputs, clock: StepClock, max_batch_size: int, max_seq_len: int,
                 max_num_tokens: int, kind: str = "cuda"):
        if kind not in GRAPH_KINDS:
            raise ValueError(f"step graphs are one of {', '.join(GRAPH_KINDS)}, not {kind!r}")
        self.forward = forward
        self.inputs = inputs
        self.clock = clock
        self.kind = kind
        bs = inputs.block_size
        if kind == "recorded":  # every batch size, one table width (a CPU's attention reads only what it needs)
            self.decode_shapes = [StepShape(b, b, inputs.max_blocks) for b in range(1, max_batch_size + 1)]
        else:
            self.decode_shapes = [StepShape(b, b, c // bs) for c in context_ladder(max_seq_len, bs)
                                  for b in batch_ladder(max_batch_size)]
        self.mixed_shapes = ([] if kind == "recorded" else
                             [StepShape(max_batch_size + 1, t, inputs.max_blocks)
                              for t in token_ladder(max_batch_size, max_num_tokens)])
        self.graphs: dict[StepShape, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # "recorded": each shape's recording once it ran (None: refused, it runs eagerly).
        self.recordings: dict[StepShape, RecordedStep | None] = {}
        if kind != "cuda":
            return
        pool = None
        # Largest first, so the smaller graphs fit in the memory the largest took from the pool.
        for shape in sorted(self.decode_shapes + self.mixed_shapes, key=lambda s: (s.tokens, s.width), reverse=True):
            step = inputs.prepare([], pad_to=shape)
            self.forward(step)  # warm-up: lazy initialisation must not happen during capture
            torch.cuda.synchronize(inputs.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.forward(step)
            pool = graph.pool()
            self.graphs[shape] = (graph, logits)

    def shape_for(self, batch: Batch) -> StepShape | None:
        """The smallest captured shape that holds the step, or None (it runs eagerly)."""
        if not batch:
            return None
        longest = max(req.num_computed_tokens + n for req, n in batch)
        lens = [n for _, n in batch]
        decode = all(n == 1 and req.num_computed_tokens + 1 == req.num_tokens for req, n in batch)
        shapes = self.decode_shapes if decode else self.mixed_shapes
        bs = self.inputs.block_size
        for shape in shapes:
            if shape.width * bs >= longest and padding(lens, shape, bs) is not None:
                return shape
        return None

    def run(self, batch: Batch, shape: StepShape, prev_tokens: PrevTokens | None = None) -> torch.Tensor:
        """Float32 logits of the step's sampled sequences, in batch order, from the graph of ``shape``."""
        with self.clock.phase("prepare"):
            step = self.inputs.prepare(batch, pad_to=shape, prev_tokens=prev_tokens)
        if self.kind == "cuda":
            graph, logits = self.graphs[shape]
            graph.replay()
        elif self.kind == "recorded":
            logits = self._recorded(shape, step)
        else:
            logits = self.forward(step)
        rows = [i for i, (req, n) in enumerate(batch) if req.num_computed_tokens + n == req.num_tokens]
        if len(rows) == len(batch):
            return logits[: len(batch)]
        return logits[tensor_on(rows, torch.long, logits.device)]  # rows may be empty

    def _recorded(self, shape: StepShape, step: StepBatch) -> torch.Tensor:
        if shape in self.recordings:
            recording = self.recordings[shape]
            return self.forward(step) if recording is None else recording.replay()
        try:
            self.recordings[shape], logits = record(lambda: self.forward(step))
        except NotRecordable as e:
            self.recordings[shape] = None
            log.warning("decode steps of %d sequences run eagerly: %s", shape.rows, e)
            return self.forward(step)
        return logits
