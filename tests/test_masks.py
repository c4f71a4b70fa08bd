"""Contract of megatron_bdgemma.masks (docs/design.md §5, §10).

Guards: every builder against a brute-force reference written here with plain loops straight from docs/design.md §5;
the strict block rule (a canvas block never sees its own clean tokens); both window boundaries (``<``, not
``<=``); no empty softmax row anywhere; training decode of block i == inference decode with the cache ending at
the block start; the encoder mask against transformers' own ``sdpa_mask``; the backend conversions.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.masking_utils import causal_mask_function, sdpa_mask, sliding_window_causal_mask_function

from megatron_bdgemma.masks import (
    BlockDiffusionTrainingMask,
    DecodeInferenceMask,
    EncoderMask,
    to_additive,
    to_megatron,
    to_sdpa,
)

windows = st.one_of(st.none(), st.integers(1, 8))


# ----------------------------------------------------------------------------------------------------------------
# brute-force references (plain loops, the rules of docs/design.md §5)


def ref_encoder(valid: list[list[bool]], window: int | None) -> list[list[list[bool]]]:
    out = []
    for row in valid:
        S = len(row)
        m = [[k <= q and row[k] and (window is None or q - k < window) for k in range(S)] for q in range(S)]
        for q in range(S):
            if not any(m[q]):
                m[q][q] = True
        out.append(m)
    return out


def ref_training(prefix, resp, S, R, B, window, block_ids=None) -> list[list[list[bool]]]:
    def slot(b, j):
        """(response block, response offset, valid) of canvas slot j."""
        i = block_ids[b][j // B] if block_ids is not None else j // B
        r = i * B + j % B
        return i, r, i >= 0 and r < resp[b]

    out = []
    for b in range(len(prefix)):
        p, rows = prefix[b], []
        for j in range(R):
            i, _, valid = slot(b, j)
            row = []
            for key in range(S + R):
                if not valid:
                    row.append(key == S + j)  # padded canvas row: only its own diagonal
                elif key < S:
                    k = key
                    if k < p:
                        vis = True  # prompt
                    elif k - p < resp[b]:
                        vis = (k - p) // B < i  # response (incl. EOS fill): strictly earlier blocks
                    else:
                        vis = False  # global pad
                    if window is not None and k < p + i * B - window + 1:
                        vis = False  # window anchored at the block start
                    row.append(vis)
                else:
                    j2 = key - S
                    row.append(j2 // B == j // B and slot(b, j2)[2])
            rows.append(row)
        out.append(rows)
    return out


def ref_inference(enc_valid, can_valid, window) -> list[list[list[bool]]]:
    out = []
    for b in range(len(enc_valid)):
        S, R = len(enc_valid[b]), len(can_valid[b])
        rows = []
        for j in range(R):
            row = [enc_valid[b][k] and (window is None or k >= S - (window - 1)) for k in range(S)]
            row += [can_valid[b][j2] or j2 == j for j2 in range(R)]
            rows.append(row)
        out.append(rows)
    return out


def _check(mask: torch.Tensor, ref, shape):
    assert mask.dtype == torch.bool and tuple(mask.shape) == shape
    assert mask.any(dim=-1).all(), "empty softmax row"
    assert mask[:, 0].tolist() == ref


# ----------------------------------------------------------------------------------------------------------------
# encoder


@st.composite
def encoder_cases(draw):
    batch, S = draw(st.integers(1, 3)), draw(st.integers(1, 10))
    # Any pattern: right padding (training), left padding (generation), holes.
    valid = [[draw(st.booleans()) for _ in range(S)] for _ in range(batch)]
    return valid, draw(windows)


@settings(max_examples=300, deadline=None)
@given(encoder_cases())
def test_encoder_mask_matches_reference(case):
    valid, window = case
    B, S = len(valid), len(valid[0])
    _check(EncoderMask(torch.tensor(valid), window).dense(), ref_encoder(valid, window), (B, 1, S, S))


@settings(max_examples=60, deadline=None)
@given(encoder_cases())
def test_encoder_mask_matches_transformers(case):
    """transformers' own index-based mask; it may leave rows empty, where ours keeps only the diagonal."""
    valid, window = case
    B, S = len(valid), len(valid[0])
    fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    hf = sdpa_mask(B, S, S, mask_function=fn, attention_mask=torch.tensor(valid), allow_is_causal_skip=False)
    ours = EncoderMask(torch.tensor(valid), window).dense()
    empty = ~hf.any(dim=-1, keepdim=True)
    assert torch.equal(ours, torch.where(empty, torch.eye(S, dtype=torch.bool), hf))


