"""Contract of megatron_bdgemma.diffusion.noise: deterministic, batching-independent training randomness.

Guards (docs/design.md §7): every draw depends only on (seed, global sample index, step, purpose) — so a sample gets
the same t, corruption, block and coin however the global batch is split over ranks and micro-batches, and on resume;
the corruption rate is t; only supervised canvas slots are touched (the prompt is never on the canvas); uniform
replacements are in-vocabulary random ids, absorbing ones are the mask id.
"""

import pytest
import torch

from megatron_bdgemma.diffusion import (
    DiffusionBatch,
    NoiseKind,
    NoisePurpose,
    build_sft_batch,
    choose_blocks,
    corrupt,
    corrupt_absorbing,
    corrupt_uniform,
    expand_t,
    sample_generator,
    sample_seed,
    sample_t,
    self_conditioning_coins,
)

EOS, PAD, V, BS, SEED = 1, 0, 97, 4, 1234


def _examples(indices: list[int]) -> DiffusionBatch:
    """SFT batch of the given global samples; sample i has prompt i+1 and answer 3i+2 (different R per split)."""
    rows = []
    S = max(2 + 4 * i + 3 for i in indices)
    for i in indices:
        p, a = i + 1, 3 * i + 2
        ids = [50 + i] * p + [10 + (k % 40) for k in range(a)]
        n = len(ids)
        rows.append((ids + [PAD] * (S - n), [0] * p + [1] * a + [0] * (S - n), [1] * n + [0] * (S - n)))
    ids, lm, valid = (torch.tensor(x) for x in zip(*rows))
    return build_sft_batch(ids, lm, valid.bool(), block_size=BS, eos_id=EOS, pad_id=PAD)


def _draw(indices: list[int], step: int) -> list[dict]:
    """Everything random for one micro-batch, cut back to per-example, batching-independent views."""
    batch = _examples(indices)
    key = dict(sample_indices=indices, step=step, seed=SEED)
    t = sample_t(**key)
    t_blk = sample_t(**key, blocks_per_example=batch.blocks_per_example, num_blocks=batch.num_blocks)
    noisy, noised = corrupt_uniform(batch.canvas_targets, batch.canvas_valid, t, vocab_size=V, **key)
    blocks = choose_blocks(batch.response_lens, BS, **key)
    coins = self_conditioning_coins(**key)
    out = []
    for r in range(len(indices)):
        L, nb = int(batch.response_lens[r]), int(batch.blocks_per_example[r])
        out.append(
            dict(
                t=t[r].item(),
                t_blk=t_blk[r, :nb].tolist(),
                noisy=noisy[r, :L].tolist(),
                noised=noised[r, :L].tolist(),
                block=int(blocks[r]),
                coin=bool(coins[r]),
            )
        )
    return out


def test_seed_is_a_pinned_stable_hash():
    # Pinned: changing the hash or its encoding silently changes every run's noise and breaks exact resume.
    assert sample_seed(0, 0, 0, "t") == sample_seed(0, 0, 0, NoisePurpose.T)
    assert sample_seed(42, 7, 3, "corrupt") == 1139377374396948788
    seeds = {sample_seed(s, i, k, p) for s in (0, 1) for i in (0, 1) for k in (0, 1) for p in NoisePurpose}
    assert len(seeds) == 2 * 2 * 2 * len(NoisePurpose)  # every component of the key matters
    assert all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(2**70, -5, 10**12, "block") >= 0  # any int is accepted
    with pytest.raises(ValueError):
        sample_generator(0, 0, 0, "tt")


def test_independent_of_batch_split():
    """Samples [0,1,2,3] in one micro-batch or as [0,1] + [2,3] (different R and S) draw identically."""
    whole = _draw([0, 1, 2, 3], step=5)
    split = _draw([0, 1], step=5) + _draw([2, 3], step=5)
    assert whole == split
    assert _draw([3, 1], step=5) == [whole[3], whole[1]]  # order within the batch does not matter either


def test_step_and_seed_change_the_noise():
    a, b = _draw([0, 1, 2, 3], step=5), _draw([0, 1, 2, 3], step=6)
    assert all(x["t"] != y["t"] for x, y in zip(a, b))
    assert [x["noisy"] for x in a] != [y["noisy"] for y in b]
    key = dict(sample_indices=list(range(8)), step=5)
    assert not torch.equal(sample_t(**key, seed=1), sample_t(**key, seed=2))


def test_t_range_and_clipping():
    t = sample_t(sample_indices=range(2000), step=0, seed=SEED)
    assert t.dtype == torch.float32 and t.shape == (2000,)
    assert t.min() >= 1e-3 and t.max() <= 1.0
    assert abs(t.mean().item() - 0.5) < 0.03
    t = sample_t(sample_indices=range(500), step=0, seed=SEED, t_min=0.3, t_max=0.8)
    assert t.min() >= 0.3 and t.max() <= 0.8
    blk = sample_t(sample_indices=[0, 1], step=0, seed=SEED, blocks_per_example=torch.tensor([3, 1]), num_blocks=4)
    assert blk.shape == (2, 4) and (blk[1, 1:] == 1.0).all() and (blk[0, :3] < 1.0).all()
    assert len(set(blk[0, :3].tolist())) == 3  # one t per block
    with pytest.raises(ValueError):
        sample_t(sample_indices=[0], step=0, seed=0, t_min=0.0)


