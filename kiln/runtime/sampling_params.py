"""What a caller may ask of one request's sampling, checked for type and range once, when it is made."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from kiln.runtime.structured_output import StructuredOutput

# Temperatures below this are greedy: dividing by them overflows float32 logits.
MIN_TEMPERATURE = 1e-5
# torch.Generator.manual_seed takes any 64-bit unsigned value.
MAX_SEED = 2**64 - 1


class SamplingParamsError(ValueError):
    """A field of ``SamplingParams`` that is wrong: ``field`` names it (as the dataclass does), so each protocol
    can name its own wire field for it without reading the message."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(slots=True)
class SamplingParams:
    """Sampling options of one request, named as in vLLM and the OpenAI API.

    ``temperature=0`` is greedy (so is anything below 1e-5). ``top_k=0`` (or -1) and ``top_p=1``
    switch those filters off. ``seed`` (0 to 2**64 - 1) makes a request's tokens reproducible whatever
    else shares its batch. ``logit_bias`` maps token ids to values added to their logits (as OpenAI's).
    Every field is checked here: a wrong type or an out-of-range value is a ``SamplingParamsError`` (a
    ``ValueError``) naming it, so a request can never fail later, inside a step that other requests share.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    n: int = 1
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    # Prefix-cache isolation (vLLM's name): a request reuses only cached blocks of requests with the same
    # salt, so one user cannot learn another's prompt from its time to first token. None: shared cache.
    cache_salt: str | None = None
    # Admission order among waiting requests: a lower value is admitted to the running batch first (vLLM's
    # order; Triton's priority levels map to it, level 1 first). Equal priorities go in arrival order.
    priority: int = 0
    # The output must match this JSON schema, regex, choice or grammar (``structured_output``).
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        for name in ("max_tokens", "top_k", "n", "min_tokens", "priority"):
            setattr(self, name, _integer(name, getattr(self, name)))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            setattr(self, name, _real(name, getattr(self, name)))
        if self.seed is not None:
            self.seed = _integer("seed", self.seed)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, _integer(name, getattr(self, name)))
        self.stop = _stop_strings(self.stop)
        self.stop_token_ids = [_integer("stop_token_ids", t, "stop_token_ids[]")
                               for t in _list("stop_token_ids", self.stop_token_ids)]
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(name, f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise SamplingParamsError("logit_bias", f"logit_bias must map token ids to numbers, got "
                                                        f"{type(self.logit_bias).__name__}")
            self.logit_bias = {_integer("logit_bias", _int_key(k), "logit_bias key"):
                               _real("logit_bias", v, "logit_bias value") for k, v in self.logit_bias.items()}
        checks = [
            ("max_tokens", self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            ("temperature", self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            ("top_k", -1 <= self.top_k < 2**31, f"top_k must be in [0, 2**31 - 1] (0 or -1: off), got {self.top_k}"),
            ("top_p", 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            ("min_p", 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            ("repetition_penalty", self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            ("n", self.n >= 1, f"n must be at least 1, got {self.n}"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20,
             f"logprobs must be in [0, 20], got {self.logprobs}"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}"),
            ("seed", self.seed is None or 0 <= self.seed <= MAX_SEED,
             f"seed must be in [0, 2**64 - 1], got {self.seed}"),
            ("stop_token_ids", all(t >= 0 for t in self.stop_token_ids),
             f"stop_token_ids must be >= 0, got {self.stop_token_ids}"),
            ("logit_bias", all(-100 <= v <= 100 for v in (self.logit_bias or {}).values()),
             "logit_bias values must be in [-100, 100]"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise SamplingParamsError(name, message)
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str) or not self.cache_salt
                                            or len(self.cache_salt) > 1024):
            raise SamplingParamsError("cache_salt", f"cache_salt must be a non-empty string of at most 1024 "
                                                    f"characters, got {type(self.cache_salt).__name__}")
        if self.structured is not None:
            if not isinstance(self.structured, StructuredOutput):
                raise SamplingParamsError("structured", f"structured must be a StructuredOutput, got "
                                                        f"{type(self.structured).__name__}")
            try:
                self.structured.check()
            except ValueError as e:
                raise SamplingParamsError("structured", str(e)) from None
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def _integer(name: str, value: object, shown: str | None = None) -> int:
    """An int (not a bool); an integral float such as 3.0 is taken, 3.5 is not."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, float)):
        raise SamplingParamsError(name, f"{shown or name} must be an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise SamplingParamsError(name, f"{shown or name} must be an integer, got {value!r}")
        return int(value)
    return int(value)


def _real(name: str, value: object, shown: str | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SamplingParamsError(name, f"{shown or name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise SamplingParamsError(name, f"{shown or name} must be a finite number, got {value!r}")
    return value


def _int_key(key: object) -> object:
    # JSON object keys are strings: "50256" names token 50256.
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    return key


def _list(name: str, value: object) -> list:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise SamplingParamsError(name, f"{name} must be a list, got {value!r}")
    return list(value)


def _stop_strings(stop: object) -> list[str]:
    if isinstance(stop, str):
        stop = [stop]
    stop = _list("stop", stop)
    for s in stop:
        if not isinstance(s, str):
            raise SamplingParamsError("stop", f"stop must be a string or a list of strings, got an element {s!r}")
    return [s for s in stop if s]
