"""Contract: with `runtime.cpu_support`, stock megatron-core runs on CPU + gloo, and every parallel layout gives the
single-process numbers.

Megatron's own GPTModel with the local layer spec (tiny: 2 layers, hidden 64, 4 heads, vocab 128, fp32, dropout 0,
RoPE, tied embeddings; MoE = 4 SequentialMLP experts top-2 + a shared expert) is run in 2 gloo ranks (one spawn,
all layouts back to back) and compared with the same code in this 1-process world:
- TP=2 dense, and TP=2 + sequence parallel MoE: logits and the word-embedding grad (each rank's vocab shard).
- EP=2 MoE with the allgather and the alltoall dispatcher: each rank's logits and grads on its own batch.
- DP=2 with megatron DDP + `get_megatron_optimizer`, through `get_forward_backward_func` + `finalize_model_grads`:
  in float64 with the plain optimizer, step 1's reduced gradients and the parameters after each of 2 steps equal
  full-batch single-process; the distributed optimizer (fp32 only) gives step 1's grad norm of single-process and
  the plain optimizer's grad norms and parameters in the same two ranks.
- PP=2 (1F1B schedule) with the same DDP + optimizer: per-step losses and grad norms equal PP=1.
- `dist_checkpointing`: saved under TP=2, loaded under TP=2 and under TP=1.

Sequence parallelism: megatron's local spec uses `WrappedTorchNorm`, which refuses SP (megatron policy, not a CPU
limit: its torch norm does not flag its weights for the SP grad all-reduce). The SP layout swaps in
`SequenceParallelLayerNorm` below, a torch LayerNorm that does; the project's own RMSNorm does the same.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_bdgemma.runtime.distributed import init_distributed
from tests.multiproc import ChildProcessFailed, run_in_processes
from tests.tolerances import record

SEED = 1234
VOCAB, SEQ, BATCH = 128, 16, 4
NUM_EXPERTS = 4
TOL = 1e-5
"""fp32 logits, gradients, losses and grad norms (absolute; values of order 1). Worst measured with the defaults
(AVX-512) and under AVX2: 3.6e-7 (TP=2 logits): margins >= 28x. EP=2 and PP=2 (both steps' losses and grad norms)
measured bit-equal."""
DP_TOL = 1e-12
"""DP=2 vs one process in float64: step 1's reduced gradients (relative to each tensor's largest magnitude) and the
parameters after each step (absolute; lr 1e-3). Worst measured 1.0e-15 and 2.4e-15 with the defaults (AVX-512),
1.0e-15 and 1.4e-15 under AVX2: margins >= 400x. In fp32 the parameters differed by 1.6e-6 after step 1 already
(Adam's first update, g / (|g| + eps), turns fp32 rounding of gradients near eps into a fraction of lr)."""
DISTOPT_TOL = 1e-6
"""The distributed optimizer, fp32 (megatron refuses float64 parameters there): grad norms relative, parameters
relative to each tensor's largest magnitude. Against the plain optimizer in the same ranks, the reduced gradients
are the same sums (a + b over two ranks) and Adam is elementwise: parameters measured bit-equal with the defaults
and under AVX2 (the clip coefficient, from the grad norm, could move a parameter by an ulp: 6e-8 of the tensor's
largest entry); the grad norm, summed over shards in another order, within 4.6e-8 (22x). Step 1's grad norm
against one process: 3.5e-8 (28x), with the defaults and under AVX2."""
TRAIN_STEPS, MICROBATCHES = 2, 2


class SequenceParallelLayerNorm(torch.nn.LayerNorm):
    """The local spec's torch LayerNorm, usable with SP: flags its weights for `finalize_model_grads`' TP all-reduce."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(hidden_size, eps=eps)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel


def build_gpt(moe: bool, sequence_parallel: bool = False, dispatcher: str = "allgather", seed: int = SEED,
              dtype: torch.dtype = torch.float32) -> GPTModel:
    """The tiny stock GPTModel for the current parallel layout, full logits; same seed = same full (unsharded)
    weights."""
    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        params_dtype=dtype, pipeline_dtype=dtype,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        sequence_parallel=sequence_parallel,
        **(dict(num_moe_experts=NUM_EXPERTS, moe_router_topk=2, moe_ffn_hidden_size=32,
                moe_shared_expert_intermediate_size=32, moe_token_dispatcher_type=dispatcher,
                moe_router_load_balancing_type="none") if moe else {}),
    )
    layer = get_gpt_layer_local_spec(num_experts=NUM_EXPERTS if moe else None)
    spec: Any = layer
    if sequence_parallel:
        layer.submodules.input_layernorm = layer.submodules.pre_mlp_layernorm = SequenceParallelLayerNorm
        spec = TransformerBlockSubmodules(layer_specs=[layer] * config.num_layers, layer_norm=SequenceParallelLayerNorm)
    # Weights come from torch's default generator (CPU init), which this reseeds.
    model_parallel_cuda_manual_seed(seed)
    model = GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
                     share_embeddings_and_output_weights=True, parallel_output=False,
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage())
    # The local spec's torch LayerNorm is built in fp32 whatever `params_dtype` says.
    return model.to(dtype)


def batch(index: int, size: int = BATCH) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(index)
    tokens = torch.randint(0, VOCAB, (size, SEQ + 1), generator=generator)
    return dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], position_ids=torch.arange(SEQ).expand(size, SEQ))


def forward_backward(model: GPTModel, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full logits and cross-entropy; grads stay local (no DDP), so the embedding grad is this rank's own."""
    model.train()
    logits = model(data["tokens"], data["position_ids"], None)
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), data["labels"].reshape(-1))
    loss.backward()
    return dict(logits=logits.detach(), loss=loss.detach(), embedding_grad=model.embedding.word_embeddings.weight.grad)


