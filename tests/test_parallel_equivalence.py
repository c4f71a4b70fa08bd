"""Contract: TP=2 (with SP) and EP=2 in 2 gloo processes give the same logits, losses and gradients as 1 process.

One tiny DiffusionGemma checkpoint is loaded at every layout, in float64. Under EP=2 the two ranks are also
data-parallel, so each takes one example and the per-rank sums are compared with the 1-process sums; under TP=2 both
ranks see the whole batch. Gradients are compared after the reductions Megatron's `finalize_model_grads` would do.
"""

from __future__ import annotations

import pytest
import torch

import megatron_bdgemma
from megatron_bdgemma.conversion.hf_checkpoint import shard_for_rank
from megatron_bdgemma.diffusion import build_sft_batch, noise_batch
from tests import hf_models
from tests.multiproc import run_in_processes
from tests.tolerances import record

# 2 KV heads on both layer types so TP=2 splits whole groups.
TEXT = dict(num_global_key_value_heads=2, num_key_value_heads=2)
DTYPE = torch.float64
"""The layouts are compared in float64 (norms, softmaxes, logits and losses too: `precision.compute_dtype`). In
fp32 the tiny random model's rounding noise (ill-conditioned q/k-norm and self-conditioning gradients,
tests/tolerances.py) reached 1.3e-5 of the largest logit and 4.6e-6 of a gradient's largest entry, and differs
between CPUs; in float64 it is ~1e-15, so a bound far below any real layout error holds on every machine."""
TOL = 1e-12
"""Logits relative to the largest logit, loss sums relative, gradients relative to each tensor's largest magnitude.
Worst measured over the three layouts: logits 2.4e-15, losses 2.6e-16, gradients 8.5e-15 with the defaults
(AVX-512); 2.2e-15, 2.6e-16, 9.3e-15 under AVX2: margins >= 100x."""


def _batch():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 96, (2, 14), generator=generator)
    loss_mask, valid = torch.zeros(2, 14, dtype=torch.bool), torch.zeros(2, 14, dtype=torch.bool)
    loss_mask[0, 5:12], valid[0, :12] = True, True
    loss_mask[1, 2:7], valid[1, :7] = True, True
    return build_sft_batch(ids, loss_mask, valid, block_size=4, eos_id=1, pad_id=0)


def _rows(batch, rows: slice):
    return batch.select(list(range(batch.batch_size))[rows])


def _run(model, batch, sample_indices):
    """Inference logits plus training-forward loss sums and gradients (global parameter names)."""
    with torch.no_grad():
        encoded = model.encode(batch.input_ids, padding_mask=~batch.encoder_valid, return_logits=True)
        positions = batch.canvas_position_ids[:, :4]
        decoded = model.decode(batch.canvas_targets[:, :4], encoded, canvas_position_ids=positions)
    model.train()
    noised = noise_batch(batch, sample_indices=sample_indices, step=2, seed=5, vocab_size=96)
    out = model.training_forward(batch, noised)
    (out.diffusion_loss_sum + out.ar_loss_sum).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return dict(encoder=encoded.logits, decoder=decoded, losses=torch.stack([out.diffusion_loss_sum, out.ar_loss_sum]).detach(),
                grads=grads)


def _global_name(model, name: str) -> str:
    """This rank's parameter name → the 1-process name (expert indices are local to the EP rank)."""
    from megatron.core import parallel_state

    if ".local_experts." not in name:
        return name
    head, rest = name.split(".local_experts.")
    local, tail = rest.split(".", 1)
    per_rank = model.config.num_moe_experts // parallel_state.get_expert_model_parallel_world_size()
    return f"{head}.local_experts.{int(local) + parallel_state.get_expert_model_parallel_rank() * per_rank}.{tail}"


def _check_layout(rank: int, path: str, tp: int, ep: int, attention: str, reference: dict) -> dict[str, float]:
    from megatron.core import parallel_state

    from megatron_bdgemma.runtime.distributed import init_distributed

    init_distributed(tp=tp, ep=ep)
    model = megatron_bdgemma.from_hf(path, dtype=DTYPE, sequence_parallel=tp > 1, attention_impl=attention)
    batch, indices = _batch(), [0, 1]
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    if dp_size > 1:  # each data-parallel rank takes its own example
        batch, indices = _rows(batch, slice(dp_rank, dp_rank + 1)), [dp_rank]
    ours = _run(model, batch, indices)
    rows = slice(dp_rank, dp_rank + 1) if dp_size > 1 else slice(None)
    diffs = {
        name: ((ours[name] - reference[name][rows]).abs().max() / reference[name][rows].abs().max()).item()
        for name in ("encoder", "decoder")
    }
    losses = ours["losses"].clone()
    torch.distributed.all_reduce(losses, group=parallel_state.get_data_parallel_group())
    diffs["losses"] = ((losses - reference["losses"]).abs() / reference["losses"].abs()).max().item()

    worst = 0.0
    tp_group = parallel_state.get_tensor_model_parallel_group()
    for name, param in model.named_parameters():
        if not param.requires_grad:  # the frozen router
            continue
        assert param.grad is not None, f"rank {rank}: no gradient for {name}"
        grad = param.grad.clone()
        is_expert = ".local_experts." in name
        if tp > 1 and (getattr(param, "sequence_parallel", False) or "q_layernorm" in name or "k_layernorm" in name):
            torch.distributed.all_reduce(grad, group=tp_group)  # finalize_model_grads' SP / qk-norm sum
        if dp_size > 1:
            group = parallel_state.get_expert_data_parallel_group() if is_expert else parallel_state.get_data_parallel_group()
            torch.distributed.all_reduce(grad, group=group)  # DDP's gradient sum
        full = reference["grads"][_global_name(model, name)]
        expected = shard_for_rank(name, full, param)
        err = (grad - expected).abs().max().item() / full.abs().max().item()
        if err > worst:
            worst, diffs["worst_param"] = err, name
    diffs["grads"] = worst
    return diffs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(hf_models.save(hf_models.diffusion_gemma(TEXT), tmp_path_factory.mktemp("dg") / "hf"))


@pytest.fixture(scope="module")
def reference(checkpoint):
    from megatron_bdgemma.runtime.distributed import ensure_model_parallel

    ensure_model_parallel()
    result = _run(megatron_bdgemma.from_hf(checkpoint, dtype=DTYPE), _batch(), [0, 1])
    return result


LAYOUTS = [(2, 1, "eager"), (1, 2, "eager"), (2, 1, "block_sparse")]  # the reference is 1 process, eager attention


def _check_layouts(rank: int, path: str, reference: dict) -> dict[tuple, dict[str, float]]:
    """Every layout in turn in the same 2 ranks (one spawn: process start and imports once; `init_distributed`
    rebuilds the groups for each)."""
    return {layout: _check_layout(rank, path, *layout, reference) for layout in LAYOUTS}


@pytest.fixture(scope="module")
def two_ranks(checkpoint, reference) -> list[dict]:
    return run_in_processes(_check_layouts, 2, checkpoint, reference, timeout_s=300)


@pytest.mark.parametrize("tp,ep,attention", LAYOUTS, ids=["tp2_sp", "ep2", "tp2_sp_block_sparse"])
def test_two_ranks_match_one(two_ranks, tp, ep, attention):
    for rank, got in enumerate(two_ranks):
        diffs = got[tp, ep, attention]
        for name in ("encoder", "decoder", "losses", "grads"):
            record(f"rank {rank} {name}", diffs[name], TOL)
            assert diffs[name] <= TOL, (rank, name, diffs)
