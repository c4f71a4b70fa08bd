"""Training losses: the canvas diffusion CE and the encoder AR CE (docs/design.md §7).

Both return ``(loss_sum, token_count)`` rather than a mean: the trainer all-reduces the counts over data-parallel
ranks and micro-batches and divides by the **global** count (``normalise``), so every token weighs the same
whatever the batching. CE is computed in fp32 (float64 for float64 logits: ``precision.compute_dtype``) on the
given logits, which the model has already softcapped.

``chunk_size`` computes the CE over chunks of the flattened token dimension, each under activation
checkpointing, so the fp32 ``[tokens, V]`` log-softmax is never held for more than one chunk (262K vocabulary:
1 MiB per token). Values are equal up to summation order, gradients are identical.

The SFT objective variants of Google's reference (``objective.variant``, docs/design.md §7) are defined here once:
the time weight :func:`time_weight` (into the per-slot weights) and the leave-one-out shift :func:`loo_shift`, which
both loss paths add to the logit of each slot's noisy token with :func:`shift_observed_logits`.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..precision import compute_dtype
from .noise import NoiseKind

__all__ = [
    "Variant", "VARIANTS", "LOO_VARIANTS", "time_weight", "loo_shift", "shift_observed_logits",
    "weighted_cross_entropy_sum", "diffusion_loss", "diffusion_loss_weights", "scored_weights", "ar_loss", "normalise",
]

Variant = Literal["base-sft", "reweighted-ce", "loo-ce", "reweighted-loo-ce"]
"""The uniform-state SFT objectives of Google's reference (gemma/diffusion/hackable_diffusion_adapter/hd/sft_model.py)."""
VARIANTS: tuple[str, ...] = get_args(Variant)
REWEIGHTED_VARIANTS = ("reweighted-ce", "reweighted-loo-ce")
"""w(t) = −α′(t)/α(t) = 1/(1 − t) under the rectified-flow schedule α(t) = 1 − t (no 1/K factor)."""
LOO_VARIANTS = ("loo-ce", "reweighted-loo-ce")
"""The CE scores softmax(f + δ·onehot(x_t)) (leave-one-out → denoiser shift, Gourevitch et al., arXiv:2605.22765)."""
_EPS = 1e-12
"""Floor of α and 1 − α (t = 1 or t = 0 would divide by zero), as the PyTorch port of the reference."""


def time_weight(t: Tensor, variant: Variant | str, weight_clip: float | None = None) -> Tensor:
    """The variant's time weight ``w(t)``, clipped to ``weight_clip`` when given, in float64.

    ``t`` is our noise level (the probability a token is corrupted), so the retention is α(t) = 1 − t and the
    reweighted variants' weight is 1/(1 − t): ~1e6 at t = 0.999999, which is what the clip is for. The clip bounds
    every variant's weight (as the reference's ``diffusion_weight_clip``), so a clip below 1 scales base-sft too.

    Args:
        t: any shape, noise levels in [0, 1].
        variant: one of :data:`VARIANTS`.
        weight_clip: upper bound of ``w`` (None = none).

    Returns:
        float64, the shape of ``t``.
    """
    _check_variant(variant)
    t = t.to(torch.float64)
    w = 1.0 / (1.0 - t).clamp(min=_EPS) if variant in REWEIGHTED_VARIANTS else torch.ones_like(t)
    return w if weight_clip is None else w.clamp(max=weight_clip)


def loo_shift(t: Tensor, vocab_size: int) -> Tensor:
    """The leave-one-out → denoiser logit shift ``δ = log(1 + K·α/(1 − α))`` with α = 1 − t, in float64.

    Args:
        t: any shape, noise levels in [0, 1].
        vocab_size: K, the number of ids the uniform corruption draws from.

    Returns:
        float64, the shape of ``t``.
    """
    t = t.to(torch.float64)
    return torch.log1p(vocab_size * (1.0 - t) / t.clamp(min=_EPS))


def shift_observed_logits(logits: Tensor, observed: Tensor, shift: Tensor, vocab_start: int = 0) -> Tensor:
    """``logits + shift · onehot(observed)``: each row's logit of its observed (noisy) token raised by its shift.

    Out of place, so the gradient w.r.t. ``logits`` passes through unchanged and the CE's gradient is
    ``softmax(f + δ·e_x_t) − onehot(x0)``. ``logits`` may be one vocabulary shard ``[vocab_start, vocab_start + V')``:
    a row whose observed id is outside it is left as it is (the shard that holds the id adds the shift).

    Args:
        logits: ``[n, V']`` in the compute dtype.
        observed: ``[n]`` long, ids in the full vocabulary (any value where ``shift`` is 0).
        shift: ``[n]`` float, cast to the logits' dtype.
        vocab_start: the first id of this shard.

    Returns:
        ``[n, V']``.
    """
    local = observed - vocab_start
    inside = (local >= 0) & (local < logits.shape[-1])
    amount = torch.where(inside, shift.to(logits.dtype), 0.0)
    return logits.scatter_add(-1, torch.where(inside, local, 0)[:, None], amount[:, None])


