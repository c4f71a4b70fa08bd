"""Two-pass self-conditioning (docs/design.md §6, Analog Bits style).

The decoder input is `rmsnorm_noscale(e + down(gelu_tanh(gate(u)) * up(u)))` with `u = rmsnorm_w(s)`, where `s`
is the soft embedding of the previous pass's logits (`soft_embedding`) or exactly zero when self-conditioning is
off for that example (zero *logits* would give the mean embedding, which is not "off").
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import get_pg_rank, get_pg_size

from megatron_bdgemma.config import BDGemmaConfig
from megatron_bdgemma.layers.linear import plain_glu_mlp
from megatron_bdgemma.layers.norm import RMSNorm, rms_normalize


def soft_embedding(
    probs: torch.Tensor, embedding_weight: torch.Tensor, scale: float, tp_group: torch.distributed.ProcessGroup
) -> torch.Tensor:
    """`(probs.to(E.dtype) @ E) · √H` for full-vocabulary probabilities `[B, R, V]` (the fp32 softmax of the previous
    pass's logits) → `[B, R, H]`.

    With a vocab-parallel embedding each TP rank holds rows `[r·V/tp, (r+1)·V/tp)` of E: it multiplies its slice
    of the probabilities and the partial sums are all-reduced over `tp_group` (which also routes the gradient to
    every shard).
    """
    probs = probs.to(embedding_weight.dtype)
    shard = embedding_weight.shape[0]
    start = get_pg_rank(tp_group) * shard
    partial = probs[..., start : start + shard] @ embedding_weight
    if get_pg_size(tp_group) > 1:  # one rank holds the whole sum (the reduction's autograd is the identity then)
        partial = reduce_from_tensor_model_parallel_region(partial, group=tp_group)
    return partial * torch.tensor(scale, dtype=embedding_weight.dtype)


class SelfConditioning(MegatronModule):
    def __init__(self, config: BDGemmaConfig, mlp: MLPSubmodules) -> None:
        super().__init__(config=config)
        self.pre_norm = RMSNorm(config, config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config, mlp, ffn_hidden_size=config.ffn_hidden_size)

    def freeze(self) -> None:
        """`freeze_self_conditioning`: no gradient for these parameters. Set before DDP wraps the model, so they get
        no gradient buffer and no optimizer state; the checkpoint still saves them (the model's state dict)."""
        self.requires_grad_(False)

    def forward(self, embeddings: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        """embeddings, signal `[R, B, H]` → decoder input `[R, B, H]`."""
        normed = self.pre_norm(signal)
        mixed = plain_glu_mlp(self.mlp, normed)
        if mixed is None:
            mixed, _ = self.mlp(normed)
        return rms_normalize(embeddings + mixed, self.config.layernorm_epsilon).type_as(embeddings)