def localize(reference: dict[str, Any], model: GPTModel) -> dict[str, Any]:
    """`reference` (a 1-process state dict) renamed to this rank's pipeline stage (PP) and local experts (EP)."""
    global_layers = [layer.layer_number - 1 for layer in model.decoder.layers]
    local_experts = NUM_EXPERTS // parallel_state.get_expert_model_parallel_world_size()
    first_expert = parallel_state.get_expert_model_parallel_rank() * local_experts

    def reference_name(name: str) -> str:
        if name == "output_layer.weight":  # the last stage's copy of the tied embedding
            return "embedding.word_embeddings.weight"
        name = re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{global_layers[int(m[1])]}.", name)
        return re.sub(r"\.local_experts\.(\d+)\.", lambda m: f".local_experts.{first_expert + int(m[1])}.", name)

    return {name: reference[reference_name(name)] for name in model.state_dict()}


def train(weights: dict[str, Any], microbatches: list[dict[str, torch.Tensor]], use_distributed_optimizer: bool = False,
          dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """`TRAIN_STEPS` steps of the realistic loop from `weights`: DDP, megatron optimizer, schedule, finalize grads.

    Returns each step's losses (last stage) and grad norm, the parameters after each step, and step 1's gradients as
    the optimizer gets them (after DDP's reduction; under the distributed optimizer only this rank's shard of each
    is reduced, so none are returned). In float64 the gradients are reduced in float64 and not clipped: megatron's
    clipping asserts fp32 gradients (`clip_grad_by_total_norm_fp32`), so there is no grad norm either. The MoE
    router's softmax stays fp32 (megatron's `topk_routing_with_score_function`).
    """
    model = build_gpt(moe=True, dtype=dtype)
    model.load_state_dict(localize(weights, model))
    config = model.config
    fp32 = dtype == torch.float32
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=fp32, overlap_grad_reduce=False, use_distributed_optimizer=use_distributed_optimizer),
        model)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-3, bf16=False, params_dtype=dtype, clip_grad=1.0 if fp32 else 0.0,
        use_distributed_optimizer=use_distributed_optimizer), [ddp])
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads

    def forward_step(data_iterator, model):
        data = next(data_iterator)
        logits = model(data["tokens"], data["position_ids"], None)

        def loss_func(output: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            # In the model's dtype: with `labels` megatron's vocab-parallel cross entropy would compute in fp32.
            loss = F.cross_entropy(output.reshape(-1, VOCAB), data["labels"].reshape(-1))
            return loss, {"loss": loss.detach()}

        return logits, loss_func

    losses, grad_norms, params, grads = [], [], [], None
    for step in range(TRAIN_STEPS):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(microbatches), model=[ddp],
            num_microbatches=len(microbatches), seq_length=SEQ, micro_batch_size=microbatches[0]["tokens"].shape[0])
        if step == 0 and not use_distributed_optimizer:
            grads = {name: param.main_grad.clone() for name, param in model.named_parameters()}
        update_successful, grad_norm, _ = optimizer.step()
        assert update_successful
        losses.append(torch.stack([r["loss"] for r in reports]) if reports else None)
        grad_norms.append(grad_norm)
        params.append({name: param.detach().clone() for name, param in model.named_parameters()})
    return dict(losses=losses, grad_norms=grad_norms, params=params, grads=grads)


