"""The build options that every verb which may build an engine takes (build, run, serve, bench), and the
BuildConfig fields they give."""
from __future__ import annotations

import argparse

from kiln.builder.awq import DEFAULT_METHOD, METHODS
from kiln.engine.format import KV_CACHE_DTYPES, BuildConfig
from kiln.errors import KilnError
from kiln.weight_formats import quantized_format

FIELDS = ("max_batch_size", "max_seq_len", "max_num_tokens", "kv_block_size", "kv_cache_dtype")


def add_build_options(p: argparse.ArgumentParser, for_run: bool = False) -> None:
    g = p.add_argument_group("build options" + (" (when the model must be built first)" if for_run else ""))
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weight and activation dtype (default: float32 on CPU, bfloat16 on GPU)")
    g.add_argument("--max-batch-size", type=int, default=None,
                   help=f"the most sequences a step runs (default {BuildConfig.max_batch_size}; the runtime "
                        f"admits fewer when its KV pool holds fewer)")
    g.add_argument("--max-seq-len", type=int, default=None, help="default: the model's limit, at most 4096")
    g.add_argument("--max-num-tokens", type=int, default=None,
                   help=f"tokens computed per step (prefill chunk; default {BuildConfig.max_num_tokens})")
    g.add_argument("--kv-block-size", type=int, default=None, help=f"default {BuildConfig.kv_block_size}")
    add_quantize_options(g)


def add_quantize_options(g: argparse._ArgumentGroup) -> None:
    """--quantize and --group-size for the weights, --kv-cache-dtype for the KV cache."""
    g.add_argument("--quantize", choices=["int8", "int4", "fp8"], default=None,
                   help="quantize the linear layers' weights: int8 and fp8 scaled per output channel and rounded "
                        "to nearest (fp8 also rounds activations per token: W8A8), int4 in groups, after "
                        "activation-aware scaling (--quantize-calibration); a GGUF file's packed weights keep their "
                        "own format")
    g.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="int4: weights per scale and offset, 32, 64, 128 (default) or 256")
    g.add_argument("--quantize-calibration", choices=list(METHODS), default=None,
                   help="int4 from float weights: awq (default) scales each input channel by the activations the "
                        "model shows on a text kiln ships before rounding, as AWQ does; none rounds to nearest only")
    g.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default=None,
                   help="the KV cache's dtype (default: the weights'); fp8 and int8 hold one byte a value, scaled "
                        "by factors calibrated at build on a text kiln ships: twice the context of a bfloat16 "
                        "cache fits, four times a float32 one's")


def quantization(args: argparse.Namespace) -> str | None:
    """The weight format ``--quantize`` and ``--group-size`` ask for (BuildConfig.quantization)."""
    if args.quantize is None:
        if args.group_size is not None:
            raise KilnError("--group-size is for --quantize int4")
        return None
    try:
        return quantized_format(args.quantize, args.group_size)
    except ValueError as e:
        raise KilnError(str(e)) from None


def quantize_calibration(args: argparse.Namespace) -> str:
    """How ``--quantize int4`` rounds float weights (``kiln.builder.awq``): the build's default unless asked."""
    if args.quantize_calibration is None:
        return DEFAULT_METHOD
    if args.quantize != "int4":
        raise KilnError("--quantize-calibration is for --quantize int4")
    return args.quantize_calibration


def build_fields(args: argparse.Namespace) -> dict:
    """The BuildConfig fields the options give (None: not given)."""
    return {**{name: getattr(args, name) for name in FIELDS}, "quantization": quantization(args)}
