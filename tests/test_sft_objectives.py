"""Contract: the four SFT objectives of Google's reference (`objective.variant`, docs/design.md §7).

    variant             w(t)          CE scores
    base-sft            1             softmax(f)
    reweighted-ce       1/(1 − t)     softmax(f)
    loo-ce              1             softmax(f + δ·onehot(x_t)),  δ = log(1 + K(1 − t)/t)
    reweighted-loo-ce   1/(1 − t)     softmax(f + δ·onehot(x_t))

w optionally clipped (`objective.weight_clip`); t is the slot's noise level (α = 1 − t is the retention), x_t its
noisy canvas id, K the corruption's vocabulary size.

- Each variant's per-token loss w·CE and its gradient w.r.t. the logits equal a float64 brute-force implementation
  written here from the formulas (not calling the project's code), on random logits, targets, noisy ids, per-slot t
  (including t = 0.999999, w ≈ 1e6, and t = t_min = 1e-3, the largest δ) and scored masks, with and without the
  clip: through `diffusion_loss` (TP = 1, unchunked and chunked, float64 and fp32 logits) and through
  `vocab_parallel_cross_entropy_sum` at TP = 2 (2 gloo ranks, chunked; each rank adds δ only where x_t is in its
  vocabulary shard), without softcap and SP, and with both (the shift comes after the softcap).
- `noise_batch` puts w(t) into `weights` and δ(t) into `logit_shift` per slot for all four variants (one t per
  example, or per block with score=all_blocks), and draws the same canvas whatever the variant; base-sft's output is
  exactly today's (weights = the scored mask, no shift).
- In the model, the shift reaches only the diffusion CE: the canvas logits (so pass 1's self-conditioning signal
  too) and the AR loss are bit-equal to base-sft's, and the plain and vocab-parallel loss paths agree.

Bounds: a loss is compared as |ours − oracle| / (w · max(1, CE)) and a gradient as max |ours − oracle| / w, both
<= 1e-6 (`BOUND`). w·CE is the per-token loss; dividing by w makes the bound independent of the weight (w up to 1e6,
whose fp32 rounding is itself 6e-8 relative). Worst measured with the defaults (AVX-512) / under AVX2: float64
TP = 1 loss and gradient 4.8e-8 / 4.8e-8 (w's fp32 rounding); fp32 TP = 1 loss 1.3e-7 / 1.3e-7, gradient
1.3e-7 / 1.9e-7; TP = 2 (Megatron's fp32 CE) loss 2.2e-7 / 2.2e-7, gradient 2.0e-7 / 2.0e-7: margins >= 4.6x.
A bug moves them by O(1) (checked by planting: δ on the target instead of x_t, a 1/K on w, t and 1 − t swapped in
δ, δ on the wrong TP shard, δ before the softcap, δ in another token order than the hidden's under SP, the model
passing the targets as shift ids).
- Through the CLI, per variant: 20 tiny SFT steps train (the diffusion loss's mean over steps 16-20 over steps 1-5,
  measured the same on both ISAs: base-sft 0.64, reweighted-ce 0.67, loo-ce 0.61, reweighted-loo-ce 0.71; bound
  0.8), the checkpoint records the variant and `--load` with another is refused. PP: tests/test_pipeline_parallel.py.
"""

from __future__ import annotations

import dataclasses
import math

from typing import get_args, get_type_hints

import pytest
import torch

import megatron_bdgemma
from megatron_bdgemma.diffusion import build_sft_batch, noise_batch, sample_t
from megatron_bdgemma.diffusion.loss import VARIANTS, diffusion_loss, diffusion_loss_weights, loo_shift, scored_weights
from megatron_bdgemma.training.config import ObjectiveSection
from tests import hf_models
from tests.multiproc import run_in_processes
from tests.tolerances import record

K = 64
"""Vocabulary size (even, for TP = 2)."""
B, L = 3, 8
T_NEAR_ONE, T_MIN = 0.999999, 1e-3
CLIPS = (None, 50.0)
BOUND = 1e-6