def two_rank_checks(rank: int, moe_reference: dict[str, torch.Tensor], checkpoint_dir: str) -> dict[str, Any]:
    """Every 2-rank layout, back to back in one spawn (a spawn costs ~7 s; the compute takes well under 1 s)."""
    results: dict[str, Any] = {}

    init_distributed(tp=2)
    results["tp2_dense"] = forward_backward(build_gpt(moe=False), batch(0))
    results["tp2_sp_moe"] = forward_backward(build_gpt(moe=True, sequence_parallel=True), batch(0))

    model = build_gpt(moe=True)
    dist_checkpointing.save(model.sharded_state_dict(), checkpoint_dir)
    reloaded = build_gpt(moe=True, seed=SEED + 1)
    reloaded.load_state_dict(dist_checkpointing.load(reloaded.sharded_state_dict(), checkpoint_dir))
    results["tp2_checkpoint_reload_max_diff"] = max(
        (a - b).abs().max().item() for a, b in zip(model.state_dict().values(), reloaded.state_dict().values())
        if torch.is_tensor(a))

    init_distributed(ep=2)
    for dispatcher in ("allgather", "alltoall"):
        model = build_gpt(moe=True, dispatcher=dispatcher)
        model.load_state_dict(localize(moe_reference, model))
        results[f"ep2_{dispatcher}"] = forward_backward(model, batch(rank))

    init_distributed()  # DP=2: each rank trains on its half of every microbatch
    half = [{k: v.chunk(2)[rank] for k, v in batch(i).items()} for i in range(MICROBATCHES)]
    results["dp2_float64"] = train(moe_reference, half, dtype=torch.float64)
    results["dp2"] = train(moe_reference, half)
    results["dp2_distopt"] = train(moe_reference, half, use_distributed_optimizer=True)

    init_distributed(pp=2)
    results["pp2"] = train(moe_reference, [batch(i) for i in range(MICROBATCHES)])
    return results


@pytest.fixture(scope="module")
def moe_reference(distributed_world) -> dict[str, torch.Tensor]:
    init_distributed()
    return build_gpt(moe=True).state_dict()


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tp2_checkpoint")


@pytest.fixture(scope="module")
def ranks(moe_reference, checkpoint_dir) -> list[dict[str, Any]]:
    return run_in_processes(two_rank_checks, 2, moe_reference, str(checkpoint_dir))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = TOL) -> None:
    record(what, (torch.as_tensor(actual) - torch.as_tensor(expected)).abs().max().item(), atol)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")


def test_tensor_parallel_matches_single_process(model_parallel, ranks):
    for key, moe, sp in (("tp2_dense", False, False), ("tp2_sp_moe", True, True)):
        expected = forward_backward(build_gpt(moe=moe), batch(0))
        vocab_shards = expected["embedding_grad"].chunk(2)
        for rank, result in enumerate(ranks):
            assert_close(result[key]["logits"], expected["logits"], f"{key} rank {rank} logits")
            assert_close(result[key]["embedding_grad"], vocab_shards[rank], f"{key} rank {rank} embedding grad")


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_expert_parallel_matches_single_process(model_parallel, ranks, dispatcher):
    for rank, result in enumerate(ranks):
        expected = forward_backward(build_gpt(moe=True), batch(rank))
        got = result[f"ep2_{dispatcher}"]
        assert_close(got["logits"], expected["logits"], f"rank {rank} logits")
        assert_close(got["embedding_grad"], expected["embedding_grad"], f"rank {rank} embedding grad")


def worst_difference(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], relative: bool) -> float:
    """The largest difference over all tensors, each relative to its largest magnitude or absolute."""
    assert actual.keys() == expected.keys()
    return max(((actual[name] - tensor).abs().max() / (tensor.abs().max() if relative else 1)).item()
               for name, tensor in expected.items())


