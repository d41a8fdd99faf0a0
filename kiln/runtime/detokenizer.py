"""Streaming text: incremental detokenization of sampled tokens and stop-string matching on the result."""
from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# Tokens of left context decoded before the new ones. One non-special token is enough for the
# decoders in use (byte-level, Metaspace, byte fallback); a few more cover decoders with pairwise rules.
_CONTEXT_TOKENS = 4
# A UTF-8 character is at most 4 bytes, so a character split into byte tokens starts at most 3 tokens back.
_MAX_CHAR_TOKENS = 4
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one completion's token ids into text deltas as they are sampled.

    ``add(ids)`` steps a ``tokenizers`` ``DecodeStream`` (Rust): it decodes a small window (a few
    already-emitted tokens of left context plus the new ones) and returns the part beyond the context's
    own text, so each call costs O(window), not O(output), and no Python runs per token of the window. A
    delta is held back while the window's decode ends in U+FFFD: the last token ended inside a multi-byte
    character whose remaining bytes have not been sampled yet.

    The stream's left context starts with the last prompt tokens, so the first output token keeps its
    leading space where a SentencePiece/Metaspace decoder would strip it from a sequence decoded on
    its own (" Paris" after "The capital of France is", as vLLM returns it). Hence the deltas plus
    ``flush()`` concatenate exactly to ``tokenizer.decode(output_ids)`` for byte-level tokenizers,
    and, for any tokenizer, to ``decode(prompt_tail + output_ids)`` minus ``decode(prompt_tail)``;
    with an empty prompt that is ``decode(output_ids)`` for every tokenizer.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._skipped: frozenset[int] = frozenset(
            i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special
        ) if skip_special_tokens else frozenset()
        context = self._initial_context(list(prompt_token_ids))
        self._stream = DecodeStream(context, skip_special_tokens=skip_special_tokens)
        # The last tokens before those held back (flush's left context), and those held back.
        self._tail: list[int] = context[-_CONTEXT_TOKENS:]
        self._held: list[int] = []
        self.num_output_tokens = 0

    def add(self, token_ids: Sequence[int]) -> str:
        """Append sampled tokens; return the newly completed text (possibly "")."""
        if not token_ids:
            return ""
        ids = list(token_ids)
        self.num_output_tokens += len(ids)
        try:
            text = self._stream.step(self.tokenizer, ids)
        except Exception:  # noqa: BLE001  (DecodeStream's "invalid prefix"; see _restart)
            return self._restart(ids)
        if text is None:
            self._held.extend(ids)
            return ""
        self._tail = (self._tail + self._held + ids)[-_CONTEXT_TOKENS:]
        self._held = []
        return text

    def flush(self) -> str:
        """At the end of the completion: whatever is held back, even an incomplete character (as U+FFFD)."""
        return self._past_tail(self._held) if self._held else ""

    # ----- internals -----
    def _restart(self, ids: list[int]) -> str:
        """When the stream refuses a window (DecodeStream raises where the window's text does not start with
        its left context's, which no tokenizer in the tests does): the held and new tokens decoded here, and a
        new stream from the new left context. They are emitted even if they end inside a character, so one
        odd decode costs at most a U+FFFD, never the request or its batch."""
        delta = self._past_tail(self._held + ids)
        self._stream = DecodeStream(self._tail, skip_special_tokens=self.skip_special_tokens)
        return delta

    def _past_tail(self, fresh: list[int]) -> str:
        """The text ``fresh`` adds after the left context (decoded alone where the window's text does not start
        with the context's); the context then moves on over them, and nothing is held back."""
        before, text = self._decode(self._tail), self._decode(self._tail + fresh)
        self._tail, self._held = (self._tail + fresh)[-_CONTEXT_TOKENS:], []
        return text[len(before):] if text.startswith(before) else self._decode(fresh)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def _initial_context(self, prompt: list[int]) -> list[int]:
        """The last few prompt tokens, starting on a whole character and holding one decodable token."""
        if not prompt:
            return []
        start = max(len(prompt) - _CONTEXT_TOKENS, 0)
        # Back over special tokens that the decode skips, or a skip-only window would lose a Metaspace space.
        while start > 0 and all(t in self._skipped for t in prompt[start:]) and len(prompt) - start < 64:
            start -= 1
        # Back to a character start: with byte fallback a run of byte tokens entered mid-character
        # decodes as U+FFFD as a whole, also once the output continues the run.
        floor = max(start - _MAX_CHAR_TOKENS + 1, 0)
        while start > floor and self._decode(prompt[start:]).startswith(_REPLACEMENT):
            start -= 1
        context = prompt[start:]
        if self._decode(context).endswith(_REPLACEMENT):
            # The prompt ends inside a character: its text and the output's cannot be split, so
            # decode the output on its own.
            return []
        return context


