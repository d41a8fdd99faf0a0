"""Small tokenizers trained in-process for tests: a GPT-2-style byte-level BPE and a SentencePiece-style one."""
from __future__ import annotations

import json
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BYTE_LEVEL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SPM_SPECIALS = ["<unk>", "<s>", "</s>"]

_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Inference engines batch requests and stream tokens back to the caller.",
    "She said: \"don't stop\" -- and then, well, it stopped.",
    "Café, naïve, résumé, façade, jalapeño, Ångström, Øresund, Łódź.",
    "Straße und Größe; über alles; Ärger, Öl, Übung.",
    "日本語のテキストも少し入れておきます。東京は大きい都市です。",
    "中文文本：你好，世界！今天天气很好。我们一起去吃饭吧。",
    "한국어 문장도 있습니다. 안녕하세요!",
    "Emoji: 🙂 🚀 🎉 👩‍💻 🇫🇷 ❤️ 👍🏽 and more 🐍.",
    "Combining: e\u0301 a\u0308 n\u0303 o\u0302 — decomposed accents.",
    "Greek: αβγ δέλτα; Cyrillic: привет мир; Hebrew: שלום; Arabic: مرحبا.",
    "Math: ∑ x² ≤ ∞, ∀ε>0 ∃δ; arrows → ← ↔; ½ ¼ ¾.",
    "Numbers 12345 67890 3.14159 2.71828 1e-9 0xFF.",
]

_CODE = [
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += x[i];\n}\n",
    "if __name__ == \"__main__\":\n        main()\n\n\n",
    "    x    =    1\t\t# aligned\n",
    "SELECT id, name FROM users WHERE age >= 18;\n",
    "const f = (x) => { return x * 2; };  // arrow\n",
    "class Foo:\n    \"\"\"Docstring.\"\"\"\n\n    def bar(self) -> None:\n        pass\n",
]


def corpus(num_lines: int = 400, seed: int = 0) -> list[str]:
    """A few hundred lines of mixed prose, code and unicode, deterministic."""
    rng = random.Random(seed)
    pool = _SENTENCES + _CODE
    lines = list(pool)
    while len(lines) < num_lines:
        parts = rng.sample(pool, k=rng.randint(1, 3))
        words = " ".join(parts).split(" ")
        rng.shuffle(words)
        lines.append(" ".join(words[: rng.randint(min(3, len(words)), len(words))]))
    return lines


def byte_level_bpe(vocab_size: int = 800) -> Tokenizer:
    """A GPT-2/SmolLM2-style byte-level BPE: every string encodes, the decoder joins bytes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=BYTE_LEVEL_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def sentencepiece_bpe(vocab_size: int = 600) -> Tokenizer:
    """A Llama-2-style BPE: ``▁`` for spaces, byte-fallback ``<0xNN>`` tokens, the Llama decoder chain.

    The alphabet is limited so that rare characters (CJK, emoji) really go through byte fallback.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPM_SPECIALS, limit_alphabet=120, show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    # Rebuild the model with the 256 byte tokens and byte_fallback on, as SentencePiece has them.
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for b in range(256):
        name = f"<0x{b:02X}>"
        if name not in vocab:
            vocab[name] = len(vocab)
    spec["model"]["byte_fallback"] = True
    spec["model"]["fuse_unk"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    return tok
