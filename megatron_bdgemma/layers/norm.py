"""Gemma's RMSNorm: `x * (mean(x^2) + eps)^-0.5 * w` computed in fp32, with a plain weight (no `1 + w`)."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale-free RMS normalisation in fp32 (HF uses `pow(-0.5)`, not rsqrt, for JAX parity)."""
    x = x.float()
    return x * torch.pow(x.pow(2).mean(-1, keepdim=True) + eps, -0.5)


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last dim; the output keeps the input dtype.

    Signature-compatible with Megatron's norm builders `(config, hidden_size, eps)`. The weight is marked
    `sequence_parallel` so Megatron's `finalize_model_grads` all-reduces its gradient over TP when SP splits the
    tokens; `with_scale=False` gives the weightless norm of v_norm, the router and the self-conditioning output.
    """

    def __init__(
        self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, with_scale: bool = True
    ) -> None:
        super().__init__()
        self.eps = eps
        if with_scale:
            self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
            self.weight.sequence_parallel = config.sequence_parallel
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = rms_normalize(x, self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.type_as(x)
