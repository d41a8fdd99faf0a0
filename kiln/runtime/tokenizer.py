"""The engine's own tokenizer: encode prompts, render chat templates, decode; no hub, no transformers."""
from __future__ import annotations

from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer

from kiln.engine import Engine
from kiln.engine.format import TOKENIZER_FILE
from kiln.errors import EngineError, RequestError


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
        self._template: jinja2.Template | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` with the engine's chat template (as transformers renders it)."""
        if not self.chat_template:
            raise RequestError("this engine's tokenizer has no chat template; send a plain prompt instead")
        if self._template is None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                               extensions=[jinja2.ext.loopcontrols])
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # The template writes any special tokens itself, as transformers' apply_chat_template assumes.
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


def _raise(message: str) -> None:
    raise RequestError(f"chat template: {message}")