def test_encoder_window_boundary_is_strict():
    S, W = 10, 4
    m = EncoderMask(torch.ones(1, S, dtype=torch.bool), W).dense()[0, 0]
    q = 7
    assert m[q, q - (W - 1)] and not m[q, q - W]  # q - k < window, not <=
    assert m[q, q] and not m[q, q + 1]  # causal
    assert m.sum(-1).tolist() == [min(q + 1, W) for q in range(S)]


def test_encoder_pad_queries_keep_diagonal():
    valid = torch.tensor([[False, False, True, True]])  # left padding
    m = EncoderMask(valid, None).dense()[0, 0]
    assert m[0].tolist() == [True, False, False, False]
    assert m[1].tolist() == [False, True, False, False]
    assert m[3].tolist() == [False, False, True, True]


# ----------------------------------------------------------------------------------------------------------------
# training


@st.composite
def training_cases(draw):
    batch = draw(st.integers(1, 3))
    B = draw(st.integers(1, 4))
    prefix = [draw(st.integers(0, 6)) for _ in range(batch)]
    resp = [draw(st.integers(0, 10)) for _ in range(batch)]
    S = max(p + r for p, r in zip(prefix, resp)) + draw(st.integers(0, 3))
    R = draw(st.integers(1, 12))  # may hold fewer or more slots than a response
    block_ids = None
    if draw(st.booleans()):
        nblk = -(-R // B)
        block_ids = [[draw(st.integers(-1, 5)) for _ in range(nblk)] for _ in range(batch)]
    return prefix, resp, S, R, B, draw(windows), block_ids


@settings(max_examples=500, deadline=None)
@given(training_cases())
def test_training_mask_matches_reference(case):
    prefix, resp, S, R, B, window, block_ids = case
    mask = BlockDiffusionTrainingMask(
        torch.tensor(prefix),
        torch.tensor(resp),
        S,
        R,
        B,
        window,
        canvas_block_ids=None if block_ids is None else torch.tensor(block_ids),
    ).dense()
    _check(mask, ref_training(prefix, resp, S, R, B, window, block_ids), (len(prefix), 1, R, S + R))


def test_training_strict_block_boundary():
    """The most important test in the product: a block never sees its own clean tokens (r // B == i)."""
    p, L, B, S = 2, 12, 4, 16
    m = BlockDiffusionTrainingMask(torch.tensor([p]), torch.tensor([L]), S, L, B, None).dense()[0, 0]
    for i in range(3):
        for j in range(i * B, (i + 1) * B):
            enc = m[j, :S]
            assert enc[: p + i * B].all()  # prompt and earlier blocks
            assert not enc[p + i * B :].any()  # own clean block, later blocks, global pad
            assert m[j, S:].tolist() == [j2 // B == i for j2 in range(L)]  # own canvas block only


def test_training_automodel_worked_example():
    """NeMo Automodel's worked example of its training mask: prefix 0, resp = enc = 16, bs 4."""
    m = BlockDiffusionTrainingMask(torch.tensor([0]), torch.tensor([16]), 16, 16, 4, None).dense()[0, 0]
    for j in range(4, 8):
        assert m[j].nonzero().flatten().tolist() == [0, 1, 2, 3, 20, 21, 22, 23]


def test_training_window_boundary_anchored_at_block_start():
    p, L, B, S, W = 3, 12, 4, 15, 5
    m = BlockDiffusionTrainingMask(torch.tensor([p]), torch.tensor([L]), S, L, B, W).dense()[0, 0]
    i = 2
    start = p + i * B  # 11: block 2's clean context is [0, 11)
    lo = start - W + 1  # 7: keys [7, 11) are the window - 1 retained positions
    for j in range(i * B, (i + 1) * B):  # the same window for every query of the block
        assert m[j, :S].nonzero().flatten().tolist() == list(range(lo, start))
    assert m[i * B, lo] and not m[i * B, lo - 1]
    # A window reaching past the start of the row has no lower bound; the prompt stays visible.
    m0 = BlockDiffusionTrainingMask(torch.tensor([p]), torch.tensor([L]), S, L, B, 100).dense()[0, 0]
    assert m0[:B, :p].all()


def test_training_padded_rows_and_global_pad():
    # Example 1 has a shorter response; canvas_len exceeds both responses.
    prefix, resp, S, R, B = torch.tensor([1, 2]), torch.tensor([8, 3]), 10, 12, 4
    m = BlockDiffusionTrainingMask(prefix, resp, S, R, B, None).dense()[:, 0]
    for j in range(3, R):  # padded rows of example 1: only the diagonal
        assert m[1, j].nonzero().flatten().tolist() == [S + j]
    assert not m[:, :, S - 1].any() and not m[1, :, 2 + 3 :S].any()  # global pad keys never seen
    assert not m[1, :3, S + 3 : S + 4].any()  # the padded canvas slot is not a key of real rows


def test_training_subset_of_blocks_equals_full_canvas():
    """Decoding only some blocks (canvas_block_ids) gives the full-canvas rows of those blocks, re-indexed."""
    prefix, resp, S, B, W = torch.tensor([2, 0]), torch.tensor([12, 9]), 14, 4, 6
    full = BlockDiffusionTrainingMask(prefix, resp, S, 12, B, W).dense()[:, 0]
    ids = torch.tensor([[2, 0], [1, -1]])
    sub = BlockDiffusionTrainingMask(prefix, resp, S, 2 * B, B, W, canvas_block_ids=ids).dense()[:, 0]
    for b in range(2):
        for c in range(2):
            i = int(ids[b, c])
            rows_sub, rows_full = slice(c * B, (c + 1) * B), slice(i * B, (i + 1) * B)
            if i < 0:
                diagonal = torch.zeros(B, S + 2 * B, dtype=torch.bool)
                diagonal[torch.arange(B), S + c * B + torch.arange(B)] = True
                assert torch.equal(sub[b, rows_sub], diagonal)
                continue
            assert torch.equal(sub[b, rows_sub, :S], full[b, rows_full, :S])
            keys_sub, keys_full = slice(S + c * B, S + (c + 1) * B), slice(S + i * B, S + (i + 1) * B)
            assert torch.equal(sub[b, rows_sub, keys_sub], full[b, rows_full, keys_full])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 6), st.integers(1, 12), st.integers(1, 4), windows)
