"""Decode steps replayed from CUDA graphs captured at load, one per (batch size, context) bucket.

A decode step runs one token for each sequence through every layer: on a GPU that is about a thousand
small kernels, and launching them from Python costs more than running them. So at load the runner
captures the step for a ladder of batch sizes and context lengths into one memory pool, over static
input buffers; a step then copies its inputs into the buffers and replays the smallest graph that
holds it. Rows past the batch are padding: they point at a dummy KV block that no request owns.
``capture=False`` runs the same padded, fixed-shape path eagerly (to test it without a GPU).
"""
from __future__ import annotations

import torch

from kiln.nn import ForwardContext, forward_context
from kiln.ops import AttentionMetadata
from kiln.runtime.request import Request

_SMALLEST_CONTEXT = 256


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
    def __init__(self, model: torch.nn.Module, kv_caches: list, device: torch.device, block_size: int,
                 max_batch_size: int, max_seq_len: int, dummy_block: int, capture: bool = True):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.dummy_block = dummy_block
        self.batch_sizes = batch_ladder(max_batch_size)
        self.contexts = context_ladder(max_seq_len, block_size)
        rows, width = self.batch_sizes[-1], self.contexts[-1] // block_size
        self.token_ids = torch.zeros(rows, dtype=torch.int64, device=device)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self.slots = torch.full((rows,), dummy_block * block_size, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(rows, dtype=torch.int64, device=device)
        self.block_tables = torch.full((rows, width), dummy_block, dtype=torch.int64, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None,
                                                 AttentionMetadata]] = {}
        pool = None
        # Largest first, so the smaller graphs fit in the memory the largest took from the pool.
        for context in reversed(self.contexts):
            for bs in reversed(self.batch_sizes):
                meta = self._meta(bs, context)
                graph = logits = None
                if capture:
                    self._forward(bs, meta)  # warm-up: lazy initialisation must not happen during capture
                    torch.cuda.synchronize(device)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        logits = self._forward(bs, meta)
                    pool = graph.pool()
                self.graphs[(bs, context)] = (graph, logits, meta)

    def fits(self, batch: list[tuple[Request, int]]) -> bool:
        """A step of one sampled token per sequence, within the largest batch and context captured."""
        return (
            0 < len(batch) <= self.batch_sizes[-1]
            and all(n == 1 and req.num_computed_tokens + 1 == req.num_tokens for req, n in batch)
            and max(req.num_tokens for req, _ in batch) <= self.contexts[-1]
        )

    def run(self, batch: list[tuple[Request, int]]) -> torch.Tensor:
        """Float32 logits [len(batch), vocab] of the step, from the smallest graph that holds it."""
        n = len(batch)
        bs = next(b for b in self.batch_sizes if b >= n)
        context = next(c for c in self.contexts if c >= max(req.num_tokens for req, _ in batch))
        width = context // self.block_size
        tokens = torch.zeros(bs, dtype=torch.int64)
        positions = torch.zeros(bs, dtype=torch.int64)
        slots = torch.full((bs,), self.dummy_block * self.block_size, dtype=torch.int64)
        seq_lens = torch.ones(bs, dtype=torch.int64)
        tables = torch.full((bs, width), self.dummy_block, dtype=torch.int64)
        for i, (req, _) in enumerate(batch):
            pos = req.num_computed_tokens
            tokens[i] = req.token_ids[pos]
            positions[i] = pos
            slots[i] = req.block_ids[pos // self.block_size] * self.block_size + pos % self.block_size
            seq_lens[i] = pos + 1
            tables[i, : len(req.block_ids)] = torch.tensor(req.block_ids, dtype=torch.int64)
        self.token_ids[:bs].copy_(tokens)
        self.positions[:bs].copy_(positions)
        self.slots[:bs].copy_(slots)
        self.seq_lens[:bs].copy_(seq_lens)
        self.block_tables[:bs, :width].copy_(tables)
        graph, logits, meta = self.graphs[(bs, context)]
        if graph is None:
            logits = self._forward(bs, meta)
        else:
            graph.replay()
        return logits[:n]

    def _meta(self, bs: int, context: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:bs],
            block_tables=self.block_tables[:bs, : context // self.block_size],
            query_start_loc=list(range(bs + 1)),
            seq_lens=[context] * bs,  # shapes only: the lengths themselves are read from seq_lens_t
            block_size=self.block_size,
            seq_lens_t=self.seq_lens[:bs],
            max_seq_len=context,
        )

    def _forward(self, bs: int, meta: AttentionMetadata) -> torch.Tensor:
        # NOTE: derived tensors cached by the ops must be recomputed inside each capture or run.
        meta.scratch.clear()
        with forward_context(ForwardContext(meta, self.kv_caches)):
            hidden = self.model(self.token_ids[:bs], self.positions[:bs])
            return self.model.compute_logits(hidden).float()
