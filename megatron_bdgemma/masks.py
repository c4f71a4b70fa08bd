"""Attention masks: the causal encoder, the block-diffusion canvas (training and inference), and conversions.

Each mask is a **rule**: a small object that answers "may query ``q`` of batch row ``b`` attend to key ``k``?" for
any broadcastable index tensors (:meth:`AttentionMask.allowed_at`), without ever holding the ``[Q, K]`` grid. The
rule is the one place the masking semantics live; everything else derives from it:

- :meth:`~AttentionMask.dense` -- the whole ``[B, 1, Q, K]`` boolean grid, ``True`` = attend (``1`` broadcasts over
  heads), for the eager reference attention; built once per rule and cached;
- :meth:`~AttentionMask.tile` and :meth:`~AttentionMask.key_spans` -- one query chunk's rows over only the key
  ranges it can see, for the block-sparse attention, whose memory then grows with ``S·chunk``, not ``S·K``;
- the same :meth:`~AttentionMask.allowed_at` is a FlexAttention ``mask_mod`` as it stands (``b, q, k`` scalars);
  :meth:`~AttentionMask.block_mask` wraps it in a ``BlockMask`` for the ``flex`` attention, cached like the grid.

The sliding window always lives inside the rule, so attention kernels never get a separate ``window_size``
(docs/design.md §4). Backend conventions for dense grids are derived at the edge by :func:`to_megatron`,
:func:`to_sdpa` and :func:`to_additive`. Every row keeps at least one allowed key (a query that would see nothing
gets its own diagonal), so no softmax row is empty.

Block-diffusion canvas (docs/design.md §5). Keys are ``[encoder (S clean positions) ; canvas (R noised positions)]``.
Response blocks have ``bs`` positions and are counted from the response start ``p``. A canvas query of block ``i``
sees the clean encoder prefix ``[0, p + i·bs)`` -- the prompt and the strictly earlier response blocks, never its
own clean block -- and the noised keys of its own canvas block only. Sliding layers additionally keep encoder keys
``k >= p + i·bs - window + 1``: the window is anchored at the block start, the same for every query of the block,
because at inference a sliding layer's cache ends there and retains ``window - 1`` positions (HF's
``DynamicSlidingWindowLayer``).

Packed rows (docs/design.md §13). Both training masks take an optional per-token ``segment_ids`` ``[B, S]``: a row
then holds several records, each one contiguous run of equal ids, and attention never leaves a record. The encoder
is causal inside its record; a canvas block sees only the clean prefix of its own record (from the record's first
token) and its own block; sliding windows are counted inside the record and never reach into the previous one.

Context parallelism (docs/design.md §14): a rank runs its own queries against keys gathered in global order;
:class:`QueryShardMask` is any rule above restricted to the rank's global query ranges, numbered from 0, so the
rank's rows are the unsplit grid's rows and its key spans the unsplit run's spans for the same queries.

Rules are vectorised on their tensors' device. ``allowed_at`` never synchronises with the host; ``key_spans`` of
the training canvas reads its per-block bounds to the host once per mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

__all__ = [
    "AttentionMask",
    "EncoderMask",
    "BlockDiffusionTrainingMask",
    "DecodeInferenceMask",
    "QueryShardMask",
    "vision_groups",
    "to_megatron",
    "to_sdpa",
    "to_additive",
]

Span = tuple[int, int]
"""A half-open key index range ``[start, end)``."""

FLEX_TILE = 128
"""Query and key tile of the FlexAttention block tables (FlexAttention's default)."""


class AttentionMask:
    """A boolean attention rule over ``(batch row, query index, key index)``; subclasses define the rule.

    Attributes (set by subclasses):
        batch_size, num_queries, num_keys: the grid the rule covers.
        query_chunk: queries that share their key spans (a canvas block), or None when any chunking is as good.
    """

    batch_size: int
    num_queries: int
    num_keys: int
    query_chunk: int | None = None

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def allowed_at(self, b: Tensor, q: Tensor, k: Tensor) -> Tensor:
        """Broadcastable integer index tensors (batch row, query, key) → bool, True = attend.

        Indices must lie inside the grid; the rule only indexes and compares, so it also serves as a FlexAttention
        ``mask_mod``.
        """
        raise NotImplementedError

    def key_spans(self, q_start: int, q_end: int) -> list[Span]:
        """Disjoint, increasing key ranges holding every key any query in ``[q_start, q_end)`` may see (of any row)."""
        return [(0, self.num_keys)]

    def query_chunks(self, chunk: int) -> list[Span]:
        """The query ranges of at most ``chunk`` queries the block-sparse attention runs one by one: consecutive
        here; a :class:`QueryShardMask` never lets one straddle two of its pieces."""
        return [(start, min(start + chunk, self.num_queries)) for start in range(0, self.num_queries, chunk)]

    def select(self, rows: Tensor) -> AttentionMask:
        """The same rule for the chosen batch rows only (``rows``: ``[B]`` bool or ``[B']`` indices)."""
        raise NotImplementedError

    def tile(self, queries: Tensor, keys: Tensor) -> Tensor:
        """The rows ``queries`` ``[*, Q']`` over the keys ``keys`` ``[*, K']`` → ``[*, B, 1, Q', K']`` bool (leading
        dimensions, equal in both, for several chunks at once)."""
        b = torch.arange(self.batch_size, device=self.device)[:, None, None]
        return self.allowed_at(b, queries[..., None, :, None], keys[..., None, None, :]).unsqueeze(-3)

    @cached_property
    def _dense(self) -> Tensor:
        device = self.device
        return self.tile(torch.arange(self.num_queries, device=device), torch.arange(self.num_keys, device=device))

    def dense(self) -> Tensor:
        """The whole grid ``[B, 1, Q, K]`` bool, True = attend (built on first use, then cached)."""
        return self._dense

    def additive(self, dtype: torch.dtype) -> Tensor:
        """The whole grid as an additive bias (:func:`to_additive`) in ``dtype``, built once per dtype, then cached:
        the eager attention adds it to the scores (no backward of its own, unlike selecting with ``where``)."""
        cache = self.__dict__.setdefault("_additive", {})
        if dtype not in cache:
            cache[dtype] = to_additive(self.dense(), dtype)
        return cache[dtype]

    def block_mask(self) -> BlockMask:
        """This rule as a FlexAttention ``BlockMask`` (``mask_mod`` = :meth:`allowed_at`, shared by all heads), for
        the ``flex`` core attention; built on first use, then cached, so the layers sharing this mask build it once.

        The block tables come from :meth:`key_spans` (every 128×128 tile they touch is listed, as partial), so
        building them never evaluates the rule over the grid: host work and memory grow with the number of tiles.
        """
        return self._block_mask

    @cached_property
    def _block_mask(self) -> BlockMask:
        from torch.nn.attention.flex_attention import BlockMask

        size = FLEX_TILE
        q_blocks, k_blocks = -(-self.num_queries // size), -(-self.num_keys // size)
        listed = torch.zeros(q_blocks, k_blocks, dtype=torch.bool)
        for qb in range(q_blocks):
            for start, end in self.key_spans(qb * size, min((qb + 1) * size, self.num_queries)):
                listed[qb, start // size : -(-end // size)] = True
        counts = listed.sum(dim=-1, dtype=torch.int32)
        indices = torch.argsort(~listed, dim=-1, stable=True).to(torch.int32)  # the listed tiles first, in order
        shape = (self.batch_size, 1, q_blocks)
        return BlockMask.from_kv_blocks(
            counts.to(self.device).expand(shape).contiguous(),
            indices.to(self.device).expand(*shape, k_blocks).contiguous(),
            BLOCK_SIZE=size,
            mask_mod=lambda b, h, q, k: self.allowed_at(b, q, k),
            seq_lengths=(self.num_queries, self.num_keys),
        )


@dataclass(eq=False)
class EncoderMask(AttentionMask):
    """Causal (optionally sliding-window) mask of the clean encoder pass.

    Positions are the tensor indices, as in HF's ``masking_utils`` (with left padding, HF's mask is on cache
    indices too). The queries are the last ``num_queries`` keys (a generation step encoding new positions after
    cached ones; by default all of them): query ``i`` sits at key index ``q = i + K - Q`` and sees key ``k`` iff
    ``k <= q``, ``q - k < window`` on sliding layers, and ``key_valid[b, k]``. A query that would see nothing (a
    pad query before any valid key, or past the window of all of them) sees only itself.

    With ``segment_ids`` (a packed row), query ``q`` additionally sees only keys of its own segment: ``k`` at or
    after the first key of the run of equal ids that holds ``q``. Positions restart per record in the caller's
    ``position_ids``; indices here stay row indices, and inside one record the two differ by a constant, so
    ``q - k < window`` is the record's own window.

    With ``vision_groups`` (images in the encoder, HF ``use_bidirectional_attention="vision"``; docs/design.md §9), a
    query inside an image's tokens also sees every valid key of that image, before and after it and past the
    window: HF's rule ``(causal and window) or same group``, padding masking both (transformers' ``masking_utils``:
    ``or_masks(sliding/causal mask, blockwise_overlay(block_sequence_ids))``, then the padding mask). A group is one
    contiguous run of keys holding ``q``, so a query still sees one key interval ``[first, last]``.

    Args:
        key_valid: ``[B, K]`` bool, False on padding (never attended).
        window: sliding window of the layer, or None for a full-attention layer.
        num_queries: ``Q <= K``; None = ``K``.
        segment_ids: optional ``[B, K]`` int, the record of each key (each record one contiguous run; padding
            may carry any id, it is never attended). None = one record per row.
        vision_groups: optional ``[B, K]`` int, the image group of each key, -1 for text: HF's block-sequence ids
            (:func:`vision_groups`; each group one contiguous run, cut at record boundaries). None = text only.
    """

    key_valid: Tensor
    window: int | None
    num_queries: int | None = None
    segment_ids: Tensor | None = None
    vision_groups: Tensor | None = None

    def __post_init__(self) -> None:
        _check_window(self.window)
        self.key_valid = self.key_valid.bool()
        self.batch_size, self.num_keys = self.key_valid.shape
        if self.num_queries is None:
            self.num_queries = self.num_keys
        if not 0 <= self.num_queries <= self.num_keys:
            raise ValueError(f"num_queries {self.num_queries} must be in [0, {self.num_keys}] (the number of keys)")
        self.offset = self.num_keys - self.num_queries
        self._segment_start = _segment_start(self.segment_ids, self.key_valid.shape, "EncoderMask")
        self._groups = self._group_bounds()

    def _group_bounds(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """``[B, K]`` each: whether a key is in an image group, and its group's first and one-past-last key."""
        if self.vision_groups is None:
            return None
        shape = self.key_valid.shape
        if tuple(self.vision_groups.shape) != tuple(shape):
            raise ValueError(f"EncoderMask: vision_groups shape {tuple(self.vision_groups.shape)} != {tuple(shape)}")
        groups = self.vision_groups.to(self.device).long()
        new_run = torch.ones(shape, dtype=torch.bool, device=self.device)
        new_run[:, 1:] = groups[:, 1:] != groups[:, :-1]
        if self.segment_ids is not None:
            new_run[:, 1:] |= self.segment_ids[:, 1:] != self.segment_ids[:, :-1]
        return groups >= 0, _run_start(new_run), _run_end(new_run)

    @property
    def device(self) -> torch.device:
        return self.key_valid.device

    @cached_property
    def _key_bounds(self) -> tuple[Tensor, Tensor | None]:
        """``[B, Q]`` long each: the first and last key query ``q`` may see, so that the rule is ``first ≤ k ≤ last``
        on valid keys; the last is None without vision groups (it is ``q`` then).

        The first is the latest of 0, the window's start and the query's record start, the last ``q``; a query in
        an image group widens both to its group's keys. A query that sees no valid key there (counted with a
        prefix sum, O(B·K)) gets itself: ``first = last = q``, and validity is waived for it. Two comparisons per
        key against per-query bounds are what the block-sparse tiles cost, which at a chunk of one packed row is
        most of the mask's work (docs/performance.md "Packed sequences")."""
        q = torch.arange(self.num_queries, device=self.device) + self.offset
        first = torch.zeros_like(q) if self.window is None else (q - self.window + 1).clamp(min=0)
        first = first.expand(self.batch_size, -1)
        last = q.expand(self.batch_size, -1)
        if self._segment_start is not None:
            first = torch.maximum(first, self._segment_start[:, q])
        if self._groups is not None:
            in_group, start, end = (t[:, q] for t in self._groups)
            first = torch.where(in_group, torch.minimum(first, start), first)
            last = torch.where(in_group, end - 1, last)
        counts = torch.nn.functional.pad(self.key_valid.long().cumsum(dim=1), (1, 0))  # [B, K + 1]
        empty = counts.gather(1, last + 1) == counts.gather(1, first)
        first = torch.where(empty, q, first)
        return first, None if self._groups is None else torch.where(empty, q, last)

    def allowed_at(self, b: Tensor, q: Tensor, k: Tensor) -> Tensor:
        first, last = self._key_bounds
        first = first[b, q]
        last = q + self.offset if last is None else last[b, q]
        # `first == last` holds for a query whose only valid key is itself (or that sees none): validity is waived.
        return (k >= first) & (k <= last) & (self.key_valid[b, k] | (first == last))

    @cached_property
    def _host_segment_start(self) -> Tensor:
        return self._segment_start.cpu()  # the one host read of a packed encoder mask

    @cached_property
    def _host_key_bounds(self) -> tuple[Tensor, Tensor]:
        return tuple(t.cpu() for t in self._key_bounds)  # the one host read of an encoder mask with images

    def key_spans(self, q_start: int, q_end: int) -> list[Span]:
        start, end = 0 if self.window is None else max(0, q_start + self.offset - self.window + 1), q_end + self.offset
        if self._segment_start is not None and q_end > q_start:
            # A chunk's first query has the earliest segment start of the chunk (starts never decrease along a
            # row), so keys before every row's start are skipped: chunks that lie inside one record cost that
            # record's prefix, not the row's (with one row per micro-batch, Σ record_len² in all).
            start = max(start, int(self._host_segment_start[:, q_start + self.offset].min()))
        if self._groups is not None and q_end > q_start:
            # Queries inside an image also read its keys before the window and after themselves.
            first, last = (t[:, q_start:q_end] for t in self._host_key_bounds)
            start, end = min(start, int(first.min())), max(end, int(last.max()) + 1)
        return [(start, end)]

    def select(self, rows: Tensor) -> EncoderMask:
        segments = None if self.segment_ids is None else self.segment_ids[rows]
        groups = None if self.vision_groups is None else self.vision_groups[rows]
        return EncoderMask(self.key_valid[rows], self.window, self.num_queries, segments, groups)


@dataclass(eq=False)
class BlockDiffusionTrainingMask(AttentionMask):
    """Mask of the training decode: canvas queries over ``[encoder keys ; canvas keys]`` (docs/design.md §5).

    Example ``b`` is laid out as in ``diffusion.layout``: the encoder row is its prompt ``[0, p_b)``, its response
    including the EOS fill ``[p_b, p_b + L_b)``, then global pad. By default canvas slot ``j`` holds response
    offset ``j`` (block ``j // bs``). With ``canvas_block_ids`` the canvas may hold any blocks, e.g. only
    the scored ones: canvas block ``c`` (slots ``[c·bs, (c+1)·bs)``) holds response block ``canvas_block_ids[b, c]``,
    so slot ``j`` holds offset ``canvas_block_ids[b, j // bs]·bs + j % bs``.

    A slot is *valid* iff its block id is ``>= 0`` and its offset is ``< L_b``. A valid query of block ``i`` sees:

    - encoder key ``k`` iff ``k < p_b + i·bs`` (prompt, and response keys with ``r // bs < i``, strictly), and on
      sliding layers only if ``k >= p_b + i·bs - window + 1``; never the global pad;
    - canvas key ``j'`` iff ``j'`` is valid and in the same canvas block (bidirectional inside the block, blind
      to every other block).

    An invalid slot (padding or an unused block slot) sees only its own canvas diagonal, so no row is empty.

    Packed rows (``segment_ids`` given; docs/design.md §13): each canvas block belongs to one record, and
    ``prefix_lens`` / ``response_lens`` are given per canvas block (``[B, C]``): the row index where that record's
    response starts, and that record's response length. The block's clean context ``[p + i·bs)`` then also starts
    at its record's first token (the start of the segment run holding index ``p + i·bs``, which lies inside the
    record's response), so no canvas block sees another record's encoder keys; canvas keys were per block already.

    Args:
        prefix_lens: ``[B]`` int, prompt length ``p_b``; or ``[B, C]``, per canvas block, the row index where its
            record's response starts.
        response_lens: ``[B]`` int, response length ``L_b`` including the EOS fill (``p_b + L_b <= S``); or
            ``[B, C]``, per canvas block, its record's.
        encoder_len: ``S``, number of encoder keys.
        canvas_len: ``R``, number of canvas slots (may exceed every ``L_b``).
        block_size: ``bs``, the block length.
        window: sliding window of the layer, or None for a full-attention layer.
        canvas_block_ids: optional ``[B, ceil(R / bs)]`` int, the response block held by each canvas block;
            negative = unused. None means canvas block ``c`` holds response block ``c``.
        segment_ids: optional ``[B, S]`` int, the record of each encoder position (a packed row, each record one
            contiguous run); None = one record per row.

    The grid is ``[B, 1, R, S + R]``.
    """

    prefix_lens: Tensor
    response_lens: Tensor
    encoder_len: int
    canvas_len: int
    block_size: int
    window: int | None
    canvas_block_ids: Tensor | None = None
    segment_ids: Tensor | None = None

    def __post_init__(self) -> None:
        _check_window(self.window)
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        batch = self.prefix_lens.shape[0]
        num_canvas_blocks = -(-self.canvas_len // self.block_size)
        if self.prefix_lens.shape not in ((batch,), (batch, num_canvas_blocks)):
            raise ValueError(
                f"prefix_lens shape {tuple(self.prefix_lens.shape)} is neither {(batch,)} nor {(batch, num_canvas_blocks)} "
                f"(batch, ceil(canvas_len / block_size))"
            )
        if self.response_lens.shape != self.prefix_lens.shape:
            raise ValueError(
                f"response_lens shape {tuple(self.response_lens.shape)} != prefix_lens shape {tuple(self.prefix_lens.shape)}"
            )
        device = self.prefix_lens.device
        slot = torch.arange(self.canvas_len, device=device)
        canvas_block = slot // self.block_size  # [R], the canvas block of each slot
        if self.canvas_block_ids is None:
            block = canvas_block.expand(batch, self.canvas_len)
        else:
            if self.canvas_block_ids.shape != (batch, num_canvas_blocks):
                raise ValueError(
                    f"canvas_block_ids shape {tuple(self.canvas_block_ids.shape)} != {(batch, num_canvas_blocks)} "
                    f"(batch, ceil(canvas_len / block_size))"
                )
            block = self.canvas_block_ids.to(device).long()[:, canvas_block]  # [B, R], response block of each slot
        # Per slot, its record's prompt length and response length: per row, or per canvas block (packed rows).
        prefix, response = (
            (t.long()[:, None] if t.dim() == 1 else t.long()[:, canvas_block]) for t in (self.prefix_lens, self.response_lens)
        )
        offset = block * self.block_size + slot % self.block_size  # [B, R], response offset held by each slot
        slot_valid = (block >= 0) & (offset < response)  # [B, R]
        # Block i's clean context is exactly the encoder prefix [0, p + i·bs): the prompt plus the strictly earlier
        # response blocks (the response keys past it are its own and later blocks, then global pad). This is also
        # where the inference cache ends when block i is decoded, which is why the window is anchored there.
        context_end = prefix + block * self.block_size  # [B, R]
        # In a packed row the context starts at the record's first token. A valid slot's context_end lies inside
        # its record's response, so the segment run holding that index is the slot's record.
        segment_start = _segment_start(self.segment_ids, (batch, self.encoder_len), "BlockDiffusionTrainingMask")
        if segment_start is None:
            context_start = torch.zeros_like(context_end)
        else:
            context_start = segment_start.gather(1, context_end.clamp(0, self.encoder_len - 1))
        if self.window is not None:
            context_start = torch.maximum(context_start, context_end - self.window + 1)
        # The rule as two key intervals per slot, so a tile costs a few comparisons per key (the block-sparse
        # attention builds one per chunk): encoder keys [context_start, context_end), empty for an invalid slot;
        # canvas keys its block's valid slots, which are a prefix of the block (a slot is valid iff its offset in
        # the block is below what is left of its record's response), or for an invalid slot itself alone.
        first_slot = canvas_block * self.block_size  # [R]
        valid_in_block = torch.zeros(batch, num_canvas_blocks, dtype=torch.long, device=device).scatter_add_(
            1, canvas_block.expand(batch, -1), slot_valid.long()
        )[:, canvas_block]  # [B, R]
        S = self.encoder_len
        self._intervals = (
            torch.where(slot_valid, context_start, 0),
            torch.where(slot_valid, context_end, 0),
            torch.where(slot_valid, S + first_slot, S + slot),
            torch.where(slot_valid, S + first_slot + valid_in_block, S + slot + 1),
        )  # each [B, R]: encoder keys [first, end), canvas keys [first, end)
        self.batch_size, self.num_queries = batch, self.canvas_len
        self.num_keys = self.encoder_len + self.canvas_len
        self.query_chunk = self.block_size

    @property
    def device(self) -> torch.device:
        return self.prefix_lens.device

    def allowed_at(self, b: Tensor, q: Tensor, k: Tensor) -> Tensor:
        encoder_first, encoder_end, canvas_first, canvas_end = (t[b, q] for t in self._intervals)
        return ((k >= encoder_first) & (k < encoder_end)) | ((k >= canvas_first) & (k < canvas_end))

    @cached_property
    def _host_intervals(self) -> tuple[Tensor, ...]:
        return tuple(t.cpu() for t in self._intervals[:2])  # the one host read of this mask

    def key_spans(self, q_start: int, q_end: int) -> list[Span]:
        bs, S = self.block_size, self.encoder_len
        canvas = (S + q_start // bs * bs, S + min(-(-q_end // bs) * bs, self.canvas_len))
        first, end = (t[:, q_start:q_end] for t in self._host_intervals)
        seen = end > first
        if not seen.any():
            return [canvas]
        return [(int(first[seen].min()), int(end[seen].max())), canvas]

    def select(self, rows: Tensor) -> BlockDiffusionTrainingMask:
        ids = None if self.canvas_block_ids is None else self.canvas_block_ids[rows]
        segments = None if self.segment_ids is None else self.segment_ids[rows]
        return BlockDiffusionTrainingMask(
            self.prefix_lens[rows], self.response_lens[rows], self.encoder_len, self.canvas_len, self.block_size,
            self.window, ids, segments,
        )


@dataclass(eq=False)
class DecodeInferenceMask(AttentionMask):
    """Mask of an inference decode: one canvas after the ``S`` encoder (KV-cache) positions.

    Mirrors HF generation with its dynamic cache (docs/design.md §10): a full layer
    sees every valid cached key; a sliding layer's cache retains only the last ``window - 1`` positions, so it sees
    the valid keys with index ``k >= S - (window - 1)``. The canvas is bidirectional and never windowed.

    Args:
        encoder_valid: ``[B, S]`` bool, False on cached padding.
        canvas_valid: optional ``[B, R]`` bool; invalid canvas keys are blocked (each row still sees itself).
            None means the whole canvas is valid; then ``canvas_len`` gives ``R``.
        window: sliding window of the layer, or None for a full-attention layer.
        canvas_len: ``R`` when ``canvas_valid`` is None (must agree with it otherwise).

    The grid is ``[B, 1, R, S + R]``.
    """

    encoder_valid: Tensor
    canvas_valid: Tensor | None
    window: int | None
    canvas_len: int | None = None

    def __post_init__(self) -> None:
        _check_window(self.window)
        self.encoder_valid = self.encoder_valid.bool()
        batch, self.encoder_len = self.encoder_valid.shape
        if self.canvas_valid is None:
            if self.canvas_len is None:
                raise ValueError("DecodeInferenceMask needs canvas_len when canvas_valid is None")
            self.canvas_valid = torch.ones(batch, self.canvas_len, dtype=torch.bool, device=self.device)
        elif self.canvas_len is not None and self.canvas_len != self.canvas_valid.shape[1]:
            raise ValueError(f"canvas_len {self.canvas_len} != canvas_valid length {self.canvas_valid.shape[1]}")
        self.canvas_valid = self.canvas_valid.bool()
        self.canvas_len = self.canvas_valid.shape[1]
        self.batch_size, self.num_queries = batch, self.canvas_len
        self.num_keys = self.encoder_len + self.canvas_len
        self._encoder_start = 0 if self.window is None else max(0, self.encoder_len - (self.window - 1))

    @property
    def device(self) -> torch.device:
        return self.encoder_valid.device

    def allowed_at(self, b: Tensor, q: Tensor, k: Tensor) -> Tensor:
        S = self.encoder_len
        is_encoder = k < S
        j = (k - S).clamp(min=0)  # the canvas slot of a canvas key (0 for encoder keys, masked off below)
        canvas = ~is_encoder & (self.canvas_valid[b, j] | (j == q))
        if S == 0:
            return canvas
        encoder = is_encoder & (k >= self._encoder_start) & self.encoder_valid[b, k.clamp(max=S - 1)]
        return encoder | canvas

    def key_spans(self, q_start: int, q_end: int) -> list[Span]:
        return [(self._encoder_start, self.num_keys)]

    def select(self, rows: Tensor) -> DecodeInferenceMask:
        return DecodeInferenceMask(self.encoder_valid[rows], self.canvas_valid[rows], self.window)


@dataclass(eq=False)
class QueryShardMask(AttentionMask):
    """The rule of ``base`` for some of its queries only: a context-parallel rank's shard (docs/design.md §14).

    The rank's queries are the global query indices ``ranges`` (disjoint, increasing ``[start, end)`` pieces: the
    load-balanced split's two chunks, ``layers.context_parallel.shard_ranges``), numbered ``0 … Q' - 1`` here in
    that order; keys keep their global indices (the K/V are gathered in global order). So local query ``q`` may
    see key ``k`` iff global query ``index[q]`` may under ``base``: every rule (causal, window, block-diffusion,
    packed segments) is the unsplit one, exactly.

    ``key_spans`` asks ``base`` for each piece a query range covers, and ``query_chunks`` cuts each piece at the
    global multiples of the chunk, so the block-sparse attention reads the keys the unsplit run reads for the same
    queries (a canvas chunk stays one block): a rank's work is its queries' share of the whole.
    """

    base: AttentionMask
    ranges: list[Span]

    def __post_init__(self) -> None:
        previous = 0
        for start, end in self.ranges:
            if not previous <= start <= end <= self.base.num_queries:
                raise ValueError(f"query ranges {self.ranges} must be increasing, disjoint and within "
                                 f"[0, {self.base.num_queries}] (the base mask's queries)")
            previous = end
        self.batch_size, self.num_keys = self.base.batch_size, self.base.num_keys
        self.num_queries = sum(end - start for start, end in self.ranges)
        self.query_chunk = self.base.query_chunk
        self._offsets = [0]
        for start, end in self.ranges:
            self._offsets.append(self._offsets[-1] + end - start)
        self._index = torch.cat(
            [torch.arange(start, end, device=self.device) for start, end in self.ranges]
            or [torch.zeros(0, dtype=torch.long, device=self.device)]
        )

    @property
    def device(self) -> torch.device:
        return self.base.device

    def allowed_at(self, b: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return self.base.allowed_at(b, self._index[q], k)

    def _global_pieces(self, q_start: int, q_end: int) -> list[Span]:
        """The global query ranges the local range ``[q_start, q_end)`` covers."""
        pieces = []
        for (start, end), offset in zip(self.ranges, self._offsets):
            lo, hi = max(q_start, offset), min(q_end, offset + end - start)
            if lo < hi:
                pieces.append((start + lo - offset, start + hi - offset))
        return pieces

    def key_spans(self, q_start: int, q_end: int) -> list[Span]:
        spans = sorted(span for lo, hi in self._global_pieces(q_start, q_end) for span in self.base.key_spans(lo, hi))
        merged: list[Span] = []
        for start, end in spans:
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            elif start < end:
                merged.append((start, end))
        return merged

    def query_chunks(self, chunk: int) -> list[Span]:
        chunks = []
        for (start, end), offset in zip(self.ranges, self._offsets):
            cuts = [start, *range((start // chunk + 1) * chunk, end, chunk), end]
            chunks += [(offset + a - start, offset + b - start) for a, b in zip(cuts, cuts[1:]) if a < b]
        return chunks

    def select(self, rows: Tensor) -> QueryShardMask:
        return QueryShardMask(self.base.select(rows), self.ranges)


def vision_groups(mm_token_type_ids: Tensor) -> Tensor:
    """``[B, S]`` token types (HF's ``mm_token_type_ids``: 0 text, 1 image, 2 video) → ``[B, S]`` long image groups
    for :class:`EncoderMask`: each contiguous run of image / video tokens numbered from 0 along its row, -1 for text
    (HF's block-sequence ids, ``get_block_sequence_ids_for_mask``)."""
    vision = (mm_token_type_ids == 1) | (mm_token_type_ids == 2)
    starts = vision.clone()
    starts[:, 1:] &= ~vision[:, :-1]
    return torch.where(vision, starts.long().cumsum(dim=1) - 1, -1)


def to_megatron(allowed: Tensor) -> Tensor:
    """Megatron / Transformer Engine boolean convention: True = **blocked** (``~allowed``)."""
    return ~allowed


def to_sdpa(allowed: Tensor) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` boolean convention: True = attend (the same tensor)."""
    return allowed


def to_additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive float bias (HF eager style): 0 where allowed, ``torch.finfo(dtype).min`` where blocked.

    ``finfo.min`` rather than ``-inf`` so that a fully blocked row gives a uniform softmax, never NaN.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"additive masks need a floating dtype, got {dtype}")
    attend, blocked = (torch.tensor(x, dtype=dtype, device=allowed.device) for x in (0, torch.finfo(dtype).min))
    return torch.where(allowed, attend, blocked)  # one pass over the grid (the block-sparse tiles build one per chunk)


# ----------------------------------------------------------------------------------------------------------------
# internals


def _segment_start(segment_ids: Tensor | None, shape: tuple[int, int], owner: str) -> Tensor | None:
    """``[B, K]`` long: the index of the first key of the run of equal ``segment_ids`` holding each key (None for
    None). A packed record is one such run, so "same record" is "at or after its run's start"."""
    if segment_ids is None:
        return None
    if tuple(segment_ids.shape) != tuple(shape):
        raise ValueError(f"{owner}: segment_ids shape {tuple(segment_ids.shape)} != {tuple(shape)}")
    first = torch.ones(shape, dtype=torch.bool, device=segment_ids.device)
    first[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return _run_start(first)


def _run_start(new_run: Tensor) -> Tensor:
    """``[B, K]`` bool, True where a run of keys starts → ``[B, K]`` long: the first key of the run holding each key."""
    index = torch.arange(new_run.shape[1], device=new_run.device).expand(new_run.shape)
    return torch.where(new_run, index, 0).cummax(dim=1).values


def _run_end(new_run: Tensor) -> Tensor:
    """As :func:`_run_start`, the one-past-last key of the run holding each key."""
    length = new_run.shape[1]
    index = torch.arange(length, device=new_run.device).expand(new_run.shape)
    ends_here = torch.ones_like(new_run)
    ends_here[:, :-1] = new_run[:, 1:]
    return torch.where(ends_here, index + 1, length).flip(1).cummin(dim=1).values.flip(1)


def _check_window(window: int | None) -> None:
    if window is not None and window < 1:
        raise ValueError(f"window must be None or >= 1, got {window}")
