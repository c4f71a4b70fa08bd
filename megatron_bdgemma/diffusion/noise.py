"""Deterministic training randomness: noise level t, corruption, block choice, self-conditioning coins.

Every random draw for example ``b`` comes from its own CPU generator seeded by a stable hash of
``(seed, global sample index, step, purpose)`` (docs/design.md §7). So the noise an example receives depends only on
which sample it is and which step it is trained in — not on the number of data-parallel ranks, the micro-batch
split, the other examples in the batch or the padded canvas width — and it replays exactly on resume. TP/CP peers
hold the same samples and therefore draw identical noise. (The references match this in distribution, not draw
for draw: Automodel seeds block choice and coins per step and micro-batch.)

Per-example draws are sized by the example itself (its valid canvas slots, its blocks), never by the batch's
padded ``R``, which is what makes them independent of batching.

Generators live on the CPU; results are moved to the device of the inputs. The draws are small (one row of
canvas length per example), so this costs nothing next to a forward pass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from enum import StrEnum
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
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
]

T_MIN = 1e-3
"""Lower end of the noise level range (``dllm.eps`` in the references): t = 0 would leave nothing to learn."""


class NoisePurpose(StrEnum):
    """Independent random streams; each purpose gets its own generator per (sample, step)."""

    T = "t"
    CORRUPT = "corrupt"
    BLOCK = "block"
    SELF_COND = "self_cond"


class NoiseKind(StrEnum):
    """Corruption kernel (and with it the loss weighting, see ``loss.diffusion_loss_weights``)."""

    UNIFORM = "uniform"
    """DiffusionGemma default: replace with a uniform random vocab id (no mask token), flat CE."""
    ABSORBING = "absorbing"
    """MDLM / BD3-LM option: replace with ``mask_id``, 1/t-weighted CE on noised positions."""


class Corruption(NamedTuple):
    noisy_ids: Tensor
    """``[B, R]``: the canvas fed to the decoder."""
    noised: Tensor
    """``[B, R]`` bool: positions that were replaced (a uniform replacement may equal the original token)."""


SampleIndices = Tensor | Sequence[int]


def sample_seed(seed: int, sample_index: int, step: int, purpose: NoisePurpose | str) -> int:
    """A 63-bit seed from a stable hash of ``(seed, sample_index, step, purpose)``.

    blake2b over a fixed text encoding, not Python's ``hash`` (salted per process), so every rank, run and resume
    agrees. Integers of any size and sign are accepted.
    """
    purpose = NoisePurpose(purpose)  # reject typos: an unknown purpose would silently alias no stream
    key = f"megatron_bdgemma.noise.v1|{int(seed)}|{int(sample_index)}|{int(step)}|{purpose.value}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sample_generator(seed: int, sample_index: int, step: int, purpose: NoisePurpose | str) -> torch.Generator:
    """A fresh CPU generator for one example's draws of one purpose at one step."""
    g = torch.Generator(device="cpu")
    g.manual_seed(sample_seed(seed, sample_index, step, purpose))
    return g


def sample_t(
    *,
    sample_indices: SampleIndices,
    step: int,
    seed: int,
    t_min: float = T_MIN,
    t_max: float = 1.0,
    blocks_per_example: Tensor | None = None,
    num_blocks: int | None = None,
) -> Tensor:
    """Noise levels ``t ~ U(t_min, t_max)``, one per example or one per (example, block).

    Args:
        sample_indices: ``[B]`` global sample indices.
        step: training step (optimizer step; the same for all micro-batches of a step).
        seed: run seed.
        t_min, t_max: the (possibly clipped) range, ``0 < t_min <= t_max <= 1``.
        blocks_per_example: ``[B]`` long. When given, draw one t per block (pretraining / all-blocks scoring):
            example ``b`` draws ``blocks_per_example[b]`` values; blocks past that get ``t_max`` (they hold no
            tokens, so the value is never used).
        num_blocks: width of the per-block output; default ``max(blocks_per_example)`` (pass ``R // block_size``).

    Returns:
        fp32 ``[B]``, or ``[B, num_blocks]`` with ``blocks_per_example``; on the CPU.
    """
    if not 0.0 < t_min <= t_max <= 1.0:
        raise ValueError(f"need 0 < t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}")
    indices = _index_list(sample_indices)
    if blocks_per_example is None:
        counts = [1] * len(indices)
        width = 1
    else:
        counts = [int(n) for n in blocks_per_example.tolist()]
        if len(counts) != len(indices):
            raise ValueError(f"blocks_per_example has {len(counts)} entries for {len(indices)} samples")
        width = max(counts, default=0) if num_blocks is None else num_blocks
        if max(counts, default=0) > width:
            raise ValueError(f"num_blocks ({width}) < largest blocks_per_example ({max(counts)})")
    t = torch.full((len(indices), width), t_max, dtype=torch.float32)
    for b, (index, n) in enumerate(zip(indices, counts)):
        u = torch.rand(n, generator=sample_generator(seed, index, step, NoisePurpose.T))
        t[b, :n] = t_min + (t_max - t_min) * u
    return t[:, 0] if blocks_per_example is None else t