def _oracle(f: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, scored: torch.Tensor, variant: str,
            clip: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64, one token at a time from the formulas: per-token loss w·CE `[B, L]`, its gradient w.r.t. f
    `[B, L, V]`, w `[B, L]` and CE `[B, L]` (0 where not scored)."""
    loss, grad = torch.zeros(f.shape[:-1], dtype=torch.float64), torch.zeros(f.shape, dtype=torch.float64)
    weight, ce = torch.zeros_like(loss), torch.zeros_like(loss)
    for b in range(f.shape[0]):
        for slot in range(f.shape[1]):
            if not scored[b, slot]:
                continue
            alpha = 1.0 - float(t[b, slot])  # retention
            w = 1.0 / alpha if variant.startswith("reweighted") else 1.0  # −α′/α with α′ = −1
            w = w if clip is None else min(w, clip)
            z = f[b, slot].to(torch.float64).clone()
            if "loo" in variant:
                z[xt[b, slot]] += math.log(1.0 + K * alpha / (1.0 - alpha))
            p = torch.exp(z - z.max())
            p = p / p.sum()
            ce[b, slot] = -math.log(p[x0[b, slot]])
            weight[b, slot], loss[b, slot] = w, w * ce[b, slot]
            p[x0[b, slot]] -= 1.0
            grad[b, slot] = w * p
    return loss, grad, weight, ce


def _data(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random logits (scale 4), targets, noisy ids (a third equal to the target, as un-noised slots), fp32 per-slot t
    as `noise_batch` holds it (one row with t = 0.999999 and t = t_min), a scored mask with holes."""
    g = torch.Generator().manual_seed(seed)
    f = 4 * torch.randn(B, L, K, generator=g, dtype=torch.float64)
    x0 = torch.randint(0, K, (B, L), generator=g)
    xt = torch.where(torch.rand(B, L, generator=g) < 1 / 3, x0, torch.randint(0, K, (B, L), generator=g))
    t = (T_MIN + (1 - T_MIN) * torch.rand(B, L, generator=g)).to(torch.float32)
    t[1, :4] = torch.tensor([T_NEAR_ONE, T_MIN, T_NEAR_ONE, T_MIN])
    scored = torch.rand(B, L, generator=g) < 0.8
    scored[1, :4] = True
    return dict(f=f, x0=x0, xt=xt, t=t, scored=scored)


def _weights_and_shift(d: dict[str, torch.Tensor], variant: str, clip: float | None):
    """What `noise_batch` hands the loss for these t (checked against the formulas in test_noise_batch_...)."""
    weights = scored_weights(d["scored"], diffusion_loss_weights(d["scored"], d["scored"], d["t"], variant=variant, weight_clip=clip))
    shift = torch.where(d["scored"], loo_shift(d["t"], K), 0.0) if "loo" in variant else None
    return weights, shift


def _errors(loss, grad, expected) -> tuple[float, float]:
    """(loss error, gradient error) as the module docstring defines them, worst over scored tokens."""
    ref_loss, ref_grad, w, ce = expected
    scale = torch.where(w > 0, w, 1.0)
    loss_err = ((loss - ref_loss).abs() / (scale * ce.abs().clamp(min=1.0))).max().item()
    grad_err = ((grad - ref_grad).abs().amax(-1) / scale).max().item()
    return loss_err, grad_err


def _per_token(total_of_mask, scored: torch.Tensor) -> torch.Tensor:
    """Per-token losses from a function of a scored mask, one token at a time."""
    out = torch.zeros(scored.shape, dtype=torch.float64)
    for b, slot in scored.nonzero().tolist():
        alone = torch.zeros_like(scored)
        alone[b, slot] = True
        out[b, slot] = total_of_mask(alone).item()
    return out


def test_config_offers_the_variants():
    assert get_args(get_type_hints(ObjectiveSection)["variant"]) == VARIANTS  # the config's list is the loss's
    assert VARIANTS == ("base-sft", "reweighted-ce", "loo-ce", "reweighted-loo-ce")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "fp32"])
