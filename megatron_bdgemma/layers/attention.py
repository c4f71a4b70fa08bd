"""Gemma 4 attention on Megatron's `Attention`: q/k/v norms, explicit RoPE, K=V tying and external K/V.

One module serves both phases of block diffusion: `kv_prefix` (the encoder's per-layer K/V) is prepended to this
call's own K/V, so the encoder runs with `kv_prefix=None` and a causal mask while the decoder runs the canvas with
the encoder K/V and a block-diffusion mask. The window, causality and block rules all live in the mask rule
(`megatron_bdgemma.masks`), which the core attention (`layers.core_attention`) consumes; nothing here knows about
them.

Fused projection layout, per KV group g (so TP splits whole groups, as Megatron's `linear_qkv` does):
`[q heads of g ; k_g ; v_g]`, and `[q heads of g ; k_g]` on full layers with `global_k_eq_v` (V = raw k_g).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.attention import Attention
from megatron.core.transformer.enums import AttnMaskType

from megatron_bdgemma.config import BDGemmaConfig
from megatron_bdgemma.layers.context_parallel import gather_sequence
from megatron_bdgemma.layers.core_attention import masked_attention
from megatron_bdgemma.layers.norm import cast, rms_normalize
from megatron_bdgemma.layers.rope import apply_rope
from megatron_bdgemma.masks import AttentionMask, QueryShardMask

KV = tuple[torch.Tensor, torch.Tensor]
"""(K, V), each `[S, B, kv_heads_local, head_dim]`: K after k_norm + RoPE, V after v_norm."""


@dataclass
class KVBuffer:
    """One layer's K and V `[B, g, P + R, d]` for the inference decodes of one canvas: the P encoder positions are
    written once, and each decode writes its R canvas positions in place behind them, so no decode step copies the
    encoder K/V (as concatenating would), and `attend` runs the decode's attention over it. Inference only: the
    in-place writes keep no autograd history."""

    key: torch.Tensor
    value: torch.Tensor
    prefix: int

    @classmethod
    def with_prefix(cls, key: torch.Tensor, value: torch.Tensor, canvas_length: int) -> KVBuffer:
        """A buffer holding encoder K/V `[B, g, P, d]` and room for `canvas_length` positions."""
        batch, groups, prefix, dim = key.shape
        buffers = []
        for tensor in (key, value):
            buffer = tensor.new_empty(batch, groups, prefix + canvas_length, dim)
            buffer[:, :, :prefix] = tensor
            buffers.append(buffer)
        return cls(*buffers, prefix)

    def select(self, rows: torch.Tensor) -> KVBuffer:
        """The buffer of the chosen rows only (a copy)."""
        return KVBuffer(self.key[rows], self.value[rows], self.prefix)

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: AttentionMask, scale: float
    ) -> torch.Tensor:
        """Write this decode's K/V `[R, B, g, d]` behind the prefix, then attend from query `[R, B, h, d]` over the
        whole buffer under `mask` → `[R, B, h*d]`.

        With `masked_attention` whatever the configured core attention: inference decodes need no backward, and on
        CPU its fused SDPA kernel never materialises the scores, about half the time of the eager
        product-softmax-product at canvas 256. The buffer's `[B, g, P + R, d]` layout is what it reads K/V in.
        """
        if torch.is_grad_enabled() and (key.requires_grad or value.requires_grad):
            raise RuntimeError("KVBuffer serves inference decodes only (run them under torch.no_grad())")
        self.key[:, :, self.prefix :] = key.permute(1, 2, 0, 3)
        self.value[:, :, self.prefix :] = value.permute(1, 2, 0, 3)
        whole_key, whole_value = self.key.permute(2, 0, 1, 3), self.value.permute(2, 0, 1, 3)
        return masked_attention(query, whole_key, whole_value, mask.additive(query.dtype), scale)


@dataclass
class BDGemmaAttentionSubmodules:
    linear_qkv: Any
    core_attention: Any
    linear_proj: Any
    q_layernorm: Any
    k_layernorm: Any


class BDGemmaAttention(Attention):
    """Self-attention of one Gemma 4 layer; the layer's head geometry comes from its per-layer config copy."""

    def __init__(
        self,
        config: BDGemmaConfig,
        submodules: BDGemmaAttentionSubmodules,
        layer_number: int,
        pg_collection: ProcessGroupCollection | None = None,
        **unused: Any,
    ) -> None:
        super().__init__(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            attn_mask_type=AttnMaskType.arbitrary,
            attention_type="self",
            pg_collection=pg_collection,
        )
        self.has_v_proj = config.has_v_proj(config.layer_attention_type)
        self.heads_per_group = config.num_attention_heads // config.num_query_groups
        self.slots_per_group = self.heads_per_group + (2 if self.has_v_proj else 1)
        head_dim = self.hidden_size_per_attention_head
        self.linear_qkv = submodules.linear_qkv(
            config.hidden_size,
            config.num_query_groups * self.slots_per_group * head_dim,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="qkv",
            tp_group=self.pg_collection.tp,
        )
        self.q_layernorm = submodules.q_layernorm(config=config, hidden_size=head_dim, eps=config.layernorm_epsilon)
        self.k_layernorm = submodules.k_layernorm(config=config, hidden_size=head_dim, eps=config.layernorm_epsilon)

    def get_query_key_value_tensors(self, hidden_states: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, KV]:
        """hidden `[S, B, H]` → q `[S, B, h_local, d]` and this call's (K, V), normed and rotated."""
        mixed, _ = self.linear_qkv(hidden_states)
        s, b = mixed.shape[:2]
        heads, dim = self.heads_per_group, self.hidden_size_per_attention_head
        mixed = mixed.view(s, b, self.num_query_groups_per_partition, self.slots_per_group, dim)
        # q_norm, k_norm and v_norm each normalise every head over d, so one normalisation of all slots serves the
        # three (HF runs three), and the q and k heads are weighted and rotated together.
        normalized = rms_normalize(mixed, self.config.layernorm_epsilon)
        q_weight, k_weight = (cast(norm.weight, normalized.dtype) for norm in (self.q_layernorm, self.k_layernorm))
        qk_weight = torch.cat([q_weight.expand(heads, dim), k_weight[None]])
        cos, sin = (table.unsqueeze(2) for table in rope)
        qk = apply_rope(cast(normalized[:, :, :, : heads + 1] * qk_weight, mixed.dtype), cos, sin)
        query = qk[:, :, :, :heads].reshape(s, b, -1, dim)
        # The last slot: v, or on K=V layers the raw key, whose v_norm (no weight) is this same normalisation.
        value = cast(normalized[:, :, :, -1], mixed.dtype)
        return query, (qk[:, :, :, heads], value)

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention_mask: AttentionMask,
        kv_prefix: KV | KVBuffer | None = None,
    ) -> tuple[torch.Tensor, KV]:
        """Attend from `hidden_states` over `[kv_prefix ; own K/V]`.

        Args:
            hidden_states: `[S, B, H]` (sequence-parallel shard when SP is on).
            rope: cos/sin `[S_full, B, 1, d]` for this layer type at the tokens' absolute positions.
            attention_mask: the rule over `S_full` queries × `P + S_full` keys (P = prefix length); a
                `QueryShardMask` says the queries are a context-parallel shard: the own K/V are then gathered over the
                CP group first, and `kv_prefix` must be whole (the encoder's gathered K/V).
            kv_prefix: the encoder's (K, V) of this layer, `[P, B, g_local, d]`, or a `KVBuffer` holding them (own
                K/V written into it, attended by `KVBuffer.attend` instead of the configured core attention), or
                None.

        Returns:
            output `[S, B, H]` and this call's own (K, V) `[S_full, B, g_local, d]` (the whole sequence's under
            context parallelism).
        """
        query, (key, value) = self.get_query_key_value_tensors(hidden_states, rope)
        if isinstance(attention_mask, QueryShardMask):
            # Context parallelism (docs/design.md §14): the queries are this rank's shard of the sequence and the mask
            # covers the whole sequence's keys, which every rank gathers in global order (the backward reduce-scatters
            # dK/dV). The encoder returns them gathered: the canvas passes attend to them without another collective.
            key, value = (gather_sequence(t, self.pg_collection.cp) for t in (key, value))
        own_kv = (key, value)
        if isinstance(kv_prefix, KVBuffer):
            context = kv_prefix.attend(query, key, value, attention_mask, self.core_attention.softmax_scale)
            output, _ = self.linear_proj(context)
            return output, own_kv
        if kv_prefix is not None:
            key = torch.cat([kv_prefix[0], key], dim=0)
            value = torch.cat([kv_prefix[1], value], dim=0)
        if self.checkpoint_core_attention and self.training and torch.is_grad_enabled():
            # Selective recompute (`recompute_modules` has core_attn): keep q/k/v, not the score grid.
            context = torch.utils.checkpoint.checkpoint(
                self.core_attention, query, key, value, attention_mask, use_reentrant=False
            )
        else:
            context = self.core_attention(query, key, value, attention_mask)
        output, _ = self.linear_proj(context)
        return output, own_kv
