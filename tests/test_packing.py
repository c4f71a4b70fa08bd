"""Packed rows (docs/design.md §13, issue #24), at the model level: several records per row, each exactly as alone.

Guards: (a) no attention weight crosses a record boundary, in the encoder and on the canvas, for sliding and full
layers: the dense grids of the segment-aware masks against a rule written here from §13 (segment equality and
record-relative positions, not the masks' run starts), and the block-sparse key spans cover every allowed key and
skip the keys before a chunk's record; (b) through `training_forward`, every packed record's encoder and canvas
logits, both losses and every gradient equal the unpacked forward of the same records with the same noise and coins
(SFT single- and multi-turn with an AR-only record, one and all blocks scored, the loo variant's shift; pretraining
documents with partial last blocks), under eager, block-sparse and flex attention (FlexAttention's CPU reference:
the packed masks as its `mask_mod`); (c) the first-fit-decreasing packer: every record once, no row over capacity, deterministic, and
its efficiency on a log-normal length sample.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from megatron_bdgemma.config import tiny
from megatron_bdgemma.diffusion import build_pretrain_batch, build_sft_batch, noise_batch
from megatron_bdgemma.diffusion.packing import (
    first_fit_decreasing,
    pack_batch,
    pack_canvas,
    packing_efficiency,
)
from megatron_bdgemma.masks import BlockDiffusionTrainingMask, EncoderMask
from megatron_bdgemma.model import BDGemmaModel
from tests.hf_models import randomise_scales

BLOCK = 4
WINDOW = 5  # shorter than the records, so sliding layers cut inside a record and would reach into the previous one
VOCAB = 512
ROW = 40


def _model(impl: str = "eager") -> BDGemmaModel:
    torch.manual_seed(0)
    model = BDGemmaModel(tiny(canvas_length=BLOCK, sliding_window=WINDOW, attention_impl=impl, attention_chunk_size=6))
    randomise_scales(model)  # no norm weight or scalar is the identity
    return model


def _sft_records():
    """Five chats: single-turn (prompt 6, answer 9), multi-turn (prompt 3, answer 4, user 3, answer 5), AR-only (7
    tokens, nothing supervised), short (prompt 2, answer 3), long answer (prompt 1, answer 10); EOS-filled."""
    turns = [[(0, 6), (6, 15)], [(0, 3), (3, 7), (7, 10), (10, 15)], [(0, 7)], [(0, 2), (2, 5)], [(0, 1), (1, 11)]]
    supervised = [[1], [1, 3], [], [1], [1]]
    S = 16
    ids = torch.randint(2, VOCAB, (len(turns), S), generator=torch.Generator().manual_seed(0))
    loss_mask = torch.zeros(len(turns), S, dtype=torch.bool)
    valid = torch.zeros(len(turns), S, dtype=torch.bool)
    for r, spans in enumerate(turns):
        valid[r, : spans[-1][1]] = True
        for t in supervised[r]:
            loss_mask[r, spans[t][0] : spans[t][1]] = True
    return build_sft_batch(ids, loss_mask, valid, block_size=BLOCK, eos_id=1, pad_id=0)


def _documents():
    """Five pretraining documents of 13, 6, 9, 3 and 17 tokens (partial last blocks)."""
    lengths = [13, 6, 9, 3, 17]
    ids = torch.randint(2, VOCAB, (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(1))
    valid = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return build_pretrain_batch(ids, block_size=BLOCK, valid=valid, pad_id=0)


def _packed(records, score: str, variant: str = "base-sft", *, row: int = ROW, vocab_size: int = VOCAB):
    """The records packed into rows of `row` tokens, noised as they are alone; coins alternate so both gates occur."""
    lengths = records.encoder_valid.sum(dim=1).tolist()
    rows = first_fit_decreasing(lengths, row)
    assert len(rows) < records.batch_size, f"nothing was packed: {rows}"
    noised = noise_batch(records, sample_indices=[10 + i for i in range(records.batch_size)], step=3, seed=1,
                         vocab_size=vocab_size, score=score, variant=variant)
    coins = torch.arange(records.batch_size) % 3 == 0  # mixed in every row of both fixtures
    noised = dataclasses.replace(noised, self_conditioning=coins)
    batch = pack_batch(records, rows, pad_id=0, seq_len=row)
    return batch, pack_canvas(batch, noised), noised


CASES = [("sft", "one_block"), ("sft", "all_blocks"), ("pretrain", "all_blocks")]


# ----------------------------------------------------------------------------------------------------------------
# (a) brute force: the masks never cross a record


def _ref_encoder(batch, window, image_ids=None):
    """§13's rule per record, in its own positions; with `image_ids` (`[B, S]`, the image each token belongs to,
    unique along a row, -1 for text) also HF's vision rule (docs/design.md §9): an image's tokens see each other."""
    seg, pos, valid = batch.segment_ids.tolist(), batch.position_ids.tolist(), batch.encoder_valid.tolist()
    image = (torch.full(batch.input_ids.shape, -1) if image_ids is None else image_ids).tolist()
    out = []
    for b in range(batch.batch_size):
        grid = [[valid[b][k] and seg[b][k] == seg[b][q] and (
                    (k <= q and (window is None or pos[b][q] - pos[b][k] < window)) or image[b][q] == image[b][k] >= 0)
                 for k in range(batch.seq_len)] for q in range(batch.seq_len)]
        for q in range(batch.seq_len):
            grid[q][q] = grid[q][q] or not any(grid[q])
        out.append(grid)
    return torch.tensor(out)


def _ref_canvas(batch, canvas, window):
    """§5's rule per record, in the record's own positions: its prompt and strictly earlier blocks, the window
    anchored at the block start, its own canvas block; a key of another record is never visible."""
    records, S, bs = batch.records, batch.seq_len, batch.block_size
    R = canvas.noised.canvas_ids.shape[1]
    seg, pos = batch.segment_ids.tolist(), batch.position_ids.tolist()
    owners, blocks = canvas.canvas_records.tolist(), canvas.noised.block_ids.tolist()

    def slot(b, j):
        i, block = owners[b][j // bs], blocks[b][j // bs]
        return i, block, i >= 0 and block >= 0 and block * bs + j % bs < int(records.response_lens[i])

    out = []
    for b in range(batch.batch_size):
        grid = []
        for j in range(R):
            i, block, valid = slot(b, j)
            if not valid:
                grid.append([key == S + j for key in range(S + R)])
                continue
            end = int(records.prefix_lens[i]) + block * bs  # record position where the block's clean context ends
            row = [seg[b][k] == i and pos[b][k] < end and (window is None or pos[b][k] >= end - window + 1)
                   for k in range(S)]
            row += [j2 // bs == j // bs and slot(b, j2)[2] for j2 in range(R)]
            grid.append(row)
        out.append(grid)
    return torch.tensor(out)


@pytest.mark.parametrize("data, score", CASES)
@pytest.mark.parametrize("window", [None, WINDOW, 2])
def test_no_attention_crosses_a_record(data, score, window):
    batch, canvas, _ = _packed(_sft_records() if data == "sft" else _documents(), score)
    encoder = EncoderMask(batch.encoder_valid, window, segment_ids=batch.segment_ids)
    decoder = BlockDiffusionTrainingMask(
        canvas.response_starts, canvas.response_lens, batch.seq_len, canvas.noised.canvas_ids.shape[1], BLOCK, window,
        canvas_block_ids=canvas.noised.block_ids, segment_ids=batch.segment_ids,
    )
    for name, mask, ref in (("encoder", encoder, _ref_encoder(batch, window)),
                            ("canvas", decoder, _ref_canvas(batch, canvas, window))):
        dense = mask.dense()[:, 0]
        assert torch.equal(dense, ref), f"{name} mask differs from the rule at {(dense != ref).nonzero()[:5].tolist()}"
        # Explicitly: every allowed pair between two real tokens lies inside one record.
        if name == "encoder":
            query_seg, key_seg = batch.segment_ids[:, :, None], batch.segment_ids[:, None, :]
            real = batch.encoder_valid[:, :, None] & batch.encoder_valid[:, None, :]
        else:
            canvas_seg = canvas.canvas_records.repeat_interleave(BLOCK, dim=1)
            query_seg, key_seg = canvas_seg[:, :, None], batch.segment_ids[:, None, :]
            dense, real = dense[:, :, : batch.seq_len], (canvas_seg[:, :, None] >= 0) & batch.encoder_valid[:, None, :]
        crossing = dense & real & (query_seg != key_seg)
        assert not crossing.any(), f"{name}: attention across records at {crossing.nonzero()[:5].tolist()}"
        # The block-sparse kernel reads only the key spans: they must hold every allowed key.
        chunk = mask.query_chunk or 6
        for start in range(0, mask.num_queries, chunk):
            end = min(start + chunk, mask.num_queries)
            spanned = torch.zeros(mask.num_keys, dtype=torch.bool)
            for a, z in mask.key_spans(start, end):
                spanned[a:z] = True
            missed = mask.dense()[:, 0, start:end] & ~spanned
            assert not missed.any(), f"{name}: key spans of queries [{start}, {end}) miss allowed keys"


def test_block_sparse_skips_other_records():
    """On one packed row, an encoder chunk inside a record reads no key before that record: full-attention cost is
    Σ over chunks of (chunk end - its record start), about Σ record_len² / 2, not row_len² / 2."""
    lengths, chunk = [300, 120, 60, 20], 10
    segment = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None, :]
    mask = EncoderMask(torch.ones_like(segment, dtype=torch.bool), None, segment_ids=segment)
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    cost = 0
    for q in range(0, segment.shape[1], chunk):
        ((a, z),) = mask.key_spans(q, q + chunk)
        assert a == int(starts[segment[0, q]]), f"chunk at {q} reads from key {a}, not its record's start"
        cost += (z - a) * chunk
    packed_ideal, row = sum(n * n for n in lengths) / 2, sum(lengths) ** 2 / 2
    assert cost <= 1.1 * packed_ideal, f"block-sparse cost {cost} vs Σ record_len²/2 = {packed_ideal} (row²/2 = {row})"


# ----------------------------------------------------------------------------------------------------------------
# (b) every packed record equals the record alone


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("impl", ["eager", "block_sparse", "flex"])
@pytest.mark.parametrize("data, score, variant", [case + ("base-sft",) for case in CASES] + [("sft", "one_block", "loo-ce")])
def test_packed_records_equal_records_alone(model_parallel, data, score, variant, impl):
    """`training_forward` of the packed rows against `training_forward` of the records one per row (the loo variant
    also checks that each record's logit shift moves with its block)."""
    records = _sft_records() if data == "sft" else _documents()
    batch, canvas, noised = _packed(records, score, variant)
    if variant == "loo-ce":
        assert canvas.noised.logit_shift is not None and canvas.noised.logit_shift.abs().sum() > 0

    alone_model = _model(impl)
    alone = alone_model.training_forward(records, noised)  # today's unpacked path: one record per row
    (alone.diffusion_loss_sum + alone.ar_loss_sum).backward()
    packed_model = _model(impl)
    packed = packed_model.training_forward(batch, canvas)
    (packed.diffusion_loss_sum + packed.ar_loss_sum).backward()
    worst = assert_packed_equals_alone(records, batch, canvas, noised, packed, alone, packed_model, alone_model)
    print(f"{data}/{score}/{variant}/{impl}: worst relative logit difference {worst:.1e}")


def assert_packed_equals_alone(records, batch, canvas, noised, packed, alone, packed_model, alone_model) -> float:
    """Every packed record's encoder logits and decoded blocks' canvas logits equal those of the record alone (one
    per row, `records` noised as `noised`) to 1e-5 of the largest |logit| alone (tiny models' logits are up to 0.8
    here, 18 in tests/test_image_sft.py, where fp32 ulps are 2e-6), both losses and token counts too, and every
    gradient (both backwards done) to 1e-5 of its largest entry; returns the worst logit difference so measured."""
    largest = max(alone.encoder_logits.abs().max().item(), alone.canvas_logits.abs().max().item())
    encoder_logits, canvas_logits = packed.encoder_logits / largest, packed.canvas_logits / largest
    alone_encoder, alone_canvas = alone.encoder_logits / largest, alone.canvas_logits / largest
    diff_sum, diff_count, ar_sum, ar_count = (packed.diffusion_loss_sum, packed.diffusion_tokens, packed.ar_loss_sum,
                                              packed.ar_tokens)
    lengths, bs = records.encoder_valid.sum(dim=1).tolist(), batch.block_size
    worst = 0.0
    for i, n in enumerate(lengths):
        row, start = int(batch.record_rows[i]), int(batch.record_starts[i])
        diff = (encoder_logits[row, start : start + n] - alone_encoder[i, :n]).abs().max().item()
        assert diff <= 1e-5, f"record {i}: encoder logits differ by {diff:.2e} packed vs alone"
        worst = max(worst, diff)
    placed = 0
    for b, c in (canvas.canvas_records >= 0).nonzero().tolist():
        i, block = int(canvas.canvas_records[b, c]), int(canvas.noised.block_ids[b, c])
        source = noised.block_ids[i].tolist().index(block)
        valid = min(bs, int(records.response_lens[i]) - block * bs)
        diff = (canvas_logits[b, c * bs : c * bs + valid]
                - alone_canvas[i, source * bs : source * bs + valid]).abs().max().item()
        assert diff <= 1e-5, f"record {i}, block {block}: canvas logits differ by {diff:.2e} packed vs alone"
        worst, placed = max(worst, diff), placed + 1
    assert placed >= int((records.response_lens > 0).sum())  # every record with a response has its block(s) placed

    assert (diff_count, ar_count) == (alone.diffusion_tokens, alone.ar_tokens)
    for name, ours, ref in (("diffusion", diff_sum, alone.diffusion_loss_sum), ("ar", ar_sum, alone.ar_loss_sum)):
        assert abs(ours.item() - ref.item()) <= 1e-5 * abs(ref.item()), f"{name} loss {ours.item()} vs {ref.item()}"
    ours, ref = _grads(packed_model), _grads(alone_model)
    assert ours.keys() == ref.keys()
    for name in ref:
        diff, scale = (ours[name] - ref[name]).abs().max().item(), ref[name].abs().max().item()
        assert diff <= 1e-5 * max(scale, 1e-3), f"{name}: gradient differs by {diff:.2e} (max {scale:.2e})"
    return worst


def test_an_all_padding_micro_batch_adds_nothing(model_parallel):
    """A DP rank short of packed rows runs all-padding micro-batches (training/data.py): no record, so zero losses and
    counts and exactly zero gradients, yet the full forward (both decode passes) runs, so its collectives are issued."""
    records = _sft_records().select([])
    batch = pack_batch(records, [[], []], pad_id=0, seq_len=3)
    noised = noise_batch(records, sample_indices=[], step=0, seed=1, vocab_size=VOCAB, variant="loo-ce")
    canvas = pack_canvas(batch, noised)
    assert canvas.noised.canvas_ids.shape == (2, BLOCK) and not canvas.noised.scored.any()
    model = _model()
    out = model.training_forward(batch, canvas)
    assert out.canvas_logits.shape == (2, BLOCK, VOCAB) and out.canvas_logits.isfinite().all()
    assert (out.diffusion_tokens, out.ar_tokens) == (0, 0)
    (out.diffusion_loss_sum + out.ar_loss_sum).backward()
    assert out.diffusion_loss_sum.item() == out.ar_loss_sum.item() == 0.0
    grads = _grads(model)
    assert grads and all(not g.any() for g in grads.values()), [n for n, g in grads.items() if g.any()]


# ----------------------------------------------------------------------------------------------------------------
# (c) the packer


def test_first_fit_decreasing_policy():
    # Longest first, each into the first row with room: 5, 5 | 4, 3, 3 (hand-computed).
    assert first_fit_decreasing([3, 5, 4, 5, 3], 10) == [[1, 3], [2, 0, 4]]
    assert first_fit_decreasing([3, 5, 4, 5, 3], 10, max_records_per_row=2) == [[1, 3], [2, 0], [4]]
    with pytest.raises(ValueError, match=r"record 1 has 11 tokens: a packed record needs 1 to 10 \(data.seq_length\)"):
        first_fit_decreasing([3, 11], 10)


def test_first_fit_decreasing_on_log_normal_chats():
    """A step's records (the buffer is the global batch) of log-normal length, median 300, capped at 4096."""
    capacity, batch, steps = 4096, 256, 8
    rng = random.Random(0)
    lengths = [min(capacity, max(1, round(rng.lognormvariate(math.log(300), 1.0)))) for _ in range(batch * steps)]
    rows_total, padded_longest, placed_total, efficiencies = 0, 0, 0, []
    for step in range(steps):
        chunk = lengths[step * batch : (step + 1) * batch]
        rows = first_fit_decreasing(chunk, capacity)
        assert rows == first_fit_decreasing(list(chunk), capacity), "not deterministic"
        assert sorted(i for row in rows for i in row) == list(range(batch)), "a record not placed exactly once"
        assert max(sum(chunk[i] for i in row) for row in rows) <= capacity
        efficiencies.append(packing_efficiency(chunk, rows, capacity))
        rows_total += len(rows)
        placed_total += sum(chunk)
        padded_longest += sum(max(chunk[i : i + 4]) * 4 for i in range(0, batch, 4))  # micro-batch 4, padded
    packed = placed_total / (rows_total * capacity)
    longest = placed_total / padded_longest
    fixed = placed_total / (len(lengths) * capacity)
    report = (f"packing efficiency (valid / row tokens): packed {packed:.3f} in {rows_total} rows (steps "
              f"{min(efficiencies):.3f} to {max(efficiencies):.3f}); unpacked padded to "
              f"the micro-batch's longest (4) {longest:.3f}; padded to seq_length {fixed:.3f}")
    print(report)
    assert min(efficiencies) >= 0.95 and packed >= 2 * longest, report


def test_dealing_by_size_balances_the_ranks():
    """`deal_by_size` (packed SFT's share of a step per DP rank): every position once, each share in stream order,
    the same deal every time; hand-computed on a small case; on log-normal chats the most loaded rank is within one
    record of the mean (largest-first's bound) and far better balanced than by stride."""
    from megatron_bdgemma.training.data import deal_by_size

    # Sizes 9, 1, 5, 5, 3 at positions 10..14, largest first: 9 (10) → rank 0; 5 (12) → rank 1, the empty one;
    # 5 (13) → rank 1 (5 < 9); 3 (14) → rank 0 (9 < 10); 1 (11) → rank 1 (10 < 12).
    assert deal_by_size(range(10, 15), [9, 1, 5, 5, 3], 2) == [[10, 14], [11, 12, 13]]
    assert deal_by_size(range(5), [1] * 5, 1) == [[0, 1, 2, 3, 4]]
    rng = random.Random(0)
    for ranks, per_rank in ((8, 8), (64, 32)):
        sizes = [min(4096, max(1, round(rng.lognormvariate(math.log(400), 1.0)))) for _ in range(ranks * per_rank)]
        shares = deal_by_size(range(len(sizes)), sizes, ranks)
        assert shares == deal_by_size(range(len(sizes)), list(sizes), ranks), "not deterministic"
        assert sorted(p for share in shares for p in share) == list(range(len(sizes)))
        assert all(share == sorted(share) for share in shares)
        loads = [sum(sizes[p] for p in share) for share in shares]
        stride = [sum(sizes[rank::ranks]) for rank in range(ranks)]
        mean = sum(sizes) / ranks
        assert max(loads) <= mean + max(sizes) and max(loads) - mean < (max(stride) - mean) / 4, (loads, stride)


def test_laid_out_tokens_is_the_collated_length():
    """`laid_out_tokens` (the size chats are dealt by) equals what `sft_collate` lays a chat out to, EOS block fill
    and the `max_len` cut included: answers of every length mod the block, an AR-only chat, an over-long one."""
    from megatron_bdgemma.data.sft import laid_out_tokens, sft_collate

    rng = random.Random(1)
    for _ in range(200):
        total = rng.randint(2, 90)
        prompt = rng.randint(1, total)  # prompt == total: no supervised token (AR only)
        mask = torch.arange(total) >= prompt
        if rng.random() < 0.3 and total - prompt > 3:  # multi-turn: an unsupervised gap inside the answer
            mask[prompt + 1 : prompt + 3] = False
        sample = dict(input_ids=torch.randint(2, 50, (total,)), loss_mask=mask, sample_index=0)
        for max_len in (64, 128):
            collated = sft_collate([sample], block_size=8, eos_id=1, pad_id=0, max_len=max_len)[0]
            assert laid_out_tokens(sample, block_size=8, max_len=max_len) == int(collated.encoder_valid.sum()), \
                (total, prompt, max_len)


def test_pack_refuses_bad_placements():
    records = _documents()  # 13, 6, 9, 3 and 17 tokens
    with pytest.raises(ValueError, match=r"rows must place each of the 5 records exactly once"):
        pack_batch(records, [[0, 1], [2, 3]], pad_id=0)
    with pytest.raises(ValueError, match=r"packed rows \[1\] hold \[29\] tokens, more than seq_len 20"):
        pack_batch(records, [[0, 1], [2, 3, 4]], pad_id=0, seq_len=20)
    batch = pack_batch(records, [[4, 0, 1], [2, 3]], pad_id=0)
    noised = noise_batch(records, sample_indices=range(5), step=0, seed=0, vocab_size=VOCAB, score="all_blocks")
    with pytest.raises(ValueError, match=r"a packed row needs 11 canvas blocks, more than num_canvas_blocks 8"):
        pack_canvas(batch, noised, num_canvas_blocks=8)
