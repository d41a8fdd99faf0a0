"""Structured outputs: a request's JSON schema, regex, choice or grammar, enforced token by token.

The grammar engine is llguidance (the Rust library vLLM and llama.cpp also use). A request's constraint
is a ``StructuredOutput`` (plain data, in its ``SamplingParams``): the front end checks it without a
tokenizer (``check``: a bad schema or regex is the caller's 400), and the engine core compiles it against
the engine's own tokenizer into a matcher per sequence (``Grammars.matcher``; one compiled matcher per
constraint is cached and copied). Each step the sampler asks every constrained row's matcher for its
bitmask of allowed tokens (``fill_bitmasks``: llguidance's thread pool, off the interpreter's lock) and
sets the other logits to -inf on the logits' device (``apply_bitmasks``: a C++ pass on the CPU); the core feeds each sampled
token back to its matcher (``accept``), and a matcher that can take nothing more ends its request
(``finish_reason="stop"``). A grammar's state depends on the previous token, so a constrained request
is sampled after the step in flight resolves (as penalties are).
"""
from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.errors import RequestError
from kiln.runtime.to_device import moved_to

KINDS = ("json", "json_object", "regex", "choice", "grammar")
# Compiled matchers kept per core (a copy of one is a request's own state): distinct constraints beyond
# this are compiled again.
CACHED_GRAMMARS = 256
# The longest constraint text taken (a schema or grammar of this many characters is already huge).
MAX_SPEC_CHARS = 1 << 20


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """What the output must match. ``kind`` is one of:

    - ``json``: ``spec`` is a JSON schema (as JSON text);
    - ``json_object``: any JSON object (``spec`` is empty);
    - ``regex``: ``spec`` is a regular expression (Rust's syntax) the whole output matches;
    - ``choice``: ``spec`` is a JSON list of strings, one of which is the output;
    - ``grammar``: ``spec`` is a context-free grammar, in llguidance's Lark syntax or llama.cpp's GBNF.

    ``whitespace_flexible`` lets JSON have any whitespace between its tokens (vLLM's default); off, the
    output is compact JSON.
    """

    kind: str
    spec: str = ""
    whitespace_flexible: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.spec, str):
            raise ValueError(f"a structured output's {self.kind} must be text, got {type(self.spec).__name__}")
        if len(self.spec) > MAX_SPEC_CHARS:
            raise ValueError(f"the {self.kind} constraint has {len(self.spec)} characters, more than {MAX_SPEC_CHARS}")
        if not isinstance(self.whitespace_flexible, bool):
            raise ValueError("whitespace_flexible must be true or false")

    def check(self) -> None:
        """ValueError with llguidance's message when the constraint does not compile (no tokenizer needed)."""
        _grammar(self.kind, self.spec, self.whitespace_flexible)

    def grammar(self) -> str:
        """llguidance's grammar for this constraint."""
        return _grammar(self.kind, self.spec, self.whitespace_flexible)


@functools.lru_cache(maxsize=CACHED_GRAMMARS)
def _grammar(kind: str, spec: str, whitespace_flexible: bool) -> str:
    import llguidance

    options = {"whitespace_flexible": whitespace_flexible}
    try:
        if kind == "json":
            schema = json.loads(spec)
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"a JSON schema is an object, got {type(schema).__name__}")
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema if isinstance(schema, dict) else {},
                                                                    overrides=options)
        elif kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=options)
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(spec)
        elif kind == "choice":
            choices = json.loads(spec)
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
                raise ValueError("choice is a non-empty list of non-empty strings")
            grammar = llguidance.grammar_from("choice", choices)
        else:
            grammar = llguidance.grammar_from("grammar", spec)
    except ValueError as e:
        raise ValueError(f"the {kind} constraint is not valid: {_first_line(e)}") from None
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise ValueError(f"the {kind} constraint is not valid: {_first_line(problem)}")
    return grammar


def _first_line(message: object) -> str:
    text = str(message).strip()
    return " ".join(text.splitlines()[:3])[:500]


