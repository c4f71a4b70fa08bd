"""Context parallelism at the attention level: the load-balanced split of a sequence over the CP group, and the K/V
all-gather whose backward reduce-scatters dK/dV (docs/design.md §14).

A sequence of length `L` is cut into `2N` equal chunks for a CP group of `N` ranks; rank `r` holds chunks `r` and
`2N - 1 - r`, in that order (Megatron's causal load balancing: under a causal or block-causal mask a chunk's work
grows with its index, so every rank gets one cheap and one dear chunk and the same total). The split applies to
everything laid out along the sequence: hidden states `[L, B, ...]`, position ids `[B, L]` (dim 1), labels.

Attention on rank `r` runs its own queries (its shard) against the keys and values of the whole sequence:
`gather_sequence` all-gathers them over the CP group and puts them back in global order, so key index `k` is global
position `k` and the mask rules of `megatron_bdgemma.masks` apply unchanged to the keys; the queries are mapped to
their global indices by `masks.QueryShardMask(mask, shard_ranges(...))`. The backward of the gather sums every
rank's dK/dV contribution for each position and leaves each rank its own shard's sum: one reduce-scatter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_bdgemma.masks import Span

__all__ = ["shard_ranges", "shard_index", "split_sequence", "merge_shards", "gather_sequence"]


def _chunk_length(length: int, size: int) -> int:
    if size < 1:
        raise ValueError(f"context-parallel size must be >= 1, got {size}")
    if length % (2 * size):
        raise ValueError(f"sequence length {length} is not divisible by 2 * cp = {2 * size} (the load-balanced split "
                         f"gives each rank two equal chunks)")
    return length // (2 * size)


def shard_ranges(length: int, rank: int, size: int) -> list[Span]:
    """The global index ranges rank `rank` of `size` holds of a sequence of `length`: chunks `rank` and
    `2·size - 1 - rank` of `length / (2·size)` positions, in that order (one range when `size` is 1)."""
    chunk = _chunk_length(length, size)
    if not 0 <= rank < size:
        raise ValueError(f"context-parallel rank {rank} is not in [0, {size})")
    if size == 1:
        return [(0, length)]
    return [(rank * chunk, (rank + 1) * chunk), ((2 * size - 1 - rank) * chunk, (2 * size - rank) * chunk)]


def shard_index(length: int, rank: int, size: int, device: torch.device | None = None) -> torch.Tensor:
    """`[length / size]` long: the global index of each of the rank's positions (the RoPE positions of an unpacked
    row; a packed row's positions are `split_sequence(position_ids, ..., dim=1)`)."""
    return torch.cat([torch.arange(a, b, device=device) for a, b in shard_ranges(length, rank, size)])


def split_sequence(x: torch.Tensor, rank: int, size: int, dim: int = 0) -> torch.Tensor:
    """Rank `rank`'s shard of `x` along `dim` (the sequence dimension: 0 for `[L, B, ...]`, 1 for `[B, L]`)."""
    return torch.cat([x.narrow(dim, a, b - a) for a, b in shard_ranges(x.shape[dim], rank, size)], dim=dim)


def merge_shards(shards: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """The inverse of `split_sequence`: the whole sequence from every rank's shard, in rank order."""
    size = len(shards)
    return _to_global(torch.cat(shards, dim=dim), size, dim)


def _to_global(x: torch.Tensor, size: int, dim: int = 0) -> torch.Tensor:
    """Rank-major `[rank 0: chunks 0, 2N-1 ; rank 1: chunks 1, 2N-2 ; ...]` along `dim` → global chunk order."""
    if size == 1:
        return x
    x = x.movedim(dim, 0)
    chunks = x.view(size, 2, x.shape[0] // (2 * size), *x.shape[1:])
    # Chunk j < N is rank j's first; chunk 2N-1-r is rank r's second, so the second halves go in reverse rank order.
    return torch.cat([chunks[:, 0], chunks[:, 1].flip(0)]).reshape(x.shape).movedim(0, dim)


def _to_rank_major(x: torch.Tensor, size: int) -> torch.Tensor:
    """The inverse of `_to_global` along dim 0."""
    if size == 1:
        return x
    chunks = x.view(2, size, x.shape[0] // (2 * size), *x.shape[1:])
    return torch.stack([chunks[0], chunks[1].flip(0)], dim=1).reshape(x.shape)


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 into global order; backward: reduce-scatter of the gradient back to the shards."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        size = group.size()
        gathered = x.new_empty(size * x.shape[0], *x.shape[1:])
        dist.all_gather_into_tensor(gathered, x.contiguous(), group=group)
        return _to_global(gathered, size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        size = ctx.group.size()
        grad = _to_rank_major(grad, size).contiguous()
        shard = grad.new_empty(grad.shape[0] // size, *grad.shape[1:])
        dist.reduce_scatter_tensor(shard, grad, group=ctx.group)
        return shard, None


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Every rank's shard `[L / N, ...]` of a sequence → the whole sequence `[L, ...]` in global order, on every rank
    of `group` (the CP group, `parallel_state.get_context_parallel_group()`); identity for a group of one.

    For K and V: the backward reduce-scatters the gradient, so each rank receives, for its own positions, the sum of
    what every rank's queries contributed to dK/dV.
    """
    if group is None or group.size() == 1:
        return x
    if x.shape[0] % 2:
        raise ValueError(f"a CP shard holds two equal chunks; got {x.shape[0]} positions")
    return _GatherSequence.apply(x, group)
