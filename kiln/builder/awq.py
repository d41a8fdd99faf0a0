"""Activation-aware scales for int4 weights (``kiln build --quantize int4``, on by default for float weights;
``--quantize-calibration none`` rounds to nearest only). The idea is AWQ's (Lin et al., "AWQ: Activation-aware
Weight Quantization for LLM Compression and Acceleration", 2023); the code is kiln's own.

Why: an int4 group spends its 16 levels on the span of its weights, so all of them get the same step. A few
input channels of a trained model carry activations many times the others'; their weights' rounding errors are
multiplied by those activations and dominate the output's error. Multiplying such a channel's weight column by
s > 1 before rounding, and its input by 1/s, gives its weights finer steps relative to their size, at the cost
of the group's other weights, whose inputs are small.

What: each linear layer that is quantized from float weights gets one scale per input channel,
s_c = m_c^alpha, m_c the mean |x_c| of its input over the calibration text (the float engine as built so far,
run over ``kiln/data/calibration.txt`` in requests of ``CHUNK`` tokens by ``calibration.run_text``), divided by
the scales' geometric mean and rounded to a power of two in [2^-8, 2^8]. alpha is searched over 0, 0.1, ..., 1
for each layer: the one whose rounded weights, W' = Q(W diag(s)) diag(1/s) with Q the format's own round to
nearest, give the least squared error of the outputs X W'^T against X W^T on ``SAMPLE_ROWS`` of the calibration
tokens X (and at most ``SEARCH_OUTPUTS`` of the outputs). alpha = 0 is plain round to nearest, so the choice is
never worse than it on those rows; where rounding to nearest already finds a grid (SmolLM2's Q4_1 weights in
groups of 32), every alpha is 0 and the engine is round to nearest's.

Measured on SmolLM2 and not kept, for no gain beyond the noise of the calibration's cut (perplexity 31.1 to 31.7
against 31.1 to 32.0): scales not rounded to powers of two, a grid of 21 alphas, AutoAWQ's weight-magnitude term
(m^alpha / w^(1 - alpha)), a search of each group's clipping range, and the MLP's output as gate_up's error.

The consumer's weight columns are multiplied by s before rounding, and 1/s is folded into what produces its
input:

    consumer       its input                         1/s folded into
    qkv_proj       input_layernorm's output          the norm's weight
    gate_up_proj   post_attention_layernorm's        the norm's weight
    down_proj      silu(gate) * up                   the up rows of gate_up_proj (the product is linear in up)
    o_proj         the attention output, per head    the value rows of qkv_proj and their bias (a head's
                                                     output is a weighted sum of its values)

With grouped-query attention the query heads that share a key/value head read the same values, so o_proj's
input channels (head h, dim d) share the scale of kv head h // (heads / kv heads), dim d: m is the mean over
those heads, and the search and the scales file hold the kv-channel form ([kv heads x head_dim]).

Exactness: every fold is exact in real arithmetic, and because each scale is a power of two it is exact in
floating point as well: x 2^k only moves an exponent, so the norm weights, value rows and bias divided by s
keep their significands (float32 and bfloat16 at any s in [2^-8, 2^8]; a float16 value pushed below 2^-14,
its smallest normal, would lose bits), a product (a 2^-k)(b 2^k) is the product ab, and an engine with the
scales folded and nothing rounded computes bit for bit what the plain one does (given the same kernels:
tests/test_awq.py). Rounding to int4 is unchanged by a power of two on a whole row (its group scale and minimum
move with it, as long as they stay in float16's normal range), so dividing the value or up rows before
quantizing them costs nothing either. What the scales
change is only what int4 rounds in the consumers; the float outputs of a folded layer (values, the up half of
gate_up) are smaller or larger by powers of two, which a quantized KV cache, calibrated after this step, sees.

``kiln refit`` needs the scales to reproduce the weights: they are written beside the weights
(``SCALES_FILE``, float32, one tensor per consumer), and engine.json's ``awq`` entry records the file's sha256,
each layer's alpha and the calibration's size; refit folds them into the new float weights before rounding,
as the build did.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from kiln.builder.calibration import run_text
from kiln.builder.transforms import fitting_format, scale_output_rows
from kiln.errors import BuildError
from kiln.models import ModelConfig
from kiln.weight_formats import block_format

if TYPE_CHECKING:
    from kiln.runtime.cpu_threads import ThreadGovernor

METHODS = ("awq", "none")  # --quantize-calibration: activation-aware scales, or round to nearest only
DEFAULT_METHOD = "awq"
SCALES_FILE = "awq_scales.safetensors"
ALPHAS = tuple(i / 10 for i in range(11))
# Calibration requests of 512 tokens (fewer if max_seq_len is less): each begins with a token of large activations
# (the attention sink), so the text's cut changes the statistics (perplexity 31.1 to 32.0 on SmolLM2 for requests
# of 128 to 1,178 tokens); a fixed length gives a model the same scales whatever its engine's max_seq_len.
CHUNK = 512
SAMPLE_ROWS = 256  # calibration rows (tokens) each layer's search measures the output error on
SEARCH_OUTPUTS = 512  # output channels (at most) whose error the search sums
MAX_EXPONENT = 8  # scales lie in [2^-8, 2^8]


def applies(method: str, quantization: str | None) -> bool:
    """Whether a build with ``--quantize-calibration method`` into format ``quantization`` scales weights."""
    return method == "awq" and quantization is not None and quantization.startswith("int4_g")


@dataclass(frozen=True, slots=True)
class Group:
    """A linear layer whose input channels are scaled, and where its input's 1/s is folded."""
    consumer: str  # module name: its weight's columns are multiplied by s
    producer: str  # module name: its weight (a norm's vector, or a linear's rows) is divided by s
    rows: tuple[int, int] | None  # the producer's output rows that hold the input (None: a norm's whole weight)
    kv_groups: tuple[int, int, int] | None  # o_proj: (heads, kv heads, head_dim); s is per kv channel

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """The scale of each of the consumer's input channels."""
        if self.kv_groups is None:
            return s
        heads, kv_heads, head_dim = self.kv_groups
        return s.reshape(kv_heads, 1, head_dim).expand(kv_heads, heads // kv_heads, head_dim).reshape(-1)

    def reduce(self, per_input: torch.Tensor) -> torch.Tensor:
        """A per-input-channel statistic in the scales' form (o_proj: the mean over the heads sharing a kv head)."""
        if self.kv_groups is None:
            return per_input
        heads, kv_heads, head_dim = self.kv_groups
        return per_input.reshape(kv_heads, heads // kv_heads, head_dim).mean(dim=1).reshape(-1)


def groups(config: ModelConfig) -> list[Group]:
    """Every layer's four consumers, in order."""
    c = config
    q_rows, kv_rows = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    out = []
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        out += [
            Group(p + "self_attn.qkv_proj", p + "input_layernorm", None, None),
            Group(p + "self_attn.o_proj", p + "self_attn.qkv_proj", (q_rows + kv_rows, q_rows + 2 * kv_rows),
                  (c.num_heads, c.num_kv_heads, c.head_dim)),
            Group(p + "mlp.gate_up_proj", p + "post_attention_layernorm", None, None),
            Group(p + "mlp.down_proj", p + "mlp.gate_up_proj", (c.intermediate_size, 2 * c.intermediate_size), None),
        ]
    return out


def foldable(config: ModelConfig, tensors: dict[str, torch.Tensor], formats: dict[str, str]) -> list[Group]:
    """The groups whose consumer and producer are float weights, held whole (a packed weight keeps its format)."""
    def is_float(module: str) -> bool:
        return f"{module}.weight" in tensors and f"{module}.weight" not in formats

    return [g for g in groups(config) if is_float(g.consumer) and is_float(g.producer)]


@dataclass(slots=True)
class Activations:
    """What calibration measured at each consumer's input."""
    mean_abs: dict[str, torch.Tensor]  # per input channel, float32
    rows: dict[str, torch.Tensor]  # [sampled rows, in], float32 on the CPU
    tokens: int


def calibrate(engine_dir: Path, consumers: list[str], device: torch.device) -> Activations:
    """Run the (float) engine at ``engine_dir`` over the calibration text and measure each consumer's input."""
    sums: dict[str, torch.Tensor] = {}
    seen: dict[str, int] = {}
    picked: dict[str, list[torch.Tensor]] = {name: [] for name in consumers}
    handles = []
    stride = 1

    def hook(name: str):
        def record(module, args) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            total = x.float().abs().sum(dim=0, dtype=torch.float64)
            sums[name] = total if name not in sums else sums[name] + total
            start = seen.get(name, 0)
            seen[name] = start + x.shape[0]
            first = -start % stride  # the rows whose index in the whole text is a multiple of stride
            if first < x.shape[0]:
                picked[name].append(x[first::stride].float().cpu())
        return record

    def on_load(core, num_tokens: int) -> None:
        nonlocal stride
        stride = max(1, math.ceil(num_tokens / SAMPLE_ROWS))
        model = core.runner.model
        for name in consumers:
            handles.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))

    try:
        tokens = run_text(engine_dir, device, on_load=on_load, chunk=CHUNK)
    finally:
        for handle in handles:
            handle.remove()
    return Activations({name: (sums[name] / seen[name]).float() for name in consumers},
                       {name: torch.cat(picked[name]) for name in consumers}, tokens)