def expand_t(t: Tensor, canvas_len: int, block_size: int | None = None) -> Tensor:
    """Per-position noise level ``[B, R]`` from per-example ``[B]`` or per-block ``[B, nblk]`` t.

    ``block_size`` is required for per-block t (slot ``j`` takes block ``j // block_size``).
    """
    if t.dim() == 1:
        return t[:, None].expand(-1, canvas_len)
    if block_size is None:
        raise ValueError("expand_t: block_size is required for per-block t [B, nblk]")
    if t.shape[1] * block_size < canvas_len:
        raise ValueError(f"per-block t covers {t.shape[1]} blocks of {block_size}, canvas has {canvas_len} slots")
    return t.repeat_interleave(block_size, dim=1)[:, :canvas_len]


def corrupt_uniform(
    targets: Tensor,
    valid: Tensor,
    t: Tensor,
    *,
    sample_indices: SampleIndices,
    step: int,
    seed: int,
    vocab_size: int,
    block_size: int | None = None,
) -> Corruption:
    """Uniform-state corruption (DiffusionGemma): each valid slot becomes a uniform random id with prob. t.

    There is no mask token; a replacement may by chance equal the original token (as in the reference).
    Slots that are not ``valid`` (the prompt is never on the canvas; pad slots) keep their ``targets`` value,
    which the layout sets to ``pad_id``.

    Args:
        targets: ``[B, R]`` clean canvas ids.
        valid: ``[B, R]`` bool, the noisable (supervised) slots.
        t: fp32 ``[B]`` per example, or ``[B, nblk]`` per block (then ``block_size`` is required).
        sample_indices, step, seed: the randomness key (see module docstring).
        vocab_size: the tokenizer's vocabulary size (not a TP-padded embedding size: padded ids are not tokens).
        block_size: canvas block length, for per-block t.

    Returns:
        :class:`Corruption` ``(noisy_ids [B, R], noised [B, R] bool)`` on the device of ``targets``.
    """
    return _corrupt(targets, valid, t, sample_indices, step, seed, block_size, vocab_size=vocab_size, mask_id=None)


def corrupt_absorbing(
    targets: Tensor,
    valid: Tensor,
    t: Tensor,
    *,
    sample_indices: SampleIndices,
    step: int,
    seed: int,
    mask_id: int,
    block_size: int | None = None,
) -> Corruption:
    """Absorbing-state corruption (MDLM / BD3-LM option): each valid slot becomes ``mask_id`` with prob. t.

    Uses the same per-example uniform draws as :func:`corrupt_uniform`, so for the same key and t both kernels
    noise the same positions. Arguments as in :func:`corrupt_uniform`.
    """
    return _corrupt(targets, valid, t, sample_indices, step, seed, block_size, vocab_size=None, mask_id=mask_id)


def corrupt(
    kind: NoiseKind | str,
    targets: Tensor,
    valid: Tensor,
    t: Tensor,
    *,
    sample_indices: SampleIndices,
    step: int,
    seed: int,
    vocab_size: int | None = None,
    mask_id: int | None = None,
    block_size: int | None = None,
) -> Corruption:
    """Dispatch to :func:`corrupt_uniform` (needs ``vocab_size``) or :func:`corrupt_absorbing` (needs ``mask_id``)."""
    kind = NoiseKind(kind)
    key = dict(sample_indices=sample_indices, step=step, seed=seed, block_size=block_size)
    if kind is NoiseKind.UNIFORM:
        if vocab_size is None:
            raise ValueError("uniform corruption needs vocab_size")
        return corrupt_uniform(targets, valid, t, vocab_size=vocab_size, **key)
    if mask_id is None:
        raise ValueError("absorbing corruption needs mask_id")
    return corrupt_absorbing(targets, valid, t, mask_id=mask_id, **key)


