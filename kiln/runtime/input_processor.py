"""The front end's intake: a caller's prompt and sampling params, checked and turned into core requests.

Everything a request could fail on is checked here, in the caller's thread, before it reaches the
engine core: prompt type (text, or token ids that are ints and not bools) and range, the params'
token ids against the vocabulary, and whether the request could ever fit the engine's limits. A bad
request is a ``RequestError`` at submission and never shares a step with others.
"""
from __future__ import annotations

import itertools
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

from kiln.errors import RequestError
from kiln.runtime.engine_core import EngineCoreRequest, child_params
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.tokenizer import EngineTokenizer

Prompt = str | Sequence[int]


@dataclass(slots=True)
class NewRequest:
    """A caller's request as the output processor tracks it: one prompt, ``n`` completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seq_ids: list[str]  # the core requests of its completions, in completion order
    arrival_time: float


class InputProcessor:
    def __init__(self, tokenizer: EngineTokenizer, vocab_size: int,
                 admission_error: Callable[[int, int], RequestError | None], max_prompt_tokens: int | None = None):
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens  # a longer text prompt is refused before tokenizing
        self.vocab_size = vocab_size
        self._admission_error = admission_error
        self._ids = itertools.count()

    def process(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                arrival_time: float | None = None) -> tuple[NewRequest, list[EngineCoreRequest]]:
        # No params: the model's own defaults (its generation config), as vLLM's LLM takes them.
        params = SamplingParams(**self.tokenizer.sampling_defaults) if params is None else params
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        elif not isinstance(request_id, str) or not request_id:
            raise RequestError(f"a request id must be a non-empty string, got {request_id!r}")
        text = prompt if isinstance(prompt, str) else None
        ids = (self.tokenizer.encode(prompt, max_tokens=self.max_prompt_tokens) if text is not None
               else prompt_token_ids(prompt))
        if not ids:
            raise RequestError("the prompt is empty")
        vocab = self.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        for name, tokens in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or {})):
            bad = [t for t in tokens if not 0 <= t < vocab]
            if bad:
                raise RequestError(f"{name} has token ids out of range [0, {vocab}): {bad[:5]}")
        problem = self._admission_error(len(ids), params.max_tokens)
        if problem:
            raise problem
        arrival = time.monotonic() if arrival_time is None else arrival_time
        seq_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        eos = self.tokenizer.eos_token_ids
        core = [EngineCoreRequest(seq_id, ids, params if params.n == 1 else child_params(params, i), eos, arrival,
                                  after=seq_ids[0] if i else None)
                for i, seq_id in enumerate(seq_ids)]
        return NewRequest(request_id, text, ids, params, seq_ids, arrival), core


def prompt_token_ids(prompt: object) -> list[int]:
    """A prompt given as token ids: a sequence of ints (numpy ints too), never bools or floats."""
    if isinstance(prompt, (bytes, dict)) or not isinstance(prompt, Sequence) and not hasattr(prompt, "tolist"):
        raise RequestError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()
    ids = []
    for t in prompt:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise RequestError(f"prompt token ids must be integers, got {t!r} ({type(t).__name__})")
        ids.append(int(t))
    return ids
