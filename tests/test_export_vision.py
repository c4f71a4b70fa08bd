"""Export of a text-only model: `transformers` must build it at about our size, not with a default vision tower."""

from __future__ import annotations

import torch

from megatron_bdgemma.hf_reference import TINY_VISION


def _hf_parameters(hf_config) -> int:
    from transformers import DiffusionGemmaForBlockDiffusion

    with torch.device("meta"):
        return sum(p.numel() for p in DiffusionGemmaForBlockDiffusion(hf_config).parameters())


def test_text_only_export_builds_a_model_of_our_size(model_parallel):
    from megatron_bdgemma.config import tiny
    from megatron_bdgemma.conversion.hf_export import hf_configs
    from megatron_bdgemma.model import BDGemmaModel

    config = tiny()
    ours = sum(p.numel() for p in BDGemmaModel(config).parameters())
    hf_config, _ = hf_configs(config, None, torch.float32)
    theirs = _hf_parameters(hf_config)
    # The vision tower adds ~1K parameters and its projection H × 8; the default tower alone would be 167M.
    assert ours < theirs <= ours + 2_000 + 8 * config.hidden_size, (theirs, ours)


def test_export_keeps_the_source_vision_config(model_parallel):
    from megatron_bdgemma.config import tiny
    from megatron_bdgemma.conversion.hf_export import hf_configs

    source = {"hf_config": {"vision_config": TINY_VISION | {"hidden_size": 24}}}
    hf_config, _ = hf_configs(tiny(), source, torch.float32)
    assert hf_config.vision_config.hidden_size == 24 and hf_config.vision_config.num_hidden_layers == 1
