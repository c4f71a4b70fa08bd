"""Attention masks: the causal encoder, the block-diffusion canvas (training and inference), and conversions.

Every builder returns one convention: a boolean **allowed** tensor, ``True`` = the query may attend to the key,
shaped ``[B, 1, Q, K]`` (``B`` = batch; the ``1`` broadcasts over heads). The sliding window always lives inside
the mask, so attention kernels never get a separate ``window_size`` (DESIGN §4). The backends' conventions are
derived at the edge by :func:`to_megatron`, :func:`to_sdpa` and :func:`to_additive`.

Every row keeps at least one allowed key (a padded query gets its own diagonal), so no softmax row is empty.

Block-diffusion canvas (DESIGN §5). Keys are ``[encoder (S clean positions) ; canvas (R noised positions)]``.
Response blocks have ``bs`` positions and are counted from the response start ``p``. A canvas query of block ``i``
sees the clean encoder prefix ``[0, p + i·bs)`` -- the prompt and the strictly earlier response blocks, never its
own clean block -- and the noised keys of its own canvas block only. Sliding layers additionally keep encoder keys
``k >= p + i·bs - window + 1``: the window is anchored at the block start, the same for every query of the block,
because at inference a sliding layer's cache ends there and retains ``window - 1`` positions (HF's
``DynamicSlidingWindowLayer``; reference/hf_numerics_details.md P3).

All builders are index-based and vectorised on the input tensors' device, with no host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "encoder_mask",
    "block_diffusion_training_mask",
    "decode_inference_mask",
    "to_megatron",
    "to_sdpa",
    "to_additive",
]


def encoder_mask(valid: Tensor, window: int | None) -> Tensor:
    """Causal (optionally sliding-window) mask for the clean encoder pass.

    Positions are the tensor indices, as in HF's ``masking_utils`` (with left padding, HF's mask is on cache
    indices too): query ``q`` sees key ``k`` iff ``k <= q``, ``q - k < window`` on sliding layers, and
    ``valid[b, k]``.

    Args:
        valid: ``[B, S]`` bool, False on padding (never attended).
        window: sliding window of the layer, or None for a full-attention layer.

    Returns:
        ``[B, 1, S, S]`` bool, True = attend. A query that would see nothing (a pad query before any valid key,
        or past the window of all of them) sees only itself.
    """
    _check_window(window)
    S = valid.shape[1]
    pos = torch.arange(S, device=valid.device)
    q, k = pos[:, None], pos[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    allowed = allowed[None] & valid.bool()[:, None, :]  # [B, S, S]
    # Give every fully blocked row its own diagonal, so no softmax row is empty.
    empty = ~allowed.any(dim=-1, keepdim=True)
    return (allowed | (torch.eye(S, dtype=torch.bool, device=valid.device) & empty)).unsqueeze(1)


def block_diffusion_training_mask(
    prefix_lens: Tensor,
    response_lens: Tensor,
    encoder_len: int,
    canvas_len: int,
    block_size: int,
    window: int | None,
    canvas_block_ids: Tensor | None = None,
) -> Tensor:
    """Mask of the training decode: canvas queries over ``[encoder keys ; canvas keys]`` (DESIGN §5).

    Example ``b`` is laid out as in ``diffusion.layout``: the encoder row is its prompt ``[0, p_b)``, its response
    including the EOS fill ``[p_b, p_b + L_b)``, then global pad. By default canvas slot ``j`` holds response
    offset ``j`` (block ``j // bs``). With ``canvas_block_ids`` the canvas may hold any blocks, e.g. only
    the scored ones: canvas block ``c`` (slots ``[c·bs, (c+1)·bs)``) holds response block ``canvas_block_ids[b, c]``,
    so slot ``j`` holds offset ``canvas_block_ids[b, j // bs]·bs + j % bs``.

    A slot is *valid* iff its block id is ``>= 0`` and its offset is ``< L_b``. A valid query of block ``i`` sees:

    - encoder key ``k`` iff ``k < p_b + i·bs`` (prompt, and response keys with ``r // bs < i``, strictly), and on
      sliding layers only if ``k >= p_b + i·bs - window + 1``; never the global pad;
    - canvas key ``j'`` iff ``j'`` is valid and in the same canvas block (bidirectional inside the block, blind
      to every other block).

    An invalid slot (padding or an unused block slot) sees only its own canvas diagonal, so no row is empty.

    Args:
        prefix_lens: ``[B]`` int, prompt length ``p_b``.
        response_lens: ``[B]`` int, response length ``L_b`` including the EOS fill (``p_b + L_b <= S``).
        encoder_len: ``S``, number of encoder keys.
        canvas_len: ``R``, number of canvas slots (may exceed every ``L_b``).
        block_size: ``bs``, the block length.
        window: sliding window of the layer, or None for a full-attention layer.
        canvas_block_ids: optional ``[B, ceil(R / bs)]`` int, the response block held by each canvas block;
            negative = unused. None means canvas block ``c`` holds response block ``c``.

    Returns:
        ``[B, 1, R, S + R]`` bool, True = attend.
    """
    _check_window(window)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    device = prefix_lens.device
    batch = prefix_lens.shape[0]
    if response_lens.shape != (batch,):
        raise ValueError(f"response_lens shape {tuple(response_lens.shape)} != prefix_lens shape {(batch,)}")
    slot = torch.arange(canvas_len, device=device)
    canvas_block = slot // block_size  # [R], the canvas block of each slot
    if canvas_block_ids is None:
        block = canvas_block.expand(batch, canvas_len)
    else:
        num_canvas_blocks = -(-canvas_len // block_size)
        if canvas_block_ids.shape != (batch, num_canvas_blocks):
            raise ValueError(
                f"canvas_block_ids shape {tuple(canvas_block_ids.shape)} != {(batch, num_canvas_blocks)} "
                f"(batch, ceil(canvas_len / block_size))"
            )
        block = canvas_block_ids.to(device).long()[:, canvas_block]  # [B, R], response block of each slot
    offset = block * block_size + slot % block_size  # [B, R], response offset held by each slot
    slot_valid = (block >= 0) & (offset < response_lens.long()[:, None])  # [B, R]

    # Block i's clean context is exactly the encoder prefix [0, p + i·bs): the prompt plus the strictly earlier
    # response blocks (the response keys past it are its own and later blocks, then global pad). This is also
    # where the inference cache ends when block i is decoded, which is why the window is anchored there.
    context_end = (prefix_lens.long()[:, None] + block * block_size)[:, :, None]  # [B, R, 1]
    key = torch.arange(encoder_len, device=device)
    encoder = key < context_end  # [B, R, S]
    if window is not None:
        encoder = encoder & (key >= context_end - window + 1)
    encoder = encoder & slot_valid[:, :, None]

    same_block = canvas_block[:, None] == canvas_block[None, :]  # [R, R]
    canvas = same_block & slot_valid[:, :, None] & slot_valid[:, None, :]
    # Valid rows already hold their diagonal; invalid rows get only it.
    canvas = canvas | torch.eye(canvas_len, dtype=torch.bool, device=device)
    return torch.cat([encoder, canvas], dim=-1).unsqueeze(1)


def decode_inference_mask(
    encoder_valid: Tensor,
    canvas_valid: Tensor | None,
    window: int | None,
    *,
    canvas_len: int | None = None,
) -> Tensor:
    """Mask of an inference decode: one canvas after the ``S`` encoder (KV-cache) positions.

    Mirrors HF generation with its dynamic cache (DESIGN §10, reference/hf_numerics_details.md P3): a full layer
    sees every valid cached key; a sliding layer's cache retains only the last ``window - 1`` positions, so it sees
    the valid keys with index ``k >= S - (window - 1)``. The canvas is bidirectional and never windowed.

    Args:
        encoder_valid: ``[B, S]`` bool, False on cached padding.
        canvas_valid: optional ``[B, R]`` bool; invalid canvas keys are blocked (each row still sees itself).
            None means the whole canvas is valid; then ``canvas_len`` gives ``R``.
        window: sliding window of the layer, or None for a full-attention layer.
        canvas_len: ``R`` when ``canvas_valid`` is None (must agree with it otherwise).

    Returns:
        ``[B, 1, R, S + R]`` bool, True = attend.
    """
    _check_window(window)
    batch, S = encoder_valid.shape
    device = encoder_valid.device
    if canvas_valid is None:
        if canvas_len is None:
            raise ValueError("decode_inference_mask needs canvas_len when canvas_valid is None")
        canvas_valid = torch.ones(batch, canvas_len, dtype=torch.bool, device=device)
    elif canvas_len is not None and canvas_len != canvas_valid.shape[1]:
        raise ValueError(f"canvas_len {canvas_len} != canvas_valid length {canvas_valid.shape[1]}")
    R = canvas_valid.shape[1]
    encoder = encoder_valid.bool()
    if window is not None:
        encoder = encoder & (torch.arange(S, device=device) >= S - (window - 1))
    canvas = canvas_valid.bool()[:, None, :] | torch.eye(R, dtype=torch.bool, device=device)  # [B, R, R]
    return torch.cat([encoder[:, None, :].expand(batch, R, S), canvas], dim=-1).unsqueeze(1)


def to_megatron(allowed: Tensor) -> Tensor:
    """Megatron / Transformer Engine boolean convention: True = **blocked** (``~allowed``)."""
    return ~allowed


def to_sdpa(allowed: Tensor) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` boolean convention: True = attend (the same tensor)."""
    return allowed


def to_additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive float bias (HF eager style): 0 where allowed, ``torch.finfo(dtype).min`` where blocked.

    ``finfo.min`` rather than ``-inf`` so that a fully blocked row gives a uniform softmax, never NaN.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"additive masks need a floating dtype, got {dtype}")
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------------------------------------------
# internals


def _check_window(window: int | None) -> None:
    if window is not None and window < 1:
        raise ValueError(f"window must be None or >= 1, got {window}")
