"""Contract: `GroupedGemmMLP` (all local experts in one grouped GEMM) computes what Megatron's `SequentialMLP`
computes, values and gradients (fp32, ≤ 1e-6 relative), in 1 process and under TP=2 (+SP) and EP=2 in 2 gloo
processes; its weights stacked once for a generation (`stacked_weights_held`) give the per-call outputs; and a
Megatron checkpoint saved with one expert module loads into the other (also across EP sizes)."""

from __future__ import annotations

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.transformer.moe.experts import SequentialMLP

import megatron_bdgemma
from megatron_bdgemma.config import tiny
from megatron_bdgemma.diffusion import build_sft_batch, noise_batch
from megatron_bdgemma.layers.grouped_experts import GroupedGemmMLP, stacked_weights_held
from megatron_bdgemma.model import BDGemmaModel
from tests import hf_models
from tests.multiproc import run_in_processes
from tests.test_parallel_equivalence import _batch

RTOL = 1e-6
TEXT = dict(num_global_key_value_heads=2, num_key_value_heads=2)  # TP=2 splits whole KV groups


def _model(grouped: bool) -> BDGemmaModel:
    torch.manual_seed(0)
    return BDGemmaModel(tiny(moe_grouped_gemm=grouped))


def _randomised_pair() -> tuple[BDGemmaModel, BDGemmaModel]:
    """A grouped and a sequential tiny model with the same random weights (norms and router scales included)."""
    grouped, sequential = _model(True), _model(False)
    hf_models.randomise_scales(grouped)  # no norm weight or scalar is the identity
    sequential.load_state_dict(grouped.state_dict())
    return grouped, sequential


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _train_step(model: BDGemmaModel, batch) -> dict[str, torch.Tensor]:
    """Training-forward loss sums and every gradient, by parameter name."""
    model.train()
    model.zero_grad(set_to_none=True)
    noised = noise_batch(batch, sample_indices=list(range(batch.input_ids.shape[0])), step=1, seed=3,
                         vocab_size=model.config.vocab_size)
    out = model.training_forward(batch, noised)
    (out.diffusion_loss_sum + out.ar_loss_sum).backward()
    result = {"losses": torch.stack([out.diffusion_loss_sum, out.ar_loss_sum]).detach(),
              "canvas_logits": out.canvas_logits.detach()}
    result |= {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return result


def _worst(grouped: dict[str, torch.Tensor], sequential: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert grouped.keys() == sequential.keys()
    return max((_relative(grouped[k], sequential[k]), k) for k in grouped)


def test_default_local_experts_are_grouped(model_parallel):
    grouped, sequential = _randomised_pair()
    assert all(type(layer.mlp.experts) is GroupedGemmMLP for layer in grouped.decoder.layers)
    assert all(type(layer.mlp.experts) is SequentialMLP for layer in sequential.decoder.layers)
    assert BDGemmaModel(tiny()).decoder.layers[0].mlp.experts.__class__ is GroupedGemmMLP  # the default
    assert grouped.state_dict().keys() == sequential.state_dict().keys()


def test_held_stacks_are_the_per_call_ones_and_inference_only(model_parallel):
    """`stacked_weights_held`: the same outputs as stacking per call, the stacks gone on exit, refused with grad."""
    model = _randomised_pair()[0]
    experts = model.decoder.layers[0].mlp.experts
    counts = torch.tensor([5, 0, 3, 8])
    tokens = torch.randn(int(counts.sum()), experts.config.hidden_size)
    probs = torch.rand(int(counts.sum()))
    with torch.no_grad():
        expected = experts(tokens, counts, probs)[0]
        with stacked_weights_held(model):
            assert experts._held_stacks is not None
            held = experts(tokens, counts, probs)[0]
    assert torch.equal(held, expected) and experts._held_stacks is None
    with pytest.raises(RuntimeError, match="inference"), stacked_weights_held(model):
        pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_module_equals_sequential_on_uneven_groups(model_parallel, dtype):
    """Uneven token counts, one expert without tokens; the grouped path must actually run."""
    grouped, sequential = (model.decoder.layers[0].mlp.experts.to(dtype) for model in _randomised_pair())
    counts = torch.tensor([5, 0, 3, 8])
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(int(counts.sum()), grouped.config.hidden_size, generator=generator).to(dtype)
    probs = torch.rand(int(counts.sum()), generator=generator)
    assert grouped._grouped_gemm_runs(tokens)
    outputs, grads = [], []
    for module in (grouped, sequential):
        x = tokens.clone().requires_grad_()
        out, bias = module(x, counts, probs)
        assert bias is None
        (out * torch.linspace(-1, 1, out.numel()).view_as(out).to(dtype)).sum().backward()
        outputs.append(out.detach())
        grads.append([x.grad] + [p.grad for p in module.parameters()])
    rtol = RTOL if dtype == torch.float32 else 1e-2
    assert _relative(outputs[0].float(), outputs[1].float()) <= rtol
    for got, expected in zip(*grads):
        assert _relative(got.float(), expected.float()) <= rtol


@pytest.mark.parametrize("grouped", [True, False])
def test_inference_skips_the_dispatcher_with_its_values(model_parallel, grouped):
    """Outside autograd at EP = TP = 1 the MoE layer sorts tokens by expert itself (`_sorted_experts`) instead of
    running Megatron's token dispatcher: the same expert sums, bit for bit, with either expert module."""
    model = _randomised_pair()[0 if grouped else 1]
    moe = model.decoder.layers[0].mlp
    generator = torch.Generator().manual_seed(2)
    router_input, expert_input, dense_input = (
        torch.randn(24, 2, model.config.hidden_size, generator=generator) for _ in range(3)
    )
    with torch.no_grad():
        sorted_experts = moe._sorted_experts(router_input, expert_input)
        probs, routing_map = moe.route(router_input)
        dispatched = moe._dispatched_experts(*moe.preprocess(expert_input, probs, routing_map))
        dense, experts = moe(router_input, expert_input, dense_input)
    assert routing_map.sum(0).min() > 0, "every expert should get tokens"
    assert torch.equal(sorted_experts, dispatched)
    assert torch.equal(experts, sorted_experts) and torch.equal(dense, moe.shared_experts_compute(dense_input))


def test_model_training_step_equals_sequential(model_parallel):
    grouped, sequential = _randomised_pair()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 500, (2, 40), generator=generator)
    loss_mask, valid = torch.zeros(2, 40, dtype=torch.bool), torch.zeros(2, 40, dtype=torch.bool)
    loss_mask[0, 8:38], valid[0, :38] = True, True
    loss_mask[1, 4:20], valid[1, :20] = True, True
    batch = build_sft_batch(ids, loss_mask, valid, block_size=16, eos_id=1, pad_id=0)
    worst, name = _worst(_train_step(grouped, batch), _train_step(sequential, batch))
    assert worst <= RTOL, f"{name}: grouped differs from sequential by {worst:.1e} relative"


@pytest.mark.parametrize("save_grouped", [True, False])
def test_checkpoint_saved_with_one_expert_module_loads_into_the_other(model_parallel, tmp_path, save_grouped):
    grouped, sequential = _randomised_pair()
    saver, loader = (grouped, sequential) if save_grouped else (sequential, grouped)
    dist_checkpointing.save(saver.sharded_state_dict(), str(tmp_path))
    torch.manual_seed(99)
    fresh = BDGemmaModel(tiny(moe_grouped_gemm=not save_grouped))
    assert type(fresh.decoder.layers[0].mlp.experts) is type(loader.decoder.layers[0].mlp.experts)
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path)))
    for (name, value), (_, expected) in zip(fresh.state_dict().items(), saver.state_dict().items()):
        if torch.is_tensor(value):
            assert torch.equal(value, expected), name


