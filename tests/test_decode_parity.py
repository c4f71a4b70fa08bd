"""Contract: `encode` + `decode` reproduce `DiffusionGemmaForBlockDiffusion`'s canvas logits (fp32, ≤ 1e-4).

Covers: no self-conditioning (zero signal), explicit `self_conditioning_logits`, a `self_conditioning_mask` mixing
both, batch > 1 with left-padded prompts, and prompts longer than the sliding window (4).
"""

from __future__ import annotations

import pytest
import torch

import megatron_bdgemma
from tests import hf_models

TOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = hf_models.diffusion_gemma(canvas_length=4)
    path = hf_models.save(hf, tmp_path_factory.mktemp("dg") / "hf")
    return hf, path


@pytest.mark.parametrize("prompt_len,left_pad", [(3, [0]), (9, [0, 4])])
@pytest.mark.parametrize("self_conditioning", ["off", "on", "mixed"])
def test_decode_matches_hf(models, model_parallel, prompt_len, left_pad, self_conditioning):
    hf, path = models
    ours = megatron_bdgemma.from_hf(path)
    vocab, canvas_len = hf.config.text_config.vocab_size, 4
    batch = len(left_pad)
    generator = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(2, vocab, (batch, prompt_len), generator=generator)
    valid = torch.ones(batch, prompt_len, dtype=torch.bool)
    for row, pad in enumerate(left_pad):
        prompt[row, :pad] = 0
        valid[row, :pad] = False
    canvas = torch.randint(0, vocab, (batch, canvas_len), generator=generator)
    positions = prompt_len + torch.arange(canvas_len).expand(batch, canvas_len)
    sc_logits = None if self_conditioning == "off" else 5 * torch.randn(batch, canvas_len, vocab, generator=generator)
    sc_mask = torch.tensor([True, False][:batch]) if self_conditioning == "mixed" else None

    with torch.no_grad():
        expected = hf(
            input_ids=prompt,
            attention_mask=valid.long(),
            decoder_input_ids=canvas,
            decoder_position_ids=positions,
            decoder_attention_mask=torch.cat([valid, torch.ones(batch, canvas_len, dtype=torch.bool)], 1).long(),
            self_conditioning_logits=sc_logits,
            self_conditioning_mask=sc_mask,
        ).logits
        encoded = ours.encode(prompt, padding_mask=~valid)
        got = ours.decode(
            canvas,
            encoded,
            canvas_position_ids=positions,
            encoder_padding_mask=~valid,
            self_conditioning_logits=sc_logits,
            self_conditioning_mask=sc_mask,
        )
    diff = (got - expected).abs().max().item()
    assert diff <= TOL, f"max-abs canvas logit difference {diff:.2e}"


def test_zero_signal_is_not_zero_logits(models, model_parallel):
    """Self-conditioning off (zero signal) differs from zero logits (the mean embedding)."""
    _, path = models
    ours = megatron_bdgemma.from_hf(path)
    prompt = torch.tensor([[5, 6, 7]])
    canvas = torch.tensor([[8, 9, 10, 11]])
    positions = 3 + torch.arange(4)[None]
    with torch.no_grad():
        encoded = ours.encode(prompt)
        off = ours.decode(canvas, encoded, canvas_position_ids=positions)
        masked = ours.decode(canvas, encoded, canvas_position_ids=positions,
                             self_conditioning_logits=torch.randn(1, 4, 96), self_conditioning_mask=torch.tensor([False]))
        zeros = ours.decode(canvas, encoded, canvas_position_ids=positions, self_conditioning_logits=torch.zeros(1, 4, 96))
    assert torch.equal(off, masked)
    assert (off - zeros).abs().max() > 1e-3