class StopStringMatcher:
    """Stop strings over streamed text: ``feed(delta)`` returns what is safe to emit and the stop hit.

    Nothing of a stop string is ever emitted, also when it spans deltas: the longest suffix of the
    pending text that could still begin a stop string is held back. The text ends before the
    stop-string occurrence that starts first (on a tie, the shorter string, which completes first),
    exactly as ``truncate_at_stop`` cuts the whole text, however the text was split into deltas.
    So when one stop string is seen complete while an earlier-starting longer one may still be
    completing ("b" inside a pending "ab" with stops "b" and "abc"), the match waits for more text.
    """

    def __init__(self, stop: Sequence[str] | str | None = None):
        if isinstance(stop, str):
            stop = [stop]
        self.stop: list[str] = [s for s in (stop or []) if s]
        self._prefixes: frozenset[str] = frozenset(s[:i] for s in self.stop for i in range(1, len(s)))
        self._max_held = max((len(s) - 1 for s in self.stop), default=0)
        self._pending = ""
        # The stop string that ended the text, once hit.
        self.hit: str | None = None

    @property
    def stopped(self) -> bool:
        return self.hit is not None

    def feed(self, delta: str) -> tuple[str, str | None]:
        """Add text; return (text safe to emit now, the stop string if one has just ended the text).

        After a hit further text is dropped and the hit is returned again.
        """
        if self.hit is not None:
            return "", self.hit
        if not self.stop:
            return delta, None
        text = self._pending + delta
        held = self._held_from(text)
        start, hit = _first_stop(text, self.stop)
        if hit is not None and start <= held:
            self._pending = ""
            self.hit = hit
            return text[:start], hit
        self._pending = text[held:]
        return text[:held], None

    def flush(self) -> str:
        """The held-back text, when the completion ends for another reason (cut at a stop string it holds)."""
        if self.hit is not None:
            return ""
        text, hit = truncate_at_stop(self._pending, self.stop)
        self._pending = ""
        self.hit = hit
        return text

    def _held_from(self, text: str) -> int:
        """Where the longest suffix of ``text`` that is a proper prefix of a stop string starts."""
        for n in range(min(self._max_held, len(text)), 0, -1):
            if text[-n:] in self._prefixes:
                return len(text) - n
        return len(text)


def _first_stop(text: str, stop: Sequence[str]) -> tuple[int, str | None]:
    best, hit = len(text) + 1, None
    for s in stop:
        i = text.find(s, 0, best + len(s))
        if i != -1 and (i < best or (i == best and hit is not None and len(s) < len(hit))):
            best, hit = i, s
    return best, hit


def truncate_at_stop(text: str, stop: Sequence[str] | str | None) -> tuple[str, str | None]:
    """The final (non-streamed) text: ``text`` cut before its first stop-string occurrence, and that string.

    Same rule as ``StopStringMatcher``: the earliest start wins, on a tie the shorter string.
    """
    if isinstance(stop, str):
        stop = [stop]
    start, hit = _first_stop(text, [s for s in (stop or []) if s])
    return (text, None) if hit is None else (text[:start], hit)
