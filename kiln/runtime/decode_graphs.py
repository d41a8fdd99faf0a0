"""Decode steps replayed from CUDA graphs captured at load, one per (batch size, context) bucket.

A decode step runs one token for each sequence through every layer: on a GPU that is about a thousand
small kernels, and launching them from Python costs more than running them. So at load the runner
captures the step for a ladder of batch sizes and context lengths into one memory pool, over the
persistent buffers of ``StepInputs``; a step then fills the buffers (padded to the bucket) and replays
the smallest graph that holds it. ``capture=False`` runs the same padded, fixed-shape path eagerly
(the "static" mode, to test it without a GPU).
"""
from __future__ import annotations

from typing import Callable

import torch

from kiln.runtime.step_inputs import Batch, PrevTokens, StepBatch, StepInputs

_SMALLEST_CONTEXT = 256

Forward = Callable[[StepBatch], torch.Tensor]


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


class DecodeGraphs:
    """``forward(step)`` computes float32 logits of every row of a padded step; it is captured per bucket."""

    def __init__(self, forward: Forward, inputs: StepInputs, max_batch_size: int, max_seq_len: int,
                 capture: bool = True):
        self.forward = forward
        self.inputs = inputs
        self.batch_sizes = batch_ladder(max_batch_size)
        self.contexts = context_ladder(max_seq_len, inputs.block_size)
        self.captured = capture
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if not capture:
            return
        pool = None
        # Largest first, so the smaller graphs fit in the memory the largest took from the pool.
        for context in reversed(self.contexts):
            for bs in reversed(self.batch_sizes):
                step = inputs.prepare([], pad_to=(bs, context))
                self.forward(step)  # warm-up: lazy initialisation must not happen during capture
                torch.cuda.synchronize(inputs.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self.forward(step)
                pool = graph.pool()
                self.graphs[(bs, context)] = (graph, logits)

    def fits(self, batch: Batch) -> bool:
        """A step of one sampled token per sequence, within the largest batch and context captured."""
        return (
            0 < len(batch) <= self.batch_sizes[-1]
            and all(n == 1 and req.num_computed_tokens + 1 == req.num_tokens for req, n in batch)
            and max(req.num_tokens for req, _ in batch) <= self.contexts[-1]
        )

    def run(self, batch: Batch, prev_tokens: PrevTokens | None = None) -> torch.Tensor:
        """Float32 logits [len(batch), vocab] of the step, from the smallest bucket that holds it."""
        n = len(batch)
        bs = next(b for b in self.batch_sizes if b >= n)
        context = next(c for c in self.contexts if c >= max(req.num_tokens for req, _ in batch))
        step = self.inputs.prepare(batch, pad_to=(bs, context), prev_tokens=prev_tokens)
        if not self.captured:
            return self.forward(step)[:n]
        graph, logits = self.graphs[(bs, context)]
        graph.replay()
        return logits[:n]
