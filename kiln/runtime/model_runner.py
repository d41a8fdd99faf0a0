"""Runs the model for one scheduled step: builds the packed inputs and paged-cache layout, returns logits."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from kiln.engine import Engine
from kiln.engine.target import target_of
from kiln.models import ModelConfig, create_model
from kiln.nn import ForwardContext, forward_context
from kiln.ops import AttentionMetadata, OpTable
from kiln.runtime.cpu_threads import ThreadGovernor
from kiln.runtime.decode_graphs import DecodeGraphs
from kiln.runtime.request import Request
from kiln.runtime.tuned_plan import load_op_table

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize


class ModelRunner:
    """Owns the model's weights and the KV cache tensors on one device."""

    def __init__(self, engine: Engine, device: torch.device, decode_graphs: str = "auto"):
        self.engine = engine
        self.device = device
        build = engine.build
        self.config = ModelConfig.from_dict(engine.model)
        self.dtype = build.torch_dtype
        self.block_size = build.kv_block_size
        # On a CPU the ops with a choice are timed here; self.tuning says what was chosen.
        self.ops, self.tuning = load_op_table(engine, device, self.dtype)
        self.threads = ThreadGovernor.for_device(device)
        _warn_if_target_differs(engine, device, self.ops)
        with torch.device("meta"):
            self.model = create_model(self.config, self.ops, max_positions=build.max_seq_len)
        weights = load_file(str(engine.weights_path), device=str(device))
        self.model.load_state_dict(weights, strict=True, assign=True)
        for module in self.model.modules():
            if hasattr(module, "prepare_weights"):
                module.prepare_weights()
        self.model.materialize_buffers(device)
        self.model.eval()
        self.kv_spec = kv_cache_spec(engine)
        self.num_blocks = 0
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.decode_graphs_mode = _decode_graphs_mode(decode_graphs, device, self.ops)
        self.graphs: DecodeGraphs | None = None

    @torch.inference_mode()
    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The KV pool of ``num_blocks`` blocks for requests (plus one dummy block for graph padding)."""
        self.num_blocks = num_blocks
        extra = 0 if self.decode_graphs_mode == "off" else 1
        shape = (num_blocks + extra, self.block_size, self.config.num_kv_heads, self.config.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.kv_spec.dtype, device=self.device),
             torch.zeros(shape, dtype=self.kv_spec.dtype, device=self.device))
            for _ in range(self.config.num_layers)
        ]
        if extra:
            build = self.engine.build
            self.graphs = DecodeGraphs(self.model, self.kv_caches, self.device, self.block_size,
                                       build.max_batch_size, build.max_seq_len, dummy_block=num_blocks,
                                       capture=self.decode_graphs_mode == "on")

    @torch.inference_mode()
    def execute(self, batch: list[tuple[Request, int]], all_logits: bool = False) -> torch.Tensor:
        """Compute ``n`` new tokens of each request; return float32 logits [num_sampled, vocab].

        A request is sampled when this step reaches its last known token; the rows come in the
        order of ``batch``. With ``all_logits``, every computed token's logits come back instead.
        """
        if self.graphs is not None and not all_logits and self.graphs.fits(batch):
            return self.graphs.run(batch)
        token_ids: list[int] = []
        positions: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        logits_rows: list[int] = []
        max_blocks = 0
        for req, n in batch:
            start = req.num_computed_tokens
            end = start + n
            token_ids.extend(req.token_ids[start:end])
            positions.extend(range(start, end))
            query_start_loc.append(query_start_loc[-1] + n)
            seq_lens.append(end)
            max_blocks = max(max_blocks, len(req.block_ids))
            if end == req.num_tokens:
                logits_rows.append(query_start_loc[-1] - 1)
        block_tables = torch.zeros((len(batch), max_blocks), dtype=torch.int64)
        for i, (req, _) in enumerate(batch):
            block_tables[i, : len(req.block_ids)] = torch.tensor(req.block_ids, dtype=torch.int64)
        pos = torch.tensor(positions, dtype=torch.int64)
        seq_index = torch.repeat_interleave(
            torch.arange(len(batch)), torch.tensor([n for _, n in batch], dtype=torch.int64)
        )
        slots = block_tables[seq_index, pos // self.block_size] * self.block_size + pos % self.block_size
        meta = AttentionMetadata(
            slot_mapping=slots.to(self.device),
            block_tables=block_tables.to(self.device),
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_size=self.block_size,
            seq_lens_t=torch.tensor(seq_lens, dtype=torch.int64).to(self.device),
        )
        with self.threads.step(len(token_ids)):
            with forward_context(ForwardContext(meta, self.kv_caches)):
                hidden = self.model(torch.tensor(token_ids, device=self.device), pos.to(self.device))
            if all_logits:
                return self.model.compute_logits(hidden).float()
            rows = hidden[torch.tensor(logits_rows, dtype=torch.int64, device=self.device)]
            return self.model.compute_logits(rows).float()


def _decode_graphs_mode(asked: str, device: torch.device, ops: OpTable) -> str:
    """"on" (capture CUDA graphs), "off", or "static" (the graphs' padded path run eagerly, for tests)."""
    if asked not in ("auto", "on", "off", "static"):
        raise ValueError(f"decode_graphs must be auto, on, off or static, got {asked!r}")
    possible = device.type == "cuda" and ops.graph_safe
    if asked == "on" and not possible:
        raise ValueError(f"decode graphs need a CUDA device and graph-safe ops (plan: {ops.choices})")
    if asked == "auto":
        return "on" if possible else "off"
    return asked


def kv_cache_spec(engine: Engine) -> KVCacheSpec:
    m = engine.model
    build = engine.build
    return KVCacheSpec(m["num_layers"], build.kv_block_size, m["num_kv_heads"], m["head_dim"], build.kv_torch_dtype)


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
