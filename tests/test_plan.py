"""tools/plan.py: the model it plans is the one transformers builds (parameter count), at any layout, on meta."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SFT_26B = ROOT / "examples" / "configs" / "diffusiongemma_26b_sft.yaml"
PRETRAIN_26B = ROOT / "examples" / "configs" / "diffusiongemma_26b_pretrain.yaml"

# google/diffusiongemma-26B-A4B-it's text config as recorded in /work/shared/reference/automodel_diffusion_gemma.md
# §1.1 (its checkpoint's config.json, not transformers' defaults).
TEXT_26B = dict(
    vocab_size=262_144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16,
    num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 5, sliding_window=1024, num_experts=128,
    top_k_experts=8, moe_intermediate_size=704, max_position_embeddings=262_144, final_logit_softcapping=30.0,
    pad_token_id=0, eos_token_id=1,
)


def _plan(config: Path, gpus: int, *overrides: str) -> tuple[dict[str, float], str]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plan.py"), "--config", str(config), "--gpus", str(gpus), *overrides],
        capture_output=True, text=True, timeout=300, env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), out.stdout
    return {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", last)}, out.stdout


def _hf_text_params(model: torch.nn.Module) -> int:
    """Unique parameters of the text model (encoder and decoder stacks are tied copies), without the vision tower
    and without `per_expert_scale`, which import folds into each expert's down projection."""
    seen, total = set(), 0
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen or re.search(r"vision|audio", name) or name.endswith("per_expert_scale"):
            continue
        seen.add(id(param))
        total += param.numel()
    return total


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> tuple[str, int]:
    from tests import hf_models

    model = hf_models.diffusion_gemma(dict(num_global_key_value_heads=2, num_experts=4), canvas_length=8)
    return str(hf_models.save(model, tmp_path_factory.mktemp("tiny") / "hf")), _hf_text_params(model)


@pytest.mark.parametrize("gpus,layout", [(1, []), (4, ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1", "train.global_batch_size=16"])],
                         ids=["one_rank", "tp2_ep2"])
def test_tiny_params_equal_transformers(tmp_path, tiny_hf, gpus, layout):
    """The planner's whole-model count, rebuilt from one rank's shards, equals transformers' count."""
    path, expected = tiny_hf
    result, _ = _plan(ROOT / "examples" / "configs" / "tiny_sft.yaml", gpus, f"model.hf={path}",
                      f"data.cache_dir={tmp_path}", *layout)
    assert result["params_total"] == expected


def test_26b_params_equal_transformers_and_recipes_fit(tmp_path):
    """The real shape on the meta device: transformers' DiffusionGemma (from the checkpoint's config values) and the
    planner at the SFT recipe's layout count the same parameters; the preset agrees; both recipes fit 80 GB."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma import DiffusionGemmaTextConfig

    from megatron_bdgemma.hf_reference import TINY_VISION

    config = DiffusionGemmaConfig(text_config=DiffusionGemmaTextConfig(**TEXT_26B), vision_config=TINY_VISION,
                                  canvas_length=256)
    with torch.device("meta"):
        expected = _hf_text_params(DiffusionGemmaForBlockDiffusion(config))
    config.save_pretrained(tmp_path / "hf")  # config.json only: the planner needs no weights
    from_hf, table = _plan(SFT_26B, 8, f"model.hf={tmp_path / 'hf'}")
    assert from_hf["params_total"] == expected, table
    assert 3.5e9 < from_hf["params_active_per_token"] < 4.5e9, table  # "A4B"
    assert from_hf["peak_gib_per_rank"] <= 80 * 0.9, table
    from_preset, _ = _plan(PRETRAIN_26B, 64)
    assert from_preset["params_total"] == expected
    assert from_preset["peak_gib_per_rank"] <= 80 * 0.9
