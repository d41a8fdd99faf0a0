"""Build a ``tokenizers.Tokenizer`` and a Hugging Face tokenizer_config from a GGUF file's tokenizer metadata.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, merges, token types and special
token ids as metadata. This module rebuilds the fast tokenizer they describe so that it gives the
same ids as transformers' GGUF tokenizer (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from kiln.errors import ConversionError
from kiln.schema import BOOL, INT, NUMBER, STR, ListOf, Record, validate

log = logging.getLogger(__name__)

# llama.cpp's token types (llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The split expressions llama.cpp applies before byte-level BPE, by ``tokenizer.ggml.pre``
# (llama-vocab.cpp). None stands for GPT-2's own expression, which ByteLevel applies itself.
PRE_TOKENIZER_SPLITS: dict[str, tuple[str | None, ...]] = {
    **dict.fromkeys(("default", "gpt2", "mpt", "olmo", "jais", "trillion"), (None,)),
    # Digits one at a time, then GPT-2's expression (SmolLM, StarCoder and relatives).
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
                    (r"\p{N}", None)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "smaug-bpe", "dbrx"), (_LLAMA3_SPLIT,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), (_QWEN2_SPLIT,)),
}

SPM_SPACE = "\u2581"

# The tokenizer metadata kiln reads, with its types (all optional here; the code says what it needs).
TOKENIZER_METADATA_SCHEMA = Record({}, {
    "tokenizer.ggml.model": STR, "tokenizer.ggml.pre": STR, "tokenizer.ggml.tokens": ListOf(STR),
    "tokenizer.ggml.token_type": ListOf(INT), "tokenizer.ggml.scores": ListOf(NUMBER),
    "tokenizer.ggml.merges": ListOf(STR), "tokenizer.chat_template": STR,
    **{f"tokenizer.ggml.{name}_token_id": INT for name in ("bos", "eos", "eot", "eom", "unknown", "padding")},
    **{f"tokenizer.ggml.{name}": BOOL for name in ("add_bos_token", "add_eos_token", "add_space_prefix")},
})


def tokenizer_from_gguf_metadata(metadata: Mapping[str, Any], source: str = "",
                                 model_max_length: int | None = None) -> tuple[Tokenizer, dict]:
    """The tokenizer and its tokenizer_config from GGUF metadata (keys as in the file, values decoded).

    ``source`` names the file in error messages; ``model_max_length`` is the model's context length.
    """
    where = source or "the GGUF file"
    validate(dict(metadata), TOKENIZER_METADATA_SCHEMA, f"{where}: GGUF metadata", ConversionError)
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ConversionError(f"{where} has no tokenizer (no 'tokenizer.ggml.tokens' metadata); kiln needs the "
                              "vocabulary inside the GGUF")
    kind = metadata.get("tokenizer.ggml.model")
    types = list(metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ConversionError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    try:
        if kind == "gpt2":
            tokenizer, add_bos_default = _byte_level(metadata, tokens, types, where), False
        elif kind == "llama":
            # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
            tokenizer, add_bos_default = _sentencepiece(metadata, tokens, types, where), True
        else:
            raise ConversionError(f"{where} has tokenizer model {kind!r}, which kiln cannot rebuild; "
                                  "supported: gpt2 (byte-level BPE), llama (SentencePiece BPE)")
    except ConversionError:
        raise
    except Exception as e:  # tokenizers raises its own exceptions for an inconsistent vocabulary/merges
        raise ConversionError(f"{where}: cannot build the {kind} tokenizer from its metadata: {e}") from e

    def token(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if isinstance(token_id, int) and 0 <= token_id < len(tokens) else None

    config = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "chat_template": metadata.get("tokenizer.chat_template"),
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    _add_special_tokens(tokenizer, tokens, types, config)
    tokenizer.post_processor = _post_processor(tokenizer, config)
    return tokenizer, config


def _byte_level(metadata: Mapping[str, Any], tokens: list[str], types: list[int], where: str) -> Tokenizer:
    alphabet = _byte_to_unicode()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, (text, kind) in enumerate(zip(tokens, types)):
        # An ordinary token is stored in the byte alphabet; one that is not could never be produced by the
        # merges, so spell it in that alphabet as transformers does. Control and user-defined tokens are
        # matched as raw text, so they keep their spelling.
        if kind == NORMAL and not set(text) <= spelled:
            text = "".join(alphabet[b] for b in text.encode("utf-8"))
        vocab[text] = i
    merges = _merges(metadata.get("tokenizer.ggml.merges") or [], where)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = metadata.get("tokenizer.ggml.pre") or "default"
    splits = PRE_TOKENIZER_SPLITS.get(pre)
    if splits is None:
        log.warning("%s: unknown pre-tokenizer %r; splitting text with GPT-2's expression, which may give "
                    "different tokens than llama.cpp", where, pre)
        splits = (None,)
    steps = [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits if s is not None]
    # ByteLevel's own expression is GPT-2's: use it when the recipe ends with that expression.
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=splits[-1] is None))
    tokenizer.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece(metadata: Mapping[str, Any], tokens: list[str], types: list[int], where: str) -> Tokenizer:
    vocab = {text: i for i, text in enumerate(tokens)}
    if metadata.get("tokenizer.ggml.merges"):
        merges = _merges(metadata["tokenizer.ggml.merges"], where)
    else:
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise ConversionError(f"{where}: a SentencePiece vocabulary needs tokenizer.ggml.scores (one per token) "
                                  "or tokenizer.ggml.merges")
        merges = merges_from_scores(tokens, scores)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPM_SPACE,
                                                       prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-driven merging of a vocabulary that lists none.

    Every way of cutting a token into two tokens of the vocabulary is a merge, ranked by the score of
    the token it makes (best first). Ties go to the longer left piece, then the longer right one,
    then vocabulary order, which is the order transformers' GGUF tokenizer uses.
    """
    ids: dict[str, int] = {}
    score_of: dict[str, float] = {}
    for i, (text, score) in enumerate(zip(tokens, scores)):
        ids[text] = i
        score_of[text] = score
    ranked: list[tuple[float, int, int, int, int, int, str, str]] = []
    for order, text in enumerate(dict.fromkeys(tokens)):
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in ids and right in ids:
                ranked.append((-score_of[text], -len(left), -len(right), order, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _merges(lines: list[str], where: str) -> list[tuple[str, str]]:
    merges = []
    for line in lines:
        # llama.cpp cuts at the first space after the first character, so a piece may start with a space.
        cut = line.find(" ", 1)
        if cut < 0:
            raise ConversionError(f"{where}: malformed merge {line!r} in tokenizer.ggml.merges (expected 'a b')")
        merges.append((line[:cut], line[cut + 1:]))
    return merges


def _add_special_tokens(tokenizer: Tokenizer, tokens: list[str], types: list[int], config: dict) -> None:
    """Keep control, unknown and user-defined tokens whole, as llama.cpp matches them in raw text."""
    named = {config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if config[k] is not None}
    special = [text for text, kind in zip(tokens, types) if kind in (CONTROL, UNKNOWN) or
               (text in named and kind != NORMAL and kind != BYTE)]
    user = [text for text, kind in zip(tokens, types) if kind == USER_DEFINED and text not in named]
    if special:
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(special)])
    if user:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in dict.fromkeys(user)])


def _post_processor(tokenizer: Tokenizer, config: dict) -> processors.TemplateProcessing | None:
    """BOS/EOS around each sequence when the file asks for them (as a tokenizer.json would say)."""
    bos = config["bos_token"] if config["add_bos_token"] else None
    eos = config["eos_token"] if config["add_eos_token"] else None
    if bos is None and eos is None:
        return None
    single = " ".join(p for p in (bos and f"{bos}:0", "$A:0", eos and f"{eos}:0") if p)
    pair = single + " " + " ".join(p for p in (bos and f"{bos}:1", "$B:1", eos and f"{eos}:1") if p)
    specials = [(t, tokenizer.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x is not None)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the others for code points from 256 up."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))