def test_data_parallel_training_matches_full_batch(model_parallel, moe_reference, ranks):
    """DP=2 (each rank half of every micro-batch) against one process on whole micro-batches, in float64: the reduced
    gradients catch a wrong DDP sum or scale, which Adam's update, invariant to the gradient's scale, would hide."""
    expected = train(moe_reference, [batch(i) for i in range(MICROBATCHES)], dtype=torch.float64)
    for rank, result in enumerate(ranks):
        got = result["dp2_float64"]
        worst = {"step 1 grads": worst_difference(got["grads"], expected["grads"], relative=True)}
        worst |= {f"step {step + 1} params": worst_difference(got["params"][step], expected["params"][step],
                                                               relative=False) for step in range(TRAIN_STEPS)}
        for what, value in worst.items():
            record(f"rank {rank} {what}", value, DP_TOL)
        assert all(value <= DP_TOL for value in worst.values()), (rank, worst)


def test_distributed_optimizer_matches_plain_optimizer_and_one_process(model_parallel, moe_reference, ranks):
    """The distributed optimizer cannot run in float64, and in fp32 Adam's first update already turns rounding into
    1.6e-6 of the parameters (`DP_TOL`): so it is compared where that noise cannot arise, with the plain optimizer
    (which the float64 test ties to one process) on the same gradients in the same ranks; and its step-1 grad norm,
    computed over the ranks' shards, with one process."""
    expected = train(moe_reference, [batch(i) for i in range(MICROBATCHES)], use_distributed_optimizer=True)
    for rank, result in enumerate(ranks):
        got, plain = result["dp2_distopt"], result["dp2"]
        worst = {"step 1 grad norm vs one process": abs(got["grad_norms"][0] / expected["grad_norms"][0] - 1)}
        for step in range(TRAIN_STEPS):
            worst[f"step {step + 1} grad norm vs plain"] = abs(got["grad_norms"][step] / plain["grad_norms"][step] - 1)
            worst[f"step {step + 1} params vs plain"] = worst_difference(got["params"][step], plain["params"][step],
                                                                         relative=True)
        for what, value in worst.items():
            record(f"rank {rank} {what}", value, DISTOPT_TOL)
        assert all(value <= DISTOPT_TOL for value in worst.values()), (rank, worst)


def test_pipeline_parallel_matches_single_stage(model_parallel, moe_reference, ranks):
    expected = train(moe_reference, [batch(i) for i in range(MICROBATCHES)])
    first, last = ranks[0]["pp2"], ranks[1]["pp2"]
    assert first["losses"] == [None] * TRAIN_STEPS  # only the last stage computes the loss
    for step in range(TRAIN_STEPS):
        assert_close(last["losses"][step], expected["losses"][step], f"step {step} losses")
        for result in (first, last):  # the grad norm is reduced over both stages
            record(f"step {step} grad norm", abs(result["grad_norms"][step] - expected["grad_norms"][step]), TOL)
            assert result["grad_norms"][step] == pytest.approx(expected["grad_norms"][step], abs=TOL)


def test_dist_checkpoint_saved_under_tp2_loads_under_tp2_and_tp1(model_parallel, ranks, checkpoint_dir):
    assert all(result["tp2_checkpoint_reload_max_diff"] == 0 for result in ranks)
    expected = build_gpt(moe=True)
    model = build_gpt(moe=True, seed=SEED + 1)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(checkpoint_dir)))
    for (name, param), (_, reference) in zip(model.state_dict().items(), expected.state_dict().items()):
        if torch.is_tensor(param):
            assert torch.equal(param, reference), name


def rank_one_fails(rank: int) -> None:
    if rank == 1:
        raise ValueError("rank one failed on purpose")
    torch.distributed.barrier()  # rank 0 waits here for a peer that never comes


def test_child_failure_reraises_with_traceback_and_does_not_hang():
    with pytest.raises(ChildProcessFailed, match=r"(?s)rank 1.*rank_one_fails.*ValueError: rank one failed on purpose"):
        run_in_processes(rank_one_fails, 2, timeout_s=60)


def test_init_distributed_rejects_indivisible_sizes(model_parallel):
    with pytest.raises(ValueError, match=r"world size 1 is not divisible by tp \* pp = 2 \* 1.*torchrun --nproc-per-node"):
        init_distributed(tp=2)
    with pytest.raises(ValueError, match=r"etp \* ep \* pp = 1 \* 2 \* 1"):
        init_distributed(ep=2)
