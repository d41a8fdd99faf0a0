"""Incremental detokenization (byte-level and SentencePiece-style tokenizers) and stop strings over streamed text."""
from __future__ import annotations

import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizer_helpers import byte_level_bpe, sentencepiece_bpe

from kiln.runtime.detokenizer import IncrementalDetokenizer, StopStringMatcher, truncate_at_stop

FFFD = "\ufffd"

TEXTS = [
    "Hello, world!",
    "日本語のテキスト、東京。中文：你好，世界！한국어 문장",
    "Emoji 🙂🚀 family 👩‍👩‍👧 flag 🇯🇵 skin 👍🏽 heart ❤️ end",
    "Combining: e\u0301 a\u0308\u0301 n\u0303 Z\u0335\u0321a\u0334\u0317lgo",
    "Accents: café naïve résumé Ångström Łódź Øre",
    "def f(x):\n    if x:\n\t\treturn   x  *  2\n\n\n    return None  \n",
    "    leading spaces and trailing    ",
    "tabs\t\tand\nnewlines\r\n\r\nand   runs     of spaces",
    "mixed 🙂 e\u0301 日本 \t code(){ }  \n✓ ∑ ½",
    " a",
    "\n",
    "🙂",
]

PROMPTS = ["", "User: say something.\nAssistant:", "前の文 🙂", "run 🙂ȸ"]


@pytest.fixture(scope="module")
def byte_level():
    return byte_level_bpe()


@pytest.fixture(scope="module")
def spm():
    return sentencepiece_bpe()


@pytest.fixture(scope="module", params=["byte_level", "spm"])
def tokenizer(request, byte_level, spm):
    return {"byte_level": byte_level, "spm": spm}[request.param]


def expected_text(tok, prompt_ids: list[int], ids: list[int], skip: bool = True) -> str:
    """The completion's text as it continues the prompt (what the deltas must add up to)."""
    alone = tok.decode(ids, skip_special_tokens=skip)
    if not prompt_ids:
        return alone
    before = tok.decode(prompt_ids, skip_special_tokens=skip)
    full = tok.decode(prompt_ids + ids, skip_special_tokens=skip)
    assert full.startswith(before)
    in_context = full[len(before):]
    # Only a leading space, which a Metaspace decoder strips from a sequence on its own, may differ.
    assert in_context == alone or in_context == " " + alone
    return in_context


def stream(tok, prompt_ids: list[int], ids: list[int], chunks: list[int] | None = None,
           skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip)
    deltas = []
    i = 0
    for n in chunks or [1] * len(ids):
        deltas.append(detok.add(ids[i:i + n]))
        i += n
    assert i == len(ids)
    deltas.append(detok.flush())
    return deltas


def check_stream(tok, prompt: str, text: str, chunks: list[int] | None = None) -> None:
    prompt_ids = tok.encode(prompt, add_special_tokens=False).ids if prompt else []
    ids = tok.encode(text, add_special_tokens=False).ids
    deltas = stream(tok, prompt_ids, ids, chunks)
    want = expected_text(tok, prompt_ids, ids)
    assert "".join(deltas) == want
    if FFFD not in want:
        assert not any(FFFD in d for d in deltas)
        assert deltas[-1] == ""  # nothing was held back at the end


# ----- round trips -----
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_token_by_token(tokenizer, prompt, text):
    check_stream(tokenizer, prompt, text)


def test_byte_level_equals_decode_of_output_alone(byte_level):
    for prompt in PROMPTS:
        prompt_ids = byte_level.encode(prompt).ids
        for text in TEXTS:
            ids = byte_level.encode(text).ids
            assert "".join(stream(byte_level, prompt_ids, ids)) == byte_level.decode(ids)


def test_spm_keeps_the_leading_space_after_a_prompt(spm):
    prompt_ids = spm.encode("The capital of France is").ids
    ids = spm.encode(" Paris, of course.", add_special_tokens=False).ids
    assert spm.decode(ids) == "Paris, of course."
    assert "".join(stream(spm, prompt_ids, ids)) == " Paris, of course."
    # With no prompt the output is decoded on its own, as decode() does.
    assert "".join(stream(spm, [], ids)) == "Paris, of course."