def _compare_in_layout(rank: int, path: str, tp: int, ep: int, save_dir: str | None) -> dict[str, object]:
    """Under this layout: grouped vs sequential on the same rank-local batch (values and gradients)."""
    from megatron.core import parallel_state

    from megatron_bdgemma.runtime.distributed import init_distributed

    init_distributed(tp=tp, ep=ep)
    batch = _batch()
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    if dp_size > 1:  # EP=2 ranks are data-parallel too: each takes one example
        batch = batch.select([dp_rank])
    results = {}
    models = {}
    for grouped in (True, False):
        models[grouped] = megatron_bdgemma.from_hf(path, sequence_parallel=tp > 1, moe_grouped_gemm=grouped)
        assert (type(models[grouped].decoder.layers[0].mlp.experts) is GroupedGemmMLP) == grouped
        results[grouped] = _train_step(models[grouped], batch)
    worst, name = _worst(results[True], results[False])
    if save_dir is not None:
        dist_checkpointing.save(models[True].sharded_state_dict(), save_dir)
    return {"worst": worst, "name": name}


def _two_rank_checks(rank: int, path: str, save_dir: str) -> dict[str, dict[str, object]]:
    return {"tp2_sp": _compare_in_layout(rank, path, tp=2, ep=1, save_dir=None),
            "ep2": _compare_in_layout(rank, path, tp=1, ep=2, save_dir=save_dir)}


def test_grouped_equals_sequential_under_tp2_and_ep2_and_ep2_checkpoint_loads_sequential(model_parallel, tmp_path):
    path = str(hf_models.save(hf_models.diffusion_gemma(TEXT), tmp_path / "hf"))
    save_dir = tmp_path / "ep2_grouped"
    save_dir.mkdir()
    for rank, result in enumerate(run_in_processes(_two_rank_checks, 2, path, str(save_dir))):
        for layout, check in result.items():
            assert check["worst"] <= RTOL, f"rank {rank} {layout} {check['name']}: {check['worst']:.1e} relative"
    # Saved by grouped experts under EP=2 (2 local experts per rank), loaded by SequentialMLP in 1 process (4).
    expected = megatron_bdgemma.from_hf(path, moe_grouped_gemm=False)
    torch.manual_seed(7)
    loaded = BDGemmaModel(expected.config)
    loaded.load_state_dict(dist_checkpointing.load(loaded.sharded_state_dict(), str(save_dir)))
    assert type(loaded.decoder.layers[0].mlp.experts) is SequentialMLP
    for (name, value), (_, reference) in zip(loaded.state_dict().items(), expected.state_dict().items()):
        if torch.is_tensor(value):
            assert torch.equal(value, reference), name
