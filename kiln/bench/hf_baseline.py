"""The Hugging Face transformers baseline: the same prompts through ``generate``, on the same device and dtype."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from kiln.bench.measure import clock, decode_rate
from kiln.engine import Engine
from kiln.errors import KilnError


@dataclass(frozen=True, slots=True)
class HFSource:
    """Where transformers loads the model from: a Hugging Face folder, or a .gguf file in ``folder``."""

    folder: Path
    gguf_file: str | None = None

    def __str__(self) -> str:
        return str(self.folder / self.gguf_file) if self.gguf_file else str(self.folder)


def hf_source(engine: Engine) -> HFSource:
    """The Hugging Face folder or .gguf file the engine was built from, as recorded at build time."""
    from kiln.checkpoint.checkpoint import is_checkpoint

    record = engine.meta.get("source") or {}
    # "path" is what the build read (maybe a kiln checkpoint); "original" is what that was converted from.
    named = [p for p in (record.get("path"), record.get("original")) if p]
    for name in named:
        path = Path(name)
        if path.is_file() and path.suffix == ".gguf":
            return HFSource(path.parent, path.name)
        if path.is_dir() and (path / "config.json").is_file() and not is_checkpoint(path):
            return HFSource(path)
    where = " or ".join(named) if named else "nothing"
    raise KilnError(f"--compare-hf needs the Hugging Face folder or .gguf file that engine {engine.path} was "
                    f"built from; it records {where}, which is missing or is not one")


def require_transformers() -> str:
    """transformers' version, or a KilnError saying how to get it (checked before kiln's run, not after)."""
    try:
        import transformers
    except ImportError:
        raise KilnError("--compare-hf needs Hugging Face transformers: pip install transformers") from None
    return transformers.__version__


class HFBaseline:
    """A transformers model on kiln's device and dtype, generating greedily exactly the asked number of tokens."""

    def __init__(self, source: HFSource, device: torch.device, dtype: torch.dtype):
        self.version = require_transformers()
        import transformers

        self.source = source
        self.device = device
        kwargs: dict = {"gguf_file": source.gguf_file} if source.gguf_file else {}
        if source.gguf_file:
            kwargs.update(dense_gguf(source.gguf_file))
        # transformers renamed torch_dtype to dtype in 4.56.
        major, minor = (int(x) for x in self.version.split(".")[:2])
        kwargs["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = dtype
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(source.folder), **kwargs)
        except (OSError, ValueError) as e:
            raise KilnError(f"transformers cannot load {source}: {e}") from e
        config = model.config
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        # A clean generation config: a model's shipped one may sample or penalize repeats, which kiln's
        # greedy requests do not; no EOS, so nothing is masked or stops early, as with ignore_eos.
        model.generation_config = transformers.GenerationConfig(pad_token_id=pad, eos_token_id=None,
                                                                bos_token_id=config.bos_token_id)
        self.model = model.to(device).eval()

    @torch.inference_mode()
    def generate(self, prompts: Sequence[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
        """Seconds to generate ``new_tokens`` for each of the same-length ``prompts`` at once, and the tokens."""
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("a transformers batch must hold prompts of one length (no padding)")
        ids = torch.tensor(list(prompts), dtype=torch.long, device=self.device)
        start = clock(self.device)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        seconds = clock(self.device) - start
        return seconds, out[:, ids.shape[1]:].tolist()

    def warmup(self, prompts: Sequence[list[int]], new_tokens: int) -> None:
        # The measured calls themselves, once: on a GPU the first full-length generate ran 5x slower
        # than the next (allocator growth, kernel selection), and a short warmup did not cover it.
        self.generate(prompts, 1)
        self.generate(prompts, new_tokens)


@dataclass(slots=True)
class HFDecodeResult:
    decode_tokens_per_s: float | None
    decode_tokens_per_s_per_iteration: list[float | None]
    output_token_ids: list[list[list[int]]]


def hf_decode(baseline: HFBaseline, batches: Sequence[Sequence[list[int]]], output_len: int) -> HFDecodeResult:
    """Decode tokens/s per batch: B * (output_len - 1) / (t(output_len tokens) - t(1 token)), averaged."""
    baseline.warmup(batches[0], output_len)
    rates: list[float | None] = []
    tokens: list[list[list[int]]] = []
    for batch in batches:
        t_first, _ = baseline.generate(batch, 1)
        t_all, ids = baseline.generate(batch, output_len)
        rates.append(decode_rate(len(batch), output_len, t_all - t_first))
        tokens.append(ids)
    measured = [r for r in rates if r is not None]
    return HFDecodeResult(sum(measured) / len(measured) if measured else None, rates, tokens)


@dataclass(slots=True)
class HFThroughputResult:
    batch_size: int
    num_batches: int
    duration_s: float
    output_throughput: float
    output_token_ids: list[list[int]]


def hf_throughput(baseline: HFBaseline, requests: Sequence[tuple[list[int], int]], batch_size: int
                  ) -> HFThroughputResult:
    """Output tokens/s over ``(prompt, output_len)`` requests, in batches of up to ``batch_size`` that share
    both lengths (so no padding and one stopping point), summed over the batches' generate times."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (prompt, output_len) in enumerate(requests):
        groups.setdefault((len(prompt), output_len), []).append(i)
    batches = [(idx[k:k + batch_size], out) for (_, out), idx in groups.items()
               for k in range(0, len(idx), batch_size)]
    baseline.warmup([requests[i][0] for i in batches[0][0]], batches[0][1])
    tokens: list[list[int]] = [[] for _ in requests]
    seconds = 0.0
    for idx, output_len in batches:
        t, ids = baseline.generate([requests[i][0] for i in idx], output_len)
        seconds += t
        for i, row in zip(idx, ids):
            tokens[i] = row
    total_out = sum(out for _, out in requests)
    return HFThroughputResult(batch_size, len(batches), seconds, total_out / seconds, tokens)


def token_match(kiln_ids: Sequence[list[int]], hf_ids: Sequence[list[int]]) -> float:
    """Share of sequences whose generated tokens are identical in both runs (greedy, so ideally 1.0)."""
    same = sum(1 for a, b in zip(kiln_ids, hf_ids) if list(a) == list(b))
    return same / len(kiln_ids) if kiln_ids else 0.0


def dense_gguf(gguf_file: str) -> dict:
    """Ask transformers for plain dense weights from a GGUF file, as kiln runs them.

    NOTE: transformers 5.24 and later keep GGUF weights in their quantized blocks unless told to
    dequantize; comparing kiln's dense weights with those would compare different bytes per weight.
    """
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF weights at load
        return {}
    import inspect

    if "dequantize" not in inspect.signature(GgufConfig).parameters:
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True)}