def choose_blocks(
    response_lens: Tensor,
    block_size: int,
    *,
    sample_indices: SampleIndices,
    step: int,
    seed: int,
) -> Tensor:
    """One scored block per example, uniform over the blocks that hold response tokens.

    Example ``b`` has ``max(ceil(response_lens[b] / block_size), 1)`` candidate blocks (an empty response still
    gets block 0, which then scores nothing).

    Returns:
        ``[B]`` long on the device of ``response_lens``.
    """
    indices = _index_list(sample_indices)
    counts = ((response_lens + block_size - 1) // block_size).clamp(min=1).tolist()
    if len(counts) != len(indices):
        raise ValueError(f"response_lens has {len(counts)} entries for {len(indices)} samples")
    chosen = [
        int(torch.randint(n, (1,), generator=sample_generator(seed, index, step, NoisePurpose.BLOCK)))
        for index, n in zip(indices, counts)
    ]
    return torch.tensor(chosen, dtype=torch.long, device=response_lens.device)


def self_conditioning_coins(
    *,
    sample_indices: SampleIndices,
    step: int,
    seed: int,
    p: float = 0.5,
) -> Tensor:
    """Per-example self-conditioning coins: True (use the pass-1 signal) with probability ``p``.

    Returns:
        ``[B]`` bool on the CPU.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"self-conditioning probability p must be in [0, 1], got {p}")
    coins = [
        float(torch.rand(1, generator=sample_generator(seed, index, step, NoisePurpose.SELF_COND))) < p
        for index in _index_list(sample_indices)
    ]
    return torch.tensor(coins, dtype=torch.bool)


# ----------------------------------------------------------------------------------------------------------------
# internals


def _corrupt(
    targets: Tensor,
    valid: Tensor,
    t: Tensor,
    sample_indices: SampleIndices,
    step: int,
    seed: int,
    block_size: int | None,
    *,
    vocab_size: int | None,
    mask_id: int | None,
) -> Corruption:
    if targets.dim() != 2 or valid.shape != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} and valid {tuple(valid.shape)} must both be [B, R]")
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    indices = _index_list(sample_indices)
    B, R = targets.shape
    if len(indices) != B or t.shape[0] != B:
        raise ValueError(f"batch {B}: got {len(indices)} sample indices and t of shape {tuple(t.shape)}")

    valid_cpu = valid.detach().to("cpu", torch.bool)
    t_slot = expand_t(t.detach().to("cpu", torch.float32), R, block_size)[valid_cpu]  # [N] valid slots, row-major
    counts = valid_cpu.sum(dim=1).tolist()

    # Draw per example, sized by its own valid slots (never by R), in slot order: first the noise coins, then
    # (uniform only) the replacement ids. Boolean indexing is row-major, so concatenation lines up with t_slot.
    # Seeded with empty tensors so that a batch without examples (a packed rank's all-padding micro-batch) works.
    coins, replacements = [torch.empty(0)], [torch.empty(0, dtype=torch.long)]
    for index, n in zip(indices, counts):
        g = sample_generator(seed, index, step, NoisePurpose.CORRUPT)
        coins.append(torch.rand(n, generator=g))
        if vocab_size is not None:
            replacements.append(torch.randint(vocab_size, (n,), generator=g))
    hit = torch.cat(coins) < t_slot  # [N]

    noised = torch.zeros((B, R), dtype=torch.bool)
    noised[valid_cpu] = hit
    new_ids = torch.full((B, R), -1, dtype=torch.long)  # read only where noised
    if vocab_size is not None:
        new_ids[valid_cpu] = torch.cat(replacements)
    else:
        new_ids[valid_cpu] = mask_id

    noised = noised.to(targets.device)
    noisy_ids = torch.where(noised, new_ids.to(device=targets.device, dtype=targets.dtype), targets)
    return Corruption(noisy_ids=noisy_ids, noised=noised)


def _index_list(sample_indices: SampleIndices) -> list[int]:
    if isinstance(sample_indices, Tensor):
        if sample_indices.dim() != 1:
            raise ValueError(f"sample_indices must be 1-D [B], got shape {tuple(sample_indices.shape)}")
        return [int(i) for i in sample_indices.tolist()]
    return [int(i) for i in sample_indices]
