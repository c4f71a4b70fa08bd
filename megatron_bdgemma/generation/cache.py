"""The encoder KV cache of generation, and the encoder step that extends it.

Generation encodes the prompt once, then only each committed canvas (or, for the AR baseline, each new token),
appending its K/V to every layer (docs/design.md §10):

- full-attention layers keep every position;
- sliding layers keep only the last `window - 1` positions, exactly like HF's `DynamicSlidingWindowLayer`. That
  is all a later query can need: the next encoder token at position L sees keys `> L - window`, and a canvas
  starting at L sees encoder keys `[L - window + 1, L)` (the block-start-anchored window of docs/design.md §5).

Rows are left-padded prompts: positions are the tensor indices (HF generation's convention, padding included),
and a per-position validity mask keeps padding out of every later attention. The padding of committed canvases
(pad after EOS) is ordinary content: it is attended, as in HF.

Tensors use HF's cache layout, K and V `[B, kv_heads_local, P, head_dim]` per layer, what `BDGemmaModel.decode`
takes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from megatron_bdgemma import masks
from megatron_bdgemma.layers.attention import KV, KVBuffer
from megatron_bdgemma.model import BDGemmaModel

__all__ = ["EncoderKVCache", "encode_into"]


class EncoderKVCache:
    """Per-layer encoder K/V of a batch of rows, sliding layers trimmed to their window.

    Attributes:
        windows: per layer, its sliding window or None (full attention).
        layer_types: per layer, its attention type (layers of one type share one retained length).
        length: positions appended so far, L (the next position's index).
        valid: `[B, L]` bool, False on (prompt) padding; kept whole, positions are absolute.
        kv: per layer, (K, V) `[B, kv_heads_local, P_l, head_dim]`, the last `P_l` of the L positions.
    """

    def __init__(self, layer_types: Sequence[str], windows: Sequence[int | None]) -> None:
        if len(layer_types) != len(windows):
            raise ValueError(f"{len(layer_types)} layer types but {len(windows)} windows")
        self.layer_types = list(layer_types)
        self.windows = list(windows)
        self.length = 0
        self.valid: Tensor | None = None
        self.kv: list[KV] = []

    @classmethod
    def for_model(cls, model: BDGemmaModel) -> EncoderKVCache:
        """An empty cache with the model's per-layer windows (the whole stack: generation runs with PP = 1)."""
        config = model.config
        if len(model.decoder.layers) != len(config.layer_types):
            raise ValueError(
                f"generation needs the whole stack on one rank (pipeline-parallel size 1); this rank holds "
                f"{len(model.decoder.layers)} of {len(config.layer_types)} layers"
            )
        return cls(config.layer_types, [config.window_of(t) for t in config.layer_types])

    def retained(self, layer: int) -> int:
        """How many of the L positions layer `layer` keeps."""
        window = self.windows[layer]
        return self.length if window is None else min(self.length, window - 1)

    def retained_valid(self, layer_type: str) -> Tensor:
        """`[B, P]` validity of the positions a layer of `layer_type` keeps."""
        retained = self.retained(self.layer_types.index(layer_type))
        return self.valid[:, self.length - retained :]

    def append(self, kv: Sequence[KV], valid: Tensor) -> None:
        """Append S new positions: `kv` per layer `[B, g, S, d]` each, `valid` `[B, S]` (False = padding)."""
        if len(kv) != len(self.windows):
            raise ValueError(f"got K/V of {len(kv)} layers for a cache of {len(self.windows)}")
        self.valid = valid.bool() if self.valid is None else torch.cat([self.valid, valid.bool()], dim=1)
        self.length += valid.shape[1]
        new = []
        for layer, (key, value) in enumerate(kv):
            if self.kv:
                key = torch.cat([self.kv[layer][0], key], dim=2)
                value = torch.cat([self.kv[layer][1], value], dim=2)
            # Slicing a view would pin the whole concatenation; a sliding layer must free what leaves the window.
            keep = self.retained(layer)
            if keep < key.shape[2]:
                start = key.shape[2] - keep
                key, value = key[:, :, start:].contiguous(), value[:, :, start:].contiguous()
            new.append((key, value))
        self.kv = new

    def decode_buffers(self, canvas_length: int) -> list[KVBuffer]:
        """Per layer, a `KVBuffer` holding the retained K/V and room for a canvas: the decodes of one canvas write
        their canvas K/V into it instead of concatenating the cache to it at every step."""
        return [KVBuffer.with_prefix(key, value, canvas_length) for key, value in self.kv]

    def decode_masks(self, canvas_length: int) -> dict[str, masks.DecodeInferenceMask]:
        """Per layer type, the decode mask over `[retained encoder keys ; canvas]` (R queries × `P + R` keys).

        Every valid retained key and the whole canvas are visible: HF's inference contract, with the sliding
        window already applied by the retention.
        """
        return {
            layer_type: masks.DecodeInferenceMask(self.retained_valid(layer_type), None, None, canvas_len=canvas_length)
            for layer_type in set(self.layer_types)
        }

    def encode_masks(self, new_valid: Tensor, vision_groups: Tensor | None = None) -> dict[str, masks.EncoderMask]:
        """Per layer type, the causal mask of S new positions over `[retained ; new]` keys.

        The new positions are the last S keys, so this is the rows of a causal encode of the whole sequence,
        restricted to the retained keys, which hold every key those rows can see. `vision_groups`: `[B, S]` the new
        positions' image groups (`masks.EncoderMask`; a prompt's images are encoded whole in one call).
        """
        result = {}
        for layer_type in set(self.layer_types):
            key_valid, groups = new_valid.bool(), vision_groups
            if self.valid is not None:
                retained = self.retained_valid(layer_type)
                key_valid = torch.cat([retained, key_valid], dim=1)
                if groups is not None:  # the retained keys' images are complete: no group spans the two
                    groups = torch.cat([torch.full_like(retained, -1, dtype=groups.dtype), groups], dim=1)
            window = self.windows[self.layer_types.index(layer_type)]
            result[layer_type] = masks.EncoderMask(key_valid, window, num_queries=new_valid.shape[1],
                                                   vision_groups=groups)
        return result


def encode_into(
    model: BDGemmaModel,
    cache: EncoderKVCache,
    input_ids: Tensor,
    *,
    padding_mask: Tensor | None = None,
    last_logits: bool = False,
    pixel_values: Tensor | None = None,
    image_position_ids: Tensor | None = None,
    mm_token_type_ids: Tensor | None = None,
) -> Tensor | None:
    """Encode S new tokens causally against `cache` and append their K/V to it.

    The tokens sit at positions `L .. L+S-1` (L = `cache.length`). Every layer attends over
    `[retained K/V ; new K/V]` under `cache.encode_masks`, which gives the K/V a causal encode of the whole
    sequence would (`BDGemmaModel.encode` is this with an empty cache).

    Args:
        model: the model (whole stack on this rank).
        cache: the cache to extend.
        input_ids: `[B, S]` new tokens.
        padding_mask: `[B, S]` bool, True = padding (left padding of the prompt); None = no padding.
        last_logits: also return the last new position's `[B, V]` fp32 softcapped next-token logits (only that
            position's: a prompt's full `[B, S, V]` logits would be large for a 262K vocabulary).
        pixel_values, image_position_ids, mm_token_type_ids: the images of the new tokens, as `BDGemmaModel.encode`
            takes them (a prompt's, HF's prefill).

    Returns:
        the logits when asked for, else None.
    """
    batch, new = input_ids.shape
    if padding_mask is None:
        valid = torch.ones(batch, new, dtype=torch.bool, device=input_ids.device)
    else:
        valid = ~padding_mask.bool()
    positions = (cache.length + torch.arange(new, device=input_ids.device)).expand(batch, new)
    encoded = model.encode(
        input_ids, position_ids=positions, kv_prefix=cache.kv or None,
        attention_mask=cache.encode_masks(valid, model.vision_groups(mm_token_type_ids)),
        pixel_values=pixel_values, image_position_ids=image_position_ids,
    )
    cache.append(encoded.kv, valid)
    return model.logits(encoded.hidden[-1:])[:, 0] if last_logits else None