@dataclass(slots=True)
class Choice:
    scales: torch.Tensor  # float32, powers of two, in the group's scale form
    alpha: float
    error: float  # the output's squared error on the sampled rows
    rtn_error: float  # the same with round to nearest (alpha 0)


def scales_for(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """m^alpha over its geometric mean, rounded to a power of two in [2^-8, 2^8] (all 1 at alpha 0)."""
    m = mean_abs.double()
    if alpha == 0 or not bool((m > 0).any()):
        return torch.ones_like(mean_abs, dtype=torch.float32)
    log_m = m.clamp(min=float(m.max()) * 2.0 ** -40).log2()
    log_s = alpha * (log_m - log_m.mean())
    return torch.exp2(log_s.round().clamp(-MAX_EXPONENT, MAX_EXPONENT)).float()


def round_trip(weight: torch.Tensor, block: int) -> torch.Tensor:
    """What the int4 formats keep of ``weight`` (float32 [out, in]) in groups of ``block``: their quantize then
    dequantize (``weight_formats._encode_q4_1``, ``_decode_q4_1``) in the same float32 steps, without the packing
    (tests check they agree bit for bit)."""
    groups = weight.reshape(-1, block)
    low = groups.amin(dim=-1, keepdim=True)
    d = (groups.amax(dim=-1, keepdim=True) - low) / 15
    inverse = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = ((groups - low) * inverse + 0.5).trunc().clamp(0, 15)
    return (d.to(torch.float16).float() * q + low.to(torch.float16).float()).reshape(weight.shape)


def search(group: Group, weight: torch.Tensor, mean_abs: torch.Tensor, rows: torch.Tensor, fmt: str,
           threads: ThreadGovernor | None = None) -> Choice:
    """The alpha (of ``ALPHAS``) whose scales let ``fmt`` round ``weight`` ([out, in], float32) with the least
    output error on ``rows`` ([n, in]); on the weight's device.

    The error is summed over every k-th output row only, at most ``SEARCH_OUTPUTS`` of them: it chooses one
    number, and a sample of a wide layer's outputs ranks the alphas as all of them do, at a fraction of the cost.
    """
    block = block_format(fmt).block
    stat = group.reduce(mean_abs.to(weight.device))
    weight = weight[::math.ceil(weight.shape[0] / SEARCH_OUTPUTS)]
    best: Choice | None = None
    rtn = math.inf
    tried: set[bytes] = set()
    for alpha in ALPHAS:
        s = scales_for(stat, alpha).to(weight.device)
        key = s.cpu().numpy().tobytes()
        if key in tried:  # rounding to powers of two makes neighbouring alphas alike
            continue
        tried.add(key)
        full = group.expand(s)
        with threads.step(weight.numel()) if threads is not None else contextlib.nullcontext():
            scaled = weight * full
            # x W'^T - x W^T = (x / s) (Q(W s) - W s)^T
            error = float(((rows / full) @ (round_trip(scaled, block) - scaled).T).square().sum())
        if alpha == 0:
            rtn = error
        if best is None or error < best.error:
            best = Choice(s.cpu(), alpha, error, rtn)
    return best


def choose(tensors: dict[str, torch.Tensor], acts: Activations, chosen: list[Group], target: str,
           device: torch.device | str = "cpu") -> dict[str, Choice]:
    """Each group's scales for quantizing into ``target`` (an int4 format; per weight, the group that fits).

    On a CPU the searches' thread count is the runtime's (``ThreadGovernor``: measured, as a busy machine makes
    every thread of a team wait for the slowest; beside one busy process on 2 cores, 2 threads took 30 times as
    long as 1)."""
    from kiln.runtime.cpu_threads import ThreadGovernor

    threads = ThreadGovernor.for_device(torch.device(device))
    out = {}
    for group in chosen:
        name = f"{group.consumer}.weight"
        weight = tensors[name].to(device, torch.float32)
        fmt = fitting_format(target, weight.shape[1], name)
        out[group.consumer] = search(group, weight, acts.mean_abs[group.consumer],
                                     acts.rows[group.consumer].to(device), fmt, threads)
    return out


def fold(config: ModelConfig, tensors: dict[str, torch.Tensor], formats: dict[str, str],
         scales: dict[str, torch.Tensor]) -> None:
    """Multiply each consumer's weight columns by its scales and divide what produces its input by them, in
    place (exact: powers of two). ``scales``: by consumer module name, in the group's form."""
    by_consumer = {g.consumer: g for g in groups(config)}
    for consumer, s in scales.items():
        group = by_consumer.get(consumer)
        if group is None:
            raise ValueError(f"no linear layer {consumer!r} takes activation-aware scales in this model")
        weight_name, producer_name = f"{consumer}.weight", f"{group.producer}.weight"
        for name in (weight_name, producer_name):
            if name not in tensors or name in formats:
                raise ValueError(f"activation-aware scales fold into float weights; {name} is "
                                 + ("missing" if name not in tensors else f"packed ({formats[name]})"))
        s = s.float()
        weight = tensors[weight_name]
        if group.expand(s).shape[0] != weight.shape[1]:
            raise ValueError(f"{consumer} has {weight.shape[1]} input channels, its scales {len(s)}")
        tensors[weight_name] = (weight.float() * group.expand(s)).to(weight.dtype)
        producer = tensors[producer_name]
        if group.rows is None:
            tensors[producer_name] = (producer.float() / s).to(producer.dtype)
            continue
        start, stop = group.rows
        factors = torch.ones(producer.shape[0])
        factors[start:stop] = 1 / s  # (exact: powers of two)
        scale_output_rows(tensors, formats, group.producer, factors)


def write(directory: Path, choices: dict[str, Choice], acts: Activations) -> dict:
    """Write the scales file into the engine folder; engine.json's ``awq`` entry for it."""
    save_file({name: c.scales.contiguous() for name, c in choices.items()}, str(directory / SCALES_FILE),
              metadata={"format": "pt"})
    kinds: dict[str, list[float]] = {}
    for name, c in choices.items():
        kinds.setdefault(name.rsplit(".", 1)[1], []).append(c.error / c.rtn_error if c.rtn_error > 0 else 1.0)
    return {
        "file": SCALES_FILE,
        "sha256": _sha256(directory / SCALES_FILE),
        "calibration_tokens": acts.tokens,
        "sample_rows": int(next(iter(acts.rows.values())).shape[0]) if acts.rows else 0,
        # each layer's alpha, and per kind of layer the mean output error on the sampled rows over round to nearest's
        "alphas": {name: c.alpha for name, c in choices.items()},
        "error_vs_round_to_nearest": {kind: round(sum(r) / len(r), 4) for kind, r in kinds.items()},
    }


def recorded(engine_dir: Path, entry: dict) -> dict[str, torch.Tensor]:
    """The scales an engine's build recorded (engine.json's ``awq`` entry), checked against their sha256."""
    path = Path(engine_dir) / SCALES_FILE
    if not path.is_file():
        raise BuildError(f"engine {engine_dir} was quantized with activation-aware scales, but its {SCALES_FILE} "
                         "is missing")
    if _sha256(path) != entry.get("sha256"):
        raise BuildError(f"{path} does not match the sha256 engine.json records for it")
    return load_file(str(path))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
