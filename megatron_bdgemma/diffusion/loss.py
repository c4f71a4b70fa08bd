"""Training losses: the canvas diffusion CE and the encoder AR CE (docs/design.md §7).

Both return ``(loss_sum, token_count)`` rather than a mean: the trainer all-reduces the counts over data-parallel
ranks and micro-batches and divides by the **global** count (``normalise``), so every token weighs the same
whatever the batching. CE is computed in fp32 (float64 for float64 logits: ``precision.compute_dtype``) on the
given logits, which the model has already softcapped.

``chunk_size`` computes the CE over chunks of the flattened token dimension, each under activation
checkpointing, so the fp32 ``[tokens, V]`` log-softmax is never held for more than one chunk (262K vocabulary:
1 MiB per token). Values are equal up to summation order, gradients are identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..precision import compute_dtype
from .noise import NoiseKind

__all__ = [
    "weighted_cross_entropy_sum", "diffusion_loss", "diffusion_loss_weights", "scored_weights", "ar_loss", "normalise",
]


def weighted_cross_entropy_sum(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """``Σ_i weights[i] · CE(logits[i], targets[i])`` in fp32 (float64 for float64 logits) over positions with
    nonzero weight.

    Args:
        logits: ``[..., V]`` any float dtype (cast to the compute dtype per chunk).
        targets: ``[...]`` long; ignored (may be out of range) where ``weights == 0``.
        weights: ``[...]`` float or bool.
        chunk_size: tokens per chunk; ``None`` computes everything at once.

    Returns:
        scalar in the compute dtype.
    """
    V = logits.shape[-1]
    if logits.shape[:-1] != targets.shape or targets.shape != weights.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)} and weights {tuple(weights.shape)} "
            "must agree on the leading dims"
        )
    dtype = compute_dtype(logits.dtype)
    weights = weights.to(dtype)
    if chunk_size is None or chunk_size >= targets.numel():
        # Only the positions in the sum are gathered: a whole canvas scores one block of many, and CE over the
        # rest (a log-softmax over V each, multiplied by 0) would cost more than the scored part.
        keep = weights != 0
        return _ce_sum(logits[keep], targets[keep], weights[keep])
    logits = logits.reshape(-1, V)  # [N, V]
    weights = weights.reshape(-1)  # [N]
    # Unscored targets may be pad/-100 sentinels: point them at id 0 so cross_entropy never sees them.
    targets = torch.where(weights != 0, targets.reshape(-1), 0)  # [N]
    N = logits.shape[0]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    recompute = torch.is_grad_enabled() and logits.requires_grad
    total = logits.new_zeros((), dtype=dtype)
    for start in range(0, N, chunk_size):
        part = slice(start, start + chunk_size)
        chunk = (logits[part], targets[part], weights[part])
        # Checkpointing frees the chunk's fp32 log-softmax after forward and recomputes it in backward.
        total = total + (checkpoint(_ce_sum, *chunk, use_reentrant=False) if recompute else _ce_sum(*chunk))
    return total


def diffusion_loss(
    logits: Tensor,
    targets: Tensor,
    scored: Tensor,
    weights: Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Canvas denoising CE: summed over scored slots, with the scored-slot count for global normalisation.

    DiffusionGemma default: ``scored`` = the chosen block's valid slots, noised or not (incl. the EOS fill), and
    weight 1 (flat CE, no 1/t). For the absorbing option pass ``weights`` from :func:`diffusion_loss_weights`:
    the count still covers every scored slot (the NELBO is averaged over tokens, un-noised ones contribute 0).

    Args:
        logits: ``[B, R', V]`` softcapped canvas logits (``R'`` = whole canvas or just the decoded blocks).
        targets: ``[B, R']`` clean ids.
        scored: ``[B, R']`` bool, the slots in the loss and in the count.
        weights: ``[B, R']`` float per-slot weights (default 1); ignored outside ``scored``.
        chunk_size: see module docstring.

    Returns:
        ``(loss_sum, token_count)``: fp32 (float64 for float64 logits) scalar and int64 scalar.
    """
    w = scored_weights(scored, weights)
    return weighted_cross_entropy_sum(logits, targets, w, chunk_size=chunk_size), scored.to(torch.bool).sum()


def scored_weights(scored: Tensor, weights: Tensor | None = None) -> Tensor:
    """The per-slot CE weights :func:`diffusion_loss` applies: ``weights`` (default 1) on ``scored``, 0 elsewhere.

    Args:
        scored: ``[B, R']`` bool.
        weights: ``[B, R']`` float, or None for 1.

    Returns:
        fp32 ``[B, R']``.
    """
    scored = scored.to(torch.bool)
    return scored.to(torch.float32) if weights is None else torch.where(scored, weights.to(torch.float32), 0.0)


def diffusion_loss_weights(
    scored: Tensor,
    noised: Tensor,
    t_per_position: Tensor,
    objective: NoiseKind | str = NoiseKind.UNIFORM,
) -> Tensor:
    """Per-slot diffusion loss weights.

    - ``"uniform"`` (DiffusionGemma): 1 on every scored slot. The uniform kernel's loss is flat; un-noised slots
      are scored too (the model must also recognise clean tokens among random ones).
    - ``"absorbing"`` (MDLM / BD3-LM, linear schedule): ``1/t`` on scored **and** noised slots, 0 elsewhere
      (un-masked slots are carried over and carry no information).

    Args:
        scored, noised: ``[B, R']`` bool.
        t_per_position: ``[B, R']`` noise level of each slot (``noise.expand_t``), or anything broadcastable.
        objective: a :class:`~megatron_bdgemma.diffusion.noise.NoiseKind`.

    Returns:
        fp32 ``[B, R']``.
    """
    scored = scored.to(torch.bool)
    if NoiseKind(objective) is NoiseKind.UNIFORM:
        return scored.to(torch.float32)
    hit = scored & noised.to(torch.bool)
    return torch.where(hit, 1.0 / t_per_position.to(torch.float32), 0.0)


def ar_loss(
    logits: Tensor,
    labels: Tensor,
    loss_mask: Tensor,
    *,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Next-token CE on the encoder logits (already shifted: ``logits[b, i]`` predicts ``labels[b, i]``).

    Use the layout's ``ar_labels`` / ``ar_loss_mask`` (every valid pair, prompt included; weight 1).

    Args:
        logits: ``[B, S, V]`` softcapped encoder logits.
        labels: ``[B, S]`` long.
        loss_mask: ``[B, S]`` bool.
        chunk_size: see module docstring.

    Returns:
        ``(loss_sum, token_count)``: fp32 (float64 for float64 logits) scalar and int64 scalar.
    """
    loss_mask = loss_mask.to(torch.bool)
    return weighted_cross_entropy_sum(logits, labels, loss_mask, chunk_size=chunk_size), loss_mask.sum()


def normalise(loss_sum: Tensor, global_count: Tensor | int) -> Tensor:
    """``loss_sum / max(global_count, 1)``: a batch with nothing scored gives 0, not NaN."""
    count = torch.as_tensor(global_count, device=loss_sum.device).clamp(min=1)
    return loss_sum / count


def _ce_sum(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """Weighted CE sum of one chunk in the weights' (compute) dtype: ``logits [n, V]``, ``targets [n]``, ``weights``."""
    ce = F.cross_entropy(logits.to(weights.dtype), targets, reduction="none")  # [n]
    # where, not a plain product: a masked slot's CE never reaches the sum (nor its gradient) even if non-finite.
    return torch.where(weights != 0, ce * weights, 0.0).sum()