@pytest.mark.parametrize("chunk", [None, 5], ids=["unchunked", "chunked"])
def test_tp1_loss_and_gradient_match_the_formulas(dtype, chunk):
    d = _data()
    worst = {}
    for variant in VARIANTS:
        for clip in CLIPS:
            weights, shift = _weights_and_shift(d, variant, clip)
            expected = _oracle(d["f"].to(dtype), d["x0"], d["xt"], d["t"], d["scored"], variant, clip)

            def total(mask: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
                loss_sum, _ = diffusion_loss(logits, d["x0"], mask, weights, chunk_size=chunk, shift_ids=d["xt"], shift=shift)
                return loss_sum

            f = d["f"].to(dtype).clone().requires_grad_()
            total(d["scored"], f).backward()
            loss = _per_token(lambda mask: total(mask, f.detach()), d["scored"])
            worst[(variant, clip)] = _errors(loss, f.grad.to(torch.float64), expected)
            if clip is not None and variant.startswith("reweighted"):
                assert expected[2].max() == clip and weights.max() == clip  # the clip bit on the t ≈ 1 slots
            if clip is None and variant.startswith("reweighted"):
                assert weights.max() > 9e5  # t ≈ 1 reached w ≈ 1e6 unclipped
    loss_err, grad_err = max(e[0] for e in worst.values()), max(e[1] for e in worst.values())
    record("tp1 per-token loss", loss_err, BOUND, dtype=str(dtype), chunk=chunk)
    record("tp1 gradient wrt logits", grad_err, BOUND, dtype=str(dtype), chunk=chunk)
    assert loss_err <= BOUND and grad_err <= BOUND, worst


def test_oracle_tells_the_variants_and_plausible_bugs_apart():
    """The bound separates the right formulas from near misses: each differs from the oracle by >> BOUND."""
    d = _data()
    f = d["f"].clone().requires_grad_()
    weights, shift = _weights_and_shift(d, "reweighted-loo-ce", None)
    diffusion_loss(f, d["x0"], d["scored"], weights, shift_ids=d["xt"], shift=shift)[0].backward()
    for variant in ("base-sft", "reweighted-ce", "loo-ce"):
        expected = _oracle(d["f"].detach(), d["x0"], d["xt"], d["t"], d["scored"], variant, None)
        assert _errors(torch.zeros(B, L, dtype=torch.float64), f.grad, expected)[1] > 1e3 * BOUND, variant
    # δ on the target instead of the noisy token: the gradient moves by O(1).
    wrong = dict(d, xt=d["x0"])
    expected = _oracle(d["f"].detach(), d["x0"], wrong["xt"], d["t"], d["scored"], "reweighted-loo-ce", None)
    assert _errors(torch.zeros(B, L, dtype=torch.float64), f.grad, expected)[1] > 1e3 * BOUND


def _check_tp2(rank: int) -> dict[str, float]:
    """One TP = 2 rank: the chunked vocab-parallel loss of every variant against the oracle, without softcap and SP,
    then with both. The LM head is the identity (H = K, each rank's rows of eye(K)), so the hidden states are the
    pre-softcap logits and the hidden's gradient (summed over ranks by the backward of the copy to the TP region, or
    reduce-scattered to the sequence shard under SP) is the gradient w.r.t. them."""
    from megatron.core import parallel_state

    from megatron_bdgemma.runtime.distributed import init_distributed
    from megatron_bdgemma.vocab_parallel import vocab_parallel_cross_entropy_sum

    init_distributed(tp=2)
    group = parallel_state.get_tensor_model_parallel_group()
    d = _data()
    embedding = torch.eye(K, dtype=torch.float64)[rank * K // 2 : (rank + 1) * K // 2]
    worst = {}
    seq = slice(rank * L // 2, (rank + 1) * L // 2)  # this rank's sequence shard under SP
    for cap, sp in ((None, False), (8.0, True)):
        head = dict(cap=cap, chunk_size=5, sequence_parallel=sp, tp_group=group)
        # The oracle sees the softcapped logits; its gradient is taken back through the softcap by the chain rule.
        capped = d["f"] if cap is None else cap * torch.tanh(d["f"] / cap)
        dcap = torch.ones_like(d["f"]) if cap is None else 1 - torch.tanh(d["f"] / cap) ** 2
        for variant in VARIANTS:
            for clip in CLIPS:
                weights, shift = _weights_and_shift(d, variant, clip)
                expected = _oracle(capped, d["x0"], d["xt"], d["t"], d["scored"], variant, clip)

                def total(mask: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
                    return vocab_parallel_cross_entropy_sum(
                        hidden, embedding, d["x0"], scored_weights(mask, weights), shift_ids=d["xt"], shift=shift, **head
                    )

                rows = seq if sp else slice(None)  # under SP a rank holds (and gets the gradient of) its shard only
                hidden = d["f"].transpose(0, 1)[rows].clone().requires_grad_()  # [S(/2), B, H = K]
                total(d["scored"], hidden).backward()
                loss = _per_token(lambda mask: total(mask, hidden.detach()), d["scored"])
                grad = hidden.grad.transpose(0, 1) / dcap[:, rows]  # back to the gradient w.r.t. the softcapped logits
                loss_err = _errors(loss, expected[1], expected)[0]
                grad_err = _errors(expected[0][:, rows], grad, tuple(x[:, rows] for x in expected))[1]
                worst[f"cap={cap} sp={sp} {variant} clip={clip}"] = (loss_err, grad_err)
    return worst


def test_tp2_vocab_parallel_chunked_loss_matches_the_formulas(model_parallel):
    for rank, worst in enumerate(run_in_processes(_check_tp2, 2)):
        assert len(worst) == 2 * len(VARIANTS) * len(CLIPS)
        loss_err, grad_err = max(e[0] for e in worst.values()), max(e[1] for e in worst.values())
        record(f"tp2 rank {rank} per-token loss", loss_err, BOUND)
        record(f"tp2 rank {rank} gradient wrt logits", grad_err, BOUND)
        assert loss_err <= BOUND and grad_err <= BOUND, (rank, worst)


def _sft_batch():
    """Two SFT examples (responses of 7 and 5 tokens, block 4: two blocks and a partial one)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, K, (2, 14), generator=g)
    loss_mask, valid = torch.zeros(2, 14, dtype=torch.bool), torch.zeros(2, 14, dtype=torch.bool)
    loss_mask[0, 5:12], valid[0, :12] = True, True
    loss_mask[1, 2:7], valid[1, :7] = True, True
    return build_sft_batch(ids, loss_mask, valid, block_size=4, eos_id=1, pad_id=0)


@pytest.mark.parametrize("score", ["one_block", "all_blocks"])
@pytest.mark.parametrize("t_range", [(T_MIN, 1.0), (0.99999, T_NEAR_ONE)], ids=["default_t", "t_near_1"])
def test_noise_batch_weights_and_shift_per_slot(score, t_range):
    batch = _sft_batch()
    key = dict(sample_indices=[3, 4], step=2, seed=5)
    kw = dict(vocab_size=K, score=score, t_min=t_range[0], t_max=t_range[1], **key)
    base = noise_batch(batch, **kw)
    today = noise_batch(batch, **kw, variant="base-sft")
    for field in dataclasses.fields(base):  # the default is base-sft, and base-sft is today's output exactly
        a, b = getattr(base, field.name), getattr(today, field.name)
        assert (a is None and b is None) or torch.equal(a, b), field.name
    assert base.logit_shift is None and torch.equal(base.weights, base.scored.float())
    if score == "one_block":
        t = sample_t(t_min=t_range[0], t_max=t_range[1], **key)[:, None].expand(-1, base.scored.shape[1])
    else:
        per_block = sample_t(t_min=t_range[0], t_max=t_range[1], blocks_per_example=batch.blocks_per_example,
                             num_blocks=batch.num_blocks, **key)
        t = per_block.repeat_interleave(batch.block_size, dim=1)[:, : base.scored.shape[1]]
        assert len(set(per_block[0].tolist())) > 1  # t differs per block
    for variant in VARIANTS:
        for clip in CLIPS:
            noised = noise_batch(batch, **kw, variant=variant, weight_clip=clip)
            for field in ("canvas_ids", "targets", "position_ids", "block_ids", "scored", "self_conditioning"):
                assert torch.equal(getattr(noised, field), getattr(base, field)), (variant, field)
            _, _, w, _ = _oracle(torch.zeros(*t.shape, K), base.targets, base.canvas_ids, t, base.scored, variant, clip)
            assert noised.weights.dtype == torch.float32
            assert ((noised.weights.double() - w).abs() <= 1e-7 * w).all(), (variant, clip)  # fp32 rounding of w
            assert (noised.weights[~base.scored] == 0).all()
            if "loo" not in variant:
                assert noised.logit_shift is None
                continue
            alpha = 1 - t.double()
            delta = torch.where(base.scored, torch.log(1 + K * alpha / (1 - alpha)), 0.0)
            assert ((noised.logit_shift - delta).abs() <= 1e-12 * delta.clamp(min=1)).all(), variant


def test_absorbing_refuses_the_variants():
    from megatron_bdgemma.training.config import load_run_config

    for bad in (["objective.variant=loo-ce"], ["objective.weight_clip=10"]):
        run = load_run_config(None, ["objective.kind=absorbing", "objective.mask_id=3", *bad])
        with pytest.raises(ValueError) as info:
            run.validate(1)
        message = str(info.value)
        assert "\n" not in message and "objective.variant" in message and "objective.kind=absorbing" in message, message
    run = load_run_config(None, ["objective.weight_clip=0"])
    with pytest.raises(ValueError, match=r"objective.weight_clip must be > 0"):
        run.validate(1)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return str(hf_models.save(hf_models.diffusion_gemma(dict(vocab_size=K)), tmp_path_factory.mktemp("dg") / "hf"))


def test_model_shift_reaches_only_the_diffusion_loss(model_path, model_parallel):
    """Self-conditioning on for both examples: pass 2's canvas logits depend on pass 1's signal, so their bit-equality
    with base-sft's shows the signal is the raw logits'; the diffusion sum is recomputed from them with the oracle."""
    model = megatron_bdgemma.from_hf(model_path, dtype=torch.float64)
    batch = _sft_batch()
    kw = dict(sample_indices=[0, 1], step=2, seed=5, vocab_size=K)
    coins = torch.tensor([True, True])
    outputs = {}
    for variant in ("base-sft", "reweighted-loo-ce"):
        noised = dataclasses.replace(noise_batch(batch, **kw, variant=variant, weight_clip=50.0), self_conditioning=coins)
        with torch.no_grad():
            outputs[variant] = (model.training_forward(batch, noised), model.training_forward(batch, noised, loss_chunk_size=3), noised)
    plain, _, _ = outputs["base-sft"]
    loo_plain, loo_chunked, noised = outputs["reweighted-loo-ce"]
    assert torch.equal(loo_plain.canvas_logits, plain.canvas_logits) and torch.equal(loo_plain.encoder_logits, plain.encoder_logits)
    assert torch.equal(loo_plain.ar_loss_sum, plain.ar_loss_sum)
    t = sample_t(sample_indices=[0, 1], step=2, seed=5)[:, None].expand(noised.scored.shape)
    expected = _oracle(loo_plain.canvas_logits, noised.targets, noised.canvas_ids, t, noised.scored, "reweighted-loo-ce", 50.0)[0].sum()
    assert not torch.isclose(plain.diffusion_loss_sum, expected)
    assert abs(loo_plain.diffusion_loss_sum - expected) <= 1e-6 * expected
    assert abs(loo_chunked.diffusion_loss_sum - expected) <= 1e-6 * expected
    assert abs(loo_chunked.ar_loss_sum - plain.ar_loss_sum) <= 1e-12 * plain.ar_loss_sum


# ---- through the CLI: a tiny SFT run per variant -------------------------------------------------------------------

CLI_STEPS = 20
CLI = ["data.seq_length=64", "data.truncation=true", "train.micro_batch_size=2", "train.global_batch_size=4",
       "train.eval_interval=0", "train.log_interval=1", "optim.warmup_steps=1", f"train.steps={CLI_STEPS}",
       "model.overrides={num_layers: 2, layer_types: [sliding_attention, full_attention]}"]
"""The tiny SFT recipe (examples/configs/tiny_sft.yaml, lr 3e-3) on a 2-layer model, 64-token records."""


def test_cli_trains_each_variant_records_it_and_refuses_to_resume_with_another(tmp_path):
    """Per variant: 20 steps of examples/pretrain_bdgemma.py exit 0 with finite losses, the diffusion loss's mean over
    the last 5 steps is below the first 5's, and the checkpoint's stored run config names the variant; `--load` with
    another variant exits 1 with the one-line refusal naming objective.variant."""
    import subprocess
    import sys

    from megatron_bdgemma.training.resume import read_checkpoint_extra
    from tests.test_robustness import REPO, SFT_CONFIG

    script, env = str(REPO / "examples" / "pretrain_bdgemma.py"), {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, script, *args, "--sample", ""], cwd=tmp_path, capture_output=True,
                              text=True, env=__import__("os").environ | env, timeout=600)

    for variant in VARIANTS:
        root = tmp_path / variant
        clip = ["objective.weight_clip=10"] if variant.startswith("reweighted") else []
        done = cli("--config", str(SFT_CONFIG), f"data.cache_dir={tmp_path / 'data'}", f"checkpoint.save={root}",
                   f"objective.variant={variant}", *clip, *CLI)
        assert done.returncode == 0, done.stdout + done.stderr
        rows = [__import__("json").loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
        diffusion = [row["diffusion"] for row in rows if "diffusion" in row]
        assert len(diffusion) == CLI_STEPS and all(math.isfinite(x) and x > 0 for x in diffusion), diffusion
        first, last = sum(diffusion[:5]) / 5, sum(diffusion[-5:]) / 5
        print(f"{variant}: diffusion loss mean of steps 1-5 {first:.3f}, of steps 16-20 {last:.3f}")
        assert last < 0.8 * first, (variant, diffusion)
        stored = read_checkpoint_extra(root, "--load")["run"]["objective"]
        assert stored["variant"] == variant and stored["weight_clip"] == (10 if clip else None), stored
    # The refusal does not depend on which variant the run has: one resume (of the last run) shows it.
    refused = cli("--load", str(root), f"objective.variant={VARIANTS[0]}")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and lines, refused.stdout + refused.stderr
    assert lines[-1].startswith(f"error: resuming {root} with a different objective.variant ('{VARIANTS[-1]}' → "
                                f"'{VARIANTS[0]}')"), lines[-1]
    absorbing = cli("--config", str(SFT_CONFIG), "objective.kind=absorbing", "objective.mask_id=3",
                    "objective.variant=loo-ce", *CLI)
    lines = absorbing.stderr.strip().splitlines()
    assert absorbing.returncode != 0 and lines and "objective.variant" in lines[-1], absorbing.stdout + absorbing.stderr
    assert "objective.kind=absorbing" in lines[-1] and "Traceback" not in absorbing.stderr, lines[-1]
