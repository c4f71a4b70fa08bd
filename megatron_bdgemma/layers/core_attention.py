"""Core attention (softmax(QKᵀ)V over local heads) under an `AttentionMask` rule, in three interchangeable backends.

- `EagerCoreAttention`: the reference. One dense `[B, 1, Sq, Sk]` mask (and off CPU one `[B, h, Sq, Sk]` score
  tensor); memory grows with Sq·Sk, which at a 16K-token prompt is gigabytes per layer.
- `BlockSparseCoreAttention`: the same math, by chunks of queries (a canvas block, or
  `attention_chunk_size` encoder positions) over only the key spans the mask says that chunk can see, with the
  mask tile built from the rule on the spot; chunks that read as many keys go through one call as one batch. In
  training the calls are recomputed in backward rather than keeping their tiles (unless together those are no
  larger than one chunk's over all keys), so nothing of size Sq·Sk is ever held: memory grows with S·chunk.
  Sliding layers touch only their window; canvas blocks only their encoder prefix and their own block.
- `FlexCoreAttention`: `torch.nn.attention.flex_attention` under the rule's own `allowed_at` as `mask_mod`
  (`AttentionMask.block_mask`, built once per mask). The GPU fast path: on CUDA a compiled, fused kernel that skips
  fully blocked key tiles and never materialises scores. On CPU it is a correctness reference only: the
  FlexAttention op's dense implementation, all scores in fp32 (FlexAttention's public entry point refuses
  backward on CPU, so the op is called directly there).

Eager and block-sparse (`masked_attention`) use fp32 softmax (float64 in a float64 model): off CPU over scores in the
activation dtype (HF's eager path), on CPU over fp32 scores within PyTorch's fused SDPA kernel (HF's sdpa path; in
bf16 closer to the fp32 model than HF's eager attention). Both do GQA without copying K/V per query head, and give
blocked scores the dtype's minimum rather than -inf (a fully blocked row would be uniform, not NaN; the mask rules
give every row at least its diagonal anyway). Flex keeps scores and softmax in fp32 and blocks with -inf, which no
row notices for the same reason. Selected by `BDGemmaConfig.attention_impl`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch.utils.checkpoint import checkpoint

from megatron_bdgemma.config import BDGemmaConfig
from megatron_bdgemma.masks import AttentionMask, to_additive
from megatron_bdgemma.precision import compute_dtype

__all__ = ["EagerCoreAttention", "BlockSparseCoreAttention", "FlexCoreAttention", "CORE_ATTENTION", "masked_attention"]


def masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """query `[Sq, B, h, d]`, key/value `[Sk, B, g, d]`, bias `[B, 1, Sq, Sk]` in the query dtype (0 = attend, the
    dtype's minimum = blocked: `masks.to_additive`) → `[Sq, B, h*d]`.

    Adding the minimum gives a blocked score exactly that minimum (any score is below its rounding step), as
    selecting it would, and an allowed score is left exact.

    On CPU this is PyTorch's fused SDPA kernel (flash attention over key blocks, scores and softmax in fp32, never a
    `[B, h, Sq, Sk]` tensor; its backward recomputes them): the same softmax(QKᵀ·scale + bias)V to fp32 rounding,
    and a fifth less CPU time than the explicit matmuls at bench_train's shapes. On CUDA a float bias with GQA at
    head dim 512 leaves SDPA only its math kernel, which copies K/V per query head, so the explicit path stays.

    In bf16 the kernel sums the bf16 products QKᵀ in fp32 and keeps the scores there, rounds only exp(score - max)
    to bf16 for the product with V, and rounds the fp32 output once; the explicit path (HF's eager attention)
    rounds the scores and the probabilities to bf16. So on CPU bf16 stays on the kernel too: on held-out tiny models
    the logits' mean distance to the fp32 model's, summed over eight seeds, is 0.90-0.96x that of HF's eager bf16
    model, against 1.01-1.05x through the explicit path; fp32 inputs to the kernel (0.94x, 0.90x) would add casts
    and fp32 copies of Q/K/V for at most a percent (tests/test_bf16.py).
    """
    sq, b, h, d = query.shape
    g = key.shape[2]
    if query.device.type == "cpu":
        out = F.scaled_dot_product_attention(
            *(t.permute(1, 2, 0, 3) for t in (query, key, value)), attn_mask=bias, scale=scale, enable_gqa=True
        )  # [B, h, Sq, d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, h * d)
    # The query heads of one KV head form one row block, so each product reads its K/V head as it is: broadcasting
    # K/V over the query heads instead would make matmul copy them once per query head.
    q = query.permute(1, 2, 0, 3).reshape(b, g, h // g * sq, d)
    k = key.permute(1, 2, 0, 3)  # [B, g, Sk, d]; a view of a `[B, g, Sk, d]` cache buffer is already contiguous
    v = value.permute(1, 2, 0, 3)
    scores = torch.matmul(q, k.transpose(-1, -2))  # [B, g, h/g·Sq, Sk]
    if scale != 1.0:  # Gemma's q/k norms carry the scale: 1.0, and a pass over the scores saved
        scores = scores * scale
    scores = scores.view(b, g, h // g, sq, -1) + bias.unsqueeze(1)
    probs = torch.softmax(scores, dim=-1, dtype=compute_dtype(q.dtype)).to(q.dtype)
    out = torch.matmul(probs.view(b, g, h // g * sq, -1), v)  # [B, g, h/g·Sq, d]
    return out.view(b, h, sq, d).permute(2, 0, 1, 3).reshape(sq, b, h * d)


class _CoreAttention(MegatronModule):
    """What Megatron's `Attention` builds its `core_attention` with; each backend adds its `forward`."""

    def __init__(self, config: BDGemmaConfig, softmax_scale: float | None = None, **unused: Any) -> None:
        super().__init__(config=config)
        self.softmax_scale = 1.0 if softmax_scale is None else softmax_scale


class EagerCoreAttention(_CoreAttention):
    """Attention under the mask's dense grid: the reference path."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """query `[Sq, B, h, d]`, key/value `[Sk, B, g, d]` → `[Sq, B, h*d]`."""
        return masked_attention(query, key, value, mask.additive(query.dtype), self.softmax_scale)


class BlockSparseCoreAttention(_CoreAttention):
    """Attention by query chunks over the key spans the mask allows; memory ∝ S·chunk.

    Chunks that read as many keys are batched into one call (stacked along the batch), as many at a time as read
    no more keys together than one chunk over all keys would: a packed row of short records is many chunks of batch
    1 where unpadded rows of the same records are a few chunks of a larger batch, and per call the mask tile, the
    K/V copies and their gradients, and the recomputation each cost more than the arithmetic of a small chunk
    (docs/performance.md "Packed sequences")."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """query `[Sq, B, h, d]`, key/value `[Sk, B, g, d]` → `[Sq, B, h*d]`."""
        chunk = mask.query_chunk or self.config.attention_chunk_size
        groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        for start, end in mask.query_chunks(chunk):
            keys = torch.cat([torch.arange(a, b) for a, b in mask.key_spans(start, end)])
            groups.setdefault((end - start, len(keys)), []).append((start, keys))
        # Recompute in backward only when a graph is being built and the calls together would keep more than one
        # chunk over all keys would (their mask tiles and K/V copies): a no-grad pass frees each call as it goes,
        # and the canvas blocks of a packed row, one per record (SFT), read at most that much: their contexts are
        # disjoint.
        reads = sum(length * num_keys * len(members) for (length, num_keys), members in groups.items())
        recompute = (
            reads > chunk * mask.num_keys and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        )
        outputs: dict[int, torch.Tensor] = {}
        for (length, num_keys), members in groups.items():
            per_call = max(1, mask.num_keys // num_keys)  # the bias and K/V of a call stay ≤ one full chunk's
            for i in range(0, len(members), per_call):
                starts, keys = zip(*members[i : i + per_call])
                queries = torch.stack([torch.arange(a, a + length) for a in starts]).to(query.device)  # [n, Q']
                keys = torch.stack(keys).to(query.device)  # [n, K']
                args = (query, key, value, mask, queries, keys, self.softmax_scale)
                out = checkpoint(_attend_chunks, *args, use_reentrant=False) if recompute else _attend_chunks(*args)
                outputs.update(zip(starts, out.unbind(1)))
        return torch.cat([outputs[start] for start in sorted(outputs)], dim=0)


def _attend_chunks(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: AttentionMask, queries: torch.Tensor,
    keys: torch.Tensor, scale: float,
) -> torch.Tensor:
    """`n` chunks at once, each its queries `queries[i]` over its keys `keys[i]` (`[n, Q']`, `[n, K']`), as one
    attention over a batch of `n·B` → `[Q', n, B, h*d]`."""
    n, length = queries.shape
    b = query.shape[1]
    # Indexing with the transposed index puts the chunk next to the batch: `[Q', n, B, ...]`, a batch of n·B as a view.
    q, k, v = (t[index.T].flatten(1, 2) for t, index in ((query, queries), (key, keys), (value, keys)))
    allowed = mask.tile(queries, keys).flatten(0, 1)  # [n·B, 1, Q', K']
    return masked_attention(q, k, v, to_additive(allowed, query.dtype), scale).view(length, n, b, -1)


class FlexCoreAttention(_CoreAttention):
    """Attention by FlexAttention under the mask's cached `BlockMask` (GQA native, scale explicit)."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """query `[Sq, B, h, d]`, key/value `[Sk, B, g, d]` → `[Sq, B, h*d]`."""
        sq, b, h, d = query.shape
        if sq == 0:
            return query.new_empty(0, b, h * d)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [B, heads, S, d]
        block_mask = mask.block_mask()
        if q.device.type == "cuda":
            out = _compiled_flex_attention()(
                q, k, v, block_mask=block_mask, scale=self.softmax_scale, enable_gqa=True,
                kernel_options=_LARGE_HEAD_KERNEL_OPTIONS if d > 256 else None,
            )
        else:
            out = _flex_attention_reference(q, k, v, block_mask, self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, h * d)


_LARGE_HEAD_KERNEL_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 32, "num_stages": 1}
"""Triton blocks for head dims > 256 (Gemma 4 full layers: 512): the defaults need more shared memory than Hopper
has (262144 B > 232448 B); these run forward and backward at d=512 on an H200 (docs/performance.md)."""


