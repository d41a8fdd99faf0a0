"""The one builder of a step's model inputs, over persistent buffers shared by the eager and graph paths.

A step's batch is a list of (request, n): request computes its tokens ``[num_computed, num_computed + n)``.
``StepInputs.prepare`` writes their token ids, positions, KV slots, query offsets, context lengths and
block tables into buffers allocated once at the engine's limits, and returns views of them. The eager
path takes views of the exact batch; a CUDA-graph replay takes the same buffers padded to the captured
shape (rows past the batch point at a dummy KV block that no request owns), so both paths read inputs
built by the same code, and a graph captured over these buffers sees each step's values.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kiln.ops import AttentionMetadata
from kiln.runtime.request import Request

Batch = list[tuple[Request, int]]
# The token ids a step in flight sampled (on the device), and each request's row in them.
PrevTokens = tuple[torch.Tensor, dict[str, int]]


@dataclass(slots=True)
class StepBatch:
    token_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    # Rows of the hidden states whose logits are sampled, in batch order; None: every row (a decode step).
    logits_indices: torch.Tensor | None
    num_seqs: int  # sequences of the batch, without padding


class StepInputs:
    def __init__(self, max_num_tokens: int, max_batch_size: int, max_seq_len: int, block_size: int,
                 device: torch.device, dummy_block: int = 0):
        self.block_size = block_size
        self.device = device
        self.dummy_block = dummy_block
        self.max_blocks = -(-max_seq_len // block_size)
        t, b = max_num_tokens, max_batch_size
        # NOTE: on a GPU each buffer has a pinned host twin and is filled by a copy that does not block
        # the host. The next step overwrites the twin only after this step's sampled tokens came back
        # (a synchronisation), so a copy never reads a twin that is being rewritten.
        pinned = device.type == "cuda"

        def buffer(*shape: int, dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
            dev = torch.zeros(shape, dtype=dtype, device=device)
            return dev, (torch.zeros(shape, dtype=dtype, pin_memory=True) if pinned else dev)

        self.token_ids, self._token_ids = buffer(t)
        self.positions, self._positions = buffer(t)
        self.slot_mapping, self._slot_mapping = buffer(t)
        self.query_start_loc, self._query_start_loc = buffer(b + 1, dtype=torch.int32)
        self.seq_lens, self._seq_lens = buffer(b)
        self.block_tables, self._block_tables = buffer(b, self.max_blocks)
        self.logits_indices, self._logits_indices = buffer(b)
        # Rows whose input token is still on the device (async scheduling): where it goes, where it is.
        self.fill_dst, self._fill_dst = buffer(b)
        self.fill_src, self._fill_src = buffer(b)
        self._copy = pinned

    def prepare(self, batch: Batch, pad_to: tuple[int, int] | None = None,
                prev_tokens: PrevTokens | None = None) -> StepBatch:
        """Fill the buffers for ``batch`` and return views of them.

        A request whose input token is a placeholder (sampled by the step in flight, async scheduling)
        takes it from ``prev_tokens``: that step's token ids on the device and each request's row there.

        With ``pad_to=(rows, context)`` (a decode step: one token per sequence) the step is padded to
        ``rows`` sequences and a block table ``context`` tokens wide, the shape of a captured graph;
        its metadata's host-side lengths then only bound the shapes (``max_seq_len``), so only
        implementations that read lengths from the device tensors may run it (graph-safe ones).
        """
        bs = self.block_size
        num_seqs = len(batch)
        lens = [n for _, n in batch]
        starts = [req.num_computed_tokens for req, _ in batch]
        seq_lens = [s + n for s, n in zip(starts, lens)]
        sampled = [start + n == req.num_tokens for (req, n), start in zip(batch, starts)]
        if pad_to is None:
            rows, width = num_seqs, -(-max(seq_lens, default=0) // bs)
        else:
            rows, width = pad_to[0], pad_to[1] // bs
            if sum(lens) != num_seqs or rows < num_seqs or width * bs < max(seq_lens, default=0):
                raise ValueError(f"a padded step holds one token per sequence, at most {rows} sequences "
                                 f"of at most {width * bs} tokens")
        num_tokens = sum(lens) + rows - num_seqs

        token_ids = self._token_ids[:num_tokens].numpy()
        positions = self._positions[:num_tokens].numpy()
        slots = self._slot_mapping[:num_tokens].numpy()
        table = self._block_tables[:rows, :width].numpy()
        query_start_loc = self._query_start_loc[: rows + 1].numpy()
        lengths = self._seq_lens[:rows].numpy()
        table.fill(self.dummy_block)
        fills: list[tuple[int, int]] = []
        offset = 0
        for i, ((req, n), start) in enumerate(zip(batch, starts)):
            if req.num_placeholders and start + n > req.num_known_tokens:
                if n != 1 or prev_tokens is None or req.request_id not in prev_tokens[1]:
                    raise RuntimeError(f"request {req.request_id!r}: its input token is not known yet and the "
                                       f"step that samples it is not in flight")
                fills.append((offset, prev_tokens[1][req.request_id]))
            blocks = np.asarray(req.block_ids[:width], dtype=np.int64)  # only those the context reaches
            table[i, : len(blocks)] = blocks
            pos = np.arange(start, start + n, dtype=np.int64)
            positions[offset:offset + n] = pos
            slots[offset:offset + n] = blocks[pos // bs] * bs + pos % bs
            token_ids[offset:offset + n] = req.token_ids[start:start + n]
            offset += n
        # Padding rows: one token 0 at position 0, written to the dummy block, context of one token.
        token_ids[offset:] = 0
        positions[offset:] = 0
        slots[offset:] = self.dummy_block * bs
        query_start_loc[0] = 0
        np.cumsum(lens + [1] * (rows - num_seqs), out=query_start_loc[1:])
        lengths[:num_seqs] = seq_lens
        lengths[num_seqs:] = 1

        self._upload(self.token_ids, self._token_ids, num_tokens)
        self._upload(self.positions, self._positions, num_tokens)
        self._upload(self.slot_mapping, self._slot_mapping, num_tokens)
        self._upload(self.query_start_loc, self._query_start_loc, rows + 1)
        self._upload(self.seq_lens, self._seq_lens, rows)
        if self._copy:
            self.block_tables[:rows, :width].copy_(self._block_tables[:rows, :width], non_blocking=True)
        if fills:
            k = len(fills)
            self._fill_dst[:k].numpy()[:] = [d for d, _ in fills]
            self._fill_src[:k].numpy()[:] = [s for _, s in fills]
            self._upload(self.fill_dst, self._fill_dst, k)
            self._upload(self.fill_src, self._fill_src, k)
            self.token_ids[self.fill_dst[:k]] = prev_tokens[0][self.fill_src[:k]]
        logits_indices = None
        if pad_to is None and not (num_tokens == num_seqs and all(sampled)):
            rows_to_sample = [int(query_start_loc[i + 1]) - 1 for i in range(num_seqs) if sampled[i]]
            self._logits_indices[: len(rows_to_sample)].numpy()[:] = rows_to_sample
            self._upload(self.logits_indices, self._logits_indices, len(rows_to_sample))
            logits_indices = self.logits_indices[: len(rows_to_sample)]
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:num_tokens],
            block_tables=self.block_tables[:rows, :width],
            query_start_loc=query_start_loc.tolist(),
            seq_lens=lengths.tolist() if pad_to is None else [width * bs] * rows,
            block_size=bs,
            query_start_loc_t=self.query_start_loc[: rows + 1],
            seq_lens_t=self.seq_lens[:rows],
            max_seq_len=width * bs if pad_to is not None else 0,
        )
        return StepBatch(self.token_ids[:num_tokens], self.positions[:num_tokens], meta, logits_indices, num_seqs)

    def _upload(self, dst: torch.Tensor, host: torch.Tensor, n: int) -> None:
        if self._copy:
            dst[:n].copy_(host[:n], non_blocking=True)
