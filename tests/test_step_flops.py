"""`training_step_flops` against a brute-force count: every matmul FLOP that `torch.utils.flop_counter` sees in one
real `training_forward` + backward (and an AR-only step) of a tiny model on CPU, with the eager attention's dense
grids; and the visible-pair counts that tools/bench_scale.py feeds it against the masks' own grids."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_bdgemma.config import FULL, SLIDING, tiny
from megatron_bdgemma.diffusion import ar_loss, build_pretrain_batch, build_sft_batch, noise_batch
from megatron_bdgemma.model import BDGemmaModel
from megatron_bdgemma.training.metrics import training_step_flops


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """torch's counter has no formula for `_grouped_mm` (the grouped experts): every row of `a` `[M, K]` meets one
    `[K, N]` group of `b`, and in the weight gradient (`a` = `[K, M]`, `b` = `[M, N]`) each of the M shared rows one
    group's output block: 2·a0·a1·N either way."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """torch's counter has no formula for the CPU SDPA kernel (eager attention on CPU): QKᵀ and PV over every
    (query, key) pair of the dense grid, `[B, h, Sq, d]` queries over `[B, g, Sk, d]` keys (GQA: h counts)."""
    batch, heads, queries, dim = query_shape
    return 2 * batch * heads * queries * key_shape[2] * (dim + value_shape[-1])


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """dQ, dK, dV and dP: twice the forward's products, as the explicit matmuls' backward counts (the kernel's
    recomputation of the scores is not model FLOPs)."""
    return 2 * _cpu_sdpa_flops(query_shape, key_shape, value_shape)


def _counted(step) -> int:
    mapping = {
        torch.ops.aten._grouped_mm: _grouped_mm_flops,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
    }
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step()
    return counter.get_total_flops()


def _layout(kind: str, vocab: int):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (2, 48), generator=generator)
    if kind == "pretrain":  # the whole sequence is the canvas
        batch = build_pretrain_batch(ids, block_size=16, pad_id=0)
        return batch, noise_batch(batch, sample_indices=[0, 1], step=0, seed=1, vocab_size=vocab, score="all_blocks")
    loss_mask, valid = torch.zeros(2, 48, dtype=torch.bool), torch.zeros(2, 48, dtype=torch.bool)
    loss_mask[0, 10:40], valid[0, :40] = True, True
    loss_mask[1, 5:20], valid[1, :20] = True, True
    batch = build_sft_batch(ids, loss_mask, valid, block_size=16, eos_id=1, pad_id=0)
    return batch, noise_batch(batch, sample_indices=[0, 1], step=0, seed=1, vocab_size=vocab)  # one block each


@pytest.mark.parametrize("kind,freeze_router,self_conditioning,freeze_self_conditioning",
                         [("pretrain", True, True, False), ("sft", True, True, True), ("sft", False, False, False)])
def test_formula_equals_counted_matmuls(model_parallel, kind, freeze_router, self_conditioning, freeze_self_conditioning):
    config = tiny(num_layers=3, layer_types=[SLIDING, FULL, SLIDING], sliding_window=8, canvas_length=16,
                  freeze_router=freeze_router, self_conditioning=self_conditioning,
                  freeze_self_conditioning=freeze_self_conditioning)
    model = BDGemmaModel(config).train()
    batch, noised = _layout(kind, config.vocab_size)
    B, S, R = batch.input_ids.shape[0], batch.seq_len, noised.canvas_ids.shape[1]

    def diffusion_step():
        out = model.training_forward(batch, noised)
        (out.diffusion_loss_sum + out.ar_loss_sum).backward()

    def ar_step():
        encoded = model.encode(batch.input_ids, padding_mask=~batch.encoder_valid, return_logits=True)
        ar_loss(encoded.logits, batch.ar_labels, batch.ar_loss_mask)[0].backward()

    dense = dict(tokens=B * S, canvas_tokens=B * R, encoder_pairs={t: B * S * S for t in (SLIDING, FULL)},
                 canvas_pairs={t: B * R * (S + R) for t in (SLIDING, FULL)})  # eager attention scores every pair
    assert training_step_flops(config, **dense).total == _counted(diffusion_step)
    assert training_step_flops(config, **dense, ar_only=True).total == _counted(ar_step)


def test_visible_pairs_are_the_masks_allowed_entries(model_parallel):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from bench_scale import attention_pairs

    config = tiny(num_layers=2, layer_types=[SLIDING, FULL], sliding_window=8, canvas_length=16)
    batch, noised = _layout("pretrain", config.vocab_size)
    encoder, canvas = attention_pairs(BDGemmaModel(config), batch, noised)
    S = batch.seq_len
    # Brute force from the rule itself: full layers see every key up to their own position (S(S+1)/2 per row),
    # sliding layers at most `window`; a canvas block sees its clean prefix and itself.
    assert encoder[FULL] == 2 * S * (S + 1) // 2
    assert encoder[SLIDING] == 2 * sum(min(q + 1, 8) for q in range(S))
    blocks = S // 16
    assert canvas[FULL] == 2 * sum(16 * (16 * j + 16) for j in range(blocks))
    assert 0 < canvas[SLIDING] < canvas[FULL]


@pytest.mark.parametrize("kind", ["sft", "pretrain"])
def test_progress_line_flops_are_each_record_alone(model_parallel, kind):
    """The trainer's TFLOP/s counts each record at its own length (`records_flops`): the same `training_step_flops`
    (not a second formula) of the pairs its masks allow with the record alone in a batch, whatever padding the
    records' batch has. SFT: records of different lengths (padded to the longest), one of them AR-only; pretraining:
    documents of whole blocks, every block decoded, and a later scored block (t differs per block) of a partial record."""
    import sys
    from pathlib import Path

    from megatron_bdgemma.training.metrics import records_flops

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from bench_scale import attention_pairs

    config = tiny(num_layers=2, layer_types=[SLIDING, FULL], sliding_window=8, canvas_length=16)
    model, vocab = BDGemmaModel(config), config.vocab_size
    ids = torch.randint(2, vocab, (3, 48), generator=torch.Generator().manual_seed(0))
    valid = torch.zeros(3, 48, dtype=torch.bool)
    if kind == "sft":
        loss_mask = torch.zeros(3, 48, dtype=torch.bool)
        valid[0, :30], loss_mask[0, 10:30] = True, True  # prompt 10, response padded to 32 by the EOS fill
        valid[1, :14], loss_mask[1, 9:14] = True, True
        valid[2, :7] = True  # no answer: AR loss only, no block
        build = lambda rows, n=48: build_sft_batch(ids[rows, :n], loss_mask[rows, :n], valid[rows, :n], block_size=16,
                                                   eos_id=1, pad_id=0)
        score = "one_block"
    else:
        valid[0, :48], valid[1, :16], valid[2, :32] = True, True, True
        build = lambda rows, n=48: build_pretrain_batch(ids[rows, :n], valid=valid[rows, :n], block_size=16, pad_id=0)
        score = "all_blocks"
    records = build([0, 1, 2])
    noised = noise_batch(records, sample_indices=[0, 1, 2], step=0, seed=1, vocab_size=vocab, score=score)
    assert records.encoder_valid.sum() < records.encoder_valid.numel()  # padding, which counts for nothing

    expected = 0.0
    for i in range(3):
        alone = build([i], int(valid[i].sum()))
        alone_noised = noise_batch(alone, sample_indices=[i], step=0, seed=1, vocab_size=vocab, score=score)
        assert alone.encoder_valid.all()  # no padding alone (the SFT layout's EOS fill is data)
        encoder, canvas = attention_pairs(model, alone, alone_noised)
        decoded = int((alone_noised.block_ids >= 0).sum()) * 16 if int(alone.response_lens[0]) else 0
        expected += training_step_flops(config, tokens=alone.seq_len, canvas_tokens=decoded, encoder_pairs=encoder,
                                        canvas_pairs=canvas if decoded else {t: 0 for t in canvas}).total
    assert records_flops(config, records, noised.block_ids) == pytest.approx(expected, rel=1e-12)