def test_training_block_equals_inference_decode(p, L, B, window):
    """Training row block i == inference with the cache holding exactly the clean prefix [0, p + i·B)."""
    S, R = p + L, -(-L // B) * B
    train = BlockDiffusionTrainingMask(torch.tensor([p]), torch.tensor([L]), S, R, B, window).dense()[0, 0]
    for i in range(R // B):
        start = p + i * B
        blk = slice(i * B, (i + 1) * B)
        canvas_valid = (torch.arange(i * B, (i + 1) * B) < L)[None]
        infer = DecodeInferenceMask(torch.ones(1, start, dtype=torch.bool), canvas_valid, window).dense()[0, 0]
        rows = canvas_valid[0]  # padded rows differ by design (they see only their diagonal in training)
        assert torch.equal(train[blk, :start][rows], infer[:, :start][rows])
        assert not train[blk, start:S].any()
        assert torch.equal(train[blk, S + i * B : S + (i + 1) * B][rows], infer[:, start:][rows])


def test_training_validation():
    one = torch.tensor([0])
    with pytest.raises(ValueError, match="window"):
        BlockDiffusionTrainingMask(one, one, 4, 4, 2, 0).dense()
    with pytest.raises(ValueError, match="block_size"):
        BlockDiffusionTrainingMask(one, one, 4, 4, 0, None).dense()
    with pytest.raises(ValueError, match="canvas_block_ids"):
        BlockDiffusionTrainingMask(one, one, 4, 5, 2, None, canvas_block_ids=torch.tensor([[0, 1]])).dense()


# ----------------------------------------------------------------------------------------------------------------
# inference


@st.composite
def inference_cases(draw):
    batch, S, R = draw(st.integers(1, 3)), draw(st.integers(0, 10)), draw(st.integers(1, 6))
    enc = [[draw(st.booleans()) for _ in range(S)] for _ in range(batch)]
    can = [[draw(st.booleans()) for _ in range(R)] for _ in range(batch)] if draw(st.booleans()) else None
    return enc, can, R, draw(windows)


@settings(max_examples=300, deadline=None)
@given(inference_cases())
def test_inference_mask_matches_reference(case):
    enc, can, R, window = case
    B, S = len(enc), len(enc[0])
    enc_t = torch.tensor(enc, dtype=torch.bool)
    if can is None:
        mask = DecodeInferenceMask(enc_t, None, window, canvas_len=R).dense()
        can = [[True] * R for _ in range(B)]
    else:
        mask = DecodeInferenceMask(enc_t, torch.tensor(can), window).dense()
    _check(mask, ref_inference(enc, can, window), (B, 1, R, S + R))


def test_inference_window_keeps_last_window_minus_one():
    """HF's DynamicSlidingWindowLayer retains window - 1 positions (docs/design.md §5, §10)."""
    S, R, W = 13, 4, 8
    m = DecodeInferenceMask(torch.ones(1, S, dtype=torch.bool), None, W, canvas_len=R).dense()[0, 0]
    assert m[:, :S].nonzero()[:, 1].unique().tolist() == list(range(S - (W - 1), S))  # 7 keys, as measured
    assert m[:, S:].all()  # the canvas is never windowed
    full = DecodeInferenceMask(torch.ones(1, S, dtype=torch.bool), None, None, canvas_len=R).dense()[0, 0]
    assert full.all()


def test_inference_validation():
    with pytest.raises(ValueError, match="canvas_len"):
        DecodeInferenceMask(torch.ones(1, 3, dtype=torch.bool), None, None).dense()
    with pytest.raises(ValueError, match="canvas_len"):
        DecodeInferenceMask(torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 2).bool(), None, canvas_len=3).dense()


# ----------------------------------------------------------------------------------------------------------------
# conversions


def test_conversions():
    allowed = EncoderMask(torch.tensor([[True, True, False, True]]), 2).dense()
    assert torch.equal(to_megatron(allowed), ~allowed)
    assert to_sdpa(allowed) is allowed
    for dtype in (torch.float32, torch.bfloat16):
        bias = to_additive(allowed, dtype)
        assert bias.dtype == dtype and bias.shape == allowed.shape
        assert (bias[allowed] == 0).all() and (bias[~allowed] == torch.finfo(dtype).min).all()
    with pytest.raises(ValueError, match="floating"):
        to_additive(allowed, torch.int32)


def test_conversions_agree_in_attention():
    torch.manual_seed(0)
    allowed = BlockDiffusionTrainingMask(torch.tensor([2, 1]), torch.tensor([5, 2]), 8, 8, 2, 3).dense()
    q, k, v = (torch.randn(2, 3, n, 4) for n in (8, 16, 16))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=to_sdpa(allowed))
    scores = q @ k.transpose(-1, -2) / 2.0
    eager = torch.softmax(scores + to_additive(allowed, torch.float32), dim=-1) @ v
    megatron = torch.softmax(scores.masked_fill(to_megatron(allowed), float("-inf")), dim=-1) @ v
    torch.testing.assert_close(sdpa, eager)
    torch.testing.assert_close(megatron, eager)


