"""Context parallelism through the whole training forward (docs/design.md §14): on 2 gloo ranks of one CP group,
each running `BDGemmaModel.training_forward` on its load-balanced shard of the encoder and the canvas (K/V gathered
per layer, dK/dV reduce-scattered), the loss sums and token counts summed over the ranks and every gradient summed
over them (what Megatron's DDP reduces over DP × CP) equal one process's on the whole rows, in float64: SFT (one
decoded block per row, split inside the block), pretraining (every block decoded) and packed SFT rows, both
self-conditioning coins, eager and block-sparse attention, the full-vocabulary and the chunked loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import megatron_bdgemma
from megatron_bdgemma.diffusion import build_pretrain_batch, build_sft_batch, noise_batch
from megatron_bdgemma.diffusion.packing import pack_batch, pack_canvas
from tests import hf_models
from tests.multiproc import run_in_processes
from tests.tolerances import record

CP = 2
DTYPE = torch.float64
TOL = 1e-12
"""Loss sums relative, gradients relative to each tensor's largest magnitude. In float64 the split changes only the
grouping of sums (the keys of a rank's chunk, the CP all-reduce of per-rank sums): worst measured losses 3.5e-16,
gradients 1.4e-14, with the defaults (AVX-512) and under AVX2: margins >= 70x."""
BLOCK = 4  # the HF model's canvas length; a CP chunk of a one-block canvas is BLOCK / (2·CP) = 1 slot
# Sliding window 5 on sliding layers, shorter than the rows: the window crosses the CP chunk boundaries.
TEXT = dict(sliding_window=5)


def _sft_records():
    """Three chats of 16 tokens: prompts 6, 3 and 2 tokens, answers 9, 5 and 10 (EOS-filled to whole blocks)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 96, (3, 16), generator=generator)
    loss_mask, valid = torch.zeros(3, 16, dtype=torch.bool), torch.zeros(3, 16, dtype=torch.bool)
    for row, (prompt, end) in enumerate([(6, 15), (3, 8), (2, 12)]):
        loss_mask[row, prompt:end], valid[row, :end] = True, True
    # Rows padded to a multiple of 2·CP (the trainer pads to 2·cp·tp): 20 tokens.
    return build_sft_batch(ids, loss_mask, valid, block_size=BLOCK, eos_id=1, pad_id=0, seq_multiple_of=2 * CP)


def _case(kind: str):
    """(batch, noised canvas) of one micro-batch; coins True, False, True so both self-conditioning paths run."""
    noise = dict(sample_indices=[0, 1, 2], step=3, seed=5, vocab_size=96)
    if kind == "pretrain":
        ids = torch.randint(2, 96, (2, 16), generator=torch.Generator().manual_seed(1))
        valid = torch.ones(2, 16, dtype=torch.bool)
        valid[1, 13:] = False  # a short last document: its last block is partial
        batch = build_pretrain_batch(ids, block_size=BLOCK, valid=valid, pad_id=0)
        noised = noise_batch(batch, **(noise | dict(sample_indices=[0, 1])), score="all_blocks")
        return batch, dataclasses.replace(noised, self_conditioning=torch.tensor([True, False]))
    records = _sft_records()
    noised = noise_batch(records, **noise)
    noised = dataclasses.replace(noised, self_conditioning=torch.tensor([True, False, True]))
    if kind == "sft":
        return records, noised
    # Packed: chats 1 and 2 share a row (11 + 14 tokens with their EOS fill, 3 pads), chat 0 (18) is alone.
    batch = pack_batch(records, [[1, 2], [0]], pad_id=0, seq_len=28)
    return batch, pack_canvas(batch, noised)


def _run(model, batch, noised, loss_chunk_size):
    model.train()
    out = model.training_forward(batch, noised, loss_chunk_size=loss_chunk_size)
    (out.diffusion_loss_sum + out.ar_loss_sum).backward()
    sums = torch.stack([out.diffusion_loss_sum.detach(), out.ar_loss_sum.detach(),
                        out.diffusion_tokens.to(DTYPE), out.ar_tokens.to(DTYPE)])
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return sums, grads


