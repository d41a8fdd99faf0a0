"""A step's inputs, built from the block-table rows kept across steps, against the same inputs rebuilt from
scratch for every step: random admissions, chunked prefills, decodes, finishes and preemptions (whose
freed blocks other requests then take), over the real block manager, eager and padded to graph shapes."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from kiln.runtime.kv_cache import BlockManager
from kiln.runtime.request import Request, RequestStatus
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.step_inputs import StepInputs, StepShape, padding

BS = 4
MAX_SEQ = 64
MAX_BATCH = 6
DUMMY = 0


def rebuilt(batch, pad_to: StepShape | None) -> dict[str, list]:
    """The step's inputs computed from the requests alone, the plain way."""
    lens = [n for _, n in batch]
    width = -(-max((r.num_computed_tokens + n for r, n in batch), default=0) // BS)
    pad = [] if pad_to is None else padding(lens, pad_to, BS)
    if pad_to is not None:
        width = pad_to.width
    tokens, positions, slots, tables, seq_lens = [], [], [], [], []
    for req, n in batch:
        start = req.num_computed_tokens
        for p in range(start, start + n):
            tokens.append(req.token_ids[p])
            positions.append(p)
            slots.append(req.block_ids[p // BS] * BS + p % BS)
        tables.append([req.block_ids[j] if j < len(req.block_ids) else DUMMY for j in range(width)])
        seq_lens.append(start + n)
    for n in pad:
        tokens += [0] * n
        positions += list(range(n))
        slots += [DUMMY * BS] * n
        tables.append([DUMMY] * width)
        seq_lens.append(n)
    starts = np.cumsum([0] + lens + pad).tolist()
    return dict(token_ids=tokens, positions=positions, slot_mapping=slots, block_tables=tables,
                query_start_loc=starts, seq_lens=seq_lens)


def built(step) -> dict[str, list]:
    return dict(token_ids=step.token_ids.tolist(), positions=step.positions.tolist(),
                slot_mapping=step.meta.slot_mapping.tolist(), block_tables=step.meta.block_tables.tolist(),
                query_start_loc=step.meta.query_start_loc_t.tolist(), seq_lens=step.meta.seq_lens_t.tolist())


@pytest.mark.parametrize("seed", range(6))
def test_kept_rows_give_the_rebuilt_step_inputs(seed):
    rng = random.Random(seed)
    blocks = BlockManager(num_blocks=40, block_size=BS, enable_prefix_caching=seed % 2 == 0)
    inputs = StepInputs(max_num_tokens=64, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ, block_size=BS,
                        device=torch.device("cpu"), dummy_block=DUMMY)
    params = SamplingParams(max_tokens=MAX_SEQ)
    waiting: list[Request] = []
    running: list[Request] = []
    ids = iter(range(10**6))
    # Request ids are reused after a request ends, as a client may reuse them.
    free_ids: list[str] = []
    steps = 0
    for _ in range(300):
        if rng.random() < 0.4 and len(waiting) < 4:
            rid = free_ids.pop() if free_ids and rng.random() < 0.5 else f"r{next(ids)}"
            prompt = [rng.randrange(1, 50) for _ in range(rng.randrange(1, 20))]
            waiting.append(Request(rid, prompt if seed > 2 else [7] * len(prompt), params))
        # Admit what fits.
        while waiting and len(running) < MAX_BATCH:
            req = waiting[0]
            computed, hit = blocks.get_computed_blocks(req) if seed % 2 == 0 else ([], 0)
            req.num_computed_tokens = hit
            if not blocks.allocate_slots(req, 0, computed):
                req.num_computed_tokens = 0
                break
            waiting.pop(0)
            req.status = RequestStatus.RUNNING
            running.append(req)
        # Preempt or finish some.
        for req in list(running):
            roll = rng.random()
            if roll < 0.05 or (roll < 0.15 and req.num_tokens >= MAX_SEQ - 8):
                running.remove(req)
                blocks.free(req)
                req.status = RequestStatus.FINISHED_STOPPED
                free_ids.append(req.request_id)
            elif roll < 0.1:
                running.remove(req)
                blocks.free(req)
                req.status = RequestStatus.PREEMPTED
                req.num_computed_tokens = 0
                waiting.insert(0, req)
        # Schedule: a chunk of the prompt, or one token.
        batch = []
        for req in running:
            left = req.num_tokens - req.num_computed_tokens
            n = min(left, rng.randrange(1, 9)) if left > 1 else 1
            if req.num_computed_tokens + n > MAX_SEQ or not blocks.allocate_slots(req, n):
                continue
            batch.append((req, n))
        if not batch:
            continue
        rng.shuffle(batch)  # the scheduler's order is not the admission order
        pad_to = None
        if rng.random() < 0.3:
            pad_to = StepShape(rows=len(batch) + rng.randrange(0, 2), tokens=sum(n for _, n in batch) + 2,
                               width=MAX_SEQ // BS)
            if padding([n for _, n in batch], pad_to, BS) is None:
                pad_to = None
        step = inputs.prepare(batch, pad_to=pad_to)
        assert built(step) == rebuilt(batch, pad_to), f"step {steps}"
        # One contiguous table, so that a GPU's copy of it from pinned memory does not wait on the device.
        assert step.meta.block_tables.is_contiguous()
        steps += 1
        # The step ran: the tokens are computed, the sampled ones appended.
        for req, n in batch:
            req.num_computed_tokens += n
            if req.num_computed_tokens == req.num_tokens:
                req.token_ids.append(rng.randrange(1, 50))
            if seed % 2 == 0:
                blocks.cache_blocks(req, req.num_computed_tokens)
    assert steps > 150


def test_a_wait_for_reused_host_buffers_counts_as_wait_not_prepare():
    """On a GPU ``prepare`` may wait for the copies of the host buffer set it reuses: the device's time, which
    the step clock reports as ``wait`` (here an event that takes 50 ms stands for those copies)."""
    import time

    from kiln.runtime.step_clock import StepClock

    class SlowEvent:
        def synchronize(self):
            time.sleep(0.05)

    clock = StepClock()
    inputs = StepInputs(max_num_tokens=16, max_batch_size=2, max_seq_len=MAX_SEQ, block_size=BS,
                        device=torch.device("cpu"), dummy_block=DUMMY, clock=clock)
    blocks = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    req = Request("r", [5, 6, 7], SamplingParams(max_tokens=4))
    assert blocks.allocate_slots(req, 3)
    inputs._hosts[0].copied = SlowEvent()
    with clock.phase("forward"), clock.phase("prepare"):
        inputs.prepare([(req, 3)])
    seconds = clock.snapshot()
    assert seconds["wait"] >= 0.05 and seconds["prepare"] < 0.04 and seconds["forward"] < 0.01
