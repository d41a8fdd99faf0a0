"""The output processor fed several steps at once (a front end that fell behind) gives what it gives fed a
step at a time: the same text, tokens, logprobs and ending, with the deltas of the missed steps in one
output; a stop string still ends the text and keeps no token past it."""
from __future__ import annotations

import random

import pytest

from kiln.engine import read_engine
from kiln.runtime.engine_core import EngineCoreOutput
from kiln.runtime.input_processor import NewRequest
from kiln.runtime.output_processor import OutputProcessor
from kiln.runtime.outputs import TokenLogprob
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.tokenizer import EngineTokenizer


@pytest.fixture(scope="module")
def tokenizer(engine_dir):
    return EngineTokenizer(read_engine(engine_dir("llama"), need_weights=False))


def steps_of(tokenizer, text: str, logprobs: bool) -> list[EngineCoreOutput]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    steps = [EngineCoreOutput("s0", [t], [TokenLogprob(t, -0.5 * i)] if logprobs else None, scheduled_time=1.0)
             for i, t in enumerate(ids)]
    steps[-1].finish_reason = "length"
    return steps


def run(tokenizer, steps: list[EngineCoreOutput], params: SamplingParams, groups: list[int]):
    processor = OutputProcessor(tokenizer)
    processor.add(NewRequest("r", "p", [5, 6, 7], params, ["s0"], 0.0))
    outs, i = [], 0
    for size in groups:
        processed = processor.process(steps[i:i + size])
        outs += processed.outputs
        i += size
        if outs and outs[-1].finished:
            break
    return outs


@pytest.mark.parametrize("stop", [None, ["brown"]])
def test_steps_processed_together_equal_steps_one_at_a_time(tokenizer, stop):
    text = "The quick brown fox, café 日本語 jumps over the lazy dog"
    params = SamplingParams(max_tokens=100, logprobs=0, stop=stop)
    steps = steps_of(tokenizer, text, logprobs=True)
    one = run(tokenizer, steps, params, [1] * len(steps))
    rng = random.Random(0)
    for _ in range(5):
        groups = []
        while sum(groups) < len(steps):
            groups.append(rng.randrange(1, 6))
        many = run(tokenizer, steps, params, groups)
        assert len(many) <= len(one)
        a, b = one[-1].outputs[0], many[-1].outputs[0]
        assert (b.text, b.token_ids, b.finish_reason, b.stop_reason) == (a.text, a.token_ids, a.finish_reason,
                                                                          a.stop_reason)
        assert [lp.logprob for lp in b.logprobs] == [lp.logprob for lp in a.logprobs]
        assert "".join(o.outputs[0].delta_text for o in many) == b.text
        assert sum((o.outputs[0].delta_token_ids for o in many), []) == b.token_ids
    if stop:
        assert one[-1].outputs[0].finish_reason == "stop" and "brown" not in one[-1].outputs[0].text
        assert len(one[-1].outputs[0].token_ids) < len(steps)
    else:
        assert one[-1].outputs[0].text.strip() == text
