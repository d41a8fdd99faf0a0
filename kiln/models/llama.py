"""The Llama family (Llama 2/3, SmolLM2), written with kiln's layers; Mistral and Qwen2 reuse it.

Module and parameter names follow transformers' so that checkpoints map one to one, except for the
fused projections (``qkv_proj``, ``gate_up_proj``) the builder assembles.
"""
from __future__ import annotations

import torch
from torch import nn

from kiln.models.config import ModelConfig
from kiln.nn import Attention, Embedding, GatedMLP, Mapping, RMSNorm, rotary_table
from kiln.ops import OpTable
from kiln.ops.packed_linear import op_name as packed_op
from kiln.weight_formats import FLOAT


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, ops: OpTable, mapping: Mapping):
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, ops)
        self.self_attn = Attention(layer_idx, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.qkv_bias,
                                   c.sliding_windows[layer_idx], ops, mapping)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, ops)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, ops, mapping)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it); the next norm adds them.

        NOTE: carrying the residual lets each add fuse with the norm after it; the sums are the
        ones transformers forms (in the activation dtype), so the numerics do not change.
        """
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        h = self.self_attn(h, cos_sin)
        h, residual = self.post_attention_layernorm.add_and_norm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, ops: OpTable, mapping: Mapping):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, ops)
        self.layers = nn.ModuleList(DecoderLayer(config, i, ops, mapping) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, rope_table: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(token_ids)
        # The rotary rows of this step's positions, gathered and cast once for all layers.
        cos_sin = rope_table[positions].to(x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos_sin)
        return self.norm.add_and_norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Packed tokens in, hidden states out; ``compute_logits`` on the rows that are sampled."""

    def __init__(self, config: ModelConfig, ops: OpTable, mapping: Mapping = Mapping(),
                 max_positions: int | None = None):
        super().__init__()
        self.config = config
        self.ops = ops
        self.model = DecoderModel(config, ops, mapping)
        if not config.tie_word_embeddings:
            self.lm_head = Embedding(config.vocab_size, config.hidden_size, ops)
        self.max_positions = max_positions or config.max_position_embeddings
        self.register_buffer("rope_table", self._rope_table(), persistent=False)

    def _rope_table(self) -> torch.Tensor:
        c = self.config
        return rotary_table(c.head_dim, self.max_positions, c.rope_theta, c.rope_scaling)

    def materialize_buffers(self, device: torch.device) -> None:
        """Compute the non-weight buffers on ``device`` (after weights were assigned to a meta-built model)."""
        self.rope_table = self._rope_table().to(device)

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(token_ids, positions, self.rope_table)

    def prepare_weights(self) -> None:
        """After loading: the output projection in the form the bound ``logits`` implementation reads (for
        a packed head, the op of its format).

        NOTE: with tied embeddings and a plugin that reorders (or decodes a packed table), this is a second
        copy of the matrix; the reference implementation shares the embedding's.
        """
        head = self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        self.logits_op = "logits" if head.weight_format == FLOAT else packed_op(head.weight_format)
        self.logits_weight = self.ops.prepare_weight(self.logits_op, head.weight.data)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.logits_op == "logits":
            return self.ops.logits(hidden, self.logits_weight)
        return getattr(self.ops, self.logits_op)(hidden, self.logits_weight)


def config_from_hf(hf: dict, *, qkv_bias: bool = False) -> ModelConfig:
    """Map a transformers config.json of the Llama family to kiln's config."""
    heads = hf["num_attention_heads"]
    layers = hf["num_hidden_layers"]
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    return ModelConfig(
        architecture=hf["architectures"][0],
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias or bool(hf.get("attention_bias", False)),
        sliding_windows=_sliding_windows(hf, layers),
        hidden_act=hf.get("hidden_act", "silu"),
    )


def _sliding_windows(hf: dict, layers: int) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    types = hf.get("layer_types")
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    if hf.get("use_sliding_window") is False:
        return (None,) * layers
    return (window,) * layers