def test_partial_characters_are_held_back(spm, byte_level):
    for tok in (spm, byte_level):
        ids = tok.encode("ab🙂c").ids
        detok = IncrementalDetokenizer(tok, tok.encode("x").ids)
        deltas = [detok.add([i]) for i in ids]
        assert "".join(deltas).lstrip(" ") == "ab🙂c"  # spm encodes a leading "▁"
        assert "🙂" in deltas
        assert not any(FFFD in d for d in deltas)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(byte_level, spm, skip):
    for tok, specials in ((byte_level, ["<|im_start|>", "<|im_end|>"]), (spm, ["<s>", "</s>"])):
        sid = [tok.token_to_id(s) for s in specials]
        # Runs of specials longer than the detokenizer's context, at the prompt's end and mid-output:
        # a context of skipped tokens only would make a Metaspace decoder drop the next word's space.
        prompt_ids = [sid[0]] + tok.encode("hi there", add_special_tokens=False).ids + [sid[1], sid[0]] * 3
        ids = ([sid[0], sid[0]] + tok.encode(" one two 🙂", add_special_tokens=False).ids + [sid[1]]
               + tok.encode(" three", add_special_tokens=False).ids + [sid[1], sid[1], sid[0]] * 3
               + tok.encode(" four", add_special_tokens=False).ids)
        deltas = stream(tok, prompt_ids, ids, skip=skip)
        assert "".join(deltas) == expected_text(tok, prompt_ids, ids, skip)
        alone = stream(tok, [], ids, skip=skip)
        assert "".join(alone) == tok.decode(ids, skip_special_tokens=skip)


def test_random_chunks(tokenizer):
    rng = random.Random(0)
    for text in TEXTS:
        n = len(tokenizer.encode(text).ids)
        for _ in range(5):
            chunks = []
            while sum(chunks) < n:
                chunks.append(min(rng.randint(1, 4), n - sum(chunks)))
            check_stream(tokenizer, rng.choice(PROMPTS), text, chunks)


def test_garbage_bytes_byte_level(byte_level):
    # Arbitrary ids make invalid UTF-8 too; the held-back U+FFFDs come out in flush().
    rng = random.Random(1)
    vocab = byte_level.get_vocab_size()
    for _ in range(50):
        ids = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 30))]
        prompt_ids = [rng.randrange(3, vocab) for _ in range(rng.randint(0, 6))]
        got = "".join(stream(byte_level, prompt_ids, ids))
        want = byte_level.decode(ids)
        # A prompt ending mid-character falls back to decoding the output alone; else the same text.
        assert got == want


def test_prompt_ending_mid_character(byte_level):
    ids = byte_level.encode("x 🙂🚀 y").ids
    for cut in range(1, len(ids)):
        prompt_ids, out = ids[:cut], ids[cut:]
        assert "".join(stream(byte_level, prompt_ids, out)) == byte_level.decode(out)


def test_long_output_streams_in_a_bounded_time_a_token(tokenizer):
    """Thousands of tokens one at a time: the same text as one decode, and the last thousand cost about what
    the first thousand did (the stream decodes a window of a few tokens, not the output so far)."""
    text = "\n".join(TEXTS) * 30
    ids = tokenizer.encode(text).ids
    assert len(ids) > 3000
    prompt_ids = tokenizer.encode(PROMPTS[1]).ids
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas, spans = [], []
    for start in range(0, len(ids), 1000):
        began = time.perf_counter()
        deltas.extend(detok.add([t]) for t in ids[start:start + 1000])
        spans.append(time.perf_counter() - began)
    deltas.append(detok.flush())
    assert "".join(deltas) == expected_text(tokenizer, prompt_ids, ids)
    assert min(spans[-2:]) < 3 * spans[0] + 0.01


class _RefusingStream:
    """A DecodeStream stand-in that refuses every step, as DecodeStream does on an invalid prefix."""

    def step(self, tokenizer, ids):
        raise Exception("Invalid prefix encountered")


def test_a_refused_stream_step_still_yields_the_text(byte_level):
    prompt_ids = byte_level.encode(PROMPTS[1]).ids
    ids = byte_level.encode("Hello, world! def f(x):\n    return x").ids
    detok = IncrementalDetokenizer(byte_level, prompt_ids)
    deltas = [detok.add(ids[:3])]
    detok._stream = _RefusingStream()  # the next step is refused; the stream after it is a fresh one
    deltas += [detok.add([t]) for t in ids[3:]] + [detok.flush()]
    assert "".join(deltas) == expected_text(byte_level, prompt_ids, ids)


def test_a_refused_step_after_held_tokens_keeps_their_text(byte_level):
    """Tokens held back mid-character, then a refused step: the held ones' bytes are in its delta."""
    ids = byte_level.encode("run 🙂🚀 end").ids
    detok = IncrementalDetokenizer(byte_level, [])
    deltas, refused = [], False
    for t in ids:
        deltas.append(detok.add([t]))
        if detok._held and not refused:
            detok._stream, refused = _RefusingStream(), True
    deltas.append(detok.flush())
    assert refused
    assert "".join(deltas) == byte_level.decode(ids)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=40), prompt=st.sampled_from(PROMPTS), data=st.data())
def test_hypothesis_round_trip(byte_level, spm, text, prompt, data):
    for tok in (byte_level, spm):
        n = len(tok.encode(text, add_special_tokens=False).ids)
        chunks = []
        while sum(chunks) < n:
            chunks.append(data.draw(st.integers(1, n - sum(chunks))))
        check_stream(tok, prompt, text, chunks)


