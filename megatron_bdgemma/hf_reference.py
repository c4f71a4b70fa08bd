"""Small random Hugging Face DiffusionGemma models, built locally: the oracles of tests and benchmarks.

Nothing is downloaded; a model is built from a config dict and saved with `save_pretrained`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SLIDING, FULL = "sliding_attention", "full_attention"

TINY_VISION: dict[str, Any] = dict(
    model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=2, head_dim=8,
)
"""A one-layer vision tower: DiffusionGemma checkpoints hold one, and conversion must carry it unchanged."""

SMALL_TEXT: dict[str, Any] = dict(
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    global_head_dim=64,
    num_global_key_value_heads=1,
    layer_types=[SLIDING] * 5 + [FULL],
    sliding_window=128,
    num_experts=8,
    top_k_experts=2,
    moe_intermediate_size=64,
    max_position_embeddings=8192,
    pad_token_id=0,
    eos_token_id=1,
)
"""DiffusionGemma's geometry (5:1 sliding/full layers, K=V full layers, top-k MoE) scaled down for CPU benchmarks."""


def random_diffusion_gemma(text: dict[str, Any], canvas_length: int, seed: int = 0, **config: Any):
    """An eval-mode `DiffusionGemmaForBlockDiffusion` with HF's random init (eager attention); `config`: more
    `DiffusionGemmaConfig` fields (e.g. an `image_token_id` inside a tiny vocabulary)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma import DiffusionGemmaTextConfig

    torch.manual_seed(seed)
    config = DiffusionGemmaConfig(
        text_config=DiffusionGemmaTextConfig(**text), vision_config=TINY_VISION, canvas_length=canvas_length, **config
    )
    config._attn_implementation = "eager"
    return DiffusionGemmaForBlockDiffusion(config).eval()


def automodel_train_mode(model: torch.nn.Module) -> torch.nn.Module:
    """A `DiffusionGemmaForBlockDiffusion` set to train as NeMo Automodel does: eager attention (the dense
    additive canvas mask) and the router's projection and scale frozen (the encoder's layers are tied to these)."""
    model.train()
    model.set_attn_implementation("eager")
    for layer in model.model.decoder.layers:
        layer.router.proj.weight.requires_grad_(False)
        layer.router.scale.requires_grad_(False)
    return model


def save(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    return path