def weighted_cross_entropy_sum(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor,
    *,
    chunk_size: int | None = None,
    shift_ids: Tensor | None = None,
    shift: Tensor | None = None,
) -> Tensor:
    """``Σ_i weights[i] · CE(logits[i] + shift[i]·onehot(shift_ids[i]), targets[i])`` in fp32 (float64 for float64
    logits) over positions with nonzero weight.

    Args:
        logits: ``[..., V]`` any float dtype (cast to the compute dtype per chunk).
        targets: ``[...]`` long; ignored (may be out of range) where ``weights == 0``.
        weights: ``[...]`` float or bool.
        chunk_size: tokens per chunk; ``None`` computes everything at once.
        shift_ids, shift: ``[...]`` the noisy ids and the LOO shift δ of the loo variants (None = no shift), added
            after the cast to the compute dtype (:func:`shift_observed_logits`).

    Returns:
        scalar in the compute dtype.
    """
    V = logits.shape[-1]
    if logits.shape[:-1] != targets.shape or targets.shape != weights.shape or (shift is not None and (
            shift.shape != targets.shape or shift_ids is None or shift_ids.shape != targets.shape)):
        shifts = "" if shift is None else f", shift_ids {tuple(getattr(shift_ids, 'shape', ()))}, shift {tuple(shift.shape)}"
        raise ValueError(
            f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)} and weights {tuple(weights.shape)}{shifts} "
            "must agree on the leading dims"
        )
    dtype = compute_dtype(logits.dtype)
    weights = weights.to(dtype)
    if chunk_size is None or chunk_size >= targets.numel():
        # Only the positions in the sum are gathered: a whole canvas scores one block of many, and CE over the
        # rest (a log-softmax over V each, multiplied by 0) would cost more than the scored part.
        keep = weights != 0
        shifted = () if shift is None else (shift_ids[keep], shift[keep])
        return _ce_sum(logits[keep], targets[keep], weights[keep], *shifted)
    logits = logits.reshape(-1, V)  # [N, V]
    weights = weights.reshape(-1)  # [N]
    shifted = () if shift is None else (shift_ids.reshape(-1), shift.reshape(-1))
    # Unscored targets may be pad/-100 sentinels: point them at id 0 so cross_entropy never sees them.
    targets = torch.where(weights != 0, targets.reshape(-1), 0)  # [N]
    N = logits.shape[0]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    recompute = torch.is_grad_enabled() and logits.requires_grad
    total = logits.new_zeros((), dtype=dtype)
    for start in range(0, N, chunk_size):
        part = slice(start, start + chunk_size)
        chunk = (logits[part], targets[part], weights[part], *(x[part] for x in shifted))
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
    shift_ids: Tensor | None = None,
    shift: Tensor | None = None,
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
        shift_ids, shift: ``[B, R']`` the noisy canvas ids and the loo variants' δ (``NoisedCanvas.logit_shift``).

    Returns:
        ``(loss_sum, token_count)``: fp32 (float64 for float64 logits) scalar and int64 scalar.
    """
    w = scored_weights(scored, weights)
    loss_sum = weighted_cross_entropy_sum(logits, targets, w, chunk_size=chunk_size, shift_ids=shift_ids, shift=shift)
    return loss_sum, scored.to(torch.bool).sum()


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
    variant: Variant | str = "base-sft",
    weight_clip: float | None = None,
) -> Tensor:
    """Per-slot diffusion loss weights.

    - ``"uniform"`` (DiffusionGemma): the variant's :func:`time_weight` of the slot's t on every scored slot (1 for
      base-sft: the uniform kernel's loss is flat); un-noised slots are scored too (the model must also recognise
      clean tokens among random ones).
    - ``"absorbing"`` (MDLM / BD3-LM, linear schedule): ``1/t`` on scored **and** noised slots, 0 elsewhere
      (un-masked slots are carried over and carry no information).

    Args:
        scored, noised: ``[B, R']`` bool.
        t_per_position: ``[B, R']`` noise level of each slot (``noise.expand_t``), or anything broadcastable.
        objective: a :class:`~megatron_bdgemma.diffusion.noise.NoiseKind`.
        variant, weight_clip: see :func:`time_weight`; variants other than base-sft are uniform-state objectives.

    Returns:
        fp32 ``[B, R']``.
    """
    scored = scored.to(torch.bool)
    _check_variant(variant)
    if NoiseKind(objective) is NoiseKind.UNIFORM:
        if variant == "base-sft" and weight_clip is None:
            return scored.to(torch.float32)
        w = time_weight(t_per_position, variant, weight_clip).to(torch.float32)
        return torch.where(scored, w, 0.0)
    if variant != "base-sft" or weight_clip is not None:
        raise ValueError(f"variant={variant!r} and weight_clip={weight_clip} are uniform-state options: the absorbing "
                         "objective takes base-sft and no clip")
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


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"objective.variant must be one of {', '.join(VARIANTS)}, got {variant!r}")


def normalise(loss_sum: Tensor, global_count: Tensor | int) -> Tensor:
    """``loss_sum / max(global_count, 1)``: a batch with nothing scored gives 0, not NaN."""
    count = torch.as_tensor(global_count, device=loss_sum.device).clamp(min=1)
    return loss_sum / count


def _ce_sum(
    logits: Tensor, targets: Tensor, weights: Tensor, shift_ids: Tensor | None = None, shift: Tensor | None = None
) -> Tensor:
    """Weighted CE sum of one chunk in the weights' (compute) dtype: ``logits [n, V]``, ``targets [n]``, ``weights``,
    optionally the LOO shift ``shift [n]`` on ``shift_ids [n]``."""
    logits = logits.to(weights.dtype)
    if shift is not None:
        logits = shift_observed_logits(logits, shift_ids, shift)
    ce = F.cross_entropy(logits, targets, reduction="none")  # [n]
    # where, not a plain product: a masked slot's CE never reaches the sum (nor its gradient) even if non-finite.
    return torch.where(weights != 0, ce * weights, 0.0).sum()
