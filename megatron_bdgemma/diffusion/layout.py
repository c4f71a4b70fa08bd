"""Batch layout for block-diffusion training: the response window and its canvas.

Contract (docs/design.md §5, §7). A training example is a right-padded token row::

    [ prompt (p tokens) | response (+ EOS block fill) | global pad ]
      positions 0..p-1    p .. p+L-1                   p+L .. S-1

The **encoder** runs causally over the clean row (prompt + response + fill); global pad is neither attended
nor scored. The **canvas** holds the response only, left-aligned: canvas slot ``j`` of example ``b`` is the
response token at absolute position ``p_b + j``, so its RoPE equals that of its clean copy in the encoder.
Blocks are counted from the response start (block of slot ``j`` is ``j // block_size``), not from position 0.

This module only arranges tokens. It knows nothing about the model, noise or losses; everything here is pure
torch on whatever device the inputs live on (normally CPU, in the data pipeline).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DiffusionBatch", "build_sft_batch", "build_pretrain_batch", "block_mask", "take_blocks"]


@dataclass(frozen=True, slots=True)
class DiffusionBatch:
    """Everything the training forward needs about one micro-batch (batch-first tensors).

    ``B`` = batch size, ``S`` = encoder length, ``R`` = canvas length (``R <= S``, a multiple of
    ``block_size``: the largest response rounded up to whole blocks).
    """

    input_ids: Tensor
    """``[B, S]`` long. Clean ids: prompt + response + EOS fill, then ``pad_id``. The encoder input."""
    encoder_valid: Tensor
    """``[B, S]`` bool. True on prompt, response and fill; False on global pad (never attended)."""
    prefix_lens: Tensor
    """``[B]`` long. Prompt length ``p_b`` (0 for pretraining): the response starts at position ``p_b``."""
    response_lens: Tensor
    """``[B]`` long. Response length including the EOS fill, so ``encoder_valid[b].sum() == p_b + L_b``.
    SFT: a multiple of ``block_size``. Pretraining: the valid length, whose last block may be partial."""
    canvas_targets: Tensor
    """``[B, R]`` long. Clean response token for canvas slot ``j`` (= ``input_ids[b, p_b + j]``);
    ``pad_id`` where not ``canvas_valid``."""
    canvas_valid: Tensor
    """``[B, R]`` bool. ``j < response_lens[b]``: the slot holds a real (supervised, noisable) token."""
    canvas_position_ids: Tensor
    """``[B, R]`` long. Absolute position ``p_b + j`` (clamped to ``S - 1`` on invalid slots, which only
    attend to themselves, so their position is irrelevant)."""
    ar_labels: Tensor
    """``[B, S]`` long. Next-token labels: ``input_ids[b, i + 1]``; ``pad_id`` where not ``ar_loss_mask``."""
    ar_loss_mask: Tensor
    """``[B, S]`` bool. ``encoder_valid[b, i] & encoder_valid[b, i + 1]``: every valid pair, prompt included."""
    block_size: int
    """Canvas block length ``B_blk`` (256 for DiffusionGemma)."""

    def __post_init__(self) -> None:
        B, S = self.input_ids.shape
        R = self.canvas_targets.shape[1]
        expected = {
            "encoder_valid": (B, S),
            "prefix_lens": (B,),
            "response_lens": (B,),
            "canvas_targets": (B, R),
            "canvas_valid": (B, R),
            "canvas_position_ids": (B, R),
            "ar_labels": (B, S),
            "ar_loss_mask": (B, S),
        }
        bad = [
            f"{name} {tuple(getattr(self, name).shape)} != {shape}"
            for name, shape in expected.items()
            if tuple(getattr(self, name).shape) != shape
        ]
        if bad:
            raise ValueError("DiffusionBatch shape mismatch: " + "; ".join(bad))
        if self.block_size < 1 or R % self.block_size != 0:
            raise ValueError(f"canvas length R ({R}) must be a positive multiple of block_size ({self.block_size})")

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        """``S``, the encoder length."""
        return self.input_ids.shape[1]

    @property
    def canvas_len(self) -> int:
        """``R``, the canvas length (a multiple of ``block_size``)."""
        return self.canvas_targets.shape[1]

    @property
    def num_blocks(self) -> int:
        """``R // block_size``: canvas blocks in the widest example."""
        return self.canvas_len // self.block_size

    @property
    def blocks_per_example(self) -> Tensor:
        """``[B]`` long: blocks holding at least one response token, ``ceil(response_lens / block_size)``."""
        return (self.response_lens + self.block_size - 1) // self.block_size

    def to(self, device: torch.device | str) -> DiffusionBatch:
        """A copy with every tensor moved to ``device``."""
        moved = {
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), Tensor) else v)
            for f in dataclasses.fields(self)
        }
        return DiffusionBatch(**moved)


