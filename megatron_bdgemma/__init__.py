"""megatron_bdgemma: block-diffusion Gemma 4 MoE ("DiffusionGemma") on Megatron-Core.

Entry points: `BDGemmaConfig` and its presets (`config`), `BDGemmaModel` (`model`), and `from_hf` below.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_bdgemma.runtime.log_filters import filter_dependency_noise

# Before any megatron-core import: most of the messages it filters are printed at import time.
filter_dependency_noise()

if TYPE_CHECKING:
    import torch

    from megatron_bdgemma.config import BDGemmaConfig, config_from_hf
    from megatron_bdgemma.model import BDGemmaModel

__all__ = ["BDGemmaConfig", "BDGemmaModel", "config_from_hf", "from_hf"]


def __getattr__(name: str) -> Any:
    # Lazy, so light users (the data pipeline, `megatron_bdgemma.diffusion`) do not import megatron-core, and
    # a command's `--help` (runtime.cli) does not import torch.
    if name in ("BDGemmaConfig", "config_from_hf"):
        from megatron_bdgemma import config

        return getattr(config, name)
    if name == "BDGemmaModel":
        from megatron_bdgemma.model import BDGemmaModel

        return BDGemmaModel
    raise AttributeError(f"module 'megatron_bdgemma' has no attribute {name!r}")


def from_hf(path: str | Path, dtype: torch.dtype | None = None, backend: str = "local", **overrides) -> BDGemmaModel:
    """Build a `BDGemmaModel` from a local HF directory and load its weights.

    Accepts `Gemma4ForCausalLM` / `Gemma4ForConditionalGeneration` (MoE text) and `DiffusionGemmaForBlockDiffusion`
    checkpoints (`config.json` + safetensors, sharded or not). Initialises a 1-process model-parallel group when
    none exists; under an existing TP/EP/PP layout each rank loads its own shard. `dtype`: the parameters' (None =
    float32). `overrides` set config fields.
    """
    import torch
    from megatron.core import parallel_state

    from megatron_bdgemma.conversion.hf_checkpoint import HFCheckpoint, load_hf_weights
    from megatron_bdgemma.runtime.distributed import ensure_model_parallel

    from megatron_bdgemma.model import BDGemmaModel

    dtype = torch.float32 if dtype is None else dtype
    ensure_model_parallel()
    checkpoint = HFCheckpoint(path)
    config = checkpoint.model_config(
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        **overrides,
    )
    model = BDGemmaModel(
        config,
        backend=backend,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    if torch.cuda.is_available():
        model.cuda()  # norms, scales and RoPE tables are created on the CPU
    load_hf_weights(model, checkpoint, config)
    return model.eval()