class Grammars:
    """The engine core's grammar compiler: the engine's tokenizer as llguidance sees it (built on first
    use, about 0.4 s for a 50k vocabulary) and the compiled matchers of recent constraints."""

    def __init__(self, tokenizer_file: Path | None, vocab_size: int, eos_token_ids: Sequence[int]):
        self._tokenizer_file = tokenizer_file
        self._vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._tokenizer = None
        self._compiled: OrderedDict[StructuredOutput, object] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, constraint: StructuredOutput):
        """A fresh matcher of ``constraint`` (llguidance's ``LLMatcher``); RequestError when it cannot be
        compiled against this engine's tokenizer."""
        with self._lock:
            compiled = self._compiled.get(constraint)
            if compiled is None:
                import llguidance

                try:
                    grammar = constraint.grammar()
                except ValueError as e:
                    raise RequestError(str(e)) from None
                compiled = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
                if compiled.is_error():
                    raise RequestError(f"the {constraint.kind} constraint does not compile for this engine's "
                                       f"tokenizer: {_first_line(compiled.get_error())}")
                self._compiled[constraint] = compiled
                if len(self._compiled) > CACHED_GRAMMARS:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(constraint)
            return compiled.deep_copy()

    def _llg_tokenizer(self):
        if self._tokenizer is None:
            import llguidance

            if self._tokenizer_file is None or not self._tokenizer_file.is_file():
                raise RequestError("this engine carries no tokenizer, so it cannot enforce structured outputs")
            self._tokenizer = llguidance.LLTokenizer(self._tokenizer_file.read_text(encoding="utf-8"),
                                                     n_vocab=self._vocab_size, eos_token=self._eos or None)
        return self._tokenizer


_executor = None
_executor_lock = threading.Lock()


def _pool():
    global _executor
    with _executor_lock:
        if _executor is None:
            import llguidance

            _executor = llguidance.LLExecutor()
        return _executor


def fill_bitmasks(matchers: Sequence[object], vocab_size: int) -> torch.Tensor:
    """The allowed tokens of each matcher's next step, one bit per token: int32 [len(matchers), words]
    on the host (bit ``t % 32`` of word ``t // 32`` set when token ``t`` is allowed)."""
    from llguidance.torch import fill_next_token_bitmask_par

    words = (vocab_size + 31) // 32
    masks = torch.zeros((len(matchers), words), dtype=torch.int32)
    fill_next_token_bitmask_par(_pool(), [(m, i) for i, m in enumerate(matchers)], masks)
    return masks


def apply_bitmasks(logits: torch.Tensor, rows: Sequence[int], masks: torch.Tensor) -> None:
    """Set ``logits[rows[i], t]`` to -inf wherever bit t of ``masks[i]`` is clear, in place.

    On the CPU one pass of kiln's C++ kernel (``cpu_layer_ops.apply_token_bitmask``); elsewhere, or where it
    did not build, the packed words are unpacked with tensor ops (on a GPU they cross to it packed, an
    eighth of the bytes of a boolean mask)."""
    index = torch.tensor(list(rows), dtype=torch.long)
    if logits.device.type == "cpu":
        from kiln.ops import cpu_layer_ops

        if cpu_layer_ops.apply_token_bitmask(logits, index, masks):
            return
    apply_bitmasks_with_tensor_ops(logits, index, masks)


def apply_bitmasks_with_tensor_ops(logits: torch.Tensor, index: torch.Tensor, masks: torch.Tensor) -> None:
    """``apply_bitmasks`` in PyTorch ops, on any device (``index``: the rows, int64 on the host)."""
    index = moved_to(index, logits.device)
    words = moved_to(masks, logits.device)
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).view(len(index), -1)[:, :logits.shape[1]].bool()
    picked = logits.index_select(0, index)
    picked.masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, index, picked)


def accept(matcher, token: int) -> None:
    """Advance ``matcher`` past a sampled token. A token its mask allowed always advances it; an error here
    would be a bug, and the request then ends at the grammar's next step (its mask allows nothing)."""
    matcher.consume_token(token)


def is_done(matcher) -> bool:
    """The constraint is complete and takes no more tokens."""
    return matcher.is_stopped()
