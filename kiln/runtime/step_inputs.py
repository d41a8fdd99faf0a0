"""The one builder of a step's model inputs, over persistent buffers shared by the eager and graph paths.

A step's batch is a list of (request, n): request computes its tokens ``[num_computed, num_computed + n)``.
``StepInputs.prepare`` writes their token ids, positions, KV slots, query offsets, context lengths and
block tables into buffers allocated once at the engine's limits, and returns views of them. The eager
path takes views of the exact batch; a CUDA-graph replay takes the same buffers padded to the captured
shape (rows past the batch point at a dummy KV block that no request owns), so both paths read inputs
built by the same code, and a graph captured over these buffers sees each step's values.

Each running request's block table lives across steps in ``BlockRows`` (a row per request, written
once and then only appended to as its blocks grow, rewritten when its blocks were freed), so a step
gathers its tables, slots and positions with a few array operations instead of rebuilding them
request by request; only prefill rows (more than one token) take a loop of their own.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kiln.ops import AttentionMetadata
from kiln.runtime.request import Request, RequestStatus
from kiln.runtime.step_clock import PREPARE_WAIT, StepClock

Batch = list[tuple[Request, int]]


@dataclass(frozen=True, slots=True)
class StepShape:
    """A fixed step shape (a captured graph's): ``rows`` sequences, ``tokens`` tokens, block tables
    ``width`` blocks wide."""

    rows: int
    tokens: int
    width: int


def padding(lens: list[int], shape: StepShape, block_size: int) -> list[int] | None:
    """Query lengths of the padding rows that bring a step of ``lens`` to ``shape``, or None if it
    does not fit: each padding row takes at least one token, and at most a block table's width."""
    pad_rows, pad_tokens = shape.rows - len(lens), shape.tokens - sum(lens)
    if pad_rows < 0 or pad_tokens < pad_rows or (pad_rows == 0 and pad_tokens):
        return None
    pad = [1] * pad_rows
    extra, cap = pad_tokens - pad_rows, shape.width * block_size
    for i in range(pad_rows):
        more = min(extra, cap - 1)
        pad[i] += more
        extra -= more
    return None if extra else pad
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


_FIELDS = ("token_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens", "block_tables",
           "logits_indices", "fill_dst", "fill_src")


class _Buffers:
    """One tensor per step-input field, at the engine's limits."""

    def __init__(self, max_num_tokens: int, max_batch_size: int, max_blocks: int, device: torch.device | str,
                 pin: bool = False):
        t, b = max_num_tokens, max_batch_size

        def zeros(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin)

        self.token_ids = zeros(t)
        self.positions = zeros(t)
        self.slot_mapping = zeros(t)
        self.query_start_loc = zeros(b + 1, dtype=torch.int32)
        self.seq_lens = zeros(b)
        self.block_tables = zeros(b, max_blocks)
        self.logits_indices = zeros(b)
        # Rows whose input token is still on the device (async scheduling): where it goes, where it is.
        self.fill_dst = zeros(b)
        self.fill_src = zeros(b)
        # Recorded after the copies that read this set (a pinned host set): it may be rewritten after.
        self.copied: torch.cuda.Event | None = None


def _table(buffers: _Buffers, rows: int, width: int) -> torch.Tensor:
    """The step's block tables, [rows, width], as the first rows * width entries of the buffer: contiguous, so
    that the host's copy to the device is one pinned, asynchronous copy. (A [:rows, :width] slice of the
    [max rows, max blocks] buffer is strided; torch copies a strided host tensor through a pageable one, and
    CUDA syncs the stream before a copy from pageable memory, so the host could wait there for the step in
    flight: see ``kiln.runtime.to_device``.)"""
    return buffers.block_tables.view(-1)[:rows * width].view(rows, width)


class BlockRows:
    """The block tables of the requests in flight, a row each, kept across steps (see the module's docstring).

    ``rows(batch)`` returns the batch's rows, first bringing each up to date: a request seen for the first
    time, or whose blocks were freed since (``Request.blocks_epoch``), gets its row written anew; one whose
    block list grew gets the new entries. Entries past a request's blocks name ``dummy_block``. The row of
    a request that no longer runs is reused once rows run short."""

    def __init__(self, num_rows: int, max_blocks: int, dummy_block: int):
        self.dummy_block = dummy_block
        self.table = np.full((num_rows, max_blocks), dummy_block, dtype=np.int64)
        self._count = [0] * num_rows  # blocks written in each row
        self._owner: list[Request | None] = [None] * num_rows
        self._epoch = [0] * num_rows
        self._row_of: dict[str, int] = {}
        self._free = list(range(num_rows - 1, -1, -1))

    def rows(self, batch: Batch) -> list[int]:
        if len(self._free) < len(batch):
            self._reclaim({id(req) for req, _ in batch})
        rows = []
        for req, _ in batch:
            row = self._row_of.get(req.request_id)
            if row is None or self._owner[row] is not req or self._epoch[row] != req.blocks_epoch:
                row = self._assign(req, row)
            blocks = req.block_ids
            count = self._count[row]
            if len(blocks) > count:
                self.table[row, count:len(blocks)] = blocks[count:]
                self._count[row] = len(blocks)
            rows.append(row)
        return rows

    def _assign(self, req: Request, row: int | None) -> int:
        if row is None:
            if not self._free:
                raise RuntimeError(f"more than {len(self._owner)} requests in flight hold block-table rows")
            row = self._free.pop()
            self._row_of[req.request_id] = row
        elif self._count[row]:
            self.table[row, :self._count[row]] = self.dummy_block
        self._owner[row], self._epoch[row], self._count[row] = req, req.blocks_epoch, 0
        return row

    def _reclaim(self, keep: set[int]) -> None:
        """Free the rows of requests that no longer run (finished, preempted, dropped), but those in ``keep``."""
        for rid, row in list(self._row_of.items()):
            owner = self._owner[row]
            if owner is None or (owner.status != RequestStatus.RUNNING and id(owner) not in keep):
                del self._row_of[rid]
                self.table[row, :self._count[row]] = self.dummy_block
                self._owner[row], self._count[row] = None, 0
                self._free.append(row)


class StepInputs:
    def __init__(self, max_num_tokens: int, max_batch_size: int, max_seq_len: int, block_size: int,
                 device: torch.device, dummy_block: int = 0, clock: StepClock | None = None):
        self.block_size = block_size
        # Times the wait for a reused host buffer set's copies (PREPARE_WAIT): the model runner's clock.
        self.clock = clock if clock is not None else StepClock()
        self.device = device
        self.dummy_block = dummy_block
        self.max_blocks = -(-max_seq_len // block_size)
        # One row more than the batch: a mixed graph shape always has a padding row (step_graphs).
        rows = max_batch_size + 1
        self._dev = _Buffers(max_num_tokens, rows, self.max_blocks, device)
        # NOTE: on a GPU the buffers are filled from pinned host twins by copies that do not block the
        # host. With async scheduling the next step is prepared before this one's copies have surely
        # run, so there are two sets of twins, used in turn, each reused only once its copies are done.
        self._copy = device.type == "cuda"
        self._hosts = ([_Buffers(max_num_tokens, rows, self.max_blocks, "cpu", pin=True) for _ in range(2)]
                       if self._copy else [self._dev])
        self._turn = 0
        self.block_rows = BlockRows(2 * rows, self.max_blocks, dummy_block)

    def __getattr__(self, name: str) -> torch.Tensor:
        if name in _FIELDS:  # the device buffers, which captured graphs read
            return getattr(self._dev, name)
        raise AttributeError(name)

    def prepare(self, batch: Batch, pad_to: StepShape | None = None,
                prev_tokens: PrevTokens | None = None) -> StepBatch:
        """Fill the buffers for ``batch`` and return views of them.

        A request whose input token is a placeholder (sampled by the step in flight, async scheduling)
        takes it from ``prev_tokens``: that step's token ids on the device and each request's row there.

        With ``pad_to`` the step is padded to that shape (a captured graph's) with rows that write
        only the dummy block (see ``padding``); its metadata's host-side lengths then only bound the
        shapes (``max_seq_len``), so only implementations that read lengths from the device tensors
        may run it (graph-safe ones).
        """
        bs = self.block_size
        num_seqs = len(batch)
        lens = [n for _, n in batch]
        starts = [req.num_computed_tokens for req, _ in batch]
        seq_lens = [s + n for s, n in zip(starts, lens)]
        sampled = [start + n == req.num_tokens for (req, n), start in zip(batch, starts)]
        if pad_to is None:
            rows, width, pad = num_seqs, -(-max(seq_lens, default=0) // bs), []
        else:
            rows, width = pad_to.rows, pad_to.width
            pad = padding(lens, pad_to, bs)
            if pad is None or width * bs < max(seq_lens, default=0):
                raise ValueError(f"a step of {len(lens)} sequences and {sum(lens)} tokens does not fit {pad_to}")
        num_tokens = sum(lens) + sum(pad)

        h = self._hosts[self._turn]
        self._turn = (self._turn + 1) % len(self._hosts)
        if h.copied is not None:
            with self.clock.phase(PREPARE_WAIT):
                h.copied.synchronize()
        token_ids = h.token_ids[:num_tokens].numpy()
        positions = h.positions[:num_tokens].numpy()
        slots = h.slot_mapping[:num_tokens].numpy()
        table = _table(h, rows, width).numpy()
        query_start_loc = h.query_start_loc[: rows + 1].numpy()
        lengths = h.seq_lens[:rows].numpy()
        offset, fills = self._fill(batch, starts, lens, width, token_ids, positions, slots, table, prev_tokens)
        # Padding rows: tokens 0 at positions 0.., written to the dummy block, which their tables name.
        token_ids[offset:] = 0
        slots[offset:] = self.dummy_block * bs
        for n in pad:
            positions[offset:offset + n] = np.arange(n)
            offset += n
        query_start_loc[0] = 0
        np.cumsum(lens + pad, out=query_start_loc[1:])
        lengths[:num_seqs] = seq_lens
        lengths[num_seqs:] = pad

        d = self._dev
        self._upload(h, "token_ids", num_tokens)
        self._upload(h, "positions", num_tokens)
        self._upload(h, "slot_mapping", num_tokens)
        self._upload(h, "query_start_loc", rows + 1)
        self._upload(h, "seq_lens", rows)
        if self._copy:
            _table(d, rows, width).copy_(_table(h, rows, width), non_blocking=True)
        if fills:
            k = len(fills)
            h.fill_dst[:k].numpy()[:] = [dst for dst, _ in fills]
            h.fill_src[:k].numpy()[:] = [src for _, src in fills]
            self._upload(h, "fill_dst", k)
            self._upload(h, "fill_src", k)
            d.token_ids[d.fill_dst[:k]] = prev_tokens[0][d.fill_src[:k]]
        logits_indices = None
        if pad_to is None and not (num_tokens == num_seqs and all(sampled)):
            rows_to_sample = [int(query_start_loc[i + 1]) - 1 for i in range(num_seqs) if sampled[i]]
            h.logits_indices[: len(rows_to_sample)].numpy()[:] = rows_to_sample
            self._upload(h, "logits_indices", len(rows_to_sample))
            logits_indices = d.logits_indices[: len(rows_to_sample)]
        if self._copy:
            h.copied = torch.cuda.Event()
            h.copied.record()
        meta = AttentionMetadata(
            slot_mapping=d.slot_mapping[:num_tokens],
            block_tables=_table(d, rows, width),
            query_start_loc=query_start_loc.tolist(),
            seq_lens=lengths.tolist() if pad_to is None else [width * bs] * rows,
            block_size=bs,
            query_start_loc_t=d.query_start_loc[: rows + 1],
            seq_lens_t=d.seq_lens[:rows],
            max_seq_len=width * bs if pad_to is not None else 0,
        )
        return StepBatch(d.token_ids[:num_tokens], d.positions[:num_tokens], meta, logits_indices, num_seqs)

    def _fill(self, batch: Batch, starts: list[int], lens: list[int], width: int, token_ids: np.ndarray,
              positions: np.ndarray, slots: np.ndarray, table: np.ndarray, prev_tokens: PrevTokens | None
              ) -> tuple[int, list[tuple[int, int]]]:
        """Write the batch's token ids, positions, slots and block tables (rows taken from ``block_rows``);
        return the number of tokens written and the input tokens still on the device, as (token offset,
        row in ``prev_tokens``)."""
        bs = self.block_size
        num_seqs = len(batch)
        rows = self.block_rows.rows(batch)
        source = self.block_rows.table
        table[:num_seqs] = source[rows, :width]
        table[num_seqs:] = self.dummy_block
        fills: list[tuple[int, int]] = []
        if all(n == 1 for n in lens):  # a decode step: one token a row, all at once
            pos = np.asarray(starts, dtype=np.int64)
            positions[:num_seqs] = pos
            slots[:num_seqs] = source[rows, pos // bs] * bs + pos % bs
            token_ids[:num_seqs] = [req.token_ids[start] for (req, _), start in zip(batch, starts)]
            for i, ((req, _), start) in enumerate(zip(batch, starts)):
                if req.num_placeholders and start + 1 > req.num_known_tokens:
                    fills.append((i, self._in_flight(req, 1, prev_tokens)))
            return num_seqs, fills
        offset = 0
        for i, ((req, n), start) in enumerate(zip(batch, starts)):
            if req.num_placeholders and start + n > req.num_known_tokens:
                fills.append((offset, self._in_flight(req, n, prev_tokens)))
            pos = np.arange(start, start + n, dtype=np.int64)
            positions[offset:offset + n] = pos
            slots[offset:offset + n] = source[rows[i], pos // bs] * bs + pos % bs
            token_ids[offset:offset + n] = req.token_ids[start:start + n]
            offset += n
        return offset, fills

    @staticmethod
    def _in_flight(req: Request, n: int, prev_tokens: PrevTokens | None) -> int:
        """The row of ``req``'s input token in the step in flight's sampled tokens."""
        if n != 1 or prev_tokens is None or req.request_id not in prev_tokens[1]:
            raise RuntimeError(f"request {req.request_id!r}: its input token is not known yet and the "
                               f"step that samples it is not in flight")
        return prev_tokens[1][req.request_id]

    def _upload(self, host: _Buffers, name: str, n: int) -> None:
        if self._copy:
            getattr(self._dev, name)[:n].copy_(getattr(host, name)[:n], non_blocking=True)
