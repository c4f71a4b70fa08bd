"""Contract: the vocab-parallel, chunked loss path (`training_forward(..., loss_chunk_size=n)`) equals the plain
full-vocabulary path and keeps no vocabulary-sized tensor for the backward.

- 1 process: loss sums, counts and every parameter gradient equal the plain path's (ragged and single chunks).
- 2 gloo processes, TP=2 with sequence parallelism: `vocab_parallel_cross_entropy_sum` and
  `vocab_parallel_soft_embedding` give the values and gradients (hidden shard, vocabulary shard of E) of the
  full-vocabulary computation, and the model's loss sums equal the 1-process ones. Model gradients under TP are
  test_parallel_equivalence.py's job.
All in float64, the CE under TP to the fp32 precision of Megatron's kernel.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import megatron_bdgemma
from megatron_bdgemma.diffusion import build_sft_batch, noise_batch
from tests import hf_models
from tests.multiproc import run_in_processes
from tests.tolerances import record

VOCAB = 130  # even (TP=2) and unlike any other width of the tiny model, so `shape[-1] == VOCAB` means logits
TEXT = dict(num_global_key_value_heads=2, num_key_value_heads=2, vocab_size=VOCAB)  # TP=2 splits whole KV groups
DTYPE = torch.float64
"""Everything runs in float64 (`precision.compute_dtype`): fp32 rounding, summed over tokens in another grouping,
left 1.3e-6 of the largest entry in the tiny model's ill-conditioned q/k-norm and self-conditioning gradients."""
TOL = 1e-12
"""Values and gradients relative to the largest magnitude of each. Worst measured with the defaults (AVX-512) and
under AVX2: 1-process chunked vs plain losses 1.5e-16 and gradients 2.0e-15; TP=2 soft embedding 6.5e-16 and its
weight gradient 4.0e-16: margins >= 500x."""
MEGATRON_CE_TOL = 1e-6
"""Under TP the chunked CE is Megatron's `vocab_parallel_cross_entropy`, which computes in fp32 whatever the logits'
dtype: its value, gradients and the TP=2 model's loss sums against float64 ones. Worst measured (the same with the
defaults and under AVX2): CE 1.4e-9, its gradients 8.1e-8, model loss sums 1.0e-8: margin 12x."""


