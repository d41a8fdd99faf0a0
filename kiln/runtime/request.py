"""The request object: carries one sequence from admission to its last token.

The scheduler and the KV block manager read and write only these plain fields; no tensors.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from kiln.runtime.outputs import TokenLogprob
from kiln.runtime.sampling_params import SamplingParams

# A sampled token whose value is still on the device (async scheduling): it holds its place in
# ``token_ids`` so that counters and the next step's shape are known before the value is.
PLACEHOLDER = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    # Its step raised for it alone (the others of the step went on); the message goes to its caller.
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self in _FINISHED  # a set made once: a tuple of members read on each call cost ~0.4 us


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED,
                       RequestStatus.FINISHED_ERROR})


@dataclass(slots=True, eq=False)
class Request:
    """One sequence. ``token_ids`` is the prompt followed by the output so far.

    ``num_computed_tokens`` counts the leading tokens whose keys and values are in the KV cache.
    A step computes tokens ``[num_computed_tokens, num_computed_tokens + n)``; when that reaches
    ``num_tokens`` the step's last logits sample the next token. Prefill, chunked prefill, decode
    and prefix-cache hits are all this one rule.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Prompt tokens that a prefix-cache hit supplied at (re)admission.
    num_cached_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    # Counts the times block_ids was emptied (freed): a step's kept block-table row is then rewritten.
    blocks_epoch: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    # Trailing PLACEHOLDER entries of token_ids: sampled, not yet known on the host.
    num_placeholders: int = 0
    # Prompt logprobs so far (if asked): entry i scores prompt token i + 1, from the logits at position i.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    # Its structured output's matcher (``structured_output``), advanced as its tokens become known.
    grammar: object | None = None
    # Timestamps (time.monotonic) for the per-request metrics.
    scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: the prompt is empty")
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def max_total_tokens(self) -> int:
        """The most tokens this request can ever hold: prompt plus ``max_tokens``."""
        return self.num_prompt_tokens + self.sampling_params.max_tokens

    @property
    def lacks_prompt_logprobs(self) -> bool:
        """It asks for prompt logprobs and some are still to come: its prompt's logits must be computed,
        not taken from the prefix cache."""
        return (self.sampling_params.prompt_logprobs is not None
                and len(self.prompt_logprobs) < self.num_prompt_tokens - 1)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose values are on the host (all but the trailing placeholders)."""
        return len(self.token_ids) - self.num_placeholders

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def append_placeholder(self) -> None:
        self.token_ids.append(PLACEHOLDER)
        self.num_placeholders += 1

    def resolve_placeholder(self, token_id: int) -> None:
        """The oldest placeholder's value has come back."""
        self.token_ids[self.num_known_tokens] = token_id
        self.num_placeholders -= 1

    def drop_placeholders(self) -> None:
        """Forget sampled values that will never be used (the request ended before them)."""
        if self.num_placeholders:
            del self.token_ids[-self.num_placeholders:]
            self.num_placeholders = 0
