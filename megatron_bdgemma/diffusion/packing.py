"""Packed rows: several records (SFT chats or pretraining documents) share one row, each computed exactly as alone.

docs/design.md §13. A packed micro-batch is defined from the **unpacked** one: the records' own
:class:`~.layout.DiffusionBatch` (one record per row, as ``build_sft_batch`` / ``build_pretrain_batch`` lay it out
today) plus a placement (which row, which offset). So everything a record has alone it keeps by construction:

- its noise: :func:`~.objective.noise_batch` runs on the records' batch with the records' own sample indices, so
  its t, corruption, block choice and self-conditioning coin are the draws it gets unpacked (docs/design.md §7);
- its encoder scope and positions: :func:`pack_batch` copies its valid tokens to ``[start, start + n)`` of its row,
  gives them ``segment_ids`` = the record's index and ``position_ids`` ``0 .. n - 1``, and copies its AR pairs;
  ``masks.EncoderMask(segment_ids=...)`` keeps attention inside the record;
- its canvas: :func:`pack_canvas` moves the record's decoded blocks (with their noisy ids, targets, positions,
  scored slots, weights and coin) into the next free canvas blocks of its row and records, per canvas block, where
  its record's response starts in the row and how long it is, which is what
  ``masks.BlockDiffusionTrainingMask(segment_ids=...)`` needs;
- its images (SFT records with image parts): :func:`pack_batch` gives each row its records' images, record after
  record (the order of their placeholders along the row), and lays each record's ``mm_token_type_ids`` at its offset,
  so the tower encodes the same images and ``masks.EncoderMask`` (whose image groups are cut at record boundaries)
  gives each image's tokens the same keys as alone.

:func:`first_fit_decreasing` is the packing policy. Pure torch and Python on the data pipeline's device (CPU); nothing
here imports megatron or the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .layout import DiffusionBatch, moved_to
from .objective import NoisedCanvas

if TYPE_CHECKING:
    from megatron_bdgemma.vision import Images

__all__ = [
    "canvas_blocks_bound", "first_fit_decreasing", "packing_efficiency", "PackedBatch", "PackedCanvas", "pack_batch",
    "pack_canvas",
]


def first_fit_decreasing(
    lengths: Sequence[int], capacity: int, *, max_records_per_row: int | None = None
) -> list[list[int]]:
    """Rows of record indices, each row's lengths summing to at most ``capacity`` (first-fit decreasing).

    Records are taken longest first (ties by index, so the result is a pure function of ``lengths``), each into the
    first row opened so far that has room (and fewer than ``max_records_per_row`` records, the canvas bound under
    pipeline parallelism), else into a new row. Each row lists its records in placement order. First-fit decreasing
    uses at most 11/9 · OPT + 6/9 rows (Dósa, 2007).

    Raises:
        ValueError: a record is empty or longer than ``capacity`` (named by index), or a bad bound.
    """
    if capacity < 1:
        raise ValueError(f"capacity (data.seq_length) must be >= 1, got {capacity}")
    if max_records_per_row is not None and max_records_per_row < 1:
        raise ValueError(f"max_records_per_row must be >= 1, got {max_records_per_row}")
    if bad := [i for i, n in enumerate(lengths) if not 1 <= n <= capacity]:
        i = bad[0]
        raise ValueError(f"record {i} has {lengths[i]} tokens: a packed record needs 1 to {capacity} (data.seq_length)")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free and (max_records_per_row is None or len(rows[r]) < max_records_per_row):
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def canvas_blocks_bound(
    seq_length: int, block_size: int, *, all_blocks: bool, max_records_per_row: int | None = None,
    documents: bool = False,
) -> int:
    """The most canvas blocks a packed row of ``seq_length`` tokens can need: the fixed canvas of every row under
    pipeline parallelism (``pack_canvas(num_canvas_blocks=...)``) and the planner's bound.

    SFT: a record's response window is whole blocks (its EOS fill) unless it is cut at ``seq_length``, and a record
    cut there fills its row alone. So a row of several records lays out at least ``block_size`` tokens per canvas
    block it needs, at most ``⌊S / B⌋`` blocks, and a row of one record needs at most ``⌈S / B⌉`` (``all_blocks``)
    or one. With one scored block per record (SFT's default) a row also needs no more than it has records.

    Pretraining ``documents`` (``data.reset_document_masks``, every block scored) end in a partial block each, so
    ``k`` documents of ``n_j`` tokens need ``Σ ⌈n_j / B⌉ ≤ ⌈S / B⌉ + k − 1`` blocks (reached: ``k − 1`` one-token
    documents beside one of ``S − k + 1``); ``k`` is at most ``max_records_per_row``, else at most ``S``.
    """
    if documents:
        return -(-seq_length // block_size) + (max_records_per_row or seq_length) - 1
    if all_blocks:
        return -(-seq_length // block_size)
    bound = max(seq_length // block_size, 1)
    return bound if max_records_per_row is None else min(bound, max_records_per_row)


def packing_efficiency(lengths: Sequence[int], rows: Sequence[Sequence[int]], row_len: int) -> float:
    """Valid tokens over row tokens: ``Σ lengths / (rows · row_len)`` (1.0 = no padding)."""
    placed = sum(lengths[i] for row in rows for i in row)
    return placed / max(len(rows) * row_len, 1)


@dataclass(frozen=True, slots=True)
class PackedBatch:
    """A packed micro-batch: the encoder rows ``[B, S]`` and the records they hold (``N`` records).

    The canvas side lives in ``records`` (each record alone, as unpacked) until :func:`pack_canvas` places its noised
    blocks; ``noise_batch(batch.records, sample_indices=<the records' sample indices>, ...)`` noises it.
    """

    input_ids: Tensor
    """``[B, S]`` long: the records' clean ids (prompt, response, EOS fill) back to back, then ``pad_id``."""
    encoder_valid: Tensor
    """``[B, S]`` bool: True on records' tokens, False on the row's padding."""
    segment_ids: Tensor
    """``[B, S]`` long: the record index (into ``records``) of each token, -1 on padding."""
    position_ids: Tensor
    """``[B, S]`` long: positions restarting at 0 on each record's first token (0 on padding)."""
    ar_labels: Tensor
    """``[B, S]`` long: each record's own next-token labels (``pad_id`` where not ``ar_loss_mask``)."""
    ar_loss_mask: Tensor
    """``[B, S]`` bool: each record's own next-token pairs; never a pair across two records."""
    records: DiffusionBatch
    """``[N, S_rec]``: the records alone, one per row (the unpacked micro-batch)."""
    record_rows: Tensor
    """``[N]`` long: the row holding each record."""
    record_starts: Tensor
    """``[N]`` long: the row index of each record's first token."""
    pad_id: int
    images: Images | None = None
    """The rows' images (``mm_token_type_ids`` ``[B, S]`` at each record's offset, the images in placeholder order
    along the rows), which the trainer gives to the model's training passes; None: text records."""

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        """``S``, the row length."""
        return self.input_ids.shape[1]

    @property
    def block_size(self) -> int:
        return self.records.block_size

    def to(self, device: torch.device | str) -> PackedBatch:
        """A copy with every tensor (the records' too) moved to ``device``."""
        return moved_to(self, device)


@dataclass(frozen=True)
class PackedCanvas:
    """The decoder's inputs for packed rows: canvas block ``c`` of row ``b`` holds one decoded block of one record.

    ``noised`` is a :class:`~.objective.NoisedCanvas` over rows (``R' = C · block_size``) whose ``block_ids``
    ``[B, C]`` are record-relative (-1 = unused canvas block) and whose ``self_conditioning`` is per slot ``[B, R']``
    (each record's coin on its own blocks), which ``BDGemmaModel.decode`` accepts in place of per-row coins.
    """

    noised: NoisedCanvas
    response_starts: Tensor
    """``[B, C]`` long: row index where the canvas block's record response starts (``start + p``); 0 if unused."""
    response_lens: Tensor
    """``[B, C]`` long: the canvas block's record's response length (EOS fill included); 0 if unused."""
    canvas_records: Tensor
    """``[B, C]`` long: the record (index into ``PackedBatch.records``) of each canvas block; -1 if unused."""

    def to(self, device: torch.device | str) -> PackedCanvas:
        """A copy with every tensor moved to ``device``."""
        return moved_to(self, device)


def pack_batch(
    records: DiffusionBatch, rows: Sequence[Sequence[int]], *, pad_id: int, seq_len: int | None = None
) -> PackedBatch:
    """Place each record's valid tokens back to back in its row (the order ``rows`` lists them).

    Args:
        records: the records alone (``build_sft_batch`` / ``build_pretrain_batch``), right-padded rows.
        rows: a partition of ``range(N)``: the records of each packed row (e.g. :func:`first_fit_decreasing`).
        pad_id: id written into the rows' padding.
        seq_len: the row length ``S`` (``data.seq_length``: fixed under pipeline parallelism); None = the longest
            row.

    Raises:
        ValueError: ``rows`` does not place every record exactly once, or a row exceeds ``seq_len``.
    """
    n = records.batch_size
    placed = sorted(i for row in rows for i in row)
    if placed != list(range(n)):
        raise ValueError(f"rows must place each of the {n} records exactly once, got {[list(r) for r in rows]}")
    lengths = records.encoder_valid.sum(dim=1).tolist()
    if bad := [i for i in range(n) if not bool(records.encoder_valid[i, : lengths[i]].all())]:
        raise ValueError(f"records {bad}: valid tokens must start at position 0 (lay records out with diffusion.layout)")
    totals = [sum(lengths[i] for i in row) for row in rows]
    S = max(totals, default=0) if seq_len is None else seq_len
    if bad := [b for b, total in enumerate(totals) if total > S]:
        raise ValueError(f"packed rows {bad} hold {[totals[b] for b in bad]} tokens, more than seq_len {S}")

    device = records.input_ids.device
    shape = (len(rows), S)
    input_ids = torch.full(shape, pad_id, dtype=torch.long, device=device)
    ar_labels = torch.full(shape, pad_id, dtype=torch.long, device=device)
    encoder_valid = torch.zeros(shape, dtype=torch.bool, device=device)
    ar_loss_mask = torch.zeros(shape, dtype=torch.bool, device=device)
    segment_ids = torch.full(shape, -1, dtype=torch.long, device=device)
    position_ids = torch.zeros(shape, dtype=torch.long, device=device)
    record_rows = torch.zeros(n, dtype=torch.long)
    record_starts = torch.zeros(n, dtype=torch.long)
    images = records.images
    types = None if images is None else torch.zeros(shape, dtype=images.mm_token_type_ids.dtype, device=device)
    for b, row in enumerate(rows):
        start = 0
        for i in row:
            span = slice(start, start + lengths[i])
            input_ids[b, span] = records.input_ids[i, : lengths[i]]
            # The record's last token has no successor inside it, so no pair crosses into the next record.
            ar_labels[b, span] = records.ar_labels[i, : lengths[i]]
            ar_loss_mask[b, span] = records.ar_loss_mask[i, : lengths[i]]
            encoder_valid[b, span] = True
            segment_ids[b, span] = i
            position_ids[b, span] = torch.arange(lengths[i], device=device)
            if types is not None:
                types[b, span] = images.mm_token_type_ids[i, : lengths[i]]
            record_rows[i], record_starts[i] = b, start
            start += lengths[i]
    if images is not None:
        # Row by row, record by record: the order of the placeholders along the packed rows.
        placed = images.select([i for row in rows for i in row])
        owner = torch.tensor([b for b, row in enumerate(rows) for _ in row], dtype=torch.long, device=device)
        images = dataclasses.replace(placed, mm_token_type_ids=types, image_rows=owner[placed.image_rows])
    return PackedBatch(
        input_ids, encoder_valid, segment_ids, position_ids, ar_labels, ar_loss_mask, records,
        record_rows.to(device), record_starts.to(device), pad_id, images,
    )


def pack_canvas(batch: PackedBatch, noised: NoisedCanvas, *, num_canvas_blocks: int | None = None) -> PackedCanvas:
    """Move each record's decoded blocks (``noised``: ``noise_batch`` of ``batch.records``) onto its row's canvas.

    A record's blocks that hold at least one response token go, in order, into the next free canvas blocks of its
    row, records in their row's order (a record with no response, AR loss only, takes none). Unused canvas blocks are invalid (block id -1): they
    attend only to themselves and are never scored.

    Args:
        num_canvas_blocks: ``C``, canvas blocks per row (fixed under pipeline parallelism); None = the most any
            row needs (at least 1).

    Raises:
        ValueError: ``noised`` does not belong to ``batch.records``, or a row needs more than ``num_canvas_blocks``.
    """
    records, bs = batch.records, batch.block_size
    if noised.block_ids.shape[0] != records.batch_size or noised.canvas_ids.shape[1] != noised.block_ids.shape[1] * bs:
        raise ValueError(
            f"noised canvas {tuple(noised.canvas_ids.shape)} with block_ids {tuple(noised.block_ids.shape)} does not "
            f"belong to the {records.batch_size} packed records (block size {bs})"
        )
    block_ids, response_lens = noised.block_ids.cpu(), records.response_lens.cpu()
    placed: list[list[tuple[int, int]]] = [[] for _ in range(batch.batch_size)]  # per row: (record, its canvas block)
    row_order = sorted(range(records.batch_size), key=lambda i: (int(batch.record_rows[i]), int(batch.record_starts[i])))
    for i in row_order:
        for c, block in enumerate(block_ids[i].tolist()):
            if 0 <= block and block * bs < response_lens[i]:
                placed[int(batch.record_rows[i])].append((i, c))
    needed = max((len(p) for p in placed), default=0)
    C = max(needed, 1) if num_canvas_blocks is None else num_canvas_blocks
    if needed > C:
        raise ValueError(f"a packed row needs {needed} canvas blocks, more than num_canvas_blocks {C}")

    B, device = batch.batch_size, noised.canvas_ids.device
    slots = (B, C * bs)
    canvas_ids = torch.full(slots, batch.pad_id, dtype=noised.canvas_ids.dtype, device=device)
    targets = torch.full(slots, batch.pad_id, dtype=noised.targets.dtype, device=device)
    positions = torch.zeros(slots, dtype=noised.position_ids.dtype, device=device)
    scored = torch.zeros(slots, dtype=torch.bool, device=device)
    weights = torch.zeros(slots, dtype=noised.weights.dtype, device=device)
    coins = torch.zeros(slots, dtype=torch.bool, device=device)
    shift = None if noised.logit_shift is None else torch.zeros(slots, dtype=noised.logit_shift.dtype, device=device)
    out_blocks = torch.full((B, C), -1, dtype=torch.long)
    starts, lens = torch.zeros((B, C), dtype=torch.long), torch.zeros((B, C), dtype=torch.long)
    owners = torch.full((B, C), -1, dtype=torch.long)
    for b, row in enumerate(placed):
        for c, (i, source) in enumerate(row):
            src, dst = slice(source * bs, (source + 1) * bs), slice(c * bs, (c + 1) * bs)
            canvas_ids[b, dst] = noised.canvas_ids[i, src]
            targets[b, dst] = noised.targets[i, src]
            positions[b, dst] = noised.position_ids[i, src]
            scored[b, dst] = noised.scored[i, src]
            weights[b, dst] = noised.weights[i, src]
            coins[b, dst] = noised.self_conditioning[i]
            if shift is not None:
                shift[b, dst] = noised.logit_shift[i, src]
            out_blocks[b, c] = block_ids[i, source]
            starts[b, c] = int(batch.record_starts[i]) + int(records.prefix_lens[i])
            lens[b, c], owners[b, c] = response_lens[i], i
    rows_noised = NoisedCanvas(canvas_ids, targets, positions, out_blocks.to(device), scored, weights, coins, shift)
    return PackedCanvas(rows_noised, starts.to(device), lens.to(device), owners.to(device))
