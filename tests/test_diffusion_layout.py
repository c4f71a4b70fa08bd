"""Contract of megatron_bdgemma.diffusion.layout: the response window (docs/design.md §5, §7).

Guards: prompt = tokens before the first supervised one; response window = from there to the last valid token,
EOS-filled to whole blocks (supervised, attended, written into the clean ids); valid unsupervised tokens inside the
window stay clean and unscored; a row with no supervised token is AR-only; global pad invalid; canvas slot j =
absolute position p + j; AR pairs cover every valid pair, prompt included. The batch-level comparison with NeMo
Automodel's own rules is tests/test_sft_reference.py.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_bdgemma.diffusion import (
    DiffusionBatch,
    block_mask,
    build_pretrain_batch,
    build_sft_batch,
    take_blocks,
)

EOS, PAD = 1, 0


def _row(prompt: list[int], answer: list[int], tail: list[int], S: int) -> tuple[list[int], list[int], list[int]]:
    """One right-padded example: ids, loss mask, valid."""
    ids = prompt + answer + tail
    n = len(ids)
    return (
        ids + [PAD] * (S - n),
        [0] * len(prompt) + [1] * len(answer) + [0] * (S - len(prompt) - len(answer)),
        [1] * n + [0] * (S - n),
    )


def _batch(rows):
    ids, lm, valid = zip(*rows)
    return torch.tensor(ids), torch.tensor(lm), torch.tensor(valid, dtype=torch.bool)


def test_sft_split_fill_positions_and_growth():
    # Example 0: prompt 3, answer 5 -> fill to 8 (two blocks of 4): 3 EOS, ends at 11 > S=10, so S grows.
    # Example 1: prompt 1, answer 4 (already one block): no fill, then global pad.
    ids, lm, valid = _batch([_row([11, 12, 13], [21, 22, 23, 24, 25], [], 10), _row([14], [31, 32, 33, 34], [], 10)])
    b = build_sft_batch(ids, lm, valid, block_size=4, eos_id=EOS, pad_id=PAD)

    assert b.seq_len == 11 and b.canvas_len == 8 and b.num_blocks == 2 and b.block_size == 4
    assert b.prefix_lens.tolist() == [3, 1]
    assert b.response_lens.tolist() == [8, 4]
    assert b.blocks_per_example.tolist() == [2, 1]
    assert b.input_ids.tolist() == [
        [11, 12, 13, 21, 22, 23, 24, 25, EOS, EOS, EOS],
        [14, 31, 32, 33, 34, PAD, PAD, PAD, PAD, PAD, PAD],
    ]
    assert b.encoder_valid.sum(1).tolist() == [11, 5]  # prompt + response + fill; pad invalid
    assert not b.encoder_valid[1, 5:].any()

    assert b.canvas_targets.tolist() == [[21, 22, 23, 24, 25, EOS, EOS, EOS], [31, 32, 33, 34, PAD, PAD, PAD, PAD]]
    assert b.canvas_valid.tolist() == [[True] * 8, [True] * 4 + [False] * 4]
    # Absolute positions p + j (the canvas RoPE matches the clean copy's), clamped to S-1 on invalid slots.
    assert b.canvas_position_ids[0].tolist() == list(range(3, 11))
    assert b.canvas_position_ids[1, :4].tolist() == [1, 2, 3, 4]
    assert (b.canvas_position_ids < b.seq_len).all()
    # Canvas slot j is the clean token at p + j.
    gathered = torch.gather(b.input_ids, 1, b.canvas_position_ids)
    assert torch.equal(torch.where(b.canvas_valid, gathered, PAD), b.canvas_targets)


def test_sft_ar_labels_cover_all_valid_pairs():
    ids, lm, valid = _batch([_row([11, 12], [21, 22, 23], [], 8), _row([13, 14, 15], [31], [], 8)])
    b = build_sft_batch(ids, lm, valid, block_size=2, eos_id=EOS, pad_id=PAD)
    for r in range(2):
        n = int(b.encoder_valid[r].sum())
        # Pairs (i, i+1) for i < n-1: prompt included, EOS fill included, nothing into pad.
        assert b.ar_loss_mask[r].tolist() == [True] * (n - 1) + [False] * (b.seq_len - n + 1)
        assert b.ar_labels[r, : n - 1].tolist() == b.input_ids[r, 1:n].tolist()
        assert (b.ar_labels[r, n - 1 :] == PAD).all()


def test_sft_keeps_unsupervised_tail_clean_and_rounds_seq():
    # A template's trailing token after the answer (valid, unsupervised) stays in the window, clean and unscored;
    # the EOS fill starts after it.
    ids, lm, valid = _batch([_row([11], [21, 22], [99], 6)])
    b = build_sft_batch(ids, lm, valid, block_size=4, eos_id=EOS, pad_id=PAD, seq_multiple_of=8)
    assert b.seq_len == 8
    assert b.input_ids.tolist() == [[11, 21, 22, 99, EOS, PAD, PAD, PAD]]
    assert b.canvas_targets[0, :4].tolist() == [21, 22, 99, EOS]
    assert b.canvas_valid[0].tolist() == [True] * 4
    assert b.canvas_supervised[0].tolist() == [True, True, False, True]


def test_multi_turn_spans_share_one_window():
    # prompt [11], answer 1 [21, 22], user turn [12, 13], answer 2 [23]: one window from the first answer on.
    ids = torch.tensor([[11, 21, 22, 12, 13, 23, PAD, PAD]])
    lm = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 0]])
    b = build_sft_batch(ids, lm, ids != PAD, block_size=4, eos_id=EOS, pad_id=PAD)
    assert b.prefix_lens.tolist() == [1] and b.response_lens.tolist() == [8]
    assert b.input_ids.tolist() == [[11, 21, 22, 12, 13, 23, EOS, EOS, EOS]]
    assert b.canvas_supervised[0].tolist() == [True, True, False, False, True, True, True, True]


def test_row_without_supervised_token_is_ar_only():
    ids, lm, valid = _batch([_row([11], [21], [], 4), _row([11, 12], [], [], 4)])
    b = build_sft_batch(ids, lm, valid, block_size=4, eos_id=EOS, pad_id=PAD)
    assert b.seq_len == 5 and b.prefix_lens.tolist() == [1, 5] and b.response_lens.tolist() == [4, 0]
    assert b.input_ids[1].tolist() == [11, 12, PAD, PAD, PAD]  # no EOS fill
    assert not b.canvas_valid[1].any() and not b.canvas_supervised[1].any()
    assert b.ar_loss_mask[1].tolist() == [True, False, False, False, False]


def test_max_len_truncates_content_and_fill():
    # Answer of 5 from position 2: the fill would end at 10; cut at 8 leaves a partial second block.
    ids, lm, valid = _batch([_row([11, 12], [21, 22, 23, 24, 25], [], 7), _row([13], [31], [], 7)])
    b = build_sft_batch(ids, lm, valid, block_size=4, eos_id=EOS, pad_id=PAD, max_len=8)
    assert b.seq_len == 8 and b.response_lens.tolist() == [6, 4]
    assert b.input_ids[0].tolist() == [11, 12, 21, 22, 23, 24, 25, EOS]
    # Content past max_len is cut too.
    b = build_sft_batch(ids, lm, valid, block_size=4, eos_id=EOS, pad_id=PAD, max_len=4)
    assert b.input_ids.tolist() == [[11, 12, 21, 22], [13, 31, EOS, EOS]]
    assert b.response_lens.tolist() == [2, 3] and b.canvas_supervised.sum(1).tolist() == [2, 3]


def test_left_padding_equals_right_padding():
    right = _batch([_row([11, 12], [21, 22, 23], [9], 8), _row([13], [31], [], 8)])
    left = tuple(torch.stack([torch.roll(t[0], 2), torch.roll(t[1], 6)]) for t in right)
    a = build_sft_batch(*right, block_size=2, eos_id=EOS, pad_id=PAD)
    b = build_sft_batch(*left, block_size=2, eos_id=EOS, pad_id=PAD)
    for name in DiffusionBatch.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, name


def test_bad_padding_is_rejected():
    ids, lm, valid = _batch([_row([11], [21], [], 4)])
    with pytest.raises(ValueError, match="contiguous run"):
        build_sft_batch(ids, lm, torch.tensor([[True, False, True, False]]), block_size=4, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="outside valid"):
        build_sft_batch(ids, torch.tensor([[0, 1, 1, 0]]), valid, block_size=4, eos_id=EOS, pad_id=PAD)


@settings(max_examples=60, deadline=None)
@given(
    examples=st.lists(
        # (prompt, answer, unsupervised tail, extra pad) lengths
        st.tuples(st.integers(0, 9), st.integers(1, 9), st.integers(0, 3), st.integers(0, 3)),
        min_size=1,
        max_size=4,
    ),
    block_size=st.integers(1, 5),
)
def test_sft_matches_per_example_reference(examples, block_size):
    """Batched layout equals a naive per-example construction, whatever the other examples are."""
    S = max(p + a + t + d for p, a, t, d in examples)
    rows, expected = [], []
    for b, (p, a, t, _) in enumerate(examples):
        prompt = [100 + 10 * b + i for i in range(p)]
        answer = [200 + 10 * b + i for i in range(a)]
        rows.append(_row(prompt, answer, [99] * t, S))
        filled = -(-(a + t) // block_size) * block_size
        expected.append((p, prompt + answer + [99] * t + [EOS] * (filled - a - t), [True] * a + [False] * t))
    b = build_sft_batch(*_batch(rows), block_size=block_size, eos_id=EOS, pad_id=PAD)

    assert b.canvas_len == max(len(clean) - p for p, clean, _ in expected)
    assert b.canvas_len % block_size == 0
    for r, (p, clean, supervised) in enumerate(expected):
        L = len(clean) - p
        assert b.prefix_lens[r] == p and b.response_lens[r] == L and L % block_size == 0
        assert b.input_ids[r, : len(clean)].tolist() == clean
        assert (b.input_ids[r, len(clean) :] == PAD).all()
        assert b.encoder_valid[r].tolist() == [True] * len(clean) + [False] * (b.seq_len - len(clean))
        assert b.canvas_targets[r, :L].tolist() == clean[p:]
        assert b.canvas_supervised[r, :L].tolist() == supervised + [True] * (L - len(supervised))
        assert (b.canvas_targets[r, L:] == PAD).all() and not b.canvas_valid[r, L:].any()
        assert b.canvas_position_ids[r, :L].tolist() == list(range(p, p + L))


def test_pretrain_pads_to_blocks_with_partial_last_block():
    ids = torch.arange(10, 17).view(1, 7).repeat(2, 1)
    valid = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    b = build_pretrain_batch(ids, block_size=3, valid=valid, pad_id=PAD)
    assert b.seq_len == 9 and b.canvas_len == 9  # S rounded up to whole blocks; canvas = whole row
    assert b.prefix_lens.tolist() == [0, 0]
    assert b.response_lens.tolist() == [7, 4]  # valid length: no EOS fill for documents
    assert b.input_ids.tolist() == [list(range(10, 17)) + [PAD, PAD], [10, 11, 12, 13] + [PAD] * 5]
    assert b.encoder_valid.sum(1).tolist() == [7, 4]
    assert torch.equal(b.canvas_valid, b.encoder_valid)
    assert torch.equal(b.canvas_targets, b.input_ids)
    assert b.canvas_position_ids[0].tolist() == list(range(9))
    assert b.ar_loss_mask.sum(1).tolist() == [6, 3]
    assert b.blocks_per_example.tolist() == [3, 2]


def test_pretrain_default_valid_and_aligned_length():
    ids = torch.randint(2, 50, (2, 8))
    b = build_pretrain_batch(ids, block_size=4, pad_id=PAD)
    assert b.seq_len == 8 and b.canvas_len == 8 and b.encoder_valid.all()
    assert torch.equal(b.input_ids, ids) and torch.equal(b.canvas_targets, ids)
    assert torch.equal(b.ar_labels[:, :-1], ids[:, 1:])


def test_block_mask_and_take_blocks():
    ids, lm, valid = _batch([_row([11], [21, 22, 23, 24, 25], [], 8), _row([12, 13], [31, 32], [], 8)])
    b = build_sft_batch(ids, lm, valid, block_size=3, eos_id=EOS, pad_id=PAD)
    blocks = torch.tensor([1, 0])
    scored = block_mask(blocks, b.canvas_supervised, b.block_size)
    assert scored.tolist() == [[False] * 3 + [True] * 3, [True] * 3 + [False] * 3]
    assert take_blocks(b.canvas_targets, blocks, 3).tolist() == [[24, 25, EOS], [31, 32, EOS]]
    assert take_blocks(b.canvas_position_ids, blocks, 3).tolist() == [[4, 5, 6], [2, 3, 4]]
    hidden = torch.randn(2, 6, 5)
    assert torch.equal(take_blocks(hidden, blocks, 3), torch.stack([hidden[0, 3:6], hidden[1, 0:3]]))
    with pytest.raises(ValueError, match="out of range"):
        take_blocks(b.canvas_targets, torch.tensor([2, 0]), 3)


def test_batch_checks_shapes_and_moves():
    ids, lm, valid = _batch([_row([11], [21], [], 4)])
    b = build_sft_batch(ids, lm, valid, block_size=2, eos_id=EOS, pad_id=PAD)
    assert b.to("cpu").input_ids.tolist() == b.input_ids.tolist()
    fields = {f: getattr(b, f) for f in DiffusionBatch.__dataclass_fields__}
    with pytest.raises(ValueError, match="canvas_valid"):
        DiffusionBatch(**{**fields, "canvas_valid": fields["canvas_valid"][:, :1]})