def _inputs():
    """Two SFT examples (prompts 5 and 2, responses 7 and 5 tokens, block 4) and their noised canvas; the coins
    differ so both the gated and the zeroed self-conditioning signal are covered."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (2, 14), generator=generator)
    loss_mask, valid = torch.zeros(2, 14, dtype=torch.bool), torch.zeros(2, 14, dtype=torch.bool)
    loss_mask[0, 5:12], valid[0, :12] = True, True
    loss_mask[1, 2:7], valid[1, :7] = True, True
    batch = build_sft_batch(ids, loss_mask, valid, block_size=4, eos_id=1, pad_id=0)
    noised = noise_batch(batch, sample_indices=[0, 1], step=2, seed=5, vocab_size=VOCAB)
    return batch, dataclasses.replace(noised, self_conditioning=torch.tensor([True, False]))


def _step(model, loss_chunk_size: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """[diffusion sum, diffusion count, AR sum, AR count] and the parameter gradients of one training step."""
    model.zero_grad(set_to_none=True)
    out = model.training_forward(*_inputs(), loss_chunk_size=loss_chunk_size)
    (out.diffusion_loss_sum + out.ar_loss_sum).backward()
    values = torch.stack([out.diffusion_loss_sum.detach(), out.diffusion_tokens.to(DTYPE), out.ar_loss_sum.detach(),
                          out.ar_tokens.to(DTYPE)])
    return values, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference relative to the expected tensor's largest magnitude."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(hf_models.save(hf_models.diffusion_gemma(TEXT), tmp_path_factory.mktemp("dg") / "hf"))


@pytest.fixture(scope="module")
def plain(checkpoint) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from megatron_bdgemma.runtime.distributed import ensure_model_parallel

    ensure_model_parallel()
    return _step(megatron_bdgemma.from_hf(checkpoint, dtype=DTYPE), None)


@pytest.mark.parametrize("chunk", [3, 1000], ids=["ragged_chunks", "one_chunk"])
def test_chunked_equals_plain(checkpoint, plain, model_parallel, chunk):
    values, grads = _step(megatron_bdgemma.from_hf(checkpoint, dtype=DTYPE), chunk)
    expected, expected_grads = plain
    losses = ((values - expected).abs() / expected.abs()).max().item()
    record("losses", losses, TOL)
    assert losses <= TOL, (values, expected)
    assert grads.keys() == expected_grads.keys()
    assert "self_conditioning.mlp.linear_fc1.weight" in grads and "embedding.word_embeddings.weight" in grads
    differences = {name: _relative(grad, expected_grads[name]) for name, grad in grads.items()}
    record("grads", max(differences.values()), TOL)
    assert max(differences.values()) <= TOL, {name: d for name, d in differences.items() if d > TOL}


def test_no_vocabulary_sized_tensor_is_kept_for_backward(checkpoint, model_parallel):
    model = megatron_bdgemma.from_hf(checkpoint)

    def widths_saved(loss_chunk_size: int | None) -> set[int]:
        widths: set[int] = set()

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            widths.add(tensor.shape[-1] if tensor.dim() else 0)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model.training_forward(*_inputs(), loss_chunk_size=loss_chunk_size)
        return widths

    assert VOCAB in widths_saved(None), "the probe should see the plain path's logits"
    assert VOCAB not in widths_saved(4)


def _check_tp2(rank: int, path: str, plain_values: torch.Tensor) -> dict[str, float]:
    """One TP=2 + SP rank: function-level values and gradients against the full computation, model loss sums; each
    relative to the expected tensor's largest magnitude."""
    from megatron.core import parallel_state

    from megatron_bdgemma.runtime.distributed import init_distributed
    from megatron_bdgemma.vocab_parallel import softcap, vocab_parallel_cross_entropy_sum, vocab_parallel_soft_embedding

    init_distributed(tp=2)
    group = parallel_state.get_tensor_model_parallel_group()
    diffs = {}

    # Functions: the same random tensors on both ranks; each keeps its sequence shard and vocabulary shard.
    generator = torch.Generator().manual_seed(1)
    S, B, H, cap, scale = 6, 2, 8, 3.0, 2.5
    hidden = torch.randn(S, B, H, generator=generator, dtype=DTYPE)
    weight = torch.randn(VOCAB, H, generator=generator, dtype=DTYPE)
    targets = torch.randint(0, VOCAB, (B, S), generator=generator)
    weights = torch.rand(B, S, generator=generator, dtype=DTYPE)
    weights[0, :2] = 0.0  # unscored tokens are skipped
    probe = torch.randn(S, B, H, generator=generator, dtype=DTYPE)  # a fixed cotangent for the soft embedding
    seq, voc = slice(rank * S // 2, (rank + 1) * S // 2), slice(rank * VOCAB // 2, (rank + 1) * VOCAB // 2)
    head = dict(cap=cap, chunk_size=3, sequence_parallel=True, tp_group=group)

    # The CE and the soft embedding each with their own leaves: the CE's fp32 gradients would hide the soft
    # embedding's float64 ones in a sum.
    hidden_shard, weight_shard = hidden[seq].clone().requires_grad_(), weight[voc].clone().requires_grad_()
    ce = vocab_parallel_cross_entropy_sum(hidden_shard, weight_shard, targets, weights, **head)
    ce.backward()
    full_hidden, full_weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = softcap(full_hidden.transpose(0, 1) @ full_weight.t(), cap)  # [B, S, V]
    expected_ce = (F.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * weights).sum()
    expected_ce.backward()
    diffs["ce"] = _relative(ce.detach(), expected_ce.detach())
    diffs["ce_hidden_grad"] = _relative(hidden_shard.grad, full_hidden.grad[seq])
    diffs["ce_weight_grad"] = _relative(weight_shard.grad, full_weight.grad[voc])

    weight_shard, full_weight = weight[voc].clone().requires_grad_(), weight.clone().requires_grad_()
    signal = vocab_parallel_soft_embedding(hidden[seq], weight_shard, scale=scale, **head)
    (signal * probe[seq]).sum().backward()
    expected_signal = (torch.softmax(logits.detach(), -1) @ full_weight).transpose(0, 1) * scale  # [S, B, H]
    (expected_signal * probe).sum().backward()
    diffs["signal"] = _relative(signal.detach(), expected_signal.detach()[seq])
    diffs["signal_weight_grad"] = _relative(weight_shard.grad, full_weight.grad[voc])

    # The model: loss sums from the vocab-parallel path equal the 1-process plain ones (backward runs, so its
    # collectives are exercised, but model gradients under TP are compared elsewhere).
    model = megatron_bdgemma.from_hf(path, dtype=DTYPE, sequence_parallel=True)
    values, _ = _step(model, 3)
    diffs["losses"] = ((values - plain_values).abs() / plain_values.abs()).max().item()
    return diffs


MEGATRON_CE = ("ce", "ce_hidden_grad", "ce_weight_grad", "losses")
"""The comparisons that go through Megatron's fp32 `vocab_parallel_cross_entropy` (`MEGATRON_CE_TOL`)."""


def test_tp2_sequence_parallel_matches_one_process(checkpoint, plain, model_parallel):
    for rank, diffs in enumerate(run_in_processes(_check_tp2, 2, checkpoint, plain[0])):
        assert len(diffs) == 6, diffs
        bounds = {name: MEGATRON_CE_TOL if name in MEGATRON_CE else TOL for name in diffs}
        for name, value in diffs.items():
            record(f"rank {rank} {name}", value, bounds[name])
        assert all(value <= bounds[name] for name, value in diffs.items()), (rank, diffs)
