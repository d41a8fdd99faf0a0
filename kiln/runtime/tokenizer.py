"""The engine's own tokenizer: encode prompts, render chat templates, decode; no hub, no transformers."""
from __future__ import annotations

from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer

from kiln.engine import Engine
from kiln.engine.format import TOKENIZER_FILE
from kiln.errors import EngineError, PromptTooLong, RequestError

# Texts this long (characters) are tokenized by a call that releases the GIL, so a caller may run it in
# a worker thread without stalling the others (tokenizing takes about 1 s a megabyte).
LONG_TEXT = 16384


class EngineTokenizer:
    def __init__(self, engine: Engine):
        facts = engine.tokenizer
        path = engine.path / TOKENIZER_FILE
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises its own untyped errors
            raise EngineError(f"{path} is not a readable tokenizer: {e}") from None
        self.bos_token_id: int | None = facts.get("bos_token_id")
        self.eos_token_ids: frozenset[int] = frozenset(facts.get("eos_token_ids") or [])
        self.pad_token_id: int | None = facts.get("pad_token_id")
        self.add_bos_token: bool = bool(facts.get("add_bos_token"))
        self.chat_template: str | None = facts.get("chat_template")
        self.bos_token: str = facts.get("bos_token") or ""
        self.eos_token: str = facts.get("eos_token") or ""
        # The model's own sampling defaults (its generation config, recorded at build): {} when it has none.
        self.sampling_defaults: dict = dict(facts.get("sampling_defaults") or {})
        self._template: jinja2.Template | None = None
        self._max_token_chars: int | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def max_token_chars(self) -> int:
        """The most characters one token's text has: a text of N characters is at least N / this tokens."""
        if self._max_token_chars is None:
            self._max_token_chars = max(map(len, self.tokenizer.get_vocab(with_added_tokens=True)), default=1)
        return self._max_token_chars

    def encode(self, text: str, add_special_tokens: bool = True, max_tokens: int | None = None) -> list[int]:
        """``text``'s token ids. With ``max_tokens``, a text too long to fit in that many tokens is refused
        by its length alone, before any tokenizing (which takes seconds on megabytes)."""
        if max_tokens is not None and len(text) > max_tokens * self.max_token_chars:
            raise PromptTooLong(f"the prompt has {len(text)} characters, more than {max_tokens} tokens can hold "
                               f"(a token of this tokenizer holds at most {self.max_token_chars}); the engine "
                               f"takes at most {max_tokens} tokens")
        try:
            if len(text) < LONG_TEXT:
                ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
            else:  # the batch call lets go of the interpreter's lock while it works: other threads run
                ids = self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        except (TypeError, ValueError) as e:  # e.g. lone surrogates, which are not text
            raise RequestError(f"the prompt cannot be tokenized: {e}") from None
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """Render ``messages`` (and the ``tools`` offered, OpenAI's function definitions) with the engine's chat
        template (as transformers renders it)."""
        if not self.chat_template:
            raise RequestError("this engine's tokenizer has no chat template; send a plain prompt instead")
        if self._template is None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                               extensions=[jinja2.ext.loopcontrols])
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token, tools=tools)

    def encode_chat(self, messages: list[dict], max_tokens: int | None = None,
                    tools: list[dict] | None = None) -> list[int]:
        # The template writes any special tokens itself, as transformers' apply_chat_template assumes.
        return self.encode(self.apply_chat_template(messages, tools=tools), add_special_tokens=False,
                           max_tokens=max_tokens)


def _raise(message: str) -> None:
    raise RequestError(f"chat template: {message}")
