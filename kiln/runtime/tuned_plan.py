"""The op table a runner binds: the engine's plan, with the ops that have a choice re-timed on this CPU at load.

An engine's plan was chosen on the machine that built it, and on a CPU the fastest kernel depends
on the CPU (``kiln/ops/tuning.py``). So on a CPU the runner times the candidates of every op that
multiplies by weights (``linear``, ``logits``, ``linear_<format>`` for packed weights) at this model's
shapes and binds the fastest; the
engine's recorded plan stays as built. A machine's choices are cached, so only the first load on a
machine pays for the timing (about a second for SmolLM2).

``KILN_TUNING=off`` binds the engine's plan as recorded (e.g. to compare plans).
"""
from __future__ import annotations

import logging
import os

import torch

from kiln.cache import cache_dir
from kiln.engine import Engine
from kiln.engine.target import target_of
from kiln.errors import KilnError
from kiln.models import ModelConfig, apply_weight_formats, create_model
from kiln.ops import OpTable, get_op
from kiln.ops.tuning import Choice, Tuner, WeightWorkload, candidates
from kiln.version import __version__
from kiln.weight_formats import FLOAT, block_format

log = logging.getLogger(__name__)

TUNING_ENV = "KILN_TUNING"
TUNED_BATCH = 8


def load_op_table(engine: Engine, device: torch.device, dtype: torch.dtype) -> tuple[OpTable, list[Choice]]:
    """The op table for ``engine`` on ``device``, and the choices made at load (empty when none were)."""
    mode = os.environ.get(TUNING_ENV, "on")
    if mode not in ("on", "off"):
        raise KilnError(f"{TUNING_ENV} must be on or off, got {mode!r}")
    if device.type != "cpu" or mode == "off":
        return OpTable(engine.plan, device, dtype), []
    build = engine.build
    # Decode batch sizes: one sequence, and a batch of a few (a CPU's usual load; timing a 256-row product
    # of every candidate would make an 8B engine's first load take minutes).
    rows = tuple(sorted({1, min(build.max_batch_size, TUNED_BATCH)}))
    # Where a timing holds: the CPU, its cores and the threads kiln may use, and the code that was timed.
    machine = dict(target_of(device), cpus=os.cpu_count(), threads=torch.get_num_threads(), kiln=__version__)
    tuner = Tuner(device, dtype, machine, cache_dir() / "tuning")
    plan = {name: dict(entry) for name, entry in (engine.plan or {}).items()}
    choices = []
    for name, shapes in weights_read(engine).items():
        op = get_op(name)
        cands = candidates(op, device, dtype)
        if len(cands) < 2:
            # One kernel runs here: bind it, also where the plan names one that does not (built elsewhere).
            if cands and plan.get(name, {}).get("impl") not in (c.impl.name for c in cands):
                plan[name] = {"impl": cands[0].impl.name, "config": cands[0].config}
            continue
        choice = tuner.choose(op, WeightWorkload(tuple(shapes), rows), prefer=plan.get(name, {}).get("impl"))
        plan[name] = {"impl": choice.impl, "config": choice.config}
        choices.append(choice)
    if choices:
        log.info("ops chosen at load for %s (%d threads): %s", machine["name"], machine["threads"],
                 "; ".join(c.describe() for c in choices))
    return OpTable(plan, device, dtype), choices


class _Recorder(OpTable):
    """A table that binds the references and records the shape of every weight each op is given to prepare."""

    def __init__(self) -> None:
        super().__init__(None, torch.device("cpu"), torch.float32)
        self.weights: dict[str, list[tuple[int, int]]] = {}

    def prepare_weight(self, op: str, weight: torch.Tensor) -> torch.Tensor:
        if weight.dim() == 2:
            fmt = get_op(op).weight_format
            shape = tuple(weight.shape) if fmt == FLOAT else block_format(fmt).logical_shape(tuple(weight.shape))
            self.weights.setdefault(op, []).append(shape)
        return weight


def weights_read(engine: Engine) -> dict[str, list[tuple[int, int]]]:
    """For each op that reads weights, their [out, in] shapes in model order, from the model itself.

    The model is built on the meta device (no memory) and asked to prepare its weights, as the
    runner does after loading, so every family reports its own layers.
    """
    recorder = _Recorder()
    with torch.device("meta"):
        model = create_model(ModelConfig.from_dict(engine.model), recorder, max_positions=engine.build.max_seq_len)
        apply_weight_formats(model, engine.tensor_formats)
    for module in model.modules():
        if hasattr(module, "prepare_weights"):
            module.prepare_weights()
    return recorder.weights