def build_sft_batch(
    input_ids: Tensor,
    loss_mask: Tensor,
    valid: Tensor,
    *,
    block_size: int,
    eos_id: int,
    pad_id: int,
    seq_multiple_of: int = 1,
) -> DiffusionBatch:
    """Lay out right-padded single-turn chat examples for block-diffusion SFT.

    The prompt is everything before the first supervised token; the response is the supervised span, which must
    be contiguous (one supervised turn). The response is then filled with ``eos_id`` up to a multiple of
    ``block_size`` (**EOS block fill**): the fill is supervised, attended and written into the clean ids, so the
    model learns to end an answer by emitting EOS for the rest of its block. Valid but unsupervised tokens after
    the supervised span (e.g. a template's trailing newline) are dropped: the fill takes their place, exactly as
    generation would continue after the answer. ``S`` grows with pad when the fill does not fit; nothing is
    truncated (budget the sequence length in the data pipeline).

    Args:
        input_ids: ``[B, S]`` token ids, right-padded.
        loss_mask: ``[B, S]`` nonzero on supervised tokens.
        valid: ``[B, S]`` bool, True on real tokens; each row must be ``True…True False…False``.
        block_size: canvas block length.
        eos_id: id written into the EOS block fill.
        pad_id: id written into global pad (also canvas/label filler where nothing is scored).
        seq_multiple_of: round the output ``S`` up to a multiple of this (e.g. 16 for FP8 kernels).

    Returns:
        A :class:`DiffusionBatch` with ``S_out = roundup(max(S, max_b(p_b + L_b)), seq_multiple_of)``.

    Raises:
        ValueError: on bad shapes, non-right-padded ``valid``, supervised tokens outside ``valid``, an example
            with no supervised token, or an example with more than one supervised span (all offenders listed).
    """
    input_ids, valid = _check_rows(input_ids, valid, block_size, seq_multiple_of)
    supervised = loss_mask.to(torch.bool)
    if supervised.shape != input_ids.shape:
        raise ValueError(f"loss_mask shape {tuple(supervised.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if bad := _rows(supervised & ~valid):
        raise ValueError(f"examples {bad}: supervised tokens lie outside valid (global pad)")

    # A supervised run starts where the mask rises; more than one run means more than one supervised turn.
    starts = supervised & ~_shift_right(supervised)
    num_spans = starts.sum(dim=1)
    problems = [
        f"example {b} has no supervised token"
        if num_spans[b] == 0
        else f"example {b} has {int(num_spans[b])} supervised spans {_spans(supervised[b])} (half-open [start, end))"
        for b in _rows(num_spans != 1)
    ]
    if problems:
        raise ValueError(
            "build_sft_batch needs exactly one contiguous supervised span (a single supervised turn) per example: "
            + "; ".join(problems)
        )

    B, S = input_ids.shape
    device = input_ids.device
    prefix_lens = supervised.to(torch.int8).argmax(dim=1)  # first supervised position
    answer_lens = supervised.sum(dim=1)
    response_lens = _round_up(answer_lens, block_size)  # answer + EOS fill
    ends = prefix_lens + response_lens  # first global-pad position

    S_out = _round_up(max(S, int(ends.max())), seq_multiple_of)
    pos = torch.arange(S_out, device=device)[None, :]  # [1, S_out]
    ids = torch.full((B, S_out), pad_id, dtype=input_ids.dtype, device=device)
    ids[:, :S] = input_ids
    answer_end = (prefix_lens + answer_lens)[:, None]
    ids = torch.where(pos < answer_end, ids, torch.where(pos < ends[:, None], eos_id, pad_id))
    encoder_valid = pos < ends[:, None]
    return _assemble(ids, encoder_valid, prefix_lens, response_lens, block_size, pad_id)


def build_pretrain_batch(
    input_ids: Tensor,
    *,
    block_size: int,
    valid: Tensor | None = None,
    pad_id: int,
) -> DiffusionBatch:
    """Lay out document rows for block-diffusion pretraining: prefix 0, the whole valid row is the response.

    ``S`` is padded with ``pad_id`` (invalid) up to a multiple of ``block_size`` so the canvas can cover the whole
    row; no EOS fill is added (documents are packed text, not answers), so an example's last block may be partial:
    ``response_lens`` is the valid length and the canvas slots past it are invalid.

    Args:
        input_ids: ``[B, S]`` token ids.
        block_size: canvas block length.
        valid: ``[B, S]`` bool, right-padded (``True…True False…False``); default all True.
        pad_id: id written into padding.

    Returns:
        A :class:`DiffusionBatch` with ``S_out = roundup(S, block_size)`` and ``R = roundup(max valid, block_size)``
        (at least one block).
    """
    if valid is None:
        valid = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    input_ids, valid = _check_rows(input_ids, valid, block_size, 1)
    B, S = input_ids.shape
    S_out = _round_up(S, block_size)
    ids = torch.full((B, S_out), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    ids[:, :S] = torch.where(valid, input_ids, pad_id)
    encoder_valid = torch.zeros((B, S_out), dtype=torch.bool, device=input_ids.device)
    encoder_valid[:, :S] = valid
    prefix_lens = torch.zeros(B, dtype=torch.long, device=input_ids.device)
    return _assemble(ids, encoder_valid, prefix_lens, valid.sum(dim=1), block_size, pad_id)


def block_mask(block_index: Tensor, canvas_valid: Tensor, block_size: int) -> Tensor:
    """Scored canvas slots when one block per example is chosen.

    Args:
        block_index: ``[B]`` long, the chosen block of each example.
        canvas_valid: ``[B, R]`` bool.
        block_size: canvas block length.

    Returns:
        ``[B, R]`` bool: ``canvas_valid & (j // block_size == block_index[b])``.
    """
    R = canvas_valid.shape[1]
    slot_block = torch.arange(R, device=canvas_valid.device) // block_size  # [R]
    return canvas_valid & (slot_block[None, :] == block_index.to(canvas_valid.device)[:, None])


def take_blocks(x: Tensor, block_index: Tensor, block_size: int) -> Tensor:
    """Gather one canvas block per example, e.g. to decode only the scored block.

    Canvas blocks never attend to each other (docs/design.md §5), so decoding just the chosen block gives the same
    logits and gradients as decoding the whole canvas and scoring that block.

    Args:
        x: ``[B, R, *rest]`` (canvas ids, positions, targets, masks, hidden states …).
        block_index: ``[B]`` long.
        block_size: canvas block length.

    Returns:
        ``[B, block_size, *rest]``: ``x[b, block_index[b] * block_size + k]``.
    """
    B, R = x.shape[:2]
    idx = block_index.to(x.device)[:, None] * block_size + torch.arange(block_size, device=x.device)[None, :]
    if int(idx.max()) >= R:
        raise ValueError(f"block_index {block_index.tolist()} out of range for canvas length {R}")
    idx = idx.view(B, block_size, *([1] * (x.dim() - 2))).expand(B, block_size, *x.shape[2:])
    return torch.gather(x, 1, idx)


# ----------------------------------------------------------------------------------------------------------------
# internals


def _assemble(
    ids: Tensor,
    encoder_valid: Tensor,
    prefix_lens: Tensor,
    response_lens: Tensor,
    block_size: int,
    pad_id: int,
) -> DiffusionBatch:
    """Derive the canvas and AR label views from the final clean ids ``[B, S]``."""
    B, S = ids.shape
    device = ids.device
    # At least one block so an all-empty pretraining batch still has a canvas to decode.
    R = max(int(_round_up(response_lens, block_size).max()), block_size)
    j = torch.arange(R, device=device)[None, :]  # [1, R]
    canvas_valid = j < response_lens[:, None]
    src = (prefix_lens[:, None] + j).clamp(max=S - 1)  # absolute position of canvas slot j
    canvas_targets = torch.where(canvas_valid, torch.gather(ids, 1, src), pad_id)

    # Next-token pairs (i, i+1) with both ends valid; the last position has no successor.
    ar_loss_mask = torch.zeros_like(encoder_valid)
    ar_loss_mask[:, :-1] = encoder_valid[:, :-1] & encoder_valid[:, 1:]
    ar_labels = torch.full_like(ids, pad_id)
    ar_labels[:, :-1] = ids[:, 1:]
    ar_labels = torch.where(ar_loss_mask, ar_labels, pad_id)

    return DiffusionBatch(
        input_ids=ids,
        encoder_valid=encoder_valid,
        prefix_lens=prefix_lens.long(),
        response_lens=response_lens.long(),
        canvas_targets=canvas_targets,
        canvas_valid=canvas_valid,
        canvas_position_ids=src,
        ar_labels=ar_labels,
        ar_loss_mask=ar_loss_mask,
        block_size=block_size,
    )


def _check_rows(input_ids: Tensor, valid: Tensor, block_size: int, seq_multiple_of: int) -> tuple[Tensor, Tensor]:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    if valid.shape != input_ids.shape:
        raise ValueError(f"valid shape {tuple(valid.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if block_size < 1 or seq_multiple_of < 1:
        raise ValueError(f"block_size ({block_size}) and seq_multiple_of ({seq_multiple_of}) must be >= 1")
    valid = valid.to(torch.bool)
    # Right padding only: a valid token after an invalid one would break "positions are 0..n-1".
    if bad := _rows(valid[:, 1:] & ~valid[:, :-1]):
        raise ValueError(f"examples {bad}: valid must be right-padded (True...True False...False)")
    return input_ids.long(), valid


def _shift_right(x: Tensor) -> Tensor:
    """``out[:, i] = x[:, i - 1]``, ``out[:, 0] = False``."""
    out = torch.zeros_like(x)
    out[:, 1:] = x[:, :-1]
    return out


def _round_up(x, multiple: int):
    return (x + multiple - 1) // multiple * multiple


def _rows(flags: Tensor) -> list[int]:
    """Indices of rows with any True (for error messages)."""
    if flags.dim() > 1:
        flags = flags.any(dim=1)
    return flags.nonzero().flatten().tolist()


def _spans(row: Tensor) -> list[tuple[int, int]]:
    """Half-open ``[start, end)`` runs of True in a 1-D bool tensor."""
    padded = torch.cat([row.new_zeros(1), row, row.new_zeros(1)]).to(torch.int8)
    edges = (padded[1:] - padded[:-1]).nonzero().flatten().tolist()
    return list(zip(edges[0::2], edges[1::2]))
