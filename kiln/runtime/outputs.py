"""What generation hands back: per-completion outputs, per-request outputs and metrics, engine stats.

A streamed request gets one ``RequestOutput`` per step that changed it. Building one costs O(1) per
new token: the delta fields are the step's own, and the cumulative ones (``text``, ``token_ids``,
``logprobs``) are views of the completion's append-only lists, joined only when read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kiln.errors import RequestError


class RequestFailed(RequestError):
    """A request that the engine could not complete; the other requests went on."""

    def __init__(self, request_id: str, message: str):
        super().__init__(f"request {request_id!r} failed: {message}")
        self.request_id = request_id


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    # The most likely tokens at this step, most likely first: (token id, logprob).
    top: list[tuple[int, float]] = field(default_factory=list)


class CompletionOutput:
    """One completion of a request, as of one output. ``finish_reason`` is "stop", "length", "abort",
    "error" or None while it runs; ``stop_reason`` the stop string or stop token id that ended it."""

    __slots__ = ("index", "finish_reason", "stop_reason", "delta_text", "delta_token_ids", "delta_logprobs",
                 "_pieces", "_num_pieces", "_tokens", "_num_tokens", "_logprobs", "_text")

    def __init__(self, index: int, pieces: list[str], tokens: list[int], logprobs: list[TokenLogprob] | None,
                 finish_reason: str | None = None, stop_reason: str | int | None = None, delta_text: str = "",
                 delta_token_ids: list[int] | None = None, delta_logprobs: list[TokenLogprob] | None = None):
        self.index = index
        self.finish_reason = finish_reason
        self.stop_reason = stop_reason
        # What is new since the previous output of this request (for streaming).
        self.delta_text = delta_text
        self.delta_token_ids = delta_token_ids if delta_token_ids is not None else []
        self.delta_logprobs = delta_logprobs
        # The completion's lists only grow, so a length is a snapshot of them as of this output.
        self._pieces, self._num_pieces = pieces, len(pieces)
        self._tokens, self._num_tokens = tokens, len(tokens)
        self._logprobs = logprobs
        self._text: str | None = None

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = "".join(self._pieces[: self._num_pieces])
        return self._text

    @property
    def token_ids(self) -> list[int]:
        return self._tokens[: self._num_tokens]

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        return None if self._logprobs is None else self._logprobs[: self._num_tokens]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (f"CompletionOutput(index={self.index}, text={self.text!r}, token_ids={self.token_ids}, "
                f"finish_reason={self.finish_reason!r}, stop_reason={self.stop_reason!r})")


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    queue_time: float | None = None  # arrival -> first scheduled
    time_to_first_token: float | None = None  # arrival -> first output token
    time_per_output_token: float | None = None  # mean over tokens after the first
    e2e_latency: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_generated_tokens: int = 0
    num_preemptions: int = 0


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    # Why the engine failed this request (its finish_reason is then "error"); the others went on.
    error: str | None = None
    # If asked (``SamplingParams.prompt_logprobs``), one entry per prompt token, as vLLM's: None for the
    # first (nothing scores it), then each token's logprob and the most likely tokens in its place.
    # Set from the output that brings the first generated token on.
    prompt_logprobs: list[TokenLogprob | None] | None = None

    # The first completion's fields, for the common n=1 case.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    prefix_cache_hit_rate: float
    num_preemptions: int
    steps: int
    # Host seconds per phase of the steps since load (runtime/step_clock.py).
    step_seconds: dict[str, float] = field(default_factory=dict)
