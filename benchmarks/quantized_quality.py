"""How far quantized engines move from float32 on a real model: the last-token logits of every prefix of a
text (teacher-forced), their relative error in norm, and the share of prefixes whose top token is float32's.

Usage: python benchmarks/quantized_quality.py [MODEL] [--formats int8 fp8 int4_g128 ...]
       [--quantize-calibration awq|none] [--json OUT]
MODEL: a Hugging Face folder or GGUF file (default: the bundled SmolLM2-135M-Instruct, decoded to float32).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tests_support import last_logits  # noqa: E402
from kiln.builder import build
from kiln.builder.engine_cache import default_model
from kiln.engine import BuildConfig
from kiln.runtime import LLM

TEXT = ("The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889 for the "
        "World's Fair. The city is also home to the Louvre, the world's largest art museum.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--formats", nargs="+", default=["int8", "fp8", "int4_g32", "int4_g128"])
    p.add_argument("--quantize-calibration", choices=["awq", "none"], default="awq",
                   help="int4: activation-aware scales (default) or round to nearest only")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    source = Path(args.model) if args.model else default_model()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def engine(quantization: str | None) -> Path:
            # (513: int4's activation-aware scales calibrate in requests of 512 tokens, as a default build's do)
            return build(source, Path(tmp) / str(quantization), BuildConfig(max_seq_len=513, quantization=quantization),
                         progress=False, keep_packed=False, quantize_calibration=args.quantize_calibration)

        base = LLM(engine(None), device="cpu")
        ids = base.tokenizer.encode(TEXT)
        prompts = [ids[:i] for i in range(4, len(ids) + 1)]
        want = last_logits(base, prompts)
        base.shutdown()
        for fmt in args.formats:
            llm = LLM(engine(fmt), device="cpu")
            got = last_logits(llm, prompts)
            llm.shutdown()
            rel = (got - want).norm(dim=-1) / want.norm(dim=-1)
            rows.append({"format": fmt, "quantize_calibration": args.quantize_calibration if fmt.startswith("int4")
                         else None, "prefixes": len(prompts), "rel_error_max": round(float(rel.max()), 4),
                         "rel_error_mean": round(float(rel.mean()), 4),
                         "top1_agreement": round(float((got.argmax(-1) == want.argmax(-1)).float().mean()), 4)})
            label = f"{fmt} ({args.quantize_calibration})" if fmt.startswith("int4") else fmt
            print(f"{label:17s} top-1 agreement {rows[-1]['top1_agreement']:.1%}  logits error mean "
                  f"{rows[-1]['rel_error_mean']:.4f} max {rows[-1]['rel_error_max']:.4f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "model": str(source),
                                               "cpu": platform.processor() or platform.machine(),
                                               "results": rows}, indent=2))


if __name__ == "__main__":
    main()
