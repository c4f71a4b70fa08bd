"""The one HF ↔ Megatron key map, used by in-memory loading and by both converter directions.

Names are relative to the text stack on the HF side (`layers.3.self_attn.q_proj.weight`), or to the vision prefix for
the carried vision tower (`vision_tower.…`, `embed_vision.…`; the checkpoint prefix is `hf_checkpoint.hf_prefixes()`'s
business), and full Megatron names on ours (local spec, unsharded). Each `Mapping` turns one
group of HF tensors into one group of Megatron tensors and back; the two directions sit side by side so they
cannot drift apart. Groups are small (one layer's experts at most), which keeps streaming conversion bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_bdgemma.config import BDGemmaConfig
from megatron_bdgemma.layers.layer import LAYER_NORMS
from megatron_bdgemma.vision import CARRIED_PREFIX, vision_tensor_shapes

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Mapping:
    """One-to-one copy; subclasses fuse or split."""

    hf_keys: tuple[str, ...]
    megatron_keys: tuple[str, ...]

    def to_megatron(self, hf: Tensors) -> Tensors:
        return {self.megatron_keys[0]: hf[self.hf_keys[0]]}

    def to_hf(self, megatron: Tensors) -> Tensors:
        return {self.hf_keys[0]: megatron[self.megatron_keys[0]]}


@dataclass(frozen=True)
class QKVMapping(Mapping):
    """HF q/k/(v) projections ↔ Megatron's fused `linear_qkv`, laid out per KV group `[q heads of g ; k_g ; v_g]`.

    Query head h belongs to KV group `h // (heads / groups)`, as HF's `repeat_kv` pairs them. Without a v_proj
    (K=V layers) the group is `[q heads of g ; k_g]`.
    """

    heads: int = 0
    groups: int = 0
    head_dim: int = 0

    def to_megatron(self, hf: Tensors) -> Tensors:
        hidden = hf[self.hf_keys[0]].shape[-1]
        parts = [hf[self.hf_keys[0]].view(self.groups, self.heads // self.groups, self.head_dim, hidden)]
        parts += [hf[key].view(self.groups, 1, self.head_dim, hidden) for key in self.hf_keys[1:]]
        return {self.megatron_keys[0]: torch.cat(parts, dim=1).reshape(-1, hidden)}

    def to_hf(self, megatron: Tensors) -> Tensors:
        fused = megatron[self.megatron_keys[0]]
        per_group = self.heads // self.groups
        grouped = fused.view(self.groups, per_group + len(self.hf_keys) - 1, self.head_dim, fused.shape[-1])
        out = {self.hf_keys[0]: grouped[:, :per_group].reshape(-1, fused.shape[-1])}
        for slot, key in enumerate(self.hf_keys[1:]):
            out[key] = grouped[:, per_group + slot].reshape(-1, fused.shape[-1])
        return out


@dataclass(frozen=True)
class GatedFC1Mapping(Mapping):
    """HF gate_proj + up_proj ↔ Megatron GLU `linear_fc1` = `[gate ; up]` (Megatron's GLU takes the first half as gate)."""

    def to_megatron(self, hf: Tensors) -> Tensors:
        return {self.megatron_keys[0]: torch.cat([hf[self.hf_keys[0]], hf[self.hf_keys[1]]], dim=0)}

    def to_hf(self, megatron: Tensors) -> Tensors:
        gate, up = megatron[self.megatron_keys[0]].chunk(2, dim=0)
        return {self.hf_keys[0]: gate, self.hf_keys[1]: up}


@dataclass(frozen=True)
class ExpertsMapping(Mapping):
    """HF fused experts `gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]` and `router.per_expert_scale [E]` ↔
    Megatron's per-expert `linear_fc1 [2I, H]` / `linear_fc2 [H, I]`.

    `per_expert_scale[e]` scales expert e's output, which is linear in fc2, so it is folded into fc2 (exact); the
    HF side gets the effective `down_proj` back with `per_expert_scale = 1`.
    """

    num_experts: int = 0

    def to_megatron(self, hf: Tensors) -> Tensors:
        gate_up, down, scale = (hf[key] for key in self.hf_keys)
        folded = down * scale.to(down.dtype)[:, None, None]
        out: Tensors = {}
        for e in range(self.num_experts):
            out[self.megatron_keys[2 * e]] = gate_up[e]
            out[self.megatron_keys[2 * e + 1]] = folded[e]
        return out

    def to_hf(self, megatron: Tensors) -> Tensors:
        fc1 = torch.stack([megatron[key] for key in self.megatron_keys[0::2]])
        fc2 = torch.stack([megatron[key] for key in self.megatron_keys[1::2]])
        return {self.hf_keys[0]: fc1, self.hf_keys[1]: fc2, self.hf_keys[2]: torch.ones(self.num_experts, dtype=fc2.dtype)}


def layer_mappings(config: BDGemmaConfig, i: int) -> list[Mapping]:
    """Mappings of global layer i (0-based)."""
    hf, mg = f"layers.{i}.", f"decoder.layers.{i}."
    layer_config = config.get_config_for_layer(i + 1)
    projections = ["q_proj", "k_proj"] + (["v_proj"] if config.has_v_proj(layer_config.layer_attention_type) else [])
    maps: list[Mapping] = [Mapping((hf + f"{name}.weight",), (mg + f"{name}.weight",)) for name in LAYER_NORMS]
    maps += [
        Mapping((hf + "layer_scalar",), (mg + "layer_scalar",)),
        QKVMapping(
            tuple(hf + f"self_attn.{p}.weight" for p in projections),
            (mg + "self_attention.linear_qkv.weight",),
            heads=config.num_attention_heads,
            groups=layer_config.num_query_groups,
            head_dim=layer_config.kv_channels,
        ),
        Mapping((hf + "self_attn.q_norm.weight",), (mg + "self_attention.q_layernorm.weight",)),
        Mapping((hf + "self_attn.k_norm.weight",), (mg + "self_attention.k_layernorm.weight",)),
        Mapping((hf + "self_attn.o_proj.weight",), (mg + "self_attention.linear_proj.weight",)),
        GatedFC1Mapping(
            (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), (mg + "mlp.shared_experts.linear_fc1.weight",)
        ),
        Mapping((hf + "mlp.down_proj.weight",), (mg + "mlp.shared_experts.linear_fc2.weight",)),
        Mapping((hf + "router.proj.weight",), (mg + "mlp.router.weight",)),
        Mapping((hf + "router.scale",), (mg + "mlp.router.scale",)),
        ExpertsMapping(
            (hf + "experts.gate_up_proj", hf + "experts.down_proj", hf + "router.per_expert_scale"),
            tuple(
                mg + f"mlp.experts.local_experts.{e}.linear_fc{n}.weight"
                for e in range(config.num_moe_experts)
                for n in (1, 2)
            ),
            num_experts=config.num_moe_experts,
        ),
    ]
    return maps


def vision_mappings(config: BDGemmaConfig) -> list[Mapping]:
    """The carried vision tensors (`vision.Vision`): each HF tensor as is, under `vision.` + its HF name."""
    if config.vision_config is None:
        return []
    names = vision_tensor_shapes(config.vision_config, config.hidden_size)
    return [Mapping((name,), (CARRIED_PREFIX + name,)) for name in names]


def model_mappings(config: BDGemmaConfig) -> list[Mapping]:
    """Every mapping of the model, in checkpoint order (embedding, layers, final norm, self-conditioning, vision)."""
    maps = [Mapping(("embed_tokens.weight",), ("embedding.word_embeddings.weight",))]
    for i in range(config.num_layers):
        maps += layer_mappings(config, i)
    maps.append(Mapping(("norm.weight",), ("decoder.final_layernorm.weight",)))
    if config.self_conditioning:
        maps += [
            Mapping(("self_conditioning.pre_norm.weight",), ("self_conditioning.pre_norm.weight",)),
            GatedFC1Mapping(
                ("self_conditioning.gate_proj.weight", "self_conditioning.up_proj.weight"),
                ("self_conditioning.mlp.linear_fc1.weight",),
            ),
            Mapping(("self_conditioning.down_proj.weight",), ("self_conditioning.mlp.linear_fc2.weight",)),
        ]
    return maps + vision_mappings(config)
