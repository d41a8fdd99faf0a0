"""Small helpers several test modules share."""
from __future__ import annotations


def assert_idle(llm) -> None:
    """Every check of the core passes and every KV block is free (asked on the core thread, after its work)."""
    stats = llm.engine.call(lambda core: (core.check_integrity(), core.stats())[1])
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0


def block_bytes(engine) -> int:
    """Bytes of one KV block of the engine at ``engine`` (a path)."""
    from kiln.engine import read_engine
    from kiln.runtime.kv_pool import kv_cache_spec

    return kv_cache_spec(read_engine(engine)).bytes_per_block


def last_logits(llm, prompts: list[list[int]]):
    """For each prompt, the float32 logits of its last token from ``llm``'s runner (each prompt alone, one step):
    teacher-forced outputs to compare engines by."""
    import torch

    from kiln.runtime import SamplingParams
    from kiln.runtime.request import Request

    runner = llm.engine.call(lambda core: core.runner)
    out = []
    for ids in prompts:
        req = Request("r", ids, SamplingParams())
        req.block_ids = list(range(-(-len(ids) // runner.block_size)))
        out.append(runner.execute([(req, len(ids))])[0].float().cpu())
    return torch.stack(out)


PARIS_TEXT = ("The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889 for the "
              "World's Fair, and for the Louvre, the largest art museum in the world.")


def text_prefixes(engine, text: str = PARIS_TEXT) -> list[list[int]]:
    """The prefixes of ``text`` (6, 8, ... tokens) in the tokenizer of the engine at ``engine``: the prompts that
    quality tests compare engines' teacher-forced logits on."""
    from kiln.engine import read_engine
    from kiln.runtime.tokenizer import EngineTokenizer

    ids = EngineTokenizer(read_engine(engine, need_weights=False)).encode(text)
    return [ids[:i] for i in range(6, len(ids) + 1, 2)]


def engine_logits(engine, prompts: list[list[int]], device: str, **options):
    """``last_logits`` of the engine at ``engine`` loaded on ``device`` (with runtime ``options``), then unloaded."""
    from kiln.runtime import LLM

    llm = LLM(engine, device=device, **options)
    try:
        return last_logits(llm, prompts)
    finally:
        llm.shutdown()