def test_additive_fully_blocked_row_is_uniform_not_nan():
    bias = to_additive(torch.zeros(1, 1, 1, 5, dtype=torch.bool), torch.bfloat16)
    probs = torch.softmax(torch.zeros(1, 1, 1, 5, dtype=torch.bfloat16) + bias, dim=-1)
    assert torch.equal(probs, torch.full_like(probs, 0.2))  # uniform (0.2 rounded to bf16)


# ----------------------------------------------------------------------------------------------------------------
# the rule's views: chunk tiles and key spans (the block-sparse attention), row selection (generation)


def _check_views(mask, chunk: int) -> None:
    """Every chunk's key spans hold all its allowed keys; its tile is the dense grid there; `select` keeps rows."""
    dense = mask.dense()
    for start in range(0, mask.num_queries, chunk):
        end = min(start + chunk, mask.num_queries)
        spans = mask.key_spans(start, end)
        assert all(0 <= a < b <= mask.num_keys for a, b in spans)
        assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:])), spans  # disjoint, increasing
        keys = torch.cat([torch.arange(a, b) for a, b in spans])
        outside = torch.ones(mask.num_keys, dtype=torch.bool)
        outside[keys] = False
        assert not dense[:, :, start:end, outside].any(), f"rows {start}:{end} see keys outside {spans}"
        assert torch.equal(mask.tile(torch.arange(start, end), keys), dense[:, :, start:end][..., keys])
    rows = torch.arange(mask.batch_size).flip(0)
    assert torch.equal(mask.select(rows).dense(), dense[rows])


