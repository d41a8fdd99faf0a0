"""Benchmark requests: read a JSONL dataset (kiln's or trtllm-bench's fields) or make synthetic ones."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.runtime.tokenizer import EngineTokenizer

# trtllm-bench writes these; they carry nothing a run needs.
_IGNORED_FIELDS = ("task_id",)


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request: prompt token ids and the exact number of tokens to generate."""

    prompt_ids: list[int]
    output_len: int
    line: int | None = None  # the dataset line it came from, for error messages

    @property
    def input_len(self) -> int:
        return len(self.prompt_ids)

    def where(self, index: int) -> str:
        return f"dataset line {self.line}" if self.line is not None else f"request {index}"


@dataclass(slots=True)
class Dataset:
    requests: list[BenchRequest]
    # What the requests are, for the report: kind, path or seed, and length statistics.
    description: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def total_input_tokens(self) -> int:
        return sum(r.input_len for r in self.requests)

    @property
    def total_output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)


def load_jsonl(path: str | Path, encode: Callable[[str], list[int]], vocab_size: int,
               limit: int | None = None) -> Dataset:
    """Read ``path``: one JSON object a line with ``prompt`` (text) or ``input_ids``, and ``output_tokens``.

    Text prompts are tokenized here, with the engine's tokenizer, so that every run (kiln's and the
    transformers baseline) sees the very same token ids.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise KilnError(f"cannot read dataset {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise KilnError(f"dataset {path} is not UTF-8 text: {e}") from e
    requests: list[BenchRequest] = []
    for number, line in enumerate(lines, start=1):
        if limit is not None and len(requests) >= limit:
            break
        if not line.strip():
            continue
        requests.append(_parse_line(line, number, path, encode, vocab_size))
    if not requests:
        raise KilnError(f"dataset {path} has no requests")
    return Dataset(requests, {"kind": "file", "path": str(path.resolve()), **_length_stats(requests)})


def _parse_line(line: str, number: int, path: Path, encode: Callable[[str], list[int]],
                vocab_size: int) -> BenchRequest:
    def bad(message: str) -> KilnError:
        return KilnError(f"{path}, line {number}: {message}")

    try:
        item = json.loads(line)
    except ValueError as e:
        raise bad(f"not valid JSON ({e})") from None
    if not isinstance(item, dict):
        raise bad(f"expected a JSON object, got {type(item).__name__}")
    has_text, has_ids = "prompt" in item, "input_ids" in item
    if has_text == has_ids:
        raise bad('give exactly one of "prompt" (text) and "input_ids" (list of token ids)')
    if has_text:
        text = item["prompt"]
        if not isinstance(text, str) or not text:
            raise bad('"prompt" must be a non-empty string')
        ids = encode(text)
        if not ids:
            raise bad("the prompt encodes to no tokens")
    else:
        ids = item["input_ids"]
        if not isinstance(ids, list) or not ids or not all(_is_int(t) for t in ids):
            raise bad('"input_ids" must be a non-empty list of integers')
        out_of_range = [t for t in ids if not 0 <= t < vocab_size]
        if out_of_range:
            raise bad(f'"input_ids" has ids outside the vocabulary [0, {vocab_size}): {out_of_range[:5]}')
    if "output_tokens" not in item:
        raise bad('"output_tokens" is missing')
    output_len = item["output_tokens"]
    if not _is_int(output_len) or output_len < 1:
        raise bad(f'"output_tokens" must be a positive integer, got {output_len!r}')
    return BenchRequest(list(ids), int(output_len), number)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def ordinary_token_ids(tokenizer: EngineTokenizer, vocab_size: int) -> list[int]:
    """Ids of the tokenizer's ordinary tokens below ``vocab_size``: no added, special, BOS, EOS or pad token."""
    raw = tokenizer.tokenizer
    excluded = set(raw.get_added_tokens_decoder()) | set(tokenizer.eos_token_ids)
    excluded |= {t for t in (tokenizer.bos_token_id, tokenizer.pad_token_id) if t is not None}
    ids = sorted(i for i in raw.get_vocab(with_added_tokens=False).values() if i < vocab_size and i not in excluded)
    if not ids:
        raise KilnError("the tokenizer has no ordinary tokens to draw synthetic prompts from")
    return ids


def synthetic(input_len: int, output_len: int, num_requests: int, seed: int,
              token_ids: Sequence[int]) -> Dataset:
    """``num_requests`` prompts of ``input_len`` random ``token_ids`` each, reproducible from ``seed``."""
    for name, value in (("input length", input_len), ("output length", output_len),
                        ("number of requests", num_requests)):
        if value < 1:
            raise KilnError(f"the {name} must be at least 1, got {value}")
    rng = random.Random(seed)
    requests = [BenchRequest(rng.choices(token_ids, k=input_len), output_len) for _ in range(num_requests)]
    return Dataset(requests, {"kind": "synthetic", "seed": seed, **_length_stats(requests)})


def value_stats(values: Sequence[int]) -> dict:
    return {"min": min(values), "mean": round(sum(values) / len(values), 2), "max": max(values)}


def length_stats(input_lens: Sequence[int], output_lens: Sequence[int]) -> dict:
    """The description's request count and length statistics."""
    return {"num_requests": len(input_lens), "input_len": value_stats(input_lens),
            "output_len": value_stats(output_lens)}


def _length_stats(requests: list[BenchRequest]) -> dict:
    return length_stats([r.input_len for r in requests], [r.output_len for r in requests])


def describe(description: dict) -> str:
    """One line for the table: where the requests come from and their lengths."""
    def span(s: dict) -> str:
        return str(s["min"]) if s["min"] == s["max"] else f"{s['min']}-{s['max']} (mean {s['mean']})"

    where = f"synthetic, seed {description['seed']}" if description.get("kind") == "synthetic" else description["path"]
    return (f"{where}: {description['num_requests']} requests, input {span(description['input_len'])}, "
            f"output {span(description['output_len'])} tokens")
