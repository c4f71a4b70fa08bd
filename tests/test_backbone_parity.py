"""Contract: `BDGemmaModel.encode` reproduces HF Gemma 4 MoE / DiffusionGemma encoder numerics (fp32, ≤ 1e-4).

Oracles: `transformers`' `Gemma4ForCausalLM` (logits) and `DiffusionGemmaForBlockDiffusion`'s encoder (the K/V
it writes into its cache), tiny random configs with every norm / scale / layer scalar randomised.
"""

from __future__ import annotations

import pytest
import torch

import megatron_bdgemma
from tests import hf_models
from tests.hf_models import FULL, SLIDING

TOL = 1e-4

CONFIGS = {
    # GQA, K=V full layer, top-2 of 4, window 4 < sequence.
    "gqa_keqv": {},
    # Gemma 4 without K=V: full layers keep their v_proj and use num_key_value_heads; full layer first.
    "no_keqv": dict(attention_k_eq_v=False, layer_types=[FULL, SLIDING, SLIDING, FULL], num_hidden_layers=4, sliding_window=3),
    # MHA on sliding layers, 2 global KV heads, top-3 of 8 experts, window longer than the sequence.
    "mha_top3": dict(num_key_value_heads=4, num_global_key_value_heads=2, num_experts=8, top_k_experts=3, sliding_window=64),
    # The default 5:1 pattern.
    "pattern_5_1": dict(num_hidden_layers=6, layer_types=None, sliding_window=5),
}


def _inputs(batch: int, seq: int, vocab: int, left_pad: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seq)
    ids = torch.randint(2, vocab, (batch, seq), generator=generator)
    valid = torch.ones(batch, seq, dtype=torch.bool)
    for row, pad in enumerate(left_pad):
        ids[row, :pad] = 0
        valid[row, :pad] = False
    return ids, valid


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("seq,left_pad", [(7, [0]), (9, [0, 3])])
def test_encode_logits_match_gemma4(tmp_path, model_parallel, name, seq, left_pad):
    hf = hf_models.gemma4_causal_lm(CONFIGS[name])
    ours = megatron_bdgemma.from_hf(hf_models.save(hf, tmp_path / "hf"))
    ids, valid = _inputs(len(left_pad), seq, hf.config.vocab_size, left_pad)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=valid.long()).logits.float()
        got = ours.encode(ids, padding_mask=~valid, return_logits=True).logits
    assert got.shape == expected.shape
    diff = (got - expected)[valid].abs().max().item()
    assert diff <= TOL, f"{name}: max-abs logit difference {diff:.2e} > {TOL}"


SCALED_ROPE = {
    # Full layers YaRN (cos/sin scaled by its attention factor), sliding layers dynamic NTK grown past max positions.
    "yarn_dynamic": {FULL: {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 64},
                     SLIDING: {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
    # Sliding layers Llama 3, full layers LongRoPE on its long factors (positions past the original 64).
    "llama3_longrope": {SLIDING: {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                        FULL: {"rope_type": "longrope", "rope_theta": 1e6, "original_max_position_embeddings": 64,
                               "short_factor": [1.0 + 0.1 * j for j in range(8)], "long_factor": [1.0 + 0.9 * j for j in range(8)]}},
}


@pytest.mark.parametrize("name", sorted(SCALED_ROPE))
def test_encode_logits_match_gemma4_with_scaled_rope(tmp_path, model_parallel, name):
    """Non-default RoPE types through the whole stack: positions 600.. lie past `max_position_embeddings` (512) and
    every original context, so dynamic grows, longrope takes its long factors and yarn / longrope scale cos/sin."""
    overrides = dict(rope_parameters=SCALED_ROPE[name])
    if name == "llama3_longrope":
        overrides["allow_global_per_layer_attribute_access"] = True  # HF's longrope validation reads the global head_dim
    hf = hf_models.gemma4_causal_lm(overrides)
    ours = megatron_bdgemma.from_hf(hf_models.save(hf, tmp_path / "hf"))
    ids, valid = _inputs(2, 9, hf.config.vocab_size, [0, 3])
    positions = torch.arange(600, 609).expand(2, 9)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=valid.long(), position_ids=positions).logits.float()
        got = ours.encode(ids, position_ids=positions, padding_mask=~valid, return_logits=True).logits
        default_rope = megatron_bdgemma.from_hf(hf_models.save(hf_models.gemma4_causal_lm(), tmp_path / "plain"))
        other = default_rope.encode(ids, position_ids=positions, padding_mask=~valid, return_logits=True).logits
    diff = (got - expected)[valid].abs().max().item()
    assert diff <= TOL, f"{name}: max-abs logit difference {diff:.2e} > {TOL}"
    assert (other - expected)[valid].abs().max().item() > 100 * TOL  # the RoPE type matters at these positions


@pytest.mark.parametrize("seq", [3, 10])  # shorter and longer than the sliding window (4)
def test_encode_kv_match_diffusion_gemma_cache(tmp_path, model_parallel, seq):
    from transformers import DynamicCache

    hf = hf_models.diffusion_gemma()
    ours = megatron_bdgemma.from_hf(hf_models.save(hf, tmp_path / "hf"))
    ids, _ = _inputs(2, seq, hf.config.text_config.vocab_size, [0, 0])
    cache = DynamicCache(config=hf.config.text_config)
    with torch.no_grad():
        hf.model.encoder(input_ids=ids, cache=cache)
        kv = ours.encode(ids).kv
    window = hf.config.text_config.sliding_window
    for i, layer_type in enumerate(hf.config.text_config.layer_types):
        keep = window - 1 if layer_type == SLIDING else seq  # HF's sliding cache keeps the last window-1 positions
        for ours_t, hf_t, what in ((kv[i][0], cache.layers[i].keys, "K"), (kv[i][1], cache.layers[i].values, "V")):
            expected = hf_t[:, :, -keep:]
            diff = (ours_t[:, :, -keep:] - expected).abs().max().item()
            assert ours_t[:, :, -keep:].shape == expected.shape
            assert diff <= TOL, f"layer {i} ({layer_type}) {what}: max-abs {diff:.2e}"
