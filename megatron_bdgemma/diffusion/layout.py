"""Batch layout for block-diffusion training: the response window and its canvas.

Contract (docs/design.md §5, §7). A training example is a token row::

    [ prompt (p tokens) | response window (+ EOS block fill) | global pad ]
      positions 0..p-1    p .. p+L-1                          p+L .. S-1

The **encoder** runs causally over the clean row (prompt + response window + fill); global pad is neither attended
nor scored. The **canvas** holds the response window only, left-aligned: canvas slot ``j`` of example ``b`` is the
token at absolute position ``p_b + j``, so its RoPE equals that of its clean copy in the encoder. Blocks are counted
from the response start (block of slot ``j`` is ``j // block_size``), not from position 0. Inside the window only
*supervised* slots are noised and scored; other valid slots (SFT: a template's trailing newline, the user turns
between assistant turns) sit on the canvas clean and are attended like any other slot.

This module only arranges tokens. It knows nothing about the model, noise or losses; everything here is pure
torch on whatever device the inputs live on (normally CPU, in the data pipeline).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from megatron_bdgemma.vision import Images

__all__ = ["DiffusionBatch", "moved_to", "build_sft_batch", "build_pretrain_batch", "block_mask", "take_blocks"]


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
    """``[B]`` long. Response window length including the EOS fill, so ``encoder_valid[b].sum() == p_b + L_b``.
    SFT: a multiple of ``block_size`` unless the row was cut at ``max_len``; 0 for a row with no supervised token.
    Pretraining: the valid length, whose last block may be partial."""
    canvas_targets: Tensor
    """``[B, R]`` long. Clean response token for canvas slot ``j`` (= ``input_ids[b, p_b + j]``);
    ``pad_id`` where not ``canvas_valid``."""
    canvas_valid: Tensor
    """``[B, R]`` bool. ``j < response_lens[b]``: the slot holds a real token (attended by its block)."""
    canvas_supervised: Tensor
    """``[B, R]`` bool, within ``canvas_valid``: the slots that are noised and scored. SFT: the supervised tokens
    and the EOS fill; valid unsupervised slots stay clean. Pretraining: every valid slot."""
    canvas_position_ids: Tensor
    """``[B, R]`` long. Absolute position ``p_b + j`` (clamped to ``S - 1`` on invalid slots, which only
    attend to themselves, so their position is irrelevant)."""
    ar_labels: Tensor
    """``[B, S]`` long. Next-token labels: ``input_ids[b, i + 1]``; ``pad_id`` where not ``ar_loss_mask``."""
    ar_loss_mask: Tensor
    """``[B, S]`` bool. ``encoder_valid[b, i] & encoder_valid[b, i + 1]``: every valid pair, prompt included."""
    block_size: int
    """Canvas block length ``B_blk`` (256 for DiffusionGemma)."""
    images: Images | None = None
    """SFT records with image parts: the batch's images (``mm_token_type_ids`` ``[B, S]``), which the trainer gives
    to the model's training passes; None: text."""

    def __post_init__(self) -> None:
        B, S = self.input_ids.shape
        R = self.canvas_targets.shape[1]
        expected = {
            "encoder_valid": (B, S),
            "prefix_lens": (B,),
            "response_lens": (B,),
            "canvas_targets": (B, R),
            "canvas_valid": (B, R),
            "canvas_supervised": (B, R),
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
        if bad := _rows(self.canvas_supervised & ~self.canvas_valid):
            raise ValueError(f"DiffusionBatch examples {bad}: canvas_supervised outside canvas_valid")
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

    def select(self, rows: list[int]) -> DiffusionBatch:
        """The examples ``rows``, in that order (none: an empty batch of the same widths), with exactly their images
        (``Images.select``)."""
        index = torch.tensor(rows, dtype=torch.long)
        return DiffusionBatch(**{
            f.name: (v[index.to(v.device)] if isinstance(v := getattr(self, f.name), Tensor) else v)
            for f in dataclasses.fields(self) if f.name != "images"
        }, images=None if self.images is None else self.images.select(rows))

    def to(self, device: torch.device | str) -> DiffusionBatch:
        """A copy with every tensor moved to ``device``."""
        return moved_to(self, device)


def moved_to(batch, device: torch.device | str):
    """A copy of the dataclass ``batch`` (DiffusionBatch, NoisedCanvas, the packed ones) with every field that moves
    on ``device``: tensors, and batches nested in it; None, ints and the like as they are."""
    return dataclasses.replace(batch, **{
        f.name: value.to(device) for f in dataclasses.fields(batch) if hasattr(value := getattr(batch, f.name), "to")
    })


def build_sft_batch(
    input_ids: Tensor,
    loss_mask: Tensor,
    valid: Tensor,
    *,
    block_size: int,
    eos_id: int,
    pad_id: int,
    seq_multiple_of: int = 1,
    max_len: int | None = None,
) -> DiffusionBatch:
    """Lay out chat examples for block-diffusion SFT, by NeMo Automodel's response-window rules (docs/design.md §7).

    Per example (its valid tokens, cut to ``max_len`` when given):

    - the prompt is everything before the **first** supervised token; the response window runs from there to the
      last valid token. Supervised tokens inside it (every assistant turn of a multi-turn chat, or only the final
      one under ``data.mask_history``: then the earlier turns are prompt, nothing special here) are noised and
      scored; valid unsupervised ones (a template's newline after the turn, the user turns between assistant
      turns) stay clean, unscored and attended, on the canvas and in the encoder;
    - **EOS block fill**: after the last valid token the window is filled with ``eos_id`` up to a whole number of
      blocks (counted from the response start); the fill is supervised, attended and written into the clean ids,
      so the model learns to end an answer with EOS for the rest of its block;
    - an example with no supervised token is all prompt: no window, no fill, AR loss only (``response_lens`` 0,
      ``prefix_lens`` = ``S``, as the reference);
    - ``S = roundup(max(S_in, max_b(end of fill)), seq_multiple_of)``, then capped at ``max_len``: a fill (or
      content) that crosses ``max_len`` is cut there, which leaves a partial last block (the reference's
      truncation).

    Args:
        input_ids: ``[B, S_in]`` token ids.
        loss_mask: ``[B, S_in]`` nonzero on supervised tokens.
        valid: ``[B, S_in]`` bool, True on real tokens: one contiguous run per row (left or right padding); rows are
            shifted so their content starts at position 0.
        block_size: canvas block length.
        eos_id: id written into the EOS block fill.
        pad_id: id written into global pad (also canvas/label filler where nothing is scored).
        seq_multiple_of: round the output ``S`` up to a multiple of this (e.g. 16 for FP8 kernels).
        max_len: cap on the output ``S`` (``data.seq_length``); None = no cap.

    Returns:
        A :class:`DiffusionBatch`.

    Raises:
        ValueError: on bad shapes, a row whose valid tokens are not one contiguous run, or supervised tokens
            outside ``valid`` (offending examples listed).
    """
    input_ids, valid = _check_rows(input_ids, valid, block_size, seq_multiple_of)
    supervised = loss_mask.to(torch.bool)
    if supervised.shape != input_ids.shape:
        raise ValueError(f"loss_mask shape {tuple(supervised.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if bad := _rows(supervised & ~valid):
        raise ValueError(f"examples {bad}: supervised tokens lie outside valid (padding)")
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")

    B, S_in = input_ids.shape
    device = input_ids.device
    # Shift every row left so its content starts at position 0 (left padding becomes right padding).
    first_valid = valid.to(torch.int8).argmax(dim=1)
    shift = (torch.arange(S_in, device=device)[None, :] + first_valid[:, None]).clamp(max=S_in - 1)
    lengths = valid.sum(dim=1)
    if max_len is not None:
        lengths = lengths.clamp(max=max_len)
    content = torch.arange(S_in, device=device)[None, :] < lengths[:, None]
    input_ids = torch.where(content, torch.gather(input_ids, 1, shift), pad_id)
    supervised = content & torch.gather(supervised, 1, shift)

    has_answer, first, ends = response_windows(lengths, supervised, block_size)

    S = _round_up(max(S_in, int(ends.max())), seq_multiple_of)
    if max_len is not None:
        S = min(S, max_len)
    ends = ends.clamp(max=S)
    pos = torch.arange(S, device=device)[None, :]  # [1, S]
    width = min(S, S_in)
    ids = torch.full((B, S), pad_id, dtype=input_ids.dtype, device=device)
    ids[:, :width] = input_ids[:, :width]
    is_content = pos < lengths[:, None]
    fill = ~is_content & (pos < ends[:, None])
    ids = torch.where(fill, eos_id, ids)
    scored = torch.zeros((B, S), dtype=torch.bool, device=device)
    scored[:, :width] = supervised[:, :width]
    scored = scored | fill
    prefix_lens = torch.where(has_answer, first, S)  # a row with no answer is all prompt
    return _assemble(ids, pos < ends[:, None], prefix_lens, ends - prefix_lens.clamp(max=ends), block_size, pad_id,
                     supervised=scored)


def response_windows(lengths: Tensor, supervised: Tensor, block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """`build_sft_batch`'s response windows, from each example's `[B]` valid length and `[B, S]` supervised tokens
    (content left-aligned): whether it has an answer, where the answer starts (its first supervised token), and where
    its EOS block fill ends (a whole number of blocks after that start; the length itself without an answer)."""
    has_answer = supervised.any(dim=1)
    first = supervised.to(torch.int8).argmax(dim=1)
    ends = torch.where(has_answer, first + _round_up(lengths - first, block_size), lengths)
    return has_answer, first, ends


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
    if bad := _rows(valid[:, 1:] & ~valid[:, :-1]):
        raise ValueError(f"examples {bad}: valid must be right-padded (True...True False...False)")
    B, S = input_ids.shape
    S_out = _round_up(S, block_size)
    ids = torch.full((B, S_out), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    ids[:, :S] = torch.where(valid, input_ids, pad_id)
    encoder_valid = torch.zeros((B, S_out), dtype=torch.bool, device=input_ids.device)
    encoder_valid[:, :S] = valid
    prefix_lens = torch.zeros(B, dtype=torch.long, device=input_ids.device)
    return _assemble(ids, encoder_valid, prefix_lens, valid.sum(dim=1), block_size, pad_id)


def block_mask(block_index: Tensor, canvas_supervised: Tensor, block_size: int) -> Tensor:
    """Scored canvas slots when one block per example is chosen.

    Args:
        block_index: ``[B]`` long, the chosen block of each example.
        canvas_supervised: ``[B, R]`` bool, the scorable slots (``DiffusionBatch.canvas_supervised``).
        block_size: canvas block length.

    Returns:
        ``[B, R]`` bool: ``canvas_supervised & (j // block_size == block_index[b])``.
    """
    R = canvas_supervised.shape[1]
    slot_block = torch.arange(R, device=canvas_supervised.device) // block_size  # [R]
    return canvas_supervised & (slot_block[None, :] == block_index.to(canvas_supervised.device)[:, None])


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
    if idx.numel() and int(idx.max()) >= R:
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
    *,
    supervised: Tensor | None = None,
) -> DiffusionBatch:
    """Derive the canvas and AR label views from the final clean ids ``[B, S]``.

    ``supervised`` ``[B, S]``: the noised and scored positions; None = every valid position (pretraining).
    """
    B, S = ids.shape
    device = ids.device
    # At least one block so an all-empty pretraining batch still has a canvas to decode.
    R = max(int(_round_up(response_lens, block_size).max()), block_size)
    j = torch.arange(R, device=device)[None, :]  # [1, R]
    canvas_valid = j < response_lens[:, None]
    src = (prefix_lens[:, None] + j).clamp(max=S - 1)  # absolute position of canvas slot j
    canvas_targets = torch.where(canvas_valid, torch.gather(ids, 1, src), pad_id)
    canvas_supervised = canvas_valid if supervised is None else canvas_valid & torch.gather(supervised, 1, src)

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
        canvas_supervised=canvas_supervised,
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
    # One contiguous run of real tokens per row: a gap would break "positions are 0..n-1".
    runs = (valid & ~_shift_right(valid)).sum(dim=1)
    if bad := _rows(runs > 1):
        raise ValueError(f"examples {bad}: valid tokens must be one contiguous run (left or right padding only)")
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
