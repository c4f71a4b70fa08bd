"""Gemma's RMSNorm: `x * (mean(x^2) + eps)^-0.5 * w` computed in fp32 (float64 in a float64 model:
`precision.compute_dtype`), with a plain weight (no `1 + w`)."""

from __future__ import annotations

import functools

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_bdgemma.precision import compute_dtype


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale-free RMS normalisation in `compute_dtype(x.dtype)` (fp32 but for float64 inputs): HF's
    `x * pow(mean(x.pow(2)) + eps, -0.5)` bit for bit.

    ATen computes `pow(2)` as `x * x`, `pow(-0.5)` as rsqrt and `mean` as the sum divided by the count, so those are
    the ops here; `eps + sum / count` is one `addcdiv` (the same two roundings: its factor 1 is exact). The count
    and eps come as cached tensors because a Python number costs a scalar-to-tensor conversion per op (with them a
    small norm takes a third less time).
    """
    x = cast(x, compute_dtype(x.dtype))
    count, eps = _constant(float(x.shape[-1]), x.dtype, x.device), _constant(eps, x.dtype, x.device)
    return x * torch.addcdiv(eps, (x * x).sum(-1, keepdim=True), count).rsqrt_()


@functools.lru_cache(maxsize=None)
def _constant(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # An ordinary tensor even when first asked for in inference mode: autograd may save it later.
    with torch.inference_mode(False):
        return torch.tensor(value, dtype=dtype, device=device)


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
        return self.scale(rms_normalize(x, self.eps), x.dtype)

    def scale(self, normalized: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The weight applied (in the compute dtype) to an `rms_normalize` output, cast to `dtype`: for callers that
        normalise one tensor once for several norms."""
        return cast(normalized if self.weight is None else normalized * cast(self.weight, normalized.dtype), dtype)


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x.to(dtype)`, skipping the call when x has that dtype (a same-dtype `to` still costs a dispatch, ~1 µs, and
    an fp32 model's layer has a dozen of them)."""
    return x if x.dtype == dtype else x.to(dtype)
