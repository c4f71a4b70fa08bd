"""One Gemma 4 MoE decoder layer (docs/design.md §4), with HF's norm names so the key map reads one-to-one.

    h = x + post_attention_layernorm(attn(input_layernorm(x)))
    d = post_feedforward_layernorm_1(dense(pre_feedforward_layernorm(h)))
    m = post_feedforward_layernorm_2(experts(pre_feedforward_layernorm_2(h)))   # routed on raw h
    y = (h + post_feedforward_layernorm(d + m)) * layer_scalar

Megatron's `TransformerLayer` has no post-norm slots and a fixed forward signature, so this is its own
`BaseTransformerLayer`; the model drives it with explicit RoPE tables, masks and encoder K/V.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_layer import BaseTransformerLayer, get_transformer_layer_offset
from megatron.core.utils import get_pg_rank

from megatron_bdgemma.config import BDGemmaConfig
from megatron_bdgemma.layers.attention import KV
from megatron_bdgemma.layers.norm import rms_normalize
from megatron_bdgemma.masks import AttentionMask


@dataclass
class BDGemmaLayerSubmodules:
    input_layernorm: Any
    self_attention: Any
    post_attention_layernorm: Any
    pre_feedforward_layernorm: Any
    pre_feedforward_layernorm_2: Any
    mlp: Any
    post_feedforward_layernorm_1: Any
    post_feedforward_layernorm_2: Any
    post_feedforward_layernorm: Any


LAYER_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "pre_feedforward_layernorm_2",
    "post_feedforward_layernorm_1",
    "post_feedforward_layernorm_2",
    "post_feedforward_layernorm",
)


class BDGemmaLayer(MegatronModule, BaseTransformerLayer):
    def __init__(
        self,
        config: BDGemmaConfig,
        submodules: BDGemmaLayerSubmodules,
        layer_number: int = 1,
        pg_collection: ProcessGroupCollection | None = None,
        vp_stage: int | None = None,
        **unused: Any,
    ) -> None:
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        pp_rank = get_pg_rank(pg_collection.pp) if hasattr(pg_collection, "pp") else 0
        self.layer_number = layer_number + get_transformer_layer_offset(config, vp_stage, pp_rank)
        self.layer_type = config.layer_attention_type
        for name in LAYER_NORMS:
            norm = getattr(submodules, name)(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
            setattr(self, name, norm)
        self.self_attention = build_module(
            submodules.self_attention, config=config, layer_number=self.layer_number, pg_collection=pg_collection
        )
        self.mlp = submodules.mlp(config=config, layer_number=self.layer_number, pg_collection=pg_collection)
        # A real per-layer value in DiffusionGemma checkpoints (HF: persistent buffer, not trained).
        self.register_buffer("layer_scalar", torch.ones(1, dtype=config.params_dtype))

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention_mask: AttentionMask,
        kv_prefix: KV | None = None,
    ) -> tuple[torch.Tensor, KV]:
        """hidden `[S, B, H]` → (hidden `[S, B, H]`, this call's (K, V)); see `BDGemmaAttention.forward`."""
        attention_output, kv = self.self_attention(
            self.input_layernorm(hidden_states), rope=rope, attention_mask=attention_mask, kv_prefix=kv_prefix
        )
        h = hidden_states + self.post_attention_layernorm(attention_output)
        # Both pre-FFN norms and the router's weightless norm normalise h: once here (HF: three times).
        normalized = rms_normalize(h, self.config.layernorm_epsilon)
        dense, experts = self.mlp(
            router_input=normalized,
            expert_input=self.pre_feedforward_layernorm_2.scale(normalized, h.dtype),
            dense_input=self.pre_feedforward_layernorm.scale(normalized, h.dtype),
        )
        # The two branch post-norms normalise one stacked tensor: the same rows, half the kernels.
        branches = rms_normalize(torch.stack([dense, experts]), self.config.layernorm_epsilon)
        ffn = (self.post_feedforward_layernorm_1.scale(branches[0], h.dtype)
               + self.post_feedforward_layernorm_2.scale(branches[1], h.dtype))
        return (h + self.post_feedforward_layernorm(ffn)) * self.layer_scalar, kv
