"""Perplexity of an engine on a text (``kiln bench perplexity``).

The text's token ids are cut into non-overlapping windows of N tokens. Each window is one request
whose prompt logprobs (``SamplingParams.prompt_logprobs``) score every token after its first, so the
model reads each window once, as its prefill, through the engine's normal API. Perplexity is exp of
the mean negative log-likelihood over all scored tokens of all windows.

The text is tokenized whole, without special tokens (no BOS), and a last window shorter than N is left
out (as llama.cpp's perplexity tool does), so every window has the same length.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from kiln.bench.measure import clock, drain
from kiln.errors import KilnError
from kiln.runtime.llm_engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams

# Original English prose on everyday and technical subjects, shipped with kiln (about 3,700 SmolLM2 tokens).
DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "data" / "perplexity.txt"
DEFAULT_WINDOW = 512


def windows(token_ids: Sequence[int], window: int) -> list[list[int]]:
    """The whole windows of ``window`` tokens, in order; the shorter tail is left out."""
    if window < 2:
        raise KilnError(f"a window needs at least 2 tokens (one to score), got {window}")
    count = len(token_ids) // window
    if count == 0:
        raise KilnError(f"the text has {len(token_ids)} tokens, fewer than one window of {window}")
    return [list(token_ids[i * window:(i + 1) * window]) for i in range(count)]


@dataclass(slots=True)
class PerplexityResult:
    window: int
    num_windows: int
    num_text_tokens: int
    num_scored_tokens: int  # (window - 1) per window
    nll: float  # mean negative log-likelihood per scored token, in nats
    perplexity: float  # exp(nll)
    window_nll: list[float]  # each window's mean
    duration_s: float
    scored_tokens_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def run_perplexity(engine: LLMEngine, token_ids: Sequence[int], window: int = DEFAULT_WINDOW) -> PerplexityResult:
    """Score ``token_ids`` in windows of ``window`` tokens (all submitted at once, batched by the engine)."""
    chunks = windows(token_ids, window)
    if window + 1 > engine.max_seq_len:
        raise KilnError(f"a window of {window} tokens plus the one token each request generates exceeds the "
                        f"engine's max_seq_len={engine.max_seq_len}; use a smaller --window or build the engine "
                        f"with --max-seq-len {window + 1} or more")
    # The generated token is not used: max_tokens must be at least 1.
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    start = clock(engine.device)
    ids = [engine.add_request(chunk, params, f"window-{i}") for i, chunk in enumerate(chunks)]
    done = drain(engine, set(ids))
    duration = clock(engine.device) - start
    window_nll = [-sum(lp.logprob for lp in done[rid].prompt_logprobs[1:]) / (window - 1) for rid in ids]
    nll = sum(window_nll) / len(window_nll)
    scored = len(chunks) * (window - 1)
    return PerplexityResult(window, len(chunks), len(token_ids), scored, nll, math.exp(nll), window_nll, duration,
                            scored / duration if duration > 0 else math.inf)
