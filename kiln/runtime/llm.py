"""``LLM``: offline generation over an engine, many prompts batched in flight."""
from __future__ import annotations

from typing import Sequence

from kiln.runtime.executor import Executor, ExecutorConfig
from kiln.runtime.outputs import RequestOutput
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.tokenizer import EngineTokenizer

Prompt = str | list[int]


class LLM:
    """Load an engine and generate: ``LLM(engine_dir).generate(prompts, SamplingParams(...))``.

    A prompt is a string or a list of token ids. Results come back in the order of the prompts.
    """

    def __init__(self, engine_dir: str, device: str | None = None, **options):
        self.executor = Executor(str(engine_dir), ExecutorConfig(device=device, **options))

    @property
    def tokenizer(self) -> EngineTokenizer:
        return self.executor.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        prompts = _as_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ex = self.executor
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(ex.add_request(prompt, p))
        except Exception:
            for rid in ids:
                ex.abort(rid)
            raise
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in ex.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[rid] for rid in ids]

    def chat(self, conversations: list[list[dict]] | list[dict],
             params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate replies to conversations (lists of {"role", "content"}) through the chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.generate([self.tokenizer.encode_chat(c) for c in conversations], params)


def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    return list(prompts)
