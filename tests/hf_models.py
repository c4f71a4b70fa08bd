"""Tiny random Hugging Face oracles, built locally and saved with `save_pretrained` (nothing from a hub).

HF initialises norm weights, router scales, `per_expert_scale` and `layer_scalar` to ones (and the vision tower's
position table), which would hide mapping mistakes; `randomise` makes every one of them distinct.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from megatron_bdgemma.hf_reference import (  # noqa: F401 - re-exported
    FULL,
    SLIDING,
    TINY_VISION,
    random_diffusion_gemma,
    save,
)

# Sizes are the smallest that still exercise each feature: GQA (4 q heads over 2 KV heads), a full-layer geometry
# different from the sliding one (head dim 16 vs 8, 1 KV head), top-2 of 4 experts, a window shorter than the
# test sequences.
BASE_TEXT: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    global_head_dim=16,
    num_global_key_value_heads=1,
    layer_types=[SLIDING, SLIDING, FULL],
    sliding_window=4,
    num_experts=4,
    top_k_experts=2,
    moe_intermediate_size=16,
    max_position_embeddings=512,
    pad_token_id=0,
    eos_token_id=1,
)

@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every norm weight, router scale, per-expert scale, layer scalar, embedding row and vision tensor a random
    value."""
    generator = torch.Generator().manual_seed(seed)
    # Its own stream, so the text stack's values do not depend on the vision tower's size.
    vision = torch.Generator().manual_seed(seed + 1)
    stored = set(model.state_dict())  # not the non-persistent RoPE tables, which transformers computes
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith(("norm.weight", "router.scale", "per_expert_scale", "layer_scalar")) or "layernorm" in name:
            tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
        elif "experts." in name and tensor.is_floating_point():
            tensor.normal_(0.0, 0.05, generator=generator)
        elif name.endswith("embed_tokens.weight"):
            # HF zeroes the pad row; a zero vector through RMSNorm has a 1/sqrt(eps) gradient, which makes
            # gradient comparisons of padded batches ill-conditioned. Real checkpoints have no zero rows.
            tensor.normal_(0.0, 0.5, generator=generator)
        if re.search(r"\b(vision_tower|embed_vision)\.", name) and name in stored:
            tensor.normal_(0.0, 0.5, generator=vision)  # norms included: any value will do, as long as it is carried
    return model



@torch.no_grad()
def randomise_scales(model: torch.nn.Module) -> torch.nn.Module:
    """Our model's counterpart of `randomise` for tests without an HF twin: every norm weight, router scale and layer
    scalar drawn from U(0.5, 1.5) with the global generator (seed it first), so none is the identity."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith(("norm.weight", "router.scale", "layer_scalar")):
            tensor.uniform_(0.5, 1.5)
    return model

def _gemma4_text(text_overrides: dict[str, Any] | None) -> dict[str, Any]:
    return BASE_TEXT | dict(
        enable_moe_block=True, attention_k_eq_v=True, hidden_size_per_layer_input=0, num_kv_shared_layers=0,
        final_logit_softcapping=30.0,
    ) | (text_overrides or {})


def gemma4_causal_lm(text_overrides: dict[str, Any] | None = None, seed: int = 0):
    """A `Gemma4ForCausalLM` MoE text model configured as DiffusionGemma's encoder (docs/design.md §4)."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    torch.manual_seed(seed)
    config = Gemma4TextConfig(**_gemma4_text(text_overrides))
    config._attn_implementation = "eager"
    return randomise(Gemma4ForCausalLM(config).eval(), seed)


def gemma4_multimodal(text_overrides: dict[str, Any] | None = None, seed: int = 0, **config: Any):
    """A `Gemma4ForConditionalGeneration` (the MoE text model of `gemma4_causal_lm` and a one-layer vision tower)."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    hf_config = Gemma4Config(text_config=_gemma4_text(text_overrides), vision_config=TINY_VISION, **config)
    hf_config._attn_implementation = "eager"
    return randomise(Gemma4ForConditionalGeneration(hf_config).eval(), seed)


def diffusion_gemma(text_overrides: dict[str, Any] | None = None, canvas_length: int = 4, seed: int = 0, **config: Any):
    """A `DiffusionGemmaForBlockDiffusion` with a one-layer vision tower, randomised; `config`: more
    `DiffusionGemmaConfig` fields."""
    model = random_diffusion_gemma(BASE_TEXT | (text_overrides or {}), canvas_length, seed, **config)
    randomise(model, seed)
    # The encoder's untied layer_scalar copies must equal the decoder's (a real checkpoint stores both equal).
    with torch.no_grad():
        for enc, dec in zip(model.model.encoder.language_model.layers, model.model.decoder.layers):
            enc.layer_scalar.copy_(dec.layer_scalar)
    return model


VISION_PARTS = ("vision_tower.", "embed_vision.")


def vision_tensors(tensors: dict[str, torch.Tensor], prefix: str = "model.encoder.") -> dict[str, torch.Tensor]:
    """The vision tower's and embedder's tensors of a checkpoint's `tensors`, named relative to `prefix` (where the
    model type keeps them: DiffusionGemma `model.encoder.`, Gemma 4 `model.`)."""
    return {key.removeprefix(prefix): t for key, t in tensors.items()
            if key.startswith(prefix) and key.removeprefix(prefix).startswith(VISION_PARTS)}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: same dtype, shape and bytes (`torch.equal` would call -0.0 and 0.0 equal, and NaN unequal)."""
    return (a.dtype, a.shape) == (b.dtype, b.shape) and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
