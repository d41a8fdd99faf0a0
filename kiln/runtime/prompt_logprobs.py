"""Prompt logprobs (vLLM's ``prompt_logprobs``): the logprob of each prompt token after the first, and the
most likely tokens in its place, from the logits of the forward pass that computes the prompt anyway.

The logits at position i score prompt token i + 1. A step that computes positions [s, s + n) of a
request that asks scores the prompt tokens among s + 1 .. s + n, so each chunk of a chunked prefill
scores its own share; the step's other rows keep the last-position-only path. A request that asks
takes no prefix-cache hit until all its prompt logprobs are in (``Request.lacks_prompt_logprobs``):
cached blocks hold keys and values, not logits. The values are the log-softmax of the model's raw
logits (no logit bias or penalty), as vLLM's.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kiln.runtime.outputs import TokenLogprob
from kiln.runtime.request import Request
from kiln.runtime.sampler import HostCopy
from kiln.runtime.step_inputs import Batch
from kiln.runtime.to_device import moved_to, tensor_on

# Prompt rows whose logits exist at once: bounds a step's extra memory (about this many rows of
# vocabulary-wide float32 logits, twice over) whatever the prompt's length.
ROWS_AT_ONCE = 256


@dataclass(frozen=True, slots=True)
class PromptSpan:
    """Positions [start, start + count) of ``request``, rows [row, row + count) of the step's hidden states."""

    request: Request
    row: int
    start: int
    count: int


def prompt_spans(batch: Batch) -> list[PromptSpan]:
    """The positions of this step whose logits score a prompt token, of the requests that ask.

    Read before the step is accounted for (``num_computed_tokens`` is its first position). Positions
    already scored (a preempted request computes its prompt again) are not scored twice.
    """
    spans = []
    row = 0
    for req, n in batch:
        start = req.num_computed_tokens
        first = max(start, len(req.prompt_logprobs))
        end = min(start + n, req.num_prompt_tokens - 1)
        if req.sampling_params.prompt_logprobs is not None and first < end:
            spans.append(PromptSpan(req, row + first - start, first, end - first))
        row += n
    return spans


def score_prompts(compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                  spans: list[PromptSpan]) -> PendingPromptLogprobs:
    """Each span's prompt tokens' logprobs and top-k, from the step's hidden states [tokens, hidden]."""
    device = hidden.device
    rows = moved_to(torch.cat([torch.arange(s.row, s.row + s.count) for s in spans]), device)
    targets = tensor_on([t for s in spans for t in s.request.prompt_token_ids[s.start + 1:s.start + 1 + s.count]],
                        torch.long, device)
    k = max(s.request.sampling_params.prompt_logprobs for s in spans)
    chosen, top_lp, top_ids = [], [], []
    for i in range(0, len(rows), ROWS_AT_ONCE):
        logprobs = torch.log_softmax(compute_logits(hidden[rows[i:i + ROWS_AT_ONCE]]).float(), dim=-1)
        chosen.append(logprobs.gather(1, targets[i:i + ROWS_AT_ONCE, None]).squeeze(1))
        values, ids = logprobs.topk(min(k, logprobs.shape[1]), dim=-1)
        top_lp.append(values)
        top_ids.append(ids)
    return PendingPromptLogprobs(spans, (torch.cat(chosen), torch.cat(top_lp), torch.cat(top_ids)))


class PendingPromptLogprobs:
    """A step's prompt logprobs on their way to the host; ``deliver()`` adds them to their requests."""

    def __init__(self, spans: list[PromptSpan], parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        self.spans = spans
        self._copy = HostCopy(parts)

    def deliver(self) -> None:
        """Append to each request's ``prompt_logprobs`` the entries it lacks (waits for the copy)."""
        chosen, top_lp, top_ids = self._copy.lists()
        j = 0
        for s in self.spans:
            req = s.request
            k = req.sampling_params.prompt_logprobs
            have = len(req.prompt_logprobs)
            # Steps resolve in order, so a span never starts past what its request has (no gap); it may
            # start before it (scored again after a preemption): those entries are kept once.
            if s.start <= have:
                for i in range(have - s.start, s.count):
                    req.prompt_logprobs.append(TokenLogprob(req.prompt_token_ids[s.start + 1 + i], chosen[j + i],
                                                            list(zip(top_ids[j + i][:k], top_lp[j + i][:k]))))
            j += s.count
