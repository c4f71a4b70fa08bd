"""Pretraining with document masks (`data.reset_document_masks`, docs/design.md §13, issue #24): a window's documents,
split after every EOD, each computed exactly as alone.

The oracle is the unpacked layout (`data.packing=false`: every document in a row of its own, laid out and computed
by the plain unpacked path, no segment ids), not anything the packing code computes: the packed windows
(`data.packing=true`) must give the same losses and gradients per step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_bdgemma.data.pretrain import IndexedDatasetWriter, document_records
from megatron_bdgemma.training.config import load_run_config
from tests.multiproc import run_in_processes
from tests.tolerances import assert_steps_close

CONFIG = Path(__file__).resolve().parent.parent / "examples" / "configs" / "tiny_pretrain.yaml"
EOD, PAD = 1, 0  # the byte tokenizer's
STEPS = 3
"""Step 1 runs at learning rate 0 (warmup), so steps 1 and 2 share the starting weights; step 3 follows one Adam
update. A fourth step's grad norm, after two updates, is where Adam amplifies fp32 rounding (tests/tolerances.py):
measured 2.1e-6 there, 1.2e-7 at most before."""


def test_document_records_split_after_each_eod():
    """Documents end with their EOD (kept, as Megatron's reset_attention_mask keeps it in the ending document); a
    window ending on EOD has no empty last piece; each piece is laid out alone with its own key."""
    windows = [torch.tensor([5, 6, EOD, 7, 8, 9, EOD, 4]), torch.tensor([3, 3, 3, EOD]), torch.tensor([2] * 8)]
    samples = [{"tokens": w, "sample_index": i} for i, w in enumerate(windows)]
    batch, keys, groups = document_records(samples, [10, 11, 12], block_size=4, pad_id=PAD, eod_id=EOD)
    pieces = [[5, 6, EOD], [7, 8, 9, EOD], [4], [3, 3, 3, EOD], [2] * 8]
    assert groups == [[0, 1, 2], [3], [4]]
    assert keys == [10 * 9, 10 * 9 + 1, 10 * 9 + 2, 11 * 5, 12 * 9]  # s · (S + 1) + j, S the window's length
    assert batch.encoder_valid.sum(dim=1).tolist() == [len(p) for p in pieces]
    for i, piece in enumerate(pieces):
        assert batch.input_ids[i, : len(piece)].tolist() == piece
        assert batch.input_ids[i, len(piece):].eq(PAD).all()
    assert batch.prefix_lens.tolist() == [0] * 5 and batch.response_lens.tolist() == [len(p) for p in pieces]
    # A record's last token (its EOD) predicts nothing: no AR pair crosses into the next document.
    assert batch.ar_loss_mask.sum(dim=1).tolist() == [len(p) - 1 for p in pieces]


def test_canvas_blocks_bound_of_documents():
    """`canvas_blocks_bound(documents=True)` against the canvas blocks rows of documents really need (`pack_canvas`
    of every block scored), by brute force over 300 random windows (S = 44, block 8: EODs at random, rows of at most
    1 to 4 documents): never exceeded, and reached for every cap (by the extreme windows it names)."""
    import random

    from megatron_bdgemma.diffusion import noise_batch
    from megatron_bdgemma.diffusion.packing import canvas_blocks_bound, pack_batch, pack_canvas

    rng, S, block, reached = random.Random(0), 44, 8, set()
    for trial in range(300):
        tokens = torch.tensor([EOD if rng.random() < rng.choice([0.05, 0.3]) else 7 for _ in range(S)])
        cap = rng.randint(1, 4)
        if trial < 8:  # the extreme case: cap − 1 one-token documents, then one of S − cap + 1 tokens
            cap = trial % 4 + 1
            tokens = torch.tensor([EOD] * (cap - 1) + [7] * (S - cap + 1))
        documents, keys, (window,) = document_records([{"tokens": tokens, "sample_index": 0}], [trial], block_size=block,
                                                      pad_id=PAD, eod_id=EOD)
        rows = [window[k : k + cap] for k in range(0, len(window), cap)]
        packed = pack_batch(documents, rows, pad_id=PAD, seq_len=S)
        noised = noise_batch(documents, sample_indices=keys, step=0, seed=0, vocab_size=50, score="all_blocks")
        needed = int((pack_canvas(packed, noised).noised.block_ids >= 0).sum(dim=1).max())
        bound = canvas_blocks_bound(S, block, all_blocks=True, max_records_per_row=cap, documents=True)
        assert needed <= bound, (tokens.tolist(), cap, needed, bound)
        reached.add((cap, needed == bound))
    assert {(cap, True) for cap in range(1, 5)} <= reached, reached


def _write_corpus(prefix: Path) -> str:
    """120 documents of 2 to 29 random byte ids (10..200) and an EOD: a window of 32 holds several, the first one a
    document's tail."""
    rng = np.random.default_rng(7)
    with IndexedDatasetWriter(prefix) as writer:
        for _ in range(120):
            writer.add_document([*rng.integers(10, 200, rng.integers(2, 30)).tolist(), EOD])
    return str(prefix)


def _run(tmp: Path, *overrides: str):
    return load_run_config(CONFIG, [
        f"data.paths=[{tmp / 'docs'}]", f"data.cache_dir={tmp / 'cache'}", "data.seq_length=32",
        f"train.steps={STEPS}", "train.global_batch_size=4", "train.micro_batch_size=2", "train.eval_interval=1",
        "train.eval_steps=1", "optim.warmup_steps=2", "optim.distributed_optimizer=false", "checkpoint.save=null",
        "model.overrides={num_layers: 2, layer_types: [sliding_attention, full_attention], canvas_length: 8, "
        "sliding_window: 12}",
        *overrides,
    ])


def _metrics(history, names=("diffusion", "ar", "grad_norm")) -> list[tuple[float, ...]]:
    return [tuple(h[n] for n in names) for h in history]


def test_document_masks_packed_equal_unpacked(tmp_path, model_parallel):
    """Per step, the windows with their documents kept apart (packed) against every document alone (unpacked): both
    losses, the grad norm and the held-out losses at 1e-5 relative, the tokens read exactly; packed rows are full
    (efficiency 1). Without document masks the same windows give other losses (the EODs are really there).

    Measured worst (losses, grad norms, held-out losses): 1.5e-7 with the defaults (AVX-512), 8.1e-8 under AVX2."""
    from megatron_bdgemma.training.data import build_step_data
    from megatron_bdgemma.training.trainer import build_model_config, train

    _write_corpus(tmp_path / "docs")
    packed_run = _run(tmp_path, "data.reset_document_masks=true", "data.packing=true")
    unpacked = train(_run(tmp_path, "data.reset_document_masks=true"))
    packed = train(packed_run)
    whole = train(_run(tmp_path))

    data = build_step_data(packed_run, build_model_config(packed_run))
    documents = [sum(mb.records.batch_size for mb, _ in data.microbatches(step)) for step in range(STEPS)]
    assert all(documents[s] > 4 for s in range(STEPS)), f"windows hold one document each: {documents}"
    assert_steps_close(_metrics(packed), _metrics(unpacked), "document masks: packed vs unpacked",
                       shared_weight_steps=STEPS)
    evaluated = [h for h in packed if "eval_diffusion" in h]
    assert len(evaluated) == STEPS
    assert_steps_close(_metrics(evaluated, ("eval_diffusion", "eval_ar")),
                       _metrics([h for h in unpacked if "eval_diffusion" in h], ("eval_diffusion", "eval_ar")),
                       "document masks: held-out losses, packed vs unpacked", shared_weight_steps=0)
    assert [h["tokens"] for h in packed] == [h["tokens"] for h in unpacked] == [4 * 32] * STEPS
    assert [h["flops"] for h in packed] == [h["flops"] for h in unpacked]  # the records' work, padding excluded
    assert [h["row_tokens"] for h in packed] == [4 * 32] * STEPS
    assert all(h["row_tokens"] > 4 * 32 for h in unpacked)  # a document per row pads to the micro-batch's longest
    # Whole windows score one canvas per window, documents one per document (partial last blocks): the losses differ.
    first = packed[0]["diffusion"], whole[0]["diffusion"]
    assert abs(first[0] - first[1]) > 1e-3 * abs(first[1]), first


LAYOUTS = {"pp2": ["parallel.pp=2"], "tp2_sp": ["parallel.tp=2"], "ep2_dp2": ["parallel.ep=2"]}
PACKED_UNDER_LAYOUTS = ["data.reset_document_masks=true", "data.packing=true", "data.max_records_per_row=2",
                        "train.eval_interval=0"]
"""At most 2 documents per row: windows of 3 or 4 are split, so a step's rows (and under PP its micro-batch count)
vary, and every row under PP carries ⌈32 / 8⌉ + 2 − 1 = 5 canvas blocks."""


def _layouts_in_rank(rank: int, tmp: str, hf: str) -> dict:
    from megatron_bdgemma.training.trainer import train

    return {name: _metrics(train(_run(Path(tmp), f"model.hf={hf}", "model.overrides={}", *PACKED_UNDER_LAYOUTS,
                                      *layout)))
            for name, layout in LAYOUTS.items()}


def test_document_masks_under_pp_tp_and_ep(tmp_path, model_parallel):
    """Packed documents at PP = 2, TP = 2 + SP and EP = 2 (× DP = 2), at most 2 documents per row, against every
    document alone in one process (the plain unpacked path), from the same HF weights: per step both losses within
    1e-5 relative, the grad norm on the steps of shared weights (tests/tolerances.py). Measured worst: 5.0e-7 with the
    defaults (TP = 2), 4.5e-7 under AVX2 (EP = 2)."""
    from megatron_bdgemma.training.trainer import train
    from tests import hf_models

    _write_corpus(tmp_path / "docs")
    model = hf_models.diffusion_gemma(dict(vocab_size=320, num_hidden_layers=4, num_global_key_value_heads=2,
                                           layer_types=["sliding_attention", "full_attention"] * 2), canvas_length=8)
    hf = str(hf_models.save(model, tmp_path / "hf"))
    alone = _metrics(train(_run(tmp_path, f"model.hf={hf}", "model.overrides={}", "data.reset_document_masks=true",
                                "train.eval_interval=0")))
    # The layout meant under PP: rows of one window's documents, at most 2, all 32 wide with 5 canvas blocks.
    from megatron_bdgemma.training.data import build_step_data
    from megatron_bdgemma.training.trainer import build_model_config

    pp2 = _run(tmp_path, f"model.hf={hf}", "model.overrides={}", *PACKED_UNDER_LAYOUTS, *LAYOUTS["pp2"])
    data = build_step_data(pp2, build_model_config(pp2))
    assert data.packing.canvas_blocks == 5
    steps = [data.microbatches(step) for step in range(STEPS)]
    documents = [[len(set(row.tolist()) - {-1}) for mb, _ in step for row in mb.segment_ids] for step in steps]
    assert all(mb.input_ids.shape == (2, 32) for step in steps for mb, _ in step)
    assert max(map(max, documents)) == 2 and min(map(len, documents)) > 4, documents  # windows were split
    ranks = run_in_processes(_layouts_in_rank, 2, str(tmp_path), hf, timeout_s=400)
    for rank, got in enumerate(ranks):
        for name in LAYOUTS:
            assert_steps_close(got[name], alone, f"document masks {name} rank {rank} vs documents alone",
                               shared_weight_steps=2)


@pytest.mark.parametrize("overrides,message", [
    (["data.packing=true"], "data.packing with data.mode=pretrain needs data.reset_document_masks=true"),
    (["data.mode=sft", "data.reset_document_masks=true"], "data.reset_document_masks is a pretrain option"),
])
def test_document_mask_options_refused_where_meaningless(overrides, message):
    run = load_run_config(CONFIG, overrides)
    with pytest.raises(ValueError, match=rf"^invalid run configuration: {message}"):
        run.validate(1)
