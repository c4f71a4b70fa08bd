"""The model's vision half: transformers' vision tower and multimodal embedder, on the first pipeline stage.

A DiffusionGemma checkpoint holds, besides the text stack, a vision tower (`model.encoder.vision_tower.*`, a
transformers `Gemma4VisionModel`) and the embedder that projects its output into the text embedding space
(`model.encoder.embed_vision.*`); Gemma 4 multimodal checkpoints hold the same two under `model.`. `Vision` is those
two modules, built by transformers from the recorded vision config (`AutoModel.from_config`,
`DiffusionGemmaMultimodalEmbedder`), so the images are encoded exactly as `DiffusionGemmaEncoderModel.
get_image_features` encodes them and every tensor keeps its HF name (`vision.vision_tower.patch_embedder.
input_proj.weight`) in the dtype it was stored in (docs/design.md §9):
- frozen by default (`requires_grad` False: no gradient, in no optimizer, and nothing in training writes them), so
  a converted, fine-tuned and exported model gives them back byte for byte; `BDGemmaConfig.train_vision` trains them;
- replicated over tensor parallelism (every TP rank runs the whole small tower on the same images);
- in the state dict, so Megatron's `sharded_state_dict` saves them like any replicated tensor (replica id
  (0, TP rank, DP rank): exactly one rank writes each) and dist_checkpointing loads them at any layout. Checkpoints
  written when these tensors were carried buffers (same names, same dtype) load unchanged.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from megatron_bdgemma.config import BDGemmaConfig

CARRIED_PREFIX = "vision."
"""Where `BDGemmaModel` keeps the vision module: the prefix of its tensors' model and checkpoint names."""
PARTS = ("vision_tower.", "embed_vision.")
"""The first component of every vision tensor's HF name (relative to DiffusionGemma's `model.encoder.`)."""


def is_vision_name(name: str) -> bool:
    """A vision tensor's HF name (`vision_tower.…` / `embed_vision.…`, relative to the checkpoint's vision
    prefix)."""
    return name.startswith(PARTS)


def is_carried(megatron_name: str) -> bool:
    """A vision tensor's model / checkpoint name (`vision.…`): carried from import to export unchanged unless
    trained."""
    return megatron_name.startswith(CARRIED_PREFIX)


def _modules(vision_config: dict[str, Any], text_hidden_size: int, dtype: torch.dtype | None = None) -> dict[str, torch.nn.Module]:
    """transformers' vision tower and embedder for `vision_config`, under their attribute names (HF's random init)."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaMultimodalEmbedder

    vision = AutoConfig.for_model(**vision_config)
    # The embedder reads only `hidden_size` from the text config.
    embedder = DiffusionGemmaMultimodalEmbedder(vision, SimpleNamespace(hidden_size=text_hidden_size))
    return {"vision_tower": AutoModel.from_config(vision, dtype=dtype), "embed_vision": embedder.to(dtype)}


@functools.lru_cache(maxsize=8)
def _shapes(vision_json: str, text_hidden_size: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):
        parts = _modules(json.loads(vision_json), text_hidden_size)
    return tuple((f"{part}.{name}", tuple(tensor.shape))
                 for part, module in parts.items() for name, tensor in module.state_dict().items())


def vision_tensor_shapes(vision_config: dict[str, Any], text_hidden_size: int) -> dict[str, tuple[int, ...]]:
    """HF name → shape of every tensor a checkpoint stores for the vision tower and embedder of `vision_config`
    (persistent parameters and buffers, in transformers' order)."""
    return dict(_shapes(json.dumps(vision_config, sort_keys=True), text_hidden_size))


@dataclass
class Images:
    """The images of a batch as HF's processor gives them, for the training passes (`BDGemmaModel.training_forward`,
    `pipeline_stage_forward`).

    pixel_values: `[N, max_patches, 3·patch²]` the patches of every image of the batch, in the order of their
        placeholders (row after row).
    image_position_ids: `[N, max_patches, 2]` each patch's (x, y), (-1, -1) on padding patches.
    mm_token_type_ids: `[B, S]` HF's token types of the encoder rows (1 on image tokens), laid out as the rows are
        (packed rows too); the vision-group mask reads it.
    image_rows: `[N]` long, the row holding each image's placeholders (non-decreasing): what lets a batch's rows be
        selected (`select`) or packed (`diffusion.packing.pack_batch`) with exactly their own images.
    """

    pixel_values: torch.Tensor
    image_position_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    image_rows: torch.Tensor

    def to(self, device: torch.device | str) -> Images:
        return Images(*(t.to(device) for t in (self.pixel_values, self.image_position_ids, self.mm_token_type_ids,
                                               self.image_rows)))

    def select(self, rows: Sequence[int]) -> Images | None:
        """The images of the batch rows `rows`, in that order (each row's in placeholder order), renumbered as
        rows `0 .. len(rows) - 1`, with those rows' token types: what collating those rows' records gives (the
        patches keep this batch's padding, which the tower never attends to). None when the rows hold no image,
        as a batch of text records has none."""
        picked = [torch.nonzero(self.image_rows == row).flatten() for row in rows]
        counts = torch.tensor([len(p) for p in picked], dtype=torch.long)
        if not int(counts.sum()):
            return None
        index, device = torch.cat(picked), self.image_rows.device
        return Images(self.pixel_values[index], self.image_position_ids[index],
                      self.mm_token_type_ids[torch.tensor(list(rows), dtype=torch.long, device=device)],
                      torch.repeat_interleave(torch.arange(len(rows)), counts).to(device))


def placeholder_slots(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """`[B, S]`: each image placeholder's index in the batch's image features, in HF's `masked_scatter` order (row
    after row), -1 on every other token. Computed on whole rows, it travels with a context-parallel shard of them, so
    a rank finds its placeholders' features without the rest of the row (docs/design.md §14)."""
    placeholders = input_ids == image_token_id
    order = placeholders.flatten().cumsum(0).view_as(placeholders) - 1
    return torch.where(placeholders, order, -1)


def vision_dtype(config: BDGemmaConfig) -> torch.dtype:
    """The torch dtype of the vision tensors (`config.vision_dtype` names it)."""
    return getattr(torch, config.vision_dtype)


class Vision(torch.nn.Module):
    """The vision tower and embedder of `config.vision_config` (transformers' modules) under their HF names.

    Zero until loaded: the model is only built with a vision config when it comes from a checkpoint that holds them,
    and a zero start neither draws from the global random stream nor depends on it.
    """

    def __init__(self, config: BDGemmaConfig) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # transformers initialises at random; the zeros below replace it
            for name, module in _modules(config.vision_config, config.hidden_size, vision_dtype(config)).items():
                self.add_module(name, module)
        with torch.no_grad():
            for tensor in self.state_dict(keep_vars=True).values():
                tensor.zero_()
        self.requires_grad_(config.train_vision)

    def forward(self, pixel_values: torch.Tensor, image_position_ids: torch.Tensor) -> torch.Tensor:
        """Images → their soft tokens in the text embedding space, `[T, H]` in the tower's dtype: every image's
        valid pooled patches, image after image (`DiffusionGemmaEncoderModel.get_image_features`).

        Args:
            pixel_values: `[N, max_patches, 3·patch²]` patches (the HF processor's), in [0, 1].
            image_position_ids: `[N, max_patches, 2]` each patch's (x, y); (-1, -1) marks padding patches.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())):
            hidden = self.vision_tower(pixel_values=pixel_values, pixel_position_ids=image_position_ids).last_hidden_state
            return self.embed_vision(inputs_embeds=hidden)