@settings(max_examples=200, deadline=None)
@given(encoder_cases(), st.integers(1, 5), st.data())
def test_encoder_views(case, chunk, data):
    valid, window = case
    queries = data.draw(st.integers(0, len(valid[0])))
    _check_views(EncoderMask(torch.tensor(valid), window, num_queries=queries), chunk)


@settings(max_examples=200, deadline=None)
@given(training_cases(), st.integers(1, 5))
def test_training_views(case, chunk):
    prefix, resp, S, R, B, window, block_ids = case
    ids = None if block_ids is None else torch.tensor(block_ids)
    mask = BlockDiffusionTrainingMask(torch.tensor(prefix), torch.tensor(resp), S, R, B, window, canvas_block_ids=ids)
    _check_views(mask, chunk)
    _check_views(mask, B)  # the chunking the block-sparse attention uses: one canvas block


@settings(max_examples=100, deadline=None)
@given(inference_cases(), st.integers(1, 5))
def test_inference_views(case, chunk):
    enc, can, R, window = case
    can_t = None if can is None else torch.tensor(can)
    _check_views(DecodeInferenceMask(torch.tensor(enc, dtype=torch.bool), can_t, window, canvas_len=R), chunk)


@settings(max_examples=200, deadline=None)
@given(encoder_cases(), st.data())
def test_encoder_last_queries_over_retained_keys_equal_the_full_mask(case, data):
    """Generation encodes new positions over a cache that keeps only the last `window - 1` keys (or all of them):
    the rows must be the full encode's rows for those positions, restricted to the kept keys."""
    valid, window = case
    S = len(valid[0])
    queries = data.draw(st.integers(1, S))
    kept = S - queries if window is None else min(S - queries, window - 1)
    full = EncoderMask(torch.tensor(valid), window).dense()[:, :, S - queries :]
    cached = EncoderMask(torch.tensor(valid)[:, S - queries - kept :], window, num_queries=queries).dense()
    assert torch.equal(cached, full[..., S - queries - kept :])
    assert not full[..., : S - queries - kept].any()
