"""Contract: in bf16 the model is no farther from the fp32 truth than HF's own bf16 model, and where its bf16
arithmetic is HF's it computes HF's values bit for bit.

- Distance (issue 21 item 10): on held-out tiny DiffusionGemmas (eight seeds), the mean |logit - fp32 logit| of our
  bf16 encoder AR logits and decode logits (self-conditioning on) is at most that of HF's bf16 model with eager
  attention, for every core-attention path that reaches `masked_attention` (eager, block-sparse, the generation
  decode over `KVBuffer`s).
- RMSNorm: Gemma 4's norm in bf16 normalises in fp32, multiplies by the weight in fp32, then casts (HF's
  `Gemma4RMSNorm` / `DiffusionGemmaRMSNorm`); ours gives its values bit for bit.
- Generation: `generate` in bf16 draws HF `generate`'s tokens, and every denoising step conditions on HF's
  self-conditioning signal (the fp32 softmax of the tempered logits rounded to bf16) and produces HF's logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaRMSNorm

import megatron_bdgemma
from megatron_bdgemma.config import tiny
from megatron_bdgemma.generation import EncoderKVCache, EntropyBound, encode_into, generate, left_pad
from megatron_bdgemma.layers.norm import RMSNorm
from tests import hf_models
from tests.hf_models import FULL, SLIDING

# ---- distance to the fp32 truth ---------------------------------------------------------------------------------

# Not the tests' BASE_TEXT (the code was tuned on it): wider heads (d 32 / 64), full layers first and last, a
# window (24) shorter than the prompt (48), 3 experts. All 3 experts are active (top-3): with top-k < E the
# statistic is a lottery of routing flips, near-ties between the k-th and (k+1)-th expert that bf16 resolves
# differently in each model, each moving a whole token's logits (measured on top-2 of 6 experts, per-seed ratios
# 0.25-2.45 for either attention kernel).
HELD_OUT = dict(
    vocab_size=160, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, global_head_dim=64, num_global_key_value_heads=1,
    layer_types=[FULL, SLIDING, SLIDING, FULL], sliding_window=24, num_experts=3, top_k_experts=3,
    moe_intermediate_size=24, max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
)
SEEDS = tuple(range(4101, 4109))
CANVAS_LENGTH = 16
BATCH, PROMPT = 8, 48


def _bf16_checkpoint(seed: int, path):
    """A random DiffusionGemma whose weights are bf16 values (as a released bf16 checkpoint's are), saved in fp32:
    the fp32 model is then the truth of the same weights, and both bf16 models differ from it by arithmetic only."""
    hf = hf_models.diffusion_gemma(HELD_OUT, CANVAS_LENGTH, seed)  # every BASE_TEXT key overridden
    with torch.no_grad():
        # The weights and the layer scalars (a persistent buffer); not the RoPE frequencies, which HF computes in
        # fp32 whatever the dtype it loads in.
        for name, tensor in list(hf.named_parameters()) + list(hf.named_buffers()):
            if isinstance(tensor, torch.nn.Parameter) or name.endswith("layer_scalar"):
                tensor.copy_(tensor.bfloat16().float())
    return hf, hf_models.save(hf, path)


def _inputs(seed: int):
    generator = torch.Generator().manual_seed(seed)
    vocab = HELD_OUT["vocab_size"]
    prompt = torch.randint(2, vocab, (BATCH, PROMPT), generator=generator)
    valid = torch.ones(BATCH, PROMPT, dtype=torch.bool)
    for row in range(1, BATCH, 2):  # every other row left-padded, by 2, 4, 6, 8
        prompt[row, : row + 1] = 0
        valid[row, : row + 1] = False
    canvas = torch.randint(0, vocab, (BATCH, CANVAS_LENGTH), generator=generator)
    positions = PROMPT + torch.arange(CANVAS_LENGTH).expand(BATCH, CANVAS_LENGTH)
    # The logits generation feeds back are rounded to the embedding dtype (HF: `processed_logits.to(bf16)`).
    signal = (5 * torch.randn(BATCH, CANVAS_LENGTH, vocab, generator=generator)).bfloat16()
    return prompt, valid, canvas, positions, signal


@torch.no_grad()
def _hf_logits(hf, inputs) -> dict[str, torch.Tensor]:
    prompt, valid, canvas, positions, signal = inputs
    decoder_mask = torch.cat([valid, torch.ones(BATCH, CANVAS_LENGTH, dtype=torch.bool)], 1).long()
    out = hf(input_ids=prompt, attention_mask=valid.long(), decoder_input_ids=canvas, decoder_position_ids=positions,
             decoder_attention_mask=decoder_mask, self_conditioning_logits=signal.to(hf.dtype))
    # The AR head over the encoder's final hidden state, as HF computes the decoder's: head in the model dtype,
    # softcap in fp32.
    ar = hf.lm_head(out.encoder_last_hidden_state).float()
    cap = hf.final_logit_softcapping
    return dict(ar=(torch.tanh(ar / cap) * cap)[valid], decode=out.logits)


@torch.no_grad()
def _our_logits(path, inputs) -> dict[str, torch.Tensor]:
    prompt, valid, canvas, positions, signal = inputs
    logits = {}
    for impl in ("eager", "block_sparse"):
        # Chunks of 5 encoder positions: several per prompt, the last one short.
        model = megatron_bdgemma.from_hf(path, dtype=torch.bfloat16, attention_impl=impl, attention_chunk_size=5)
        encoded = model.encode(prompt, padding_mask=~valid, return_logits=True)
        logits[f"{impl} ar"] = encoded.logits[valid]
        logits[f"{impl} decode"] = model.decode(canvas, encoded, canvas_position_ids=positions,
                                                encoder_padding_mask=~valid, self_conditioning_logits=signal)
    # Generation's decode: the encoder K/V in a cache, each canvas decode attending over `KVBuffer`s.
    cache = EncoderKVCache.for_model(model)
    encode_into(model, cache, prompt, padding_mask=~valid)
    logits["kv_buffer decode"] = model.decode(
        canvas, cache.decode_buffers(CANVAS_LENGTH), canvas_position_ids=positions,
        attention_mask=cache.decode_masks(CANVAS_LENGTH), self_conditioning_logits=signal,
    )
    return logits


@pytest.fixture(scope="module")
def distances(tmp_path_factory, distributed_world) -> dict[int, dict[str, tuple[float, float]]]:
    """{seed: {path: (ours-bf16 distance, HF-bf16 distance)}}, each the mean |logit - fp32 logit|."""
    distances = {}
    for seed in SEEDS:
        hf32, path = _bf16_checkpoint(seed, tmp_path_factory.mktemp(f"bf16_{seed}") / "hf")
        inputs = _inputs(seed)
        truth = _hf_logits(hf32, inputs)
        # HF's eager attention (the reference): fp32 softmax over scores rounded to bf16, probabilities
        # rounded to bf16. HF's sdpa attention runs our CPU kernel, so against it the ratio measures only the MoE's
        # rounding, which differs from HF's and is about as fine: 1.00-1.03 summed over SEEDS, 1.00-1.01 over 12
        # other seeds.
        hf16 = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager")
        reference = _hf_logits(hf16.eval(), inputs)
        distances[seed] = {
            name: ((logits - truth[name.split()[-1]]).abs().mean().item(),
                   (reference[name.split()[-1]] - truth[name.split()[-1]]).abs().mean().item())
            for name, logits in _our_logits(path, inputs).items()
        }
    return distances


@pytest.mark.parametrize(
    "path", ["eager ar", "eager decode", "block_sparse ar", "block_sparse decode", "kv_buffer decode"]
)
def test_bf16_is_no_farther_from_fp32_than_hf_bf16(distances, path):
    """Ours-bf16 / HF-bf16 distance, summed over the seeds, is at most 1; no seed above 1.1.

    Measured summed over SEEDS (AVX-512 / with the AVX2 variables): AR 0.946-0.956 / 0.951-0.962, decode
    0.898-0.904 / 0.896-0.897; per seed AR 0.92-0.98 / 0.94-0.99, decode 0.78-0.98 / 0.77-0.97. Over 12 other seeds
    (9000-9011) the sums are AR 0.95, decode 0.86, and one seed's AR ratio was above 1 (1.02 / 1.06): the AR
    logits' error is mostly the MoE's and the residual stream's bf16 rounding, as large in both models, so one
    seed's ratio scatters by a few percent around the attention's gain, a sum over eight much less. The explicit
    product-softmax-product in bf16 (HF eager's rounding; ours on CPU before 3766f3c) measures AR 1.01 and decode
    1.05 here and fails this test.
    """
    ours, hf = (sum(d[path][i] for d in distances.values()) for i in (0, 1))
    per_seed = {seed: round(d[path][0] / d[path][1], 3) for seed, d in distances.items()}
    assert ours <= hf, f"{path}: ours-bf16 / HF-bf16 distance to the fp32 logits {ours / hf:.3f}; per seed {per_seed}"
    assert max(per_seed.values()) <= 1.1, f"{path}: per seed {per_seed}"


# ---- RMSNorm ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_scale", [True, False])
def test_rms_norm_is_hfs_in_bf16(with_scale):
    """Our RMSNorm in bf16 gives HF's values bit for bit: normalised in fp32, weight applied in fp32, then cast."""
    generator = torch.Generator().manual_seed(0)
    hidden = 64
    x = (3 * torch.randn(4, 9, hidden, generator=generator)).bfloat16()
    weight = (torch.rand(hidden, generator=generator) + 0.5).bfloat16()
    theirs = DiffusionGemmaRMSNorm(hidden, eps=1e-6, with_scale=with_scale).bfloat16()
    ours = RMSNorm(tiny(params_dtype=torch.bfloat16, bf16=True), hidden, eps=1e-6, with_scale=with_scale)
    if with_scale:
        with torch.no_grad():
            theirs.weight.copy_(weight)
            ours.weight.copy_(weight)
    expected = theirs(x)
    got = ours(x)
    assert got.dtype == torch.bfloat16 and (ours.weight is None or ours.weight.dtype == torch.bfloat16)
    differing = int((got != expected).sum())
    assert differing == 0, f"{differing} of {x.numel()} values differ from HF's RMSNorm"
    if with_scale:
        # The check can fail: the weight applied in bf16 (after the cast) gives other values on this input.
        normalized = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        assert (normalized.bfloat16() * weight != expected).any()



# ---- generation -------------------------------------------------------------------------------------------------

PROMPTS = [list(range(5, 16)), [20, 21, 22, 23, 24]]  # 11 tokens (> window) and 5 (left-padded by 6)
PAD, SEED = 0, 7
NO_STOP = dict(max_denoising_steps=6)  # HF's temperatures: no row meets the adaptive stop
SHARP = dict(max_denoising_steps=8, t_max=0.03, t_min=0.015)  # rows stop at different steps


@pytest.fixture(scope="module")
def generation_models(tmp_path_factory, distributed_world):
    """The tests' tiny DiffusionGemma (BASE_TEXT, seed 0) in bf16, HF's and ours.

    The routed experts' branch is switched off (its post-norm weight 0): Megatron's experts weight the intermediate
    by the routing probabilities before fc2 (HF weights fc2's output) and carry `per_expert_scale` inside fc2, so in
    bf16 that branch rounds differently from HF's by construction (logits 0.1-0.4 apart). On the tiny models tried
    with it (×3-×30 embeddings, softcap raised, vocabularies of 24-96, temperatures down to 0.0015) the tokens
    parted on most seeds, and where they did not, some top-2 gap of the generation was below that difference.
    Without it everything else is HF's bf16 arithmetic bit for bit (attention by the same fused kernel, norms, RoPE,
    self-conditioning, head), so every step's logits are equal and no tie can flip (the branch's bf16 accuracy is
    part of what the distance tests above measure). HF runs sdpa attention: its eager decoder-mask builder fails on
    padded batches in `generate` (tests/test_generation.py).
    """
    hf = hf_models.diffusion_gemma(canvas_length=4)
    with torch.no_grad():
        for name, weight in hf.named_parameters():
            if name.endswith("post_feedforward_layernorm_2.weight"):
                weight.zero_()
    path = hf_models.save(hf, tmp_path_factory.mktemp("bf16_generation") / "hf")
    hf16 = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa")
    return hf16.eval(), megatron_bdgemma.from_hf(path, dtype=torch.bfloat16)


@contextmanager
def _recorded_steps(hf16, ours, monkeypatch) -> Iterator[dict[str, tuple[list, list]]]:
    """{"hf"/"ours": (each denoising step's logits, the self-conditioning signal its decoder input was built from)}.

    HF generation runs each step through `self.forward`, ours through `model.decode`; both models build the
    decoder input in their `self_conditioning` module from (canvas embeddings, signal).
    """
    steps = {"hf": ([], []), "ours": ([], [])}
    hf_forward, our_decode = hf16.forward, ours.decode

    def hf_step(*args, **kwargs):
        out = hf_forward(*args, **kwargs)
        if kwargs.get("decoder_input_ids") is not None:  # not the prompt's prefill
            steps["hf"][0].append(out.logits.clone())
        return out

    def our_step(*args, **kwargs):
        logits = our_decode(*args, **kwargs)
        steps["ours"][0].append(logits.clone())  # the sampler tempers its logits in place
        return logits

    monkeypatch.setattr(hf16, "forward", hf_step)
    monkeypatch.setattr(ours, "decode", our_step)
    hooks = [
        hf16.model.decoder.self_conditioning.register_forward_pre_hook(lambda _, a: steps["hf"][1].append(a[1])),
        ours.self_conditioning.register_forward_pre_hook(lambda _, a: steps["ours"][1].append(a[1].transpose(0, 1))),
    ]
    try:
        yield steps
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("sampling", [NO_STOP, SHARP], ids=["no_stop", "adaptive_stop"])
def test_bf16_generation_is_hfs(generation_models, model_parallel, monkeypatch, sampling):
    """Tokens and forward counts equal HF `generate`'s in bf16; without the adaptive stop (every row decoded at
    every step by both) also every step's logits and self-conditioning signal, bit for bit: the signal is built from
    the fp32 softmax of the tempered logits rounded to bf16, as HF feeds them back (`processed_logits.to(bf16)`)."""
    hf16, ours = generation_models
    input_ids, padding = left_pad(PROMPTS, PAD)
    with _recorded_steps(hf16, ours, monkeypatch) as steps:
        torch.manual_seed(SEED)
        expected = hf16.generate(input_ids, attention_mask=(~padding).long(), max_new_tokens=12, eos_token_id=None,
                                 pad_token_id=PAD, **sampling)
        torch.manual_seed(SEED)
        got = generate(ours, input_ids, padding_mask=padding, sampler=EntropyBound(**sampling), max_new_tokens=12,
                       eos_token_ids=[], pad_token_id=PAD)
    differing = int((got.sequences != expected.sequences).sum())
    assert differing == 0, f"{differing} of {got.sequences.numel()} tokens differ from HF's"
    torch.testing.assert_close(got.tokens_per_forward, expected.tokens_per_forward.float())
    if sampling is SHARP:
        assert got.forwards[0] != got.forwards[1]  # rows stopped apart: the live-rows decode ran
        return
    for index, name in ((1, "self-conditioning signal"), (0, "logits")):
        theirs, mine = steps["hf"][index], steps["ours"][index]
        assert len(theirs) == len(mine) == 3 * NO_STOP["max_denoising_steps"], name
        for step, (a, b) in enumerate(zip(theirs, mine)):
            assert torch.equal(a, b), f"step {step}: the {name} differs from HF's by up to {(a - b).abs().max():.3g}"
