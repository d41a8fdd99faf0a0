"""Runs the model for one scheduled step on one device: weights, KV pool, step inputs, decode graphs."""
from __future__ import annotations

import logging

import torch

from kiln.engine import Engine, load_weights
from kiln.engine.target import target_of
from kiln.models import ModelConfig, apply_weight_formats, create_model
from kiln.nn import ForwardContext, forward_context
from kiln.nn.attention import set_kv_cache_scales
from kiln.ops import OpTable
from kiln.ops.user_plugins import load_engine_plugins
from kiln.runtime.cpu_threads import ThreadGovernor
from kiln.runtime.kv_pool import KVCacheSpec, allocate_kv_caches, kv_cache_spec
from kiln.runtime.prompt_logprobs import PendingPromptLogprobs, PromptSpan, score_prompts
from kiln.runtime.step_clock import StepClock
from kiln.runtime.step_graphs import StepGraphs
from kiln.runtime.step_inputs import Batch, PrevTokens, StepBatch, StepInputs
from kiln.runtime.tuned_plan import load_op_table

log = logging.getLogger(__name__)

CUDA_GRAPH_MODES = ("auto", "on", "off", "static", "recorded")
# The StepGraphs kind of each mode that has one.
_GRAPH_KIND = {"on": "cuda", "static": "static", "recorded": "recorded"}


class ModelRunner:
    """Owns the model's weights, the KV cache tensors and the step-input buffers on one device."""

    def __init__(self, engine: Engine, device: torch.device, cuda_graphs: str = "auto",
                 max_batch_size: int | None = None, max_num_tokens: int | None = None, verify_weights: bool = True):
        self.engine = engine
        self.device = device
        build = engine.build
        self.config = ModelConfig.from_dict(engine.model)
        self.dtype = build.torch_dtype
        self.block_size = build.kv_block_size
        self.max_batch_size = max_batch_size or build.max_batch_size
        self.max_num_tokens = max_num_tokens or build.max_num_tokens
        self.max_seq_len = build.max_seq_len
        load_engine_plugins(engine.path, engine.plugins)
        # On a CPU the ops with a choice are timed here; self.tuning says what was chosen.
        self.ops, self.tuning = load_op_table(engine, device, self.dtype)
        # On a CPU each step's thread count follows what other processes leave free (cpu_threads).
        self.threads = ThreadGovernor.for_device(device)
        # The host's time per phase of the steps (the core times its own phases on it too).
        self.clock = StepClock()
        _warn_if_target_differs(engine, device, self.ops)
        self.cuda_graphs_mode = cuda_graph_mode(cuda_graphs, device, self.ops)
        with torch.device("meta"):
            self.model = create_model(self.config, self.ops, max_positions=build.max_seq_len)
            apply_weight_formats(self.model, engine.tensor_formats)
        weights = load_weights(engine, device, verify=verify_weights)
        self.model.load_state_dict(weights, strict=True, assign=True)
        for module in self.model.modules():
            if hasattr(module, "prepare_weights"):
                module.prepare_weights()
        self.model.materialize_buffers(device)
        set_kv_cache_scales(self.model, engine.meta.get("kv_cache_scales"))
        self.model.eval()
        self.kv_spec: KVCacheSpec = kv_cache_spec(engine)
        self.num_blocks = 0
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.inputs: StepInputs | None = None
        self.graphs: StepGraphs | None = None

    @torch.inference_mode()
    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The KV pool of ``num_blocks`` blocks for requests, plus one dummy block that padding rows write."""
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_caches(self.kv_spec, num_blocks + 1, self.device)
        self.inputs = StepInputs(self.max_num_tokens, self.max_batch_size, self.max_seq_len, self.block_size,
                                 self.device, dummy_block=num_blocks, clock=self.clock)
        if self.cuda_graphs_mode != "off":
            self.graphs = StepGraphs(self._logits_of_last_tokens, self.inputs, self.clock, self.max_batch_size,
                                     self.max_seq_len, self.max_num_tokens, _GRAPH_KIND[self.cuda_graphs_mode])

    @torch.inference_mode()
    def profile_step_memory(self) -> int:
        """Device bytes a step needs beyond the weights and the KV pool, at the engine's limits: the
        peak of a step of max_num_tokens tokens over max_batch_size sequences (one long prefill chunk,
        the rest one token each), its logits and a sampling pass that sorts every row; twice that when
        decode graphs will be captured (their memory pool is their own). 0 off a GPU."""
        if self.device.type != "cuda":
            return 0
        from kiln.runtime.request import Request
        from kiln.runtime.sampler import Sampler
        from kiln.runtime.sampling_params import SamplingParams

        # As many tokens as a step may hold, in sequences no longer than max_seq_len, one per batch slot.
        slots = min(self.max_batch_size, self.max_num_tokens)
        budget, lens = self.max_num_tokens, []
        for i in range(slots):
            lens.append(min(self.max_seq_len, budget - (slots - i - 1)))  # each later slot keeps one token
            budget -= lens[-1]
        bs = self.block_size
        blocks = sum(-(-n // bs) for n in lens)
        params = SamplingParams(temperature=1.0, top_p=0.9, logprobs=20)
        batch, next_block = [], 0
        for i, n in enumerate(lens):
            req = Request(f"profile-{i}", [0] * n, params)
            req.block_ids = list(range(next_block, next_block + -(-n // bs)))
            next_block += len(req.block_ids)
            batch.append((req, n))
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        caches, self.kv_caches = self.kv_caches, allocate_kv_caches(self.kv_spec, blocks + 1, self.device)
        inputs, self.inputs = self.inputs, StepInputs(self.max_num_tokens, self.max_batch_size, self.max_seq_len,
                                                      bs, self.device, dummy_block=blocks)
        try:
            kv_bytes = sum(k.nbytes + v.nbytes for k, v in self.kv_caches)
            logits = self.execute(batch)
            Sampler().sample(logits, [r for r, _ in batch]).result()
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - base - kv_bytes
        finally:
            self.kv_caches, self.inputs = caches, inputs
            torch.cuda.empty_cache()
        return peak * (2 if self.cuda_graphs_mode == "on" else 1)

    @torch.inference_mode()
    def execute(self, batch: Batch, prev_tokens: PrevTokens | None = None) -> torch.Tensor:
        """Compute each request's scheduled tokens; return float32 logits [num_sampled, vocab].

        A request is sampled when this step reaches its last token; rows come in batch order. The work
        is queued on the device: nothing here waits for it. ``prev_tokens``: see ``StepInputs.prepare``.
        """
        return self.execute_and_score(batch, [], prev_tokens)[0]

    @torch.inference_mode()
    def execute_and_score(self, batch: Batch, spans: list[PromptSpan], prev_tokens: PrevTokens | None = None
                          ) -> tuple[torch.Tensor, PendingPromptLogprobs | None]:
        """``execute``, and the logprobs of the prompt tokens that ``spans`` name (``prompt_spans(batch)``)
        from the same forward pass; a step with spans runs eagerly."""
        with self.threads.step(sum(n for _, n in batch)):
            shape = self.graphs.shape_for(batch) if self.graphs is not None and not spans else None
            if shape is not None:
                return self.graphs.run(batch, shape, prev_tokens), None
            with self.clock.phase("prepare"):
                step = self.inputs.prepare(batch, prev_tokens=prev_tokens)
            hidden = self._hidden(step)
            scored = score_prompts(self.model.compute_logits, hidden, spans) if spans else None
            if step.logits_indices is not None:
                hidden = hidden[step.logits_indices]
            return self.model.compute_logits(hidden).float(), scored

    @torch.inference_mode()
    def all_logits(self, batch: Batch) -> torch.Tensor:
        """Float32 logits of every computed token of the step (for parity tests)."""
        return self.model.compute_logits(self._hidden(self.inputs.prepare(batch))).float()

    def _hidden(self, step: StepBatch) -> torch.Tensor:
        with forward_context(ForwardContext(step.meta, self.kv_caches)):
            return self.model(step.token_ids, step.positions)

    def _logits_of_last_tokens(self, step: StepBatch) -> torch.Tensor:
        """Logits of each row's last token, the rows read from the device (so a graph may replay it)."""
        hidden = self._hidden(step)
        if step.token_ids.shape[0] != step.meta.block_tables.shape[0]:
            hidden = hidden[step.meta.query_start_loc_t[1:].long() - 1]
        return self.model.compute_logits(hidden).float()


