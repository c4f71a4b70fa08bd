"""Vocabulary-scale memory: the training losses and the self-conditioning soft embedding straight from hidden states.

With Gemma 4's 262,144-token vocabulary, fp32 logits cost 1 MiB per token. The plain path (`BDGemmaModel.logits`)
gathers full-vocabulary logits over TP and autograd keeps them, and their softmax, until the backward. The two
consumers of the LM head during training work here from the final hidden states instead:

- **vocab-parallel**: each TP rank multiplies by its own rows of the tied embedding (`[V/tp, H]`, vocab-parallel
  already) and only ever holds `[tokens, V/tp]`. The fp32 softcap is elementwise, so it is applied to the shard;
  ranks are combined through per-token statistics (max, sum of exp, target logit), as in Megatron's
  `vocab_parallel_cross_entropy`, which the loss uses directly.
- **chunked over tokens**: each chunk runs under activation checkpointing, so the forward keeps no logits and the
  backward recomputes one chunk at a time. The extra peak memory is a few `[chunk, V/tp]` fp32 tensors.

Values equal the plain path up to summation order, and so do the gradients. "fp32" here is
`precision.compute_dtype`: float64 in a float64 model, except the CE under TP > 1, which is Megatron's
`vocab_parallel_cross_entropy` and computes in fp32 whatever the logits' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    vocab_parallel_cross_entropy,
)
from megatron.core.tensor_parallel.utils import VocabUtility
from torch import Tensor
from torch.distributed import ProcessGroup, ReduceOp, all_reduce
from torch.utils.checkpoint import checkpoint

from megatron_bdgemma.diffusion.loss import shift_observed_logits
from megatron_bdgemma.precision import compute_dtype

__all__ = ["softcap", "vocab_parallel_cross_entropy_sum", "vocab_parallel_soft_embedding"]


def softcap(logits: Tensor, cap: float | None, *, inplace: bool = False) -> Tensor:
    """`cap · tanh(logits / cap)` elementwise (any shape); `cap=None` leaves the logits as they are.

    `inplace=True` overwrites `logits` (a tensor no one else needs, outside autograd) with the same values: at a
    vocabulary's width the two temporaries of the out-of-place form cost more than the arithmetic.
    """
    if cap is None:
        return logits
    if inplace:
        return logits.div_(cap).tanh_().mul_(cap)
    return cap * torch.tanh(logits / cap)


def vocab_parallel_cross_entropy_sum(
    hidden: Tensor,
    embedding_weight: Tensor,
    targets: Tensor,
    weights: Tensor,
    *,
    cap: float | None,
    chunk_size: int,
    sequence_parallel: bool,
    tp_group: ProcessGroup,
    shift_ids: Tensor | None = None,
    shift: Tensor | None = None,
) -> Tensor:
    """`Σ weights · CE(softcap(fp32 logits) + shift·onehot(shift_ids), targets)` from the LM head's input, never
    holding `[tokens, V]`.

    Equals `weighted_cross_entropy_sum(model.logits(hidden), targets, weights, shift_ids=..., shift=...)`. The LOO
    shift is added by the rank whose vocabulary shard holds the slot's noisy id, before Megatron's CE combines the
    shards.

    Args:
        hidden: `[S, B, H]` final-normed stack output (`[S/tp, B, H]` under sequence parallelism), with grad.
        embedding_weight: `[V/tp, H]` this rank's rows of the tied embedding / LM head.
        targets: `[B, S]` long; ignored (may be out of range) where `weights == 0`.
        weights: `[B, S]` float or bool, identical on every TP rank.
        cap: the final logit softcap (None = none).
        chunk_size: tokens per checkpointed chunk.
        sequence_parallel: whether `hidden` is split over TP ranks along S.
        tp_group: the tensor-parallel group the vocabulary is split over.
        shift_ids, shift: `[B, S]` the noisy canvas ids and the loo variants' δ (None = no shift), identical on every
            TP rank.

    Returns:
        fp32 scalar (float64 in a float64 model, to fp32 precision under TP > 1), the same on every TP rank.
    """
    _check_chunk_size(chunk_size)
    hidden = _replicate(hidden, sequence_parallel, tp_group)
    dtype = compute_dtype(embedding_weight.dtype)
    flat_weights = weights.t().reshape(-1).to(dtype)  # [S·B], the order of hidden's tokens
    # Only weighted tokens go through the head: padding and unscored canvas slots cost nothing. The selection comes
    # from `weights`, which every TP rank holds, so all ranks run the same chunks and collectives (the price is one
    # host sync for the count).
    rows = flat_weights.nonzero().squeeze(1)  # [n]
    tokens = hidden.reshape(-1, hidden.shape[-1])[rows]  # [n, H]
    targets, flat_weights = targets.t().reshape(-1)[rows], flat_weights[rows]
    shifted = (None, None) if shift is None else (shift_ids.t().reshape(-1)[rows], shift.t().reshape(-1)[rows])
    recompute = torch.is_grad_enabled() and (tokens.requires_grad or embedding_weight.requires_grad)
    total = tokens.new_zeros((), dtype=dtype)
    for start in range(0, rows.numel(), chunk_size):
        part = slice(start, start + chunk_size)
        args = (tokens[part], embedding_weight, targets[part], flat_weights[part], cap, tp_group,
                *(None if x is None else x[part] for x in shifted))
        # Checkpointing drops the chunk's logits and softmax after the forward; the backward recomputes them.
        total = total + (checkpoint(_cross_entropy_sum, *args, use_reentrant=False) if recompute else _cross_entropy_sum(*args))
    return total


def vocab_parallel_soft_embedding(
    hidden: Tensor,
    embedding_weight: Tensor,
    *,
    cap: float | None,
    scale: float,
    chunk_size: int,
    sequence_parallel: bool,
    tp_group: ProcessGroup,
) -> Tensor:
    """The self-conditioning signal `(softmax_fp32(ℓ).to(E.dtype) @ E) · √H` of the logits `ℓ` of `hidden`.

    Equals `soft_embedding(model.logits(hidden), E, scale)` (batch-first there, `[S, B, H]` here) but builds `ℓ`
    and its softmax one token chunk and one vocabulary shard at a time. `ℓ` is detached (docs/design.md §6: pass 1 is
    not back-propagated); the gradient reaches E through the product with the probabilities, which the backward
    recomputes per chunk.

    Args:
        hidden: `[R, B, H]` final-normed output of decode pass 1 (`[R/tp, B, H]` under sequence parallelism).
        embedding_weight: `[V/tp, H]` this rank's rows of the tied embedding.
        cap: the final logit softcap (None = none).
        scale: √H, applied in the embedding dtype after the reduction over ranks, as the plain path does.
        chunk_size: tokens per checkpointed chunk.
        sequence_parallel: whether `hidden` (and the result) are split over TP ranks along R.
        tp_group: the tensor-parallel group the vocabulary is split over.

    Returns:
        `[R, B, H]` (`[R/tp, B, H]` under sequence parallelism) in the embedding dtype.
    """
    _check_chunk_size(chunk_size)
    full = _replicate(hidden.detach(), sequence_parallel, tp_group)
    tokens = full.reshape(-1, full.shape[-1])  # [R·B, H]
    recompute = torch.is_grad_enabled() and embedding_weight.requires_grad
    parts = []
    for start in range(0, tokens.shape[0], chunk_size):
        args = (tokens[start : start + chunk_size], embedding_weight, cap, tp_group)
        parts.append(checkpoint(_partial_soft_embedding, *args, use_reentrant=False) if recompute else _partial_soft_embedding(*args))
    partial = torch.cat(parts).view(*full.shape[:-1], embedding_weight.shape[-1])  # [R, B, H], this shard's sum
    if sequence_parallel:
        signal = reduce_scatter_to_sequence_parallel_region(partial, group=tp_group)
    else:
        signal = reduce_from_tensor_model_parallel_region(partial, group=tp_group)
    return signal * torch.tensor(scale, dtype=embedding_weight.dtype)


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _replicate(hidden: Tensor, sequence_parallel: bool, tp_group: ProcessGroup) -> Tensor:
    """`[S(/tp), B, H]` → `[S, B, H]` on every TP rank.

    Each rank's gradient w.r.t. the result is partial (its vocabulary shard only): the backward of both mappings
    sums it over ranks (reduce-scatter back to the sequence shard, or all-reduce), as the LM head's own would.
    """
    if sequence_parallel:
        return gather_from_sequence_parallel_region(hidden, group=tp_group)
    return copy_to_tensor_model_parallel_region(hidden, group=tp_group)


def _shard_logits(tokens: Tensor, embedding_weight: Tensor, cap: float | None) -> Tensor:
    """`[n, H]` × `[V/tp, H]` → `[n, V/tp]` fp32 softcapped: the matmul in the weight dtype, then fp32 (the compute
    dtype), as the LM head."""
    logits = F.linear(tokens, embedding_weight)
    return softcap(logits.to(compute_dtype(logits.dtype)), cap)


def _cross_entropy_sum(
    tokens: Tensor, embedding_weight: Tensor, targets: Tensor, weights: Tensor, cap: float | None, tp_group: ProcessGroup,
    shift_ids: Tensor | None, shift: Tensor | None,
) -> Tensor:
    """One chunk: `[n, H]` hidden, `[n]` targets and (nonzero) weights, optionally the LOO shift → fp32 weighted CE
    sum."""
    logits = _shard_logits(tokens, embedding_weight, cap)  # [n, V/tp]
    if shift is not None:
        start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(logits.shape[-1], tp_group.rank(), tp_group.size())
        logits = shift_observed_logits(logits, shift_ids, shift, vocab_start=start)
    if tp_group.size() == 1:  # the shard is the whole vocabulary: the same CE without three size-1 all-reduces
        ce = F.cross_entropy(logits, targets, reduction="none")
    else:
        ce = vocab_parallel_cross_entropy(logits, targets, tp_group=tp_group)  # [n]
    return (ce * weights).sum()


def _partial_soft_embedding(tokens: Tensor, embedding_weight: Tensor, cap: float | None, tp_group: ProcessGroup) -> Tensor:
    """One chunk: `[n, H]` hidden → `[n, H]` this rank's share `softmax(ℓ)[:, shard] @ E[shard]` (to be summed)."""
    logits = _shard_logits(tokens, embedding_weight.detach(), cap)  # [n, V/tp]
    # The softmax over the whole vocabulary, from the shards: global max for stability, then the global sum.
    peak = logits.amax(dim=-1, keepdim=True)
    if tp_group.size() > 1:
        all_reduce(peak, op=ReduceOp.MAX, group=tp_group)
    exp = torch.exp(logits - peak)
    total = exp.sum(dim=-1, keepdim=True)
    if tp_group.size() > 1:
        all_reduce(total, group=tp_group)
    return (exp / total).to(embedding_weight.dtype) @ embedding_weight
