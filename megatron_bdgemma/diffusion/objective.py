"""One training example's diffusion inputs: noise levels, corrupted canvas, scored blocks, self-conditioning coins.

`noise_batch` draws everything from (seed, global sample index, step, purpose), so the result does not depend on
how the batch is split over ranks or micro-batches. With one scored block per example (the SFT default) only that
block is put on the canvas: canvas blocks never see each other, so decoding the scored block alone gives the same
logits and gradients as decoding the whole canvas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .layout import DiffusionBatch, moved_to, take_blocks
from .loss import LOO_VARIANTS, Variant, diffusion_loss_weights, loo_shift
from .noise import NoiseKind, SampleIndices, choose_blocks, corrupt, expand_t, sample_t, self_conditioning_coins


@dataclass(frozen=True)
class NoisedCanvas:
    """The decoder's training inputs; R' = number of decoded blocks × block size.

    canvas_ids / targets / position_ids: `[B, R']` noisy ids, clean ids, absolute positions.
    block_ids: `[B, R' / block_size]` response block held by each canvas block (-1 = empty slot).
    scored: `[B, R']` bool, positions that enter the diffusion loss; weights `[B, R']` their CE weights.
    self_conditioning: `[B]` bool coins (True = pass 2 sees pass 1's signal).
    logit_shift: `[B, R']` float64 δ(t) of the loo variants on scored slots (0 elsewhere), added by the diffusion
        loss to the logit of each slot's `canvas_ids` token; None for the variants without the shift.
    """

    canvas_ids: Tensor
    targets: Tensor
    position_ids: Tensor
    block_ids: Tensor
    scored: Tensor
    weights: Tensor
    self_conditioning: Tensor
    logit_shift: Tensor | None = None

    def to(self, device: torch.device | str) -> NoisedCanvas:
        """A copy with every tensor moved to ``device``."""
        return moved_to(self, device)


def noise_batch(
    batch: DiffusionBatch,
    *,
    sample_indices: SampleIndices,
    step: int,
    seed: int,
    vocab_size: int,
    score: Literal["one_block", "all_blocks"] = "one_block",
    kind: NoiseKind | str = NoiseKind.UNIFORM,
    mask_id: int | None = None,
    t_min: float = 1e-3,
    t_max: float = 1.0,
    self_conditioning_p: float = 0.5,
    variant: Variant | str = "base-sft",
    weight_clip: float | None = None,
) -> NoisedCanvas:
    """Corrupt the response window of `batch` (docs/design.md §7).

    `score="one_block"`: one t per example, one uniformly chosen block scored and decoded.
    `score="all_blocks"` (pretraining): one t per block, every block decoded and scored.
    `kind="absorbing"` replaces with `mask_id` and weights noised positions by 1/t (MDLM / BD3-LM).
    `variant` (uniform kind only): the time weight w(t) goes into `weights`, the loo variants' shift δ(t) into
    `logit_shift`, both per slot from its own t (so per block under all_blocks); `vocab_size` is δ's K.
    """
    key = dict(sample_indices=sample_indices, step=step, seed=seed)
    bs, device = batch.block_size, batch.input_ids.device
    if score == "one_block":
        t = sample_t(t_min=t_min, t_max=t_max, **key).to(device)
    elif score == "all_blocks":
        t = sample_t(t_min=t_min, t_max=t_max, blocks_per_example=batch.blocks_per_example, num_blocks=batch.num_blocks, **key).to(device)
    else:
        raise ValueError(f"score must be 'one_block' or 'all_blocks', got {score!r}")
    noisy, noised = corrupt(
        kind, batch.canvas_targets, batch.canvas_supervised, t, vocab_size=vocab_size, mask_id=mask_id, block_size=bs, **key
    )
    t_per_position = expand_t(t, batch.canvas_len, bs if score == "all_blocks" else None)
    scored = batch.canvas_supervised  # valid unsupervised slots (SFT) are neither noised nor scored
    targets, positions = batch.canvas_targets, batch.canvas_position_ids
    if score == "one_block":
        chosen = choose_blocks(batch.response_lens, bs, **key)
        noisy, noised, targets, positions, scored, t_per_position = (
            take_blocks(x, chosen, bs) for x in (noisy, noised, targets, positions, scored, t_per_position)
        )
        block_ids = chosen[:, None]
    else:
        block_ids = torch.arange(batch.num_blocks, device=device).expand(batch.batch_size, -1)
        block_ids = torch.where(block_ids < batch.blocks_per_example.to(device)[:, None], block_ids, -1)
    weights = diffusion_loss_weights(
        scored, noised, t_per_position, objective=str(NoiseKind(kind)), variant=variant, weight_clip=weight_clip
    )
    shift = torch.where(scored, loo_shift(t_per_position, vocab_size), 0.0) if variant in LOO_VARIANTS else None
    coins = self_conditioning_coins(p=self_conditioning_p, **key).to(device)
    return NoisedCanvas(noisy, targets, positions, block_ids, scored, weights, coins, shift)