def _model(path: str, attention: str):
    return megatron_bdgemma.from_hf(path, dtype=DTYPE, attention_impl=attention, attention_chunk_size=BLOCK)


def summed_over_cp(
    sums: torch.Tensor, grads: dict[str, torch.Tensor], reference, group
) -> tuple[torch.Tensor, dict[str, float]]:
    """A CP rank's loss sums and gradients summed over the ranks (DDP's sum over DP × CP), and each gradient's
    difference from one process's (`reference`, `(sums, grads)`), relative to its largest entry."""
    ref_grads = reference[1]
    assert grads.keys() == ref_grads.keys(), sorted(set(grads) ^ set(ref_grads))
    sums = sums.clone()
    torch.distributed.all_reduce(sums, group=group)
    errors = {}
    for name, grad in grads.items():
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=group)
        errors[name] = ((grad - ref_grads[name]).abs().max() / ref_grads[name].abs().max()).item()
    return sums, errors


def _check(path: str, kind: str, attention: str, loss_chunk_size: int | None, reference) -> dict:
    """In a rank of the CP group: this rank's shard of one case, the sums and gradients summed over the ranks
    against one process's (`reference`)."""
    from megatron.core import parallel_state

    from megatron_bdgemma.runtime.distributed import init_distributed

    init_distributed(cp=CP)  # the groups are kept; the RNG tracker reseeded for each case, as for the reference
    group = parallel_state.get_context_parallel_group()
    assert group.size() == CP and parallel_state.get_data_parallel_world_size() == 1
    sums, errors = summed_over_cp(*_run(_model(path, attention), *_case(kind), loss_chunk_size), reference, group)
    ref_sums, worst = reference[0], max(errors, key=errors.get)
    return {"losses": ((sums[:2] - ref_sums[:2]).abs() / ref_sums[:2].abs()).max().item(),
            "counts_equal": bool(torch.equal(sums[2:], ref_sums[2:])), "grads": errors[worst], "worst": worst}


def _two_rank_runs(rank: int, path: str, references: dict) -> dict:
    """Everything this module runs on the 2 CP ranks, in one spawn of them (process start and imports once): every
    case of `CASES` against its one-process reference, then the collectives' bytes (last: it wraps the collectives)."""
    checks = {case: _check(path, *case, references[case]) for case in CASES}
    return dict(checks=checks, collective_bytes=_count_collective_bytes(path))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(hf_models.save(hf_models.diffusion_gemma(TEXT, canvas_length=BLOCK), tmp_path_factory.mktemp("dg") / "hf"))


CASES = [("sft", "eager", None), ("sft", "block_sparse", None), ("pretrain", "eager", None),
         ("pretrain", "block_sparse", 7), ("packed", "block_sparse", None)]


@pytest.fixture(scope="module")
def two_ranks(checkpoint, distributed_world) -> list[dict]:
    """The 2 ranks' results of `_two_rank_runs`, against one process's runs of every case on the whole rows (eager
    attention), each from a reseeded RNG tracker like a test's `model_parallel`."""
    from megatron_bdgemma.runtime.distributed import DEFAULT_SEED, init_distributed

    references = {}
    for kind, attention, loss_chunk_size in CASES:
        init_distributed(seed=DEFAULT_SEED)
        references[kind, attention, loss_chunk_size] = _run(_model(checkpoint, "eager"), *_case(kind), loss_chunk_size)
    return run_in_processes(_two_rank_runs, CP, checkpoint, references, timeout_s=360)


