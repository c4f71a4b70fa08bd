"""Contract of the core-attention backends (`layers/core_attention.py`): the block-sparse path equals the eager
reference in values and gradients under every mask rule, holds nothing of size Sq·Sk for backward, and gives the
whole model (training forward, recompute, generation) the same results."""

from __future__ import annotations

import pytest
import torch

from megatron_bdgemma.config import tiny
from megatron_bdgemma.diffusion import NoisedCanvas, noise_batch
from megatron_bdgemma.generation import generate
from megatron_bdgemma.layers import core_attention
from megatron_bdgemma.layers.core_attention import BlockSparseCoreAttention, EagerCoreAttention, masked_attention
from megatron_bdgemma.masks import BlockDiffusionTrainingMask, DecodeInferenceMask, EncoderMask
from megatron_bdgemma.model import BDGemmaModel
from tests.test_training_forward import BLOCK, WINDOW, _batch
from tests.test_training_forward import _model as _random_model

CHUNK = 3  # does not divide the lengths below, so the last chunk is short


def _backends(chunk: int = CHUNK) -> tuple[EagerCoreAttention, BlockSparseCoreAttention]:
    config = tiny(attention_chunk_size=chunk)
    return EagerCoreAttention(config, softmax_scale=0.7), BlockSparseCoreAttention(config, softmax_scale=0.7)


def _padded(batch: int, length: int) -> torch.Tensor:
    """Row 0 left-padded, row 1 with holes, the rest whole."""
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[0, :3] = False
    valid[1, 4:6] = False
    return valid


def _masks():
    """(name, mask, number of keys the caller passes as K/V) for every rule, windows shorter than the sequences."""
    prefix, response = torch.tensor([2, 5]), torch.tensor([9, 4])  # S = 14, R = 12, blocks of 4
    yield "encoder full", EncoderMask(_padded(2, 11), None)
    yield "encoder sliding", EncoderMask(_padded(2, 11), 4)
    yield "encoder, last 4 queries (generation)", EncoderMask(_padded(2, 11), 4, num_queries=4)
    yield "training all blocks full", BlockDiffusionTrainingMask(prefix, response, 14, 12, 4, None)
    yield "training all blocks sliding", BlockDiffusionTrainingMask(prefix, response, 14, 12, 4, 5)
    ids = torch.tensor([[2, -1], [0, 1]])  # example 0: its third block only; example 1: both of its blocks
    yield "training chosen blocks", BlockDiffusionTrainingMask(prefix, response, 14, 8, 4, 5, canvas_block_ids=ids)
    yield "inference decode sliding", DecodeInferenceMask(_padded(2, 9), None, 4, canvas_len=5)
    # Packed rows (docs/design.md §13): row 0 holds two records (6 and 8 tokens), row 1 one; chunks of one row
    # reading as many keys run as one batched call.
    segments = torch.tensor([[0] * 6 + [1] * 8, [0] * 14])
    yield "encoder packed sliding", EncoderMask(torch.ones(2, 14, dtype=torch.bool), 4, segment_ids=segments)
    starts, lens, ids = torch.tensor([[2, 9], [5, 5]]), torch.tensor([[4, 5], [9, 9]]), torch.tensor([[0, 1], [2, -1]])
    yield "training packed sliding", BlockDiffusionTrainingMask(starts, lens, 14, 8, 4, 5, ids, segments)


def _run(backend, q, k, v, mask, grad_out):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = backend(q, k, v, mask)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize(("heads", "groups", "head_dim"), [(4, 2, 8), (2, 2, 8), (2, 1, 256), (2, 1, 512)])
@pytest.mark.parametrize("case", list(_masks()), ids=lambda c: c[0])
def test_block_sparse_equals_eager(model_parallel, case, heads, groups, head_dim):
    _, mask = case
    generator = torch.Generator().manual_seed(0)
    # In float64: in fp32 the two differ by the rounding of SDPA's backward, which recomputes probabilities as
    # exp(score - logsumexp) with an error growing with |score| (up to ~80 here at d = 512): up to 2.0e-5 of the
    # scale, as far from each other as each is from float64 (eager 1.5e-5, block-sparse 1.2e-5, the packed canvas
    # case at d = 256). In float64 what is left is the order of the sums over other key counts.
    q = torch.randn(mask.num_queries, mask.batch_size, heads, head_dim, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(mask.num_keys, mask.batch_size, groups, head_dim, generator=generator, dtype=torch.float64)
            for _ in range(2))
    grad_out = torch.randn(mask.num_queries, mask.batch_size, heads * head_dim, generator=generator,
                           dtype=torch.float64)
    eager, sparse = _backends()
    expected, got = _run(eager, q, k, v, mask, grad_out), _run(sparse, q, k, v, mask, grad_out)
    for name, a, b in zip(("output", "dq", "dk", "dv"), expected, got):
        # Relative to the tensor's scale (scores of order 20 and gradients of order 10 at d = 512): measured ≤ 4.2e-14
        # with the defaults and under AVX2.
        diff, scale = (a - b).abs().max().item(), a.abs().max().item()
        assert diff <= 1e-12 * max(scale, 1.0), f"{name} differs by {diff:.2e} (max {scale:.2e})"


def test_block_sparse_bf16_matches_eager(model_parallel):
    mask = BlockDiffusionTrainingMask(torch.tensor([2, 5]), torch.tensor([9, 4]), 14, 12, 4, 5)
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(12, 2, 4, 16, generator=generator).bfloat16()
    k, v = (torch.randn(26, 2, 2, 16, generator=generator).bfloat16() for _ in range(2))
    eager, sparse = _backends()
    # Same products and the same fp32 softmax; only the order of the fp32 row sums may differ.
    assert (eager(q, k, v, mask).float() - sparse(q, k, v, mask).float()).abs().max() <= 1e-2


