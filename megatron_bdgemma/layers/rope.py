"""The one RoPE of the project: tables from explicit positions, applied rotate-half.

Sliding layers use default RoPE over the whole head dim. Full layers use HF's "proportional" RoPE: the first
`int(partial * D / 2)` pair frequencies are `theta^(-2j/D)` (exponent over the **full** D) and the remaining pairs
have frequency zero, so with D=512 and partial 0.25 the rotated dims are {0..63} ∪ {256..319}. Megatron's
`rotary_percent` rotates a contiguous prefix instead and is not used.
"""

from __future__ import annotations

import torch

from megatron_bdgemma.config import FULL, BDGemmaConfig


def inverse_frequencies(head_dim: int, theta: float, partial_rotary_factor: float = 1.0, factor: float = 1.0) -> torch.Tensor:
    """[head_dim / 2] fp32 inverse frequencies; pairs past the rotated fraction are 0 (unrotated)."""
    rotated = int(partial_rotary_factor * head_dim // 2)
    inv = 1.0 / (theta ** (torch.arange(0, 2 * rotated, 2, dtype=torch.float32) / head_dim))
    inv = torch.cat([inv, torch.zeros(head_dim // 2 - rotated)])
    return inv / factor


def layer_inverse_frequencies(config: BDGemmaConfig, layer_type: str) -> torch.Tensor:
    if layer_type == FULL:
        return inverse_frequencies(
            config.global_kv_channels,
            config.global_rope_theta,
            config.global_partial_rotary_factor,
            config.global_rope_scaling_factor,
        )
    return inverse_frequencies(config.kv_channels, config.rope_theta, 1.0, config.rope_scaling_factor)


def rope_tables(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[S, B, 1, D]` for positions `[B, S]`.

    Angles are computed in fp32 and then cast to the activation dtype, as HF does (so bf16 runs match HF's rounding).
    """
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq.to(position_ids.device)  # [B, S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1).transpose(0, 1)[:, :, None, :]  # [S, B, 1, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[S, B, heads, D]` by tables `[S, B, 1, D]`."""
    return x * cos + rotate_half(x) * sin
