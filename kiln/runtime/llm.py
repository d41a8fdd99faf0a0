"""``LLM``: offline generation over an engine, many prompts batched in flight."""
from __future__ import annotations

from typing import Sequence

from kiln.engine import Engine
from kiln.runtime.config import RuntimeConfig
from kiln.runtime.input_processor import Prompt
from kiln.runtime.llm_engine import LLMEngine
from kiln.runtime.outputs import RequestFailed, RequestOutput
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.tokenizer import EngineTokenizer


class LLM:
    """Load an engine and generate: ``LLM(engine_dir).generate(prompts, SamplingParams(...))``.

    A prompt is a string or a list of token ids. Results come back in the order of the prompts.
    ``options`` are ``RuntimeConfig``'s fields (``kv_cache_memory``, ``cuda_graphs``, ...).
    """

    def __init__(self, engine: str | Engine, device: str | None = None, **options):
        self.engine = LLMEngine(engine if isinstance(engine, Engine) else str(engine),
                                RuntimeConfig.from_options(device, **options))

    @property
    def tokenizer(self) -> EngineTokenizer:
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt. If one fails (``RequestFailed``) or the call is interrupted, the
        call's other requests are aborted, so the ``LLM`` is ready for the next call. No ``params``: the
        model's own sampling defaults (its generation config, as the engine recorded it), else kiln's."""
        prompts = _as_list(prompts)
        if params is None:
            params = SamplingParams(**self.tokenizer.sampling_defaults)
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        engine = self.engine
        ids: list[str] = []
        done: dict[str, RequestOutput] = {}
        try:
            for prompt, p in zip(prompts, params):
                ids.append(engine.add_request(prompt, p))
            while len(done) < len(ids):
                for out in engine.step(timeout=0.5):
                    if out.error is not None:
                        raise RequestFailed(out.request_id, out.error)
                    if out.finished:
                        done[out.request_id] = out
        except BaseException:
            for rid in ids:
                if rid not in done:
                    engine.abort(rid)
            raise
        return [done[rid] for rid in ids]

    def chat(self, conversations: list[list[dict]] | list[dict],
             params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate replies to conversations (lists of {"role", "content"}) through the chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.generate([self.tokenizer.encode_chat(c) for c in conversations], params)

    def shutdown(self) -> None:
        self.engine.shutdown()


def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [list(prompts)]
    return list(prompts)
