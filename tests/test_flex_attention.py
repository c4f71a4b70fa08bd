"""Contract of the `flex` core attention: `FlexCoreAttention` = `EagerCoreAttention` in values and gradients.

On CPU FlexAttention runs its dense reference implementation (the mask rule's ``allowed_at`` vmapped over the
whole grid as ``mask_mod``), so these tests pin the rule-as-``mask_mod`` semantics of every mask kind, the layout
conversions, GQA and the scale; the block tables that compiled GPU kernels skip tiles by are checked against the
dense grid separately. Guards: every mask kind through FlexAttention's vmap, one ``BlockMask`` per mask object,
and a tiny model's training losses and gradients equal to eager attention.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from megatron_bdgemma.config import tiny
from megatron_bdgemma.layers.core_attention import EagerCoreAttention, FlexCoreAttention
from megatron_bdgemma.masks import AttentionMask, BlockDiffusionTrainingMask, DecodeInferenceMask, EncoderMask
from tests.hf_models import randomise_scales

TOLERANCE = 1e-5  # fp32 max-abs, values and gradients, relative to the largest entry where that exceeds 1

# Example 0: left padding (2) and a hole (positions 6, 7); example 1: all valid.
VALID = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1], [1] * 12]).bool()
GROUPS = torch.tensor([[-1, -1, -1, 0, 0, 0, 0, -1, -1, -1, -1, -1], [-1, 0, 0, 0, -1, -1, -1, -1, -1, 1, 1, 1]])

MASKS = {
    "encoder_full": lambda: EncoderMask(VALID, None),
    "encoder_sliding": lambda: EncoderMask(VALID, 3),
    "encoder_last_queries": lambda: EncoderMask(VALID, 3, num_queries=5),  # a generation step after cached keys
    "encoder_last_queries_full": lambda: EncoderMask(VALID, None, num_queries=1),
    # Images: example 0 one group of 4 (longer than the window), example 1 two groups, one of them the last keys.
    "encoder_vision_sliding": lambda: EncoderMask(VALID, 3, vision_groups=GROUPS),
    "encoder_vision_full": lambda: EncoderMask(VALID, None, vision_groups=GROUPS),
    "training_all_blocks": lambda: BlockDiffusionTrainingMask(
        torch.tensor([3, 1]), torch.tensor([6, 9]), 12, 12, 4, None
    ),
    "training_all_blocks_sliding": lambda: BlockDiffusionTrainingMask(
        torch.tensor([3, 1]), torch.tensor([6, 9]), 12, 12, 4, 3
    ),
    "training_canvas_block_ids": lambda: BlockDiffusionTrainingMask(
        torch.tensor([3, 1]), torch.tensor([6, 9]), 12, 8, 4, 5, canvas_block_ids=torch.tensor([[1, -1], [2, 0]])
    ),
    "decode_window": lambda: DecodeInferenceMask(VALID, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool(), 5),
    "decode_full_no_cache": lambda: DecodeInferenceMask(VALID[:, :0], None, None, canvas_len=4),
}


@pytest.fixture
def config(model_parallel):
    return tiny()


def _compare(config, mask: AttentionMask, heads: int, groups: int, head_dim: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    B, Q, K = mask.batch_size, mask.num_queries, mask.num_keys

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).requires_grad_()

    # Scores of order 1, so the softmax is not one-hot.
    qk = head_dim**-0.25
    inputs = (
        randn(Q, B, heads, head_dim, scale=qk), randn(K, B, groups, head_dim, scale=qk), randn(K, B, groups, head_dim)
    )
    grad_out = torch.randn(Q, B, heads * head_dim, generator=generator)
    results = []
    # Flex first: the rule's lazily cached helpers (e.g. EncoderMask._key_bounds) are then first evaluated under
    # FlexAttention's vmap, and the eager grid built afterwards from them.
    for module in (FlexCoreAttention(config, softmax_scale=0.7), EagerCoreAttention(config, softmax_scale=0.7)):
        q, k, v = (t.detach().clone().requires_grad_() for t in inputs)
        out = module(q, k, v, mask)
        out.backward(grad_out)
        results.append((out.detach(), q.grad, k.grad, v.grad))
    for name, flex, eager in zip(("output", "dq", "dk", "dv"), *results):
        assert eager.shape == flex.shape, name
        diff, scale = (eager - flex).abs().max().item(), eager.abs().max().item()
        assert diff <= TOLERANCE * max(scale, 1.0), f"{name} differs by {diff:.2e} (max {scale:.2e})"


@pytest.mark.parametrize("name", MASKS)
@pytest.mark.parametrize("heads,groups", [(4, 2), (2, 2)])
def test_flex_equals_eager_every_mask(config, name, heads, groups):
    mask = MASKS[name]()
    _compare(config, mask, heads, groups, head_dim=16)
    assert torch.equal(mask.dense(), MASKS[name]().dense()), "helpers cached under vmap changed the grid"


@pytest.mark.parametrize("head_dim", [256, 512])
@pytest.mark.parametrize("name", ["encoder_sliding", "training_canvas_block_ids"])
def test_flex_equals_eager_gemma_head_dims(config, name, head_dim):
    _compare(config, MASKS[name](), 4, 2, head_dim)


def test_block_mask_is_built_once_per_mask(config, monkeypatch):
    import torch.nn.attention.flex_attention as fa

    calls = []
    create = fa.BlockMask.from_kv_blocks
    monkeypatch.setattr(fa.BlockMask, "from_kv_blocks", lambda *a, **kw: calls.append(1) or create(*a, **kw))
    mask, attention = MASKS["encoder_sliding"](), FlexCoreAttention(config)
    q, kv = torch.randn(12, 2, 4, 8), torch.randn(12, 2, 2, 8)
    first, second = attention(q, kv, kv, mask), attention(q, kv, kv, mask)  # two layers sharing one mask
    assert len(calls) == 1 and mask.block_mask() is mask.block_mask() and torch.equal(first, second)
    assert mask.select(torch.tensor([1])).block_mask() is not mask.block_mask()


@pytest.mark.parametrize(
    "mask",
    [
        EncoderMask(torch.arange(300)[None].repeat(2, 1) % 97 != 5, 64),
        EncoderMask(torch.ones(1, 300, dtype=torch.bool), 64, num_queries=40),
        BlockDiffusionTrainingMask(torch.tensor([20, 150]), torch.tensor([260, 90]), 300, 256, 32, 64),
        DecodeInferenceMask(torch.arange(300)[None] % 50 != 0, None, 64, canvas_len=256),
        # An image of keys [120, 200) across a tile edge: its queries see before the window and after themselves.
        EncoderMask(torch.ones(1, 300, dtype=torch.bool), 64,
                    vision_groups=torch.where((torch.arange(300) >= 120) & (torch.arange(300) < 200), 0, -1)[None]),
    ],
    ids=["encoder_sliding", "encoder_last_queries", "training_sliding", "decode_sliding", "encoder_vision"],
)
def test_block_tables_cover_the_dense_grid(mask):
    """What compiled kernels rely on (CPU's reference ignores it): every allowed entry lies in a listed block, and
    blocks listed as full are entirely allowed. Several 128-blocks per side, some of them skipped."""
    block = mask.block_mask()
    bq, bk = block.BLOCK_SIZE
    dense = mask.dense()[:, 0]
    pad = (0, -dense.shape[-1] % bk, 0, -dense.shape[-2] % bq)
    tiles = F.pad(dense, pad).unflatten(-1, (-1, bk)).unflatten(1, (-1, bq))  # [B, Qb, bq, Kb, bk]
    any_allowed = tiles.any(dim=(2, 4))
    listed = block.to_dense()[:, 0].bool()
    assert torch.equal(listed & any_allowed, any_allowed), "an allowed entry lies in a skipped block"
    assert not listed.all(), "nothing is skipped: the case does not test the tables"
    full = block.full_kv_num_blocks is not None
    if full:
        full_listed = torch.zeros_like(listed)
        for b in range(listed.shape[0]):
            for qb in range(listed.shape[1]):
                n = int(block.full_kv_num_blocks[b, 0, qb])
                full_listed[b, qb, block.full_kv_indices[b, 0, qb, :n]] = True
        real = F.pad(torch.ones_like(dense), pad).unflatten(-1, (-1, bk)).unflatten(1, (-1, bq))
        assert torch.equal(full_listed & (tiles == real).all(dim=(2, 4)), full_listed), "a 'full' block is not"


def test_reference_matches_public_flex_attention(config):
    """The CPU path (FlexAttention's op, called directly so that backward works) = the public function, forward."""
    mask = MASKS["training_canvas_block_ids"]()
    q, k, v = torch.randn(2, 4, 8, 16) * 0.25, torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16)
    with pytest.warns(UserWarning, match="without torch.compile"):
        public = flex_attention(q, k, v, block_mask=mask.block_mask(), scale=0.7, enable_gqa=True)
    ours = FlexCoreAttention(config, softmax_scale=0.7)(*(t.permute(2, 0, 1, 3) for t in (q, k, v)), mask)
    assert (public.permute(2, 0, 1, 3).reshape(8, 2, 64) - ours).abs().max() <= 1e-6


def test_public_flex_attention_refuses_cpu_backward():
    """Why the CPU path calls the op directly; if torch lifts this, the public function can serve CPU too."""
    mask = MASKS["encoder_full"]()
    q = torch.randn(2, 2, 12, 8, requires_grad=True)
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        flex_attention(q, q, q, block_mask=mask.block_mask())


# ---- the whole model ---------------------------------------------------------------------------------------------


def test_tiny_model_training_forward_flex_equals_eager(model_parallel):
    from tests.test_training_forward import BLOCK, WINDOW, _all_blocks, _batch

    from megatron_bdgemma.model import BDGemmaModel

    batch = _batch()
    noised = _all_blocks(batch)
    results = []
    for impl in ("eager", "flex"):
        torch.manual_seed(0)
        model = BDGemmaModel(tiny(canvas_length=BLOCK, sliding_window=WINDOW, attention_impl=impl))
        randomise_scales(model)  # no norm weight or scalar is the identity
        out = model.training_forward(batch, noised)
        (out.diffusion_loss_sum + out.ar_loss_sum).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.diffusion_loss_sum.detach(), out.ar_loss_sum.detach(), grads))
    (diff_a, ar_a, grads_a), (diff_b, ar_b, grads_b) = results
    assert (diff_a - diff_b).abs() <= 1e-5 and (ar_a - ar_b).abs() <= 1e-5
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        diff = (grads_a[name] - grads_b[name]).abs().max().item()
        assert diff <= 1e-5 * max(grads_a[name].abs().max().item(), 1.0), f"{name}: gradient differs by {diff:.2e}"
