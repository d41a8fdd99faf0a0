"""Recorded CPU steps (kiln.runtime.recorded_step): a forward's dispatcher calls recorded once and replayed over
the same buffers, refused where a replay could differ; and the runner's "recorded" mode, which is the CPU's
default, against eager steps."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from kiln.runtime import LLM, SamplingParams
from kiln.runtime.recorded_step import NotRecordable, record
from tests_support import assert_idle

from conftest import DEVICE


def test_a_replay_reads_the_buffers_as_they_are_then():
    """Inputs that existed before the forward are read afresh at every replay; intermediate results, views,
    in-place ops, tensor lists (cat, index), numbers where a tensor goes, dtypes, devices and memory formats are
    the replay's own; the C++ program (where the extension is built) and the Python loop give the same."""
    from kiln.ops import cpu_layer_ops

    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    buf = torch.zeros(4, 8)

    def forward():
        h = torch.relu(x @ w)
        buf.copy_(h)  # an in-place write to a buffer of the caller's
        both = torch.cat([h, h.view(4, 2, 4).flip(1).reshape(4, 8)], dim=1)
        rows = torch.arange(3)
        out = (both.sum(dim=1, keepdim=True).mul_(2) + x[:, :1] * 0.5)[rows]
        return out.to(torch.float64).contiguous(memory_format=torch.contiguous_format)

    with torch.inference_mode():
        recording, first = record(forward)
        assert (recording.program is not None) == cpu_layer_ops.available()
        assert torch.equal(first, forward())
        assert torch.equal(recording.replay(), first) and torch.equal(recording.replay_in_python(), first)
        x.copy_(torch.randn(4, 8))  # the step's new inputs, written into the same tensor
        buf.zero_()
        expected = forward()
        buf.zero_()
        assert torch.equal(recording.replay(), expected)
        assert torch.equal(buf, torch.relu(x @ w))
        assert torch.equal(recording.replay_in_python(), expected)


def test_a_forward_that_makes_tensors_outside_the_dispatcher_is_refused():
    x = torch.randn(3)
    with pytest.raises(NotRecordable, match="made outside the dispatcher"):
        record(lambda: x + torch.from_numpy(np.ones(3, dtype=np.float32)))
    with pytest.raises(NotRecordable, match="made outside the dispatcher"):
        record(lambda: x * torch.tensor([1.0, 2.0, 3.0]))


def test_a_forward_that_reads_a_value_back_is_refused():
    """A call whose result is a Python number (.item(), a comparison turned into a bool) may steer the forward."""
    x = torch.randn(3)
    with pytest.raises(NotRecordable, match="returned"):
        record(lambda: x * 2 if (x.sum() > 0).item() else x * 3)


@pytest.fixture(scope="module")
def engine(engine_dir):
    return engine_dir("llama", max_batch_size=8, max_num_tokens=64)


@pytest.mark.skipif(DEVICE != "cpu", reason="recorded steps are the CPU's")
def test_recorded_decode_steps_give_the_eager_tokens(engine):
    """The default on a CPU: decode steps of every batch size recorded once each and replayed, the same greedy
    tokens as eager steps, for prompts of mixed lengths admitted and finished at different steps."""
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.choice([1, 5, 17, 40]))] for _ in range(11)]
    params = [SamplingParams(max_tokens=rng.choice([3, 9, 30]), temperature=0, ignore_eos=True) for _ in prompts]
    eager = LLM(engine, device="cpu", cuda_graphs="off").generate(prompts, params)
    recorded = LLM(engine, device="cpu", engine_core="inline")
    graphs = recorded.engine.call(lambda core: core.runner.graphs)
    assert graphs is not None and graphs.kind == "recorded"
    replays = []
    original = graphs._recorded
    graphs._recorded = lambda shape, step: replays.append(shape) or original(shape, step)
    outs = recorded.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in eager]
    rows = {shape.rows for shape in replays}
    assert len(replays) > len(graphs.recordings) and len(rows) > 2  # several batch sizes, most steps replayed
    assert all(r is not None for r in graphs.recordings.values())
    from kiln.ops import cpu_layer_ops

    if cpu_layer_ops.available():  # replayed from C++
        assert all(r.program is not None for r in graphs.recordings.values())
    assert_idle(recorded)


@pytest.mark.skipif(DEVICE != "cpu", reason="recorded steps are the CPU's")
def test_a_refused_recording_runs_that_shape_eagerly(engine, caplog):
    """A forward that makes a tensor outside the dispatcher cannot be recorded: that shape's steps run eagerly
    (one warning), with the same tokens."""
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = LLM(engine, device="cpu", cuda_graphs="off").generate(prompts, greedy)
    llm = LLM(engine, device="cpu", engine_core="inline")
    graphs = llm.engine.call(lambda core: core.runner.graphs)
    forward = graphs.forward
    graphs.forward = lambda step: forward(step) + torch.from_numpy(np.zeros(1, dtype=np.float32))
    with caplog.at_level("WARNING", logger="kiln.runtime.step_graphs"):
        outs = llm.generate(prompts, greedy)
    assert [o.token_ids for o in outs] == [o.token_ids for o in expected]
    assert graphs.recordings and all(r is None for r in graphs.recordings.values())
    assert "run eagerly" in caplog.text and "outside the dispatcher" in caplog.text
