"""Model-independent pieces of the block-diffusion objective (docs/design.md §5–§7).

- :mod:`.layout` — the response window: clean encoder ids with EOS block fill, the canvas, AR labels.
- :mod:`.noise` — deterministic per-sample randomness: t, corruption, block choice, self-conditioning coins.
- :mod:`.loss` — fp32 CE sums and counts for the diffusion and AR losses (normalised globally by the trainer).

A training step uses them in this order::

    batch = build_sft_batch(ids, loss_mask, valid, block_size=256, eos_id=1, pad_id=0)
    key = dict(sample_indices=idx, step=step, seed=seed)
    t = sample_t(**key)                                                       # [B]
    noisy, noised = corrupt_uniform(batch.canvas_targets, batch.canvas_supervised, t, vocab_size=V, **key)
    blocks = choose_blocks(batch.response_lens, batch.block_size, **key)      # [B]
    coins = self_conditioning_coins(**key)                                    # [B]
    scored = block_mask(blocks, batch.canvas_supervised, batch.block_size)    # [B, R]
    ... model forward -> canvas logits [B, R, V], encoder logits [B, S, V] ...
    diff_sum, diff_count = diffusion_loss(canvas_logits, batch.canvas_targets, scored)
    ar_sum, ar_count = ar_loss(encoder_logits, batch.ar_labels, batch.ar_loss_mask)
    # all-reduce the counts over DP ranks and micro-batches, then normalise(sum, global_count).

Nothing here imports megatron or the model.
"""

from .layout import DiffusionBatch, block_mask, build_pretrain_batch, build_sft_batch, take_blocks
from .objective import NoisedCanvas, noise_batch
from .loss import (
    VARIANTS,
    ar_loss,
    diffusion_loss,
    diffusion_loss_weights,
    loo_shift,
    normalise,
    shift_observed_logits,
    time_weight,
    weighted_cross_entropy_sum,
)
from .noise import (
    T_MIN,
    Corruption,
    NoiseKind,
    NoisePurpose,
    choose_blocks,
    corrupt,
    corrupt_absorbing,
    corrupt_uniform,
    expand_t,
    sample_generator,
    sample_seed,
    sample_t,
    self_conditioning_coins,
)

__all__ = [
    # layout
    "DiffusionBatch",
    "build_sft_batch",
    "build_pretrain_batch",
    "block_mask",
    "take_blocks",
    # noise
    "T_MIN",
    "NoisePurpose",
    "NoiseKind",
    "Corruption",
    "sample_seed",
    "sample_generator",
    "sample_t",
    "expand_t",
    "corrupt_uniform",
    "corrupt_absorbing",
    "corrupt",
    "choose_blocks",
    "self_conditioning_coins",
    # objective
    "NoisedCanvas",
    "noise_batch",
    # loss
    "VARIANTS",
    "time_weight",
    "loo_shift",
    "shift_observed_logits",
    "weighted_cross_entropy_sum",
    "diffusion_loss",
    "diffusion_loss_weights",
    "ar_loss",
    "normalise",
]