@pytest.mark.parametrize("kind,attention,loss_chunk_size", CASES, ids=[f"{k}-{a}-{c or 'logits'}" for k, a, c in CASES])
def test_cp2_training_forward_equals_one_process(two_ranks, kind, attention, loss_chunk_size):
    for rank, got in enumerate(two_ranks):
        diffs = got["checks"][kind, attention, loss_chunk_size]
        assert diffs["counts_equal"], (rank, "token counts summed over the CP ranks differ from one process's")
        for name in ("losses", "grads"):
            record(f"cp2 {kind} {attention} rank {rank} {name}", diffs[name], TOL)
            assert diffs[name] <= TOL, (rank, name, diffs)


def _count_collective_bytes(path: str) -> dict:
    """Bytes this rank's CP collectives moved in one training step (forward + backward) of each case, per K/V shape
    `(g, d)`: received by the all-gathers, sent by the reduce-scatters (what `context_parallel` calls, counted at the
    call, not from any formula); and the layer types of each shape and the micro-batch's (B, S, R). The wrapped
    collectives stay in place: this runs last in its ranks."""
    from types import SimpleNamespace

    import megatron_bdgemma.layers.context_parallel as context_parallel
    from megatron_bdgemma.runtime.distributed import init_distributed

    init_distributed(cp=CP)
    model = megatron_bdgemma.from_hf(path, dtype=torch.float32, attention_impl="block_sparse", attention_chunk_size=BLOCK)
    counted: dict[tuple, int] = {}

    def add(op: str, tensor: torch.Tensor, elements: int) -> None:
        key = (op, tuple(tensor.shape[2:]))
        counted[key] = counted.get(key, 0) + elements * tensor.element_size()

    def all_gather_into_tensor(output, input, group=None):
        add("all_gather", input, output.numel() - input.numel())  # what this rank receives
        return torch.distributed.all_gather_into_tensor(output, input, group=group)

    def reduce_scatter_tensor(output, input, group=None):
        add("reduce_scatter", input, input.numel() - output.numel())  # what this rank sends
        return torch.distributed.reduce_scatter_tensor(output, input, group=group)

    context_parallel.dist = SimpleNamespace(all_gather_into_tensor=all_gather_into_tensor,
                                            reduce_scatter_tensor=reduce_scatter_tensor)
    shapes = {}
    for layer in model.decoder.layers:
        attention = layer.self_attention
        shape = (attention.num_query_groups_per_partition, attention.hidden_size_per_attention_head)
        shapes.setdefault(shape, []).append(layer.layer_type)
    out = {}
    for kind in ("sft", "pretrain"):
        counted.clear()
        batch, noised = _case(kind)
        _run(model, batch, noised, None)
        model.zero_grad()
        out[kind] = dict(counted=dict(counted), rows=(batch.input_ids.shape[0], batch.input_ids.shape[1],
                                                      noised.canvas_ids.shape[1]))
    return dict(cases=out, shapes=shapes, config=model.config)


def test_cp_collective_bytes_equal_the_planners_formula(two_ranks):
    """The bytes each rank's K/V all-gathers receive and its dK/dV reduce-scatters send in one step, counted at the
    collectives, equal `training.plan.context_parallel_bytes` (what tools/plan.py prints and plans with) per layer
    type times the rows, exactly: SFT (S 20, one 4-slot block) and pretraining (S = R = 16), self-conditioning on
    (pass 1 gathers its canvas K/V without a backward)."""
    from megatron_bdgemma.training.plan import context_parallel_bytes

    for rank, got in enumerate(got["collective_bytes"] for got in two_ranks):
        config = got["config"]
        assert config.self_conditioning
        for kind, case in got["cases"].items():
            rows, seq, canvas = case["rows"]
            formula = context_parallel_bytes(config, seq, canvas, cp=CP, tp=1, dtype_bytes=4)
            expected = {(op, shape): rows * sum(formula[t][op] for t in types)
                        for shape, types in got["shapes"].items() for op in ("all_gather", "reduce_scatter")}
            assert case["counted"] == expected, (rank, kind, case["counted"], expected)
