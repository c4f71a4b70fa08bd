"""Contract: HF configs and checkpoints that we cannot represent fail with an error naming the problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import megatron_bdgemma
from megatron_bdgemma.config import FULL, SLIDING, config_from_hf
from tests import hf_models


def _gemma4_text(**overrides):
    from transformers import Gemma4TextConfig

    values = hf_models.BASE_TEXT | dict(enable_moe_block=True, attention_k_eq_v=True, hidden_size_per_layer_input=0)
    return Gemma4TextConfig(**(values | overrides))


def test_config_from_hf_reads_every_geometry_field():
    config = config_from_hf(_gemma4_text(final_logit_softcapping=30.0))
    assert (config.kv_channels, config.num_query_groups) == (8, 2)
    assert (config.global_kv_channels, config.num_global_query_groups) == (16, 1)
    assert config.layer_types == [SLIDING, SLIDING, FULL]
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (4, 2, 16)
    assert config.ffn_hidden_size == config.moe_shared_expert_intermediate_size == 48
    assert config.global_k_eq_v and not config.self_conditioning
    assert config.sliding_window == 4 and config.final_logit_softcapping == 30.0


def test_diffusion_gemma_config_is_always_k_eq_v_and_self_conditioned():
    config = config_from_hf(hf_models.diffusion_gemma().config)
    assert config.global_k_eq_v and config.self_conditioning and config.canvas_length == 4


@pytest.mark.parametrize(
    "overrides,named",
    [
        (dict(hidden_size_per_layer_input=256), "hidden_size_per_layer_input"),
        (dict(num_kv_shared_layers=2), "num_kv_shared_layers"),
        (dict(enable_moe_block=False), "enable_moe_block"),
        (dict(use_bidirectional_attention="all"), "use_bidirectional_attention"),
        (dict(attention_bias=True), "attention_bias"),
    ],
)
def test_unsupported_config_features_are_named(overrides, named):
    with pytest.raises(ValueError, match=named):
        config_from_hf(_gemma4_text(**overrides))


def test_all_unsupported_features_are_listed_at_once():
    with pytest.raises(ValueError) as error:
        config_from_hf(_gemma4_text(hidden_size_per_layer_input=256, num_kv_shared_layers=2))
    assert "hidden_size_per_layer_input" in str(error.value) and "num_kv_shared_layers" in str(error.value)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="llama"):
        megatron_bdgemma.from_hf(tmp_path)


@pytest.fixture
def saved_gemma4(tmp_path):
    return hf_models.save(hf_models.gemma4_causal_lm(), tmp_path / "hf")


def _edit_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(saved_gemma4, model_parallel):
    _edit_weights(saved_gemma4, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(KeyError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight"):
        megatron_bdgemma.from_hf(saved_gemma4)


def test_misshaped_tensor_is_named(saved_gemma4, model_parallel):
    def shrink(tensors):
        tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"][:, :-1].clone()

    _edit_weights(saved_gemma4, shrink)
    with pytest.raises(ValueError, match=r"mlp\.down_proj\.weight"):
        megatron_bdgemma.from_hf(saved_gemma4)


def test_unexpected_tensor_is_named(saved_gemma4, model_parallel):
    _edit_weights(saved_gemma4, lambda t: t.__setitem__("model.layers.0.mystery.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mystery\.weight"):
        megatron_bdgemma.from_hf(saved_gemma4)


def test_untied_layer_scalar_copies_must_agree(tmp_path, model_parallel):
    path = hf_models.save(hf_models.diffusion_gemma(), tmp_path / "hf")
    _edit_weights(path, lambda t: t["model.encoder.language_model.layers.2.layer_scalar"].mul_(2))
    with pytest.raises(ValueError, match=r"layers\.2\.layer_scalar"):
        megatron_bdgemma.from_hf(path)


def test_vision_tower_is_loaded_frozen(tmp_path, model_parallel):
    """Every stored vision tensor lands in the model unchanged (its dtype too, whatever the text stack's), as a
    frozen parameter: no gradient, nothing an optimizer sees (`train_vision` off)."""
    path = hf_models.save(hf_models.diffusion_gemma(), tmp_path / "hf")
    model = megatron_bdgemma.from_hf(path, dtype=torch.bfloat16)
    source = hf_models.vision_tensors(load_file(path / "model.safetensors"))
    held = {name.removeprefix("vision."): t for name, t in model.state_dict().items() if name.startswith("vision.")}
    assert len(source) == 16 and sorted(held) == sorted(source)
    assert all(hf_models.same_bytes(held[name], t) and t.dtype == torch.float32 for name, t in source.items())
    vision = [(name, p) for name, p in model.named_parameters() if name.startswith("vision.")]
    assert len(vision) == 16 and not any(p.requires_grad for _, p in vision)


def _model_for(path):
    from megatron_bdgemma.conversion.hf_checkpoint import HFCheckpoint
    from megatron_bdgemma.model import BDGemmaModel

    checkpoint = HFCheckpoint(path)
    config = config_from_hf(checkpoint.hf_config())
    return BDGemmaModel(config), checkpoint, config


def test_parameter_no_tensor_maps_to_is_named(saved_gemma4, model_parallel):
    """A model parameter outside the key map would keep its random init: that is an error, never silent."""
    from megatron_bdgemma.conversion.hf_checkpoint import load_hf_weights

    model, checkpoint, config = _model_for(saved_gemma4)
    model.decoder.layers[1].mlp.register_parameter("mystery", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ValueError, match=r"decoder\.layers\.1\.mlp\.mystery"):
        load_hf_weights(model, checkpoint, config)


def test_grouped_expert_names_load(saved_gemma4, model_parallel):
    """The `te` spec's `TEGroupedMLP` holds expert e's weights as `linear_fc{1,2}.weight{e}` (Transformer Engine's
    `GroupedLinear`); they receive what the local spec's `local_experts.{e}.linear_fc{1,2}.weight` receive. The
    grouped module is stood in for by plain parameters of those names (Transformer Engine is not installed here)."""
    from megatron_bdgemma.conversion.hf_checkpoint import load_hf_weights

    reference = megatron_bdgemma.from_hf(saved_gemma4)
    model, checkpoint, config = _model_for(saved_gemma4)
    for layer in model.decoder.layers:
        grouped = torch.nn.Module()
        for n in (1, 2):
            linear = torch.nn.Module()
            for e, expert in enumerate(layer.mlp.experts.local_experts):
                weight = getattr(expert, f"linear_fc{n}").weight
                linear.register_parameter(f"weight{e}", torch.nn.Parameter(torch.zeros_like(weight)))
            grouped.add_module(f"linear_fc{n}", linear)
        layer.mlp.experts = grouped
    load_hf_weights(model, checkpoint, config)
    for i, layer in enumerate(model.decoder.layers):
        for e, expert in enumerate(reference.decoder.layers[i].mlp.experts.local_experts):
            for n in (1, 2):
                expected = getattr(expert, f"linear_fc{n}").weight
                assert torch.equal(getattr(getattr(layer.mlp.experts, f"linear_fc{n}"), f"weight{e}"), expected)


def test_untied_lm_head_is_refused(tmp_path, model_parallel):
    """A checkpoint whose config unties the head would lose its lm_head.weight: refused by name, by from_hf and the
    converter (which then writes nothing)."""
    from megatron_bdgemma.conversion.megatron_checkpoint import ConversionError, convert_hf_to_megatron

    path = hf_models.save(hf_models.gemma4_causal_lm(dict(tie_word_embeddings=False)), tmp_path / "hf")
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        megatron_bdgemma.from_hf(path)
    with pytest.raises((ConversionError, ValueError), match="tie_word_embeddings=False"):
        convert_hf_to_megatron(path, tmp_path / "out", log=lambda _: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("equal", [True, False])
def test_tied_checkpoint_with_lm_head_loads_only_if_equal(saved_gemma4, tmp_path, model_parallel, equal):
    from megatron_bdgemma.conversion.megatron_checkpoint import ConversionError, convert_hf_to_megatron

    reference = megatron_bdgemma.from_hf(saved_gemma4)
    _edit_weights(saved_gemma4, lambda t: t.__setitem__(
        "lm_head.weight", t["model.embed_tokens.weight"].clone() * (1.0 if equal else 1.5)))
    if equal:
        loaded = megatron_bdgemma.from_hf(saved_gemma4)
        assert all(torch.equal(p, dict(reference.named_parameters())[n]) for n, p in loaded.named_parameters())
        convert_hf_to_megatron(saved_gemma4, tmp_path / "out", log=lambda _: None)
        return
    with pytest.raises(ValueError, match=r"lm_head\.weight differs from model\.embed_tokens\.weight"):
        megatron_bdgemma.from_hf(saved_gemma4)
    with pytest.raises(ConversionError, match=r"lm_head\.weight differs"):
        convert_hf_to_megatron(saved_gemma4, tmp_path / "out", log=lambda _: None)
    assert not (tmp_path / "out").exists()
