"""Core attention (softmax(QKᵀ)V over local heads) under an `AttentionMask` rule, in two interchangeable backends.

- `EagerCoreAttention`: the reference. One dense `[B, 1, Sq, Sk]` mask and one `[B, h, Sq, Sk]` score tensor;
  memory grows with Sq·Sk, which at a 16K-token prompt is gigabytes per layer.
- `BlockSparseCoreAttention`: the same math, one chunk of queries at a time (a canvas block, or
  `attention_chunk_size` encoder positions) over only the key spans the mask says that chunk can see, with the
  mask tile built from the rule on the spot. In training each chunk is recomputed in backward rather than keeping
  its probabilities, so nothing of size Sq·Sk is ever held: memory grows with S·chunk. Sliding layers touch only
  their window; canvas blocks only their encoder prefix and their own block.

Both use fp32 softmax over scores in the activation dtype (HF's eager path), GQA by broadcasting each KV head over
its query heads, and give blocked scores the dtype's minimum rather than -inf (a fully blocked row would be uniform,
not NaN; the mask rules give every row at least its diagonal anyway). Selected by `BDGemmaConfig.attention_impl`.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.module import MegatronModule
from torch.utils.checkpoint import checkpoint

from megatron_bdgemma.config import BDGemmaConfig
from megatron_bdgemma.masks import AttentionMask

__all__ = ["EagerCoreAttention", "BlockSparseCoreAttention", "CORE_ATTENTION", "masked_attention"]


def masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """query `[Sq, B, h, d]`, key/value `[Sk, B, g, d]`, allowed `[B, 1, Sq, Sk]` (True = attend) → `[Sq, B, h*d]`."""
    sq, b, h, d = query.shape
    g = key.shape[2]
    q = query.permute(1, 2, 0, 3).reshape(b, g, h // g, sq, d)  # query heads grouped by their KV head
    k = key.permute(1, 2, 0, 3).unsqueeze(2)  # [B, g, 1, Sk, d]
    v = value.permute(1, 2, 0, 3).unsqueeze(2)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, g, h/g, Sq, Sk]
    scores = scores.masked_fill(~allowed.unsqueeze(1), torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v)  # [B, g, h/g, Sq, d]
    return out.reshape(b, h, sq, d).permute(2, 0, 1, 3).reshape(sq, b, h * d)


class EagerCoreAttention(MegatronModule):
    """Attention under the mask's dense grid: the reference path."""

    def __init__(self, config: BDGemmaConfig, softmax_scale: float | None = None, **unused: Any) -> None:
        super().__init__(config=config)
        self.softmax_scale = 1.0 if softmax_scale is None else softmax_scale

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """query `[Sq, B, h, d]`, key/value `[Sk, B, g, d]` → `[Sq, B, h*d]`."""
        return masked_attention(query, key, value, mask.dense(), self.softmax_scale)


class BlockSparseCoreAttention(MegatronModule):
    """Attention one query chunk at a time over the key spans the mask allows; memory ∝ S·chunk."""

    def __init__(self, config: BDGemmaConfig, softmax_scale: float | None = None, **unused: Any) -> None:
        super().__init__(config=config)
        self.softmax_scale = 1.0 if softmax_scale is None else softmax_scale
        self.chunk_size = config.attention_chunk_size

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """query `[Sq, B, h, d]`, key/value `[Sk, B, g, d]` → `[Sq, B, h*d]`."""
        chunk = mask.query_chunk or self.chunk_size
        # Recompute in backward only when a graph is being built and there is more than one chunk: a no-grad pass
        # frees each chunk as it goes, and a single chunk holds no more than its own recomputation would.
        recompute = (
            query.shape[0] > chunk and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        )
        outputs = []
        for start in range(0, query.shape[0], chunk):
            end = min(start + chunk, query.shape[0])
            args = (query[start:end], key, value, mask, start, end, self.softmax_scale)
            outputs.append(checkpoint(_attend_chunk, *args, use_reentrant=False) if recompute else _attend_chunk(*args))
        return torch.cat(outputs, dim=0)


def _attend_chunk(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: AttentionMask, start: int, end: int, scale: float
) -> torch.Tensor:
    """Queries `[start, end)` over the mask's key spans for them; slices of K/V are views when there is one span."""
    spans = mask.key_spans(start, end)
    device = query.device
    keys = torch.cat([torch.arange(a, b, device=device) for a, b in spans])
    if len(spans) == 1:
        (a, b), = spans
        key, value = key[a:b], value[a:b]
    else:
        key = torch.cat([key[a:b] for a, b in spans])
        value = torch.cat([value[a:b] for a, b in spans])
    allowed = mask.tile(torch.arange(start, end, device=device), keys)
    return masked_attention(query, key, value, allowed, scale)


CORE_ATTENTION = {"eager": EagerCoreAttention, "block_sparse": BlockSparseCoreAttention}
"""`BDGemmaConfig.attention_impl` → the core-attention module the layer spec uses."""