@functools.cache
def _compiled_flex_attention() -> Any:
    """`flex_attention` under `torch.compile`, made once per process; new masks of the same kind reuse its kernels."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any, scale: float
) -> torch.Tensor:
    """FlexAttention's own dense implementation (`[B, h, Sq, d]`, GQA by repeating KV heads), with its autograd.

    The public `flex_attention` raises "FlexAttention does not support backward on CPU" for inputs that need grad
    (also under `torch.compile`), so this calls the higher-order op it wraps, as the public function does in its
    compile-debug mode. The op evaluates the block mask's `mask_mod` over the whole grid (vmapped) and ignores its
    block tables; its kernel options only steer compiled kernels.
    """
    from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_op

    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    out, _, _ = flex_attention_op(q, k, v, _identity_score, block_mask.as_tuple(), scale, {})
    return out


def _identity_score(score: torch.Tensor, *indices: torch.Tensor) -> torch.Tensor:
    """FlexAttention `score_mod` (score, b, h, q, k) that leaves the score alone: masking is the block mask's job."""
    return score


CORE_ATTENTION = {"eager": EagerCoreAttention, "block_sparse": BlockSparseCoreAttention, "flex": FlexCoreAttention}
"""`BDGemmaConfig.attention_impl` → the core-attention module the layer spec uses."""
