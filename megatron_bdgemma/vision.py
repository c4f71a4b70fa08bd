"""The model's vision half, carried unchanged: the HF vision tower's and multimodal embedder's tensors.

A DiffusionGemma checkpoint holds, besides the text stack, a vision tower (`model.encoder.vision_tower.*`, a
transformers `Gemma4VisionModel`) and the embedder that projects its output into the text embedding space
(`model.encoder.embed_vision.*`); Gemma 4 multimodal checkpoints hold the same two under `model.`. Training does not
use images yet, but a model converted from such a checkpoint, trained and exported must give them back, byte for
byte. `VisionWeights`, on the first pipeline stage (where images will enter the encoder, docs/design.md §9), holds
every such tensor under its HF name (`vision_tower.patch_embedder.input_proj.weight`) as a persistent buffer in the
dtype it was stored in:
- buffers get no gradient, are in no optimizer and nothing in training writes them;
- they are in the state dict, so Megatron's `sharded_state_dict` saves them like any replicated tensor (replica id
  (0, TP rank, DP rank): exactly one rank writes each) and dist_checkpointing loads them at any layout.

The names and shapes are those of transformers' own modules for the recorded vision config (built on the meta
device), so the export holds exactly what `DiffusionGemmaForBlockDiffusion` loads. When images enter the encoder,
this module is replaced by the real tower and embedder under the same attribute names (`vision.vision_tower`,
`vision.embed_vision`), so checkpoints written now keep loading.
"""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace
from typing import Any

import torch

from megatron_bdgemma.config import BDGemmaConfig

CARRIED_PREFIX = "vision."
"""Where `BDGemmaModel` keeps the carried tensors: the prefix of their model and checkpoint names."""
PARTS = ("vision_tower.", "embed_vision.")
"""The first component of every carried HF name (relative to DiffusionGemma's `model.encoder.`)."""


def is_vision_name(name: str) -> bool:
    """A carried tensor's HF name (`vision_tower.…` / `embed_vision.…`, relative to the checkpoint's vision
    prefix)."""
    return name.startswith(PARTS)


def is_carried(megatron_name: str) -> bool:
    """A carried tensor's model / checkpoint name (`vision.…`)."""
    return megatron_name.startswith(CARRIED_PREFIX)


@functools.lru_cache(maxsize=8)
def _shapes(vision_json: str, text_hidden_size: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    from transformers import AutoConfig, AutoModel
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaMultimodalEmbedder

    vision = AutoConfig.for_model(**json.loads(vision_json))
    with torch.device("meta"):
        parts = {
            "vision_tower": AutoModel.from_config(vision),
            # The embedder reads only `hidden_size` from the text config.
            "embed_vision": DiffusionGemmaMultimodalEmbedder(vision, SimpleNamespace(hidden_size=text_hidden_size)),
        }
    return tuple((f"{part}.{name}", tuple(tensor.shape))
                 for part, module in parts.items() for name, tensor in module.state_dict().items())


def vision_tensor_shapes(vision_config: dict[str, Any], text_hidden_size: int) -> dict[str, tuple[int, ...]]:
    """HF name → shape of every tensor a checkpoint stores for the vision tower and embedder of `vision_config`
    (persistent parameters and buffers, in transformers' order)."""
    return dict(_shapes(json.dumps(vision_config, sort_keys=True), text_hidden_size))


def vision_dtype(config: BDGemmaConfig) -> torch.dtype:
    """The torch dtype of the carried tensors (`config.vision_dtype` names it)."""
    return getattr(torch, config.vision_dtype)


class VisionWeights(torch.nn.Module):
    """The vision tower and embedder of `config.vision_config` as frozen persistent buffers under their HF names.

    Zero until loaded: the model is only built with a vision config when it comes from a checkpoint that holds them.
    """

    def __init__(self, config: BDGemmaConfig) -> None:
        super().__init__()
        dtype = vision_dtype(config)
        for name, shape in vision_tensor_shapes(config.vision_config, config.hidden_size).items():
            *path, leaf = name.split(".")
            module: torch.nn.Module = self
            for part in path:
                if part not in module._modules:
                    module.add_module(part, torch.nn.Module())
                module = module._modules[part]
            module.register_buffer(leaf, torch.zeros(shape, dtype=dtype))