def cuda_graph_mode(asked: str, device: torch.device, ops: OpTable) -> str:
    """"on" (capture CUDA graphs of decode and small mixed steps), "recorded" (a CPU's: record each decode
    shape's op calls once and replay them, ``recorded_step``), "off", or "static" (the graphs' padded
    fixed-shape steps, run eagerly). "auto": "on" on a GPU, "recorded" on a CPU, where the plan allows.

    The padded modes need a plan whose every implementation reads step lengths from device tensors
    (``graph_safe``), whatever the device: a padded step's host-side lengths only bound the shapes.
    """
    if asked not in CUDA_GRAPH_MODES:
        raise ValueError(f"cuda_graphs must be one of {', '.join(CUDA_GRAPH_MODES)}, got {asked!r}")
    unsafe = [f"{op}:{impl}" for op, impl in ops.choices.items() if not ops.graph_safe_ops[op]]
    if asked in ("on", "static", "recorded") and unsafe:
        raise ValueError(f"cuda_graphs={asked!r} needs graph-safe implementations, but the plan runs "
                         f"{', '.join(unsafe)}, which read step lengths on the host")
    if asked == "on" and device.type != "cuda":
        raise ValueError(f"cuda_graphs='on' captures CUDA graphs and needs a CUDA device, not {device}")
    if asked == "recorded" and device.type != "cpu":
        raise ValueError(f"cuda_graphs='recorded' replays recorded CPU steps and needs the CPU, not {device}")
    if asked == "auto":
        return "off" if unsafe else {"cuda": "on", "cpu": "recorded"}.get(device.type, "off")
    return asked


def _warn_if_target_differs(engine: Engine, device: torch.device, ops: OpTable) -> None:
    """One warning when the engine was planned elsewhere: what differs, and which ops fell back."""
    target = engine.target
    here = target_of(device)
    keys = ("device_type", "name", "compute_capability", "torch")
    differs = [f"{k}: built for {target.get(k)}, running on {here[k]}" for k in keys if target.get(k) != here[k]]
    if differs or ops.fallbacks:
        fallen = ", ".join(ops.fallbacks) or "none"
        log.warning("engine %s was planned for another target (%s); plugins that cannot run here fall back to "
                    "their reference implementations: %s", engine.path, "; ".join(differs) or "same device", fallen)
