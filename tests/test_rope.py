"""Contract: our RoPE equals transformers' Gemma 4 / DiffusionGemma rotary embeddings for every RoPE type they accept
(default, linear, proportional, dynamic, yarn, longrope, llama3), inverse frequencies and cos/sin tables, at short
positions and beyond `original_max_position_embeddings` / `max_position_embeddings`; other types and unusable
parameters are refused by name. Proportional RoPE is HF's, not Megatron's rotary_percent."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma4TextConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.diffusion_gemma import DiffusionGemmaTextConfig
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding

from megatron_bdgemma.config import FULL, SLIDING, config_from_hf, tiny
from megatron_bdgemma.layers.rope import ROPE_TYPES, RotaryTables, apply_rope, rope_frequencies, rope_tables
from tests.hf_models import BASE_TEXT

GEMMA4_MOE = dict(enable_moe_block=True, attention_k_eq_v=True, hidden_size_per_layer_input=0, final_logit_softcapping=30.0)


@pytest.mark.parametrize("head_dim", [256, 512])
@pytest.mark.parametrize("layer_type", [SLIDING, FULL])
def test_default_rope_rotates_as_hf(head_dim, layer_type):
    config = DiffusionGemmaTextConfig(
        num_hidden_layers=2, layer_types=[SLIDING, FULL], head_dim=head_dim, global_head_dim=head_dim,
        hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
    )
    hf_rope = DiffusionGemmaTextRotaryEmbedding(config)
    ours_inv, scale = rope_frequencies(config.rope_parameters[layer_type], head_dim, config.max_position_embeddings)
    torch.testing.assert_close(ours_inv, getattr(hf_rope, f"{layer_type}_inv_freq"), rtol=0, atol=0)

    positions = torch.tensor([[0, 1, 5, 300, 70_000], [3, 4, 5, 6, 7]])
    x = torch.randn(2, 5, 3, head_dim)  # [B, S, heads, D]
    cos, sin = hf_rope(x, positions, layer_type)
    expected = apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim=2)
    our_cos, our_sin = rope_tables(positions, ours_inv, x.dtype, scale)
    got = apply_rope(x.transpose(0, 1), our_cos, our_sin).transpose(0, 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_proportional_rope_rotates_both_halves_of_the_first_quarter():
    """D=512, partial 0.25: dims {0..63} ∪ {256..319} rotate, everything else is untouched."""
    params = {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}
    inv, _ = rope_frequencies(params, 512, 4096)
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


ORIGINAL = 128  # original_max_position_embeddings of the scaled types; max_position_embeddings is 512 (BASE_TEXT)
SLIDING_DIM, FULL_DIM = 32, 64


def _longrope(head_dim: int, **extra) -> dict:
    pairs = head_dim // 2
    return {"rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": ORIGINAL,
            "short_factor": [1.0 + 0.05 * j for j in range(pairs)], "long_factor": [1.0 + 0.7 * j for j in range(pairs)]} | extra


ROPE_CASES = {
    # HF's default RoPE ignores `factor`; proportional divides by it.
    "default_proportional": ({"rope_type": "default", "rope_theta": 1e4, "factor": 2.0},
                             {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6, "factor": 2.0}),
    "linear_default": ({"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}, {"rope_type": "default", "rope_theta": 1e6}),
    "dynamic_yarn": ({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
                     # transformers reads `truncate` from the outer dict, so a layer type's own is ignored (rope.py).
                     {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                      "truncate": False}),
    "yarn_mscale_dynamic": ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0, "original_max_position_embeddings": ORIGINAL,
                             "mscale": 0.7, "mscale_all_dim": 1.3, "beta_fast": 16, "beta_slow": 2},
                            {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 3.5}),
    "llama3_longrope": ({"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL},
                        _longrope(FULL_DIM, factor=4.0)),
    "longrope_yarn_given_attention": (_longrope(SLIDING_DIM, attention_factor=1.25),
                                      {"rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0,
                                       "original_max_position_embeddings": ORIGINAL, "attention_factor": 0.9}),
    "sliding_proportional_linear": ({"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e4},
                                    {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}),
}
# Largest positions below ORIGINAL, between ORIGINAL and max_position_embeddings, and beyond both.
POSITIONS = {"short": [[0, 1, 5, 17, 100]], "past_original": [[0, 7, 130, 300, 2]], "past_max": [[3, 600, 2_000, 70_000, 123]]}


def _hf_configs(sliding: dict, full: dict) -> list:
    text = BASE_TEXT | dict(head_dim=SLIDING_DIM, global_head_dim=FULL_DIM, rope_parameters={SLIDING: sliding, FULL: full})
    if "longrope" in (sliding["rope_type"], full["rope_type"]):
        # HF's longrope validation reads the global head_dim, which Gemma 4's per-layer configs guard behind this flag.
        text["allow_global_per_layer_attribute_access"] = True
    return [(Gemma4TextConfig(**text | GEMMA4_MOE), Gemma4TextRotaryEmbedding),
            (DiffusionGemmaTextConfig(**text), DiffusionGemmaTextRotaryEmbedding)]


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_every_rope_type_equals_hf(case):
    """config_from_hf + our tables = HF Gemma 4's and DiffusionGemma's own rotary embeddings (inverse frequencies
    and cos/sin, attention factor included), per layer type, at short and long positions."""
    assert {p["rope_type"] for c in ROPE_CASES.values() for p in c} == set(ROPE_TYPES)  # every type is covered
    for hf_config, rotary in _hf_configs(*ROPE_CASES[case]):
        ours = RotaryTables(config_from_hf(hf_config))
        for name, positions in POSITIONS.items():
            positions = torch.tensor(positions)
            hf_rope = rotary(hf_config)  # fresh: HF's dynamic cache keeps state across calls (layers/rope.py)
            tables = ours(positions, torch.float32)
            for layer_type in (SLIDING, FULL):
                where = f"{case} {hf_config.model_type} {layer_type} {name}"
                cos, sin = hf_rope(torch.zeros(1), positions, layer_type)
                hf_inv = getattr(hf_rope, f"{layer_type}_inv_freq")  # after HF's per-call update
                params = hf_config.rope_parameters[layer_type]
                inv, _ = rope_frequencies(params, FULL_DIM if layer_type == FULL else SLIDING_DIM,
                                          hf_config.max_position_embeddings, int(positions.max()) + 1)
                torch.testing.assert_close(inv, hf_inv, rtol=0, atol=1e-6, msg=where)
                our_cos, our_sin = tables[layer_type]
                torch.testing.assert_close(our_cos[:, :, 0].transpose(0, 1), cos, rtol=0, atol=1e-6, msg=where)
                torch.testing.assert_close(our_sin[:, :, 0].transpose(0, 1), sin, rtol=0, atol=1e-6, msg=where)


def test_length_dependent_types_change_past_their_threshold():
    """The positions of a call pick the table: dynamic grows past max_position_embeddings, longrope switches to its
    long factors past original_max_position_embeddings (so the oracle test above compares different tables)."""
    dynamic = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}
    longrope = _longrope(16)
    assert torch.equal(rope_frequencies(dynamic, 32, 512, 512)[0], rope_frequencies(dynamic, 32, 512)[0])
    assert not torch.equal(rope_frequencies(dynamic, 32, 512, 513)[0], rope_frequencies(dynamic, 32, 512)[0])
    assert torch.equal(rope_frequencies(longrope, 16, 512, ORIGINAL)[0], rope_frequencies(longrope, 16, 512)[0])
    assert not torch.equal(rope_frequencies(longrope, 16, 512, ORIGINAL + 1)[0], rope_frequencies(longrope, 16, 512)[0])


def test_rope_tables_follow_the_model_device_and_scale():
    """The fixed tables are buffers of the module (they move with `.to()`); yarn scales cos/sin by its factor."""
    yarn = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": ORIGINAL}
    tables = RotaryTables(tiny(rope_parameters={SLIDING: {"rope_type": "default", "rope_theta": 1e4}, FULL: yarn}))
    assert {name for name, _ in tables.named_buffers()} == {f"inv_freq_{SLIDING}", f"inv_freq_{FULL}"}
    cos, sin = tables(torch.tensor([[0, 50]]), torch.float32)[FULL]
    assert tables.scale[FULL] > 1.0
    torch.testing.assert_close(cos[0, 0, 0], torch.full((32,), tables.scale[FULL]))  # position 0: cos = scale
    torch.testing.assert_close(cos**2 + sin**2, torch.full_like(cos, tables.scale[FULL] ** 2))


@pytest.mark.parametrize("params,named", [
    ({"rope_type": "axial", "rope_theta": 1e4}, "'axial' is not a text RoPE type.*supported: default, linear"),
    ({"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
])
def test_rope_hf_refuses_is_named_by_config_from_hf(params, named):
    full = {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}
    text = BASE_TEXT | GEMMA4_MOE | dict(rope_parameters={SLIDING: params, FULL: full})
    with pytest.raises(ValueError, match=rf"rope_parameters\['sliding_attention'\].*{named}"):
        config_from_hf(Gemma4TextConfig(**text))


@pytest.mark.parametrize("params,named", [
    ({"rope_type": "su", "rope_theta": 1e4}, r"rope_type 'su'.*supported: default, linear, proportional, dynamic"),
    ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}, "'yarn' RoPE needs 'original_max_position_embeddings'"),
    ({"rope_type": "linear", "rope_theta": 1e4}, "'linear' RoPE needs 'factor'"),
    ({"rope_type": "default"}, "'rope_theta' is missing"),
    (_longrope(8), r"short_factor has 4 entries, expected head_dim / 2 = 8"),
])
def test_bad_rope_parameters_are_named_by_the_config(params, named):
    with pytest.raises(ValueError, match=rf"rope_parameters\['sliding_attention'\].*{named}"):
        tiny(rope_parameters={SLIDING: params, FULL: {"rope_type": "default", "rope_theta": 1e6}})


def test_checkpoints_with_scalar_rope_fields_still_load():
    """Checkpoints written before `rope_parameters` stored five scalars; they load as the same RoPE."""
    from megatron_bdgemma.conversion.megatron_checkpoint import model_config_from_dict, model_config_to_dict

    values = model_config_to_dict(tiny())
    del values["rope_parameters"]
    values |= dict(rope_theta=5e3, rope_scaling_factor=2.0, global_rope_theta=1e6, global_partial_rotary_factor=0.25,
                   global_rope_scaling_factor=1.0)
    assert model_config_from_dict(values).rope_parameters == {
        SLIDING: {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e3},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
    }