# ----- stop strings -----
def naive_cut(text: str, stops: list[str]) -> tuple[str, str | None]:
    found = [(text.find(s), len(s), s) for s in stops if s in text]
    if not found:
        return text, None
    start, _, s = min(found)
    return text[:start], s


def feed_chunks(stops: list[str], text: str, cuts: list[int]) -> tuple[str, str | None, list[str]]:
    """Feed ``text`` cut at ``cuts``; return the emitted text, the hit and the running emitted texts."""
    matcher = StopStringMatcher(stops)
    emitted, running = "", []
    bounds = [0] + sorted(cuts) + [len(text)]
    for a, b in zip(bounds, bounds[1:]):
        out, hit = matcher.feed(text[a:b])
        emitted += out
        running.append(emitted)
        if hit is not None:
            assert matcher.flush() == ""
            return emitted, hit, running
    emitted += matcher.flush()
    return emitted, matcher.hit, running


def test_truncate_at_stop():
    assert truncate_at_stop("hello world", ["wor"]) == ("hello ", "wor")
    assert truncate_at_stop("hello world", ["xyz"]) == ("hello world", None)
    assert truncate_at_stop("hello world", []) == ("hello world", None)
    assert truncate_at_stop("abcabc", ["c", "b"]) == ("a", "b")
    assert truncate_at_stop("stopping", ["stopping", "stop"]) == ("", "stop")
    assert truncate_at_stop("abc", "bc") == ("a", "bc")


@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet="ab c", max_size=30),
       stops=st.lists(st.text(alphabet="ab c", min_size=1, max_size=4), min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=8))
def test_stop_strings_any_chunking(text, stops, cuts):
    cuts = [c for c in cuts if c <= len(text)]
    want, want_hit = naive_cut(text, stops)
    assert truncate_at_stop(text, stops) == (want, want_hit)
    emitted, hit, running = feed_chunks(stops, text, cuts)
    assert emitted == want
    assert hit == want_hit
    # Text once emitted is final: every running output is a prefix of the answer.
    assert all(want.startswith(r) for r in running)


def test_stop_string_spanning_chunks():
    text = "The answer is 42.\n###\nIgnored"
    for cut in range(len(text) + 1):
        for cut2 in range(cut, len(text) + 1):
            assert feed_chunks(["###"], text, [cut, cut2])[:2] == ("The answer is 42.\n", "###")
    matcher = StopStringMatcher(["###"])
    assert matcher.feed("abc #") == ("abc ", None)
    assert matcher.feed("#") == ("", None)
    assert matcher.feed("x") == ("##x", None)  # not a stop after all: released
    assert matcher.feed("##") == ("", None)
    assert matcher.feed("#tail") == ("", "###")
    assert matcher.feed("more") == ("", "###")


def test_stop_string_prefix_of_another():
    for stops in (["stop", "stopping"], ["stopping", "stop"]):
        assert feed_chunks(stops, "we are stopping now", list(range(20)))[:2] == ("we are ", "stop")
    # The longer one starting earlier wins over a shorter one inside it.
    for stops in (["b", "abc"], ["abc", "b"]):
        assert feed_chunks(stops, "xxabcd", list(range(7)))[:2] == ("xx", "abc")
        assert feed_chunks(stops, "xxabd", list(range(6)))[:2] == ("xxa", "b")
        matcher = StopStringMatcher(stops)
        assert matcher.feed("xxab") == ("xx", None)  # "b" is complete, but "abc" may still come
        assert matcher.feed("d") == ("a", "b")


def test_flush():
    matcher = StopStringMatcher(["world"])
    assert matcher.feed("hello wor") == ("hello ", None)
    assert matcher.flush() == "wor"
    assert matcher.flush() == ""
    assert not matcher.stopped
    # A complete stop string still waiting on a longer candidate is cut at flush.
    matcher = StopStringMatcher(["b", "abc"])
    assert matcher.feed("zab") == ("z", None)
    assert matcher.flush() == "a"
    assert matcher.hit == "b"
    # No stop strings: everything passes straight through.
    passthrough = StopStringMatcher([])
    assert passthrough.feed("any text") == ("any text", None)
    assert passthrough.flush() == ""


def test_unicode_stop_strings_over_a_detokenized_stream(tokenizer):
    text = "Réponse : 日本語 🙂🚀 fin. <END> ignored 🙂"
    ids = tokenizer.encode(text).ids
    prompt_ids = tokenizer.encode("Q:").ids
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    matcher = StopStringMatcher(["🙂🚀 f", "<END>"])
    emitted, hit = "", None
    for i in ids:
        out, hit = matcher.feed(detok.add([i]))
        emitted += out
        if hit:
            break
    assert (emitted, hit) == truncate_at_stop(expected_text(tokenizer, prompt_ids, ids), matcher.stop)
    assert emitted.strip() == "Réponse : 日本語"