def test_block_sparse_keeps_nothing_quadratic_for_backward(model_parallel):
    """Eager saves its dense `[.., S, S]` mask (off CPU its probabilities too); block-sparse saves only inputs (each
    chunk recomputes its mask tile and probabilities in backward)."""
    S, heads = 96, 2
    mask = EncoderMask(torch.ones(1, S, dtype=torch.bool), None)
    q = torch.randn(S, 1, heads, 8, requires_grad=True)
    k, v = (torch.randn(S, 1, 1, 8, requires_grad=True) for _ in range(2))
    largest = {}
    for name, backend in zip(("eager", "block_sparse"), _backends(chunk=8)):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            backend(q, k, v, mask).sum().backward()
        largest[name] = max(sizes)
    assert largest["eager"] >= S * S  # the check can fail: eager does hold a score-grid-sized tensor
    assert largest["block_sparse"] <= S * heads * 8, largest


@pytest.mark.parametrize("window", [None, 8])
def test_packed_row_attends_in_as_many_calls_as_unpadded_rows(model_parallel, monkeypatch, window):
    """Four records of 24 tokens packed in one row cost the block-sparse attention what the same records cost as
    four unpadded rows: as many calls over as many query-key pairs (chunks that read as many keys go through one
    call as a batch), with the same outputs; chunk by chunk, the packed row would make four times the calls
    (tools/bench_packing.py's control, docs/performance.md "Packed sequences")."""
    records, length, chunk = 4, 24, 6
    calls = {}

    def counted(query, key, value, bias, scale):
        calls[name].append(bias.shape[0] * query.shape[0] * key.shape[0])  # batch · queries · keys of the call
        return masked_attention(query, key, value, bias, scale)

    monkeypatch.setattr(core_attention, "masked_attention", counted)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(length, records, 2, 8, generator=generator)
    k, v = (torch.randn(length, records, 1, 8, generator=generator) for _ in range(2))
    segments = torch.arange(records).repeat_interleave(length)[None]
    packed_mask = EncoderMask(torch.ones(1, records * length, dtype=torch.bool), window, segment_ids=segments)
    unpadded_mask = EncoderMask(torch.ones(records, length, dtype=torch.bool), window)
    _, sparse = _backends(chunk=chunk)
    outputs = {}
    for name, mask, (q_, k_, v_) in (
        ("unpadded", unpadded_mask, (q, k, v)),
        ("packed", packed_mask, (t.transpose(0, 1).reshape(records * length, 1, *t.shape[2:]) for t in (q, k, v))),
    ):
        calls[name] = []
        outputs[name] = sparse(q_, k_, v_, mask)
    assert len(calls["packed"]) == len(calls["unpadded"]) == length // chunk, calls
    assert sum(calls["packed"]) == sum(calls["unpadded"]), calls
    packed_out = outputs["packed"].view(records, length, -1).transpose(0, 1)
    assert (packed_out - outputs["unpadded"]).abs().max() <= 1e-6


def test_sliding_chunks_touch_only_their_window(model_parallel):
    S, window, chunk = 64, 5, 8
    mask = EncoderMask(torch.ones(1, S, dtype=torch.bool), window)
    for start in range(0, S, chunk):
        (a, b), = mask.key_spans(start, start + chunk)
        assert b - a <= chunk + window - 1


# ---- the whole model ----------------------------------------------------------------------------------------


def _pair() -> tuple[BDGemmaModel, BDGemmaModel]:
    """Two models with equal random weights, eager and block-sparse (chunks of 3 encoder positions)."""
    eager = _random_model()
    sparse = BDGemmaModel(tiny(canvas_length=BLOCK, sliding_window=WINDOW, attention_impl="block_sparse", attention_chunk_size=CHUNK))
    sparse.load_state_dict(eager.state_dict())
    return eager, sparse


@pytest.mark.parametrize("score", ["all_blocks", "one_block"])
@pytest.mark.parametrize("recompute", [None, "full"])
def test_training_forward_equal_values_and_gradients(model_parallel, score, recompute):
    batch = _batch()
    noised = noise_batch(batch, sample_indices=[0, 1], step=2, seed=1, vocab_size=512, score=score)
    noised = NoisedCanvas(**{**noised.__dict__, "self_conditioning": torch.tensor([True, False])})
    results = []
    for model in _pair():
        model.config.recompute_granularity = recompute
        out = model.training_forward(batch, noised)
        (out.diffusion_loss_sum + out.ar_loss_sum).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.diffusion_loss_sum.item(), out.ar_loss_sum.item(), grads))
    (d_a, ar_a, grads_a), (d_b, ar_b, grads_b) = results
    assert d_a == pytest.approx(d_b, rel=1e-6) and ar_a == pytest.approx(ar_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        diff, scale = (grads_a[name] - grads_b[name]).abs().max().item(), grads_a[name].abs().max().item()
        assert diff <= 3e-5 * max(scale, 1.0), f"{name}: gradient differs by {diff:.2e} (max {scale:.2e})"


def test_generation_gives_the_same_tokens(model_parallel):
    prompts = torch.randint(2, 500, (2, 9), generator=torch.Generator().manual_seed(3))
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, :4] = True  # left padding, and prompts longer than the window
    tokens = []
    for model in _pair():
        model.eval()
        out = generate(model, prompts, padding_mask=padding, max_new_tokens=12, generator=torch.Generator().manual_seed(0))
        tokens.append(out.generated)
    assert torch.equal(tokens[0], tokens[1])
