"""Contract of megatron_bdgemma.diffusion.loss: fp32 CE sums and counts (docs/design.md §7).

Guards: the diffusion loss is flat CE over every scored slot, noised or not (uniform kernel), or 1/t on noised
slots with the count still over all scored slots (absorbing option); the AR loss is next-token CE over valid
pairs; sums and counts (not means) come back so the trainer can normalise globally; chunked CE equals unchunked
CE in value and gradient.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_bdgemma.diffusion import (
    ar_loss,
    build_sft_batch,
    diffusion_loss,
    diffusion_loss_weights,
    normalise,
    weighted_cross_entropy_sum,
)

V = 37


def _naive(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-token loop in float64: Σ w · (−log softmax(logits)[target])."""
    total = torch.zeros((), dtype=torch.float64)
    for idx in zip(*torch.nonzero(weights, as_tuple=True)):
        row = logits[idx].double()
        total = total + weights[idx].double() * -(row.log_softmax(-1)[targets[idx]])
    return total


def _inputs(B=3, R=10, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (30 * torch.tanh(torch.randn(B, R, V, generator=g) * 3 / 30)).to(dtype)  # softcapped like the model
    targets = torch.randint(V, (B, R), generator=g)
    scored = torch.rand(B, R, generator=g) < 0.6
    return logits, targets, scored


def test_diffusion_loss_matches_naive_loop_and_counts():
    logits, targets, scored = _inputs()
    targets = torch.where(scored, targets, -100)  # unscored targets may be sentinels: never read
    loss_sum, count = diffusion_loss(logits, targets, scored)
    assert loss_sum.dtype == torch.float32 and loss_sum.dim() == 0
    assert count.dtype == torch.int64 and int(count) == int(scored.sum())
    torch.testing.assert_close(loss_sum.double(), _naive(logits, targets, scored.double()), rtol=1e-6, atol=1e-5)


def test_absorbing_weights_are_inverse_t_on_noised_and_count_all_scored():
    logits, targets, scored = _inputs(seed=1)
    noised = torch.rand(scored.shape, generator=torch.Generator().manual_seed(2)) < 0.5
    t = torch.rand(scored.shape[0], generator=torch.Generator().manual_seed(3))[:, None].expand_as(scored) * 0.9 + 0.1

    uniform = diffusion_loss_weights(scored, noised, t, "uniform")
    assert torch.equal(uniform, scored.float())  # flat: noised and clean scored slots alike, no 1/t
    absorbing = diffusion_loss_weights(scored, noised, t, "absorbing")
    torch.testing.assert_close(absorbing, torch.where(scored & noised, 1 / t, 0.0))

    loss_sum, count = diffusion_loss(logits, targets, scored, absorbing)
    assert int(count) == int(scored.sum())  # NELBO averages over all scored tokens; clean ones contribute 0
    torch.testing.assert_close(loss_sum.double(), _naive(logits, targets, absorbing.double()), rtol=1e-6, atol=1e-5)


def test_bf16_logits_are_scored_in_fp32():
    logits, targets, scored = _inputs(dtype=torch.bfloat16, seed=4)
    loss_sum, _ = diffusion_loss(logits, targets, scored)
    assert loss_sum.dtype == torch.float32
    expected = _naive(logits.float(), targets, scored.double())
    torch.testing.assert_close(loss_sum.double(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 30, 1000])
def test_chunked_equals_unchunked_values_and_grads(chunk_size):
    logits, targets, scored = _inputs(B=3, R=10, seed=5)
    weights = scored.float() * torch.linspace(0.5, 2.0, 10)  # non-trivial weights exercise the weighting too
    ref_in = logits.clone().requires_grad_()
    ref = weighted_cross_entropy_sum(ref_in, targets, weights)
    ref.backward()
    chk_in = logits.clone().requires_grad_()
    out = weighted_cross_entropy_sum(chk_in, targets, weights, chunk_size=chunk_size)
    out.backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(chk_in.grad, ref_in.grad, rtol=0, atol=1e-7)
    assert (chk_in.grad[~scored] == 0).all()  # unscored slots get no gradient

    with torch.no_grad():  # the no-grad path (no checkpointing) gives the same value
        no_grad = weighted_cross_entropy_sum(logits, targets, weights, chunk_size=chunk_size)
        torch.testing.assert_close(no_grad, ref.detach())


def test_ar_loss_is_next_token_ce_over_valid_pairs():
    # Two examples: prompt + answer, right-padded; the layout shifts labels and masks pad pairs.
    ids = torch.tensor([[5, 6, 7, 8, 9, 0, 0], [5, 6, 7, 8, 9, 10, 11]])
    lm = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1]])
    batch = build_sft_batch(ids, lm, ids != 0, block_size=2, eos_id=1, pad_id=0)
    B, S = batch.input_ids.shape
    logits = torch.randn(B, S, V, generator=torch.Generator().manual_seed(6), requires_grad=True)
    loss_sum, count = ar_loss(logits, batch.ar_labels, batch.ar_loss_mask, chunk_size=3)

    expected, n = torch.zeros((), dtype=torch.float64), 0
    for b in range(B):
        L = int(batch.encoder_valid[b].sum())
        for i in range(L - 1):  # every valid pair (i, i+1), prompt included
            expected = expected - logits[b, i].double().log_softmax(-1)[batch.input_ids[b, i + 1]]
            n += 1
    assert int(count) == n
    torch.testing.assert_close(loss_sum.double(), expected.detach(), rtol=1e-6, atol=1e-5)
    loss_sum.backward()
    assert (logits.grad[~batch.ar_loss_mask] == 0).all()


def test_normalise_by_global_count():
    s = torch.tensor(6.0)
    assert normalise(s, torch.tensor(3)).item() == 2.0
    assert normalise(s, 4).item() == 1.5
    assert normalise(torch.tensor(0.0), torch.tensor(0)).item() == 0.0  # nothing scored anywhere: 0, not NaN


def test_shape_mismatch_is_rejected():
    logits, targets, scored = _inputs()
    with pytest.raises(ValueError, match="leading dims"):
        diffusion_loss(logits, targets[:, :-1], scored[:, :-1])
    # Sanity: the flat helper agrees with summing per-token CE the plain torch way.
    flat = F.cross_entropy(logits[scored], targets[scored], reduction="sum")
    torch.testing.assert_close(diffusion_loss(logits, targets, scored)[0], flat)
