"""Contract: our RoPE equals HF's default (sliding) and "proportional" (full) RoPE, not Megatron's rotary_percent."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.diffusion_gemma import DiffusionGemmaTextConfig
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextRotaryEmbedding, apply_rotary_pos_emb

from megatron_bdgemma.config import FULL, SLIDING
from megatron_bdgemma.layers.rope import apply_rope, inverse_frequencies, rope_tables


@pytest.mark.parametrize("head_dim", [256, 512])
@pytest.mark.parametrize("layer_type", [SLIDING, FULL])
def test_rope_matches_hf(head_dim, layer_type):
    config = DiffusionGemmaTextConfig(
        num_hidden_layers=2, layer_types=[SLIDING, FULL], head_dim=head_dim, global_head_dim=head_dim,
        hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
    )
    hf_rope = DiffusionGemmaTextRotaryEmbedding(config)
    params = config.rope_parameters[layer_type]
    ours_inv = inverse_frequencies(head_dim, params["rope_theta"], params.get("partial_rotary_factor", 1.0))
    torch.testing.assert_close(ours_inv, getattr(hf_rope, f"{layer_type}_inv_freq"), rtol=0, atol=0)

    positions = torch.tensor([[0, 1, 5, 300, 70_000], [3, 4, 5, 6, 7]])
    x = torch.randn(2, 5, 3, head_dim)  # [B, S, heads, D]
    cos, sin = hf_rope(x, positions, layer_type)
    expected = apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim=2)
    our_cos, our_sin = rope_tables(positions, ours_inv, x.dtype)
    got = apply_rope(x.transpose(0, 1), our_cos, our_sin).transpose(0, 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_proportional_rope_rotates_both_halves_of_the_first_quarter():
    """D=512, partial 0.25: dims {0..63} ∪ {256..319} rotate, everything else is untouched."""
    inv = inverse_frequencies(512, 1e6, 0.25)
    x = torch.randn(1, 1, 1, 512)
    cos, sin = rope_tables(torch.tensor([[1234]]), inv, x.dtype)
    moved = (apply_rope(x, cos, sin) - x).abs()[0, 0, 0] > 0
    expected = torch.zeros(512, dtype=torch.bool)
    expected[0:64] = True
    expected[256:320] = True
    assert torch.equal(moved, expected)
    # HF's own proportional init gives the same frequencies (exponent over the full D, trailing zeros).
    config = DiffusionGemmaTextConfig(num_hidden_layers=1, layer_types=[FULL], global_head_dim=512, hidden_size=64,
                                      num_attention_heads=2, num_key_value_heads=1)
    hf_inv, _ = ROPE_INIT_FUNCTIONS["proportional"](config.per_layer_config[FULL], None, layer_type=FULL)
    torch.testing.assert_close(inv, hf_inv, rtol=0, atol=0)


def test_rope_scaling_factor_divides_frequencies():
    torch.testing.assert_close(inverse_frequencies(64, 1e4, 1.0, factor=8.0), inverse_frequencies(64, 1e4) / 8.0)


@pytest.mark.parametrize(
    "sliding,full",
    [
        # HF's default RoPE ignores `factor`: dividing by it moved every sliding layer's frequencies.
        ({"rope_type": "default", "rope_theta": 1e4, "factor": 2.0},
         {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6, "factor": 2.0}),
        ({"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0},
         {"rope_type": "default", "rope_theta": 1e6, "factor": 3.0}),
        ({"rope_type": "default", "rope_theta": 5e3},
         {"rope_type": "linear", "rope_theta": 1e6, "factor": 0.5}),
    ],
)
def test_every_supported_rope_type_equals_hf(sliding, full):
    """config_from_hf + our tables = HF Gemma 4's and DiffusionGemma's own rotary embeddings, per layer type."""
    from transformers import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding

    from megatron_bdgemma.config import config_from_hf
    from megatron_bdgemma.layers.rope import layer_inverse_frequencies
    from tests.hf_models import BASE_TEXT

    text = BASE_TEXT | dict(enable_moe_block=True, attention_k_eq_v=True, hidden_size_per_layer_input=0,
                            final_logit_softcapping=30.0, rope_parameters={SLIDING: sliding, FULL: full})
    for hf_config, rotary in [(Gemma4TextConfig(**text), Gemma4TextRotaryEmbedding),
                              (DiffusionGemmaTextConfig(**{k: v for k, v in text.items() if k in BASE_TEXT or
                                                           k == "rope_parameters"}), DiffusionGemmaTextRotaryEmbedding)]:
        ours = config_from_hf(hf_config)
        hf_rope = rotary(hf_config)
        for layer_type in (SLIDING, FULL):
            torch.testing.assert_close(layer_inverse_frequencies(ours, layer_type),
                                       getattr(hf_rope, f"{layer_type}_inv_freq"), rtol=0, atol=0)


@pytest.mark.parametrize("params,named", [
    ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "original_max_position_embeddings": 256}, "'yarn'"),
    ({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, "'dynamic'"),
    ({"rope_type": "proportional", "rope_theta": 1e4, "partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
])
def test_unsupported_rope_is_named(params, named):
    from transformers import Gemma4TextConfig

    from megatron_bdgemma.config import config_from_hf
    from tests.hf_models import BASE_TEXT

    full = {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}
    text = BASE_TEXT | dict(enable_moe_block=True, attention_k_eq_v=True, hidden_size_per_layer_input=0,
                            rope_parameters={SLIDING: params, FULL: full})
    with pytest.raises(ValueError, match=rf"rope_parameters\['sliding_attention'\].*{named}"):
        config_from_hf(Gemma4TextConfig(**text))