def test_corruption_rate_matches_t():
    B, R = 4, 4096
    targets = torch.randint(2, V, (B, R))
    valid = torch.ones(B, R, dtype=torch.bool)
    t = torch.tensor([0.05, 0.3, 0.7, 1.0])
    _, noised = corrupt_uniform(targets, valid, t, sample_indices=range(B), step=0, seed=SEED, vocab_size=V)
    rate = noised.float().mean(1)
    assert torch.allclose(rate, t, atol=0.03)
    assert noised[3].all()  # t = 1 noises everything

    # Per-block t: the rate follows each block's own t.
    t_blk = torch.tensor([[0.1, 0.9]]).repeat(B, 1)
    _, noised = corrupt_uniform(
        targets, valid, t_blk, sample_indices=range(B), step=0, seed=SEED, vocab_size=V, block_size=R // 2
    )
    assert torch.allclose(noised[:, : R // 2].float().mean(), torch.tensor(0.1), atol=0.02)
    assert torch.allclose(noised[:, R // 2 :].float().mean(), torch.tensor(0.9), atol=0.02)


def test_only_supervised_slots_change_and_prompt_is_untouched():
    batch = _examples([0, 1, 2, 3])
    clean_ids = batch.input_ids.clone()
    t = torch.ones(4)  # noise every supervised slot
    noisy, noised = corrupt_uniform(
        batch.canvas_targets, batch.canvas_valid, t, sample_indices=range(4), step=0, seed=SEED, vocab_size=V
    )
    assert torch.equal(noised, batch.canvas_valid)
    assert (noisy[~batch.canvas_valid] == PAD).all()  # pad slots stay pad
    assert ((noisy >= 0) & (noisy < V)).all()
    assert torch.equal(batch.input_ids, clean_ids)  # the encoder's clean row (prompt included) is not modified
    # Every noised slot maps to an absolute position inside the response, never the prompt.
    pos = batch.canvas_position_ids[noised]
    assert (pos >= batch.prefix_lens[:, None].expand_as(noised)[noised]).all()

    # Replacements are uniform over the vocabulary: with a tiny vocabulary every id shows up, including
    # (by chance) the original token — no fixed sentinel.
    targets = torch.full((1, 2000), 3)
    everywhere = torch.ones_like(targets, dtype=torch.bool)
    noisy, noised = corrupt_uniform(
        targets, everywhere, torch.ones(1), sample_indices=[0], step=0, seed=SEED, vocab_size=5
    )
    assert set(noisy[noised].tolist()) == {0, 1, 2, 3, 4}


def test_absorbing_noises_the_same_slots_with_the_mask_id():
    batch = _examples([0, 1, 2])
    key = dict(sample_indices=[0, 1, 2], step=9, seed=SEED)
    t = sample_t(**key)
    uni = corrupt_uniform(batch.canvas_targets, batch.canvas_valid, t, vocab_size=V, **key)
    absb = corrupt_absorbing(batch.canvas_targets, batch.canvas_valid, t, mask_id=V, **key)
    assert torch.equal(uni.noised, absb.noised)
    assert (absb.noisy_ids[absb.noised] == V).all()
    assert torch.equal(absb.noisy_ids[~absb.noised], batch.canvas_targets[~absb.noised])
    via = corrupt(NoiseKind.ABSORBING, batch.canvas_targets, batch.canvas_valid, t, mask_id=V, **key)
    assert torch.equal(via.noisy_ids, absb.noisy_ids)
    with pytest.raises(ValueError, match="vocab_size"):
        corrupt("uniform", batch.canvas_targets, batch.canvas_valid, t, **key)


def test_choose_blocks_uniform_over_response_blocks():
    lens = torch.tensor([1, 4, 5, 12, 0] * 400)
    blocks = choose_blocks(lens, BS, sample_indices=range(len(lens)), step=0, seed=SEED)
    n_blocks = ((lens + BS - 1) // BS).clamp(min=1)
    assert ((blocks >= 0) & (blocks < n_blocks)).all()
    three = blocks[lens == 12]
    counts = torch.bincount(three, minlength=3).float() / len(three)
    assert torch.allclose(counts, torch.full((3,), 1 / 3), atol=0.08)


def test_self_conditioning_coins():
    idx = range(4000)
    coins = self_conditioning_coins(sample_indices=idx, step=0, seed=SEED)
    assert coins.dtype == torch.bool and abs(coins.float().mean().item() - 0.5) < 0.03
    assert not self_conditioning_coins(sample_indices=idx, step=0, seed=SEED, p=0.0).any()
    assert self_conditioning_coins(sample_indices=idx, step=0, seed=SEED, p=1.0).all()


def test_expand_t():
    t = torch.tensor([0.1, 0.2])
    assert torch.equal(expand_t(t, 3), torch.tensor([[0.1] * 3, [0.2] * 3]))
    blk = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    assert expand_t(blk, 4, block_size=2)[1].tolist() == pytest.approx([0.3, 0.3, 0.4, 0.4])
    with pytest.raises(ValueError, match="block_size"):
        expand_t(blk, 4)
