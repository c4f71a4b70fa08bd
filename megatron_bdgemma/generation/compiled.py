"""The parts of a denoising step that `generate(..., compile=True)` runs under `torch.compile`: the canvas forward
(`BDGemmaModel.decode`) and the vocabulary-wide passes after the temperature (`distribution`).

The distribution (softmax, entropy, argmax over `[B, R, V]`) is half a dozen full passes eagerly; inductor fuses
them into one or two (3.9 ms instead of 8.8 ms at [2, 256, 2048] fp32 on one CPU thread). Default mode on every
device: its outputs live into the next step, which CUDA graphs' output reuse would overwrite.

What compiles: the whole decode (self-conditioning input, every layer's norms, attention over its `KVBuffer`, dense
MLP, final norm, LM head, softcap) except each MoE layer's routing → routed experts → combine, which runs eagerly
(`BDGemmaMoELayer._sorted_experts` at EP = TP = 1, else `_dispatched_experts`: data-dependent token counts); so a
decode is a few graphs per layer rather than one.

Shapes: the canvas is static; the encoder prefix grows by one canvas per canvas. Dynamo's automatic dynamic shapes
recompile once when the prefix first changes (second canvas) with the prefix symbolic, and later canvases reuse
those graphs. Each layer geometry (sliding / full) and each mask state (its additive bias built at a canvas's first
decode, then cached) is its own graph, hence the raised recompile limit.

Mode: on CUDA `reduce-overhead` (CUDA graphs: a decode is thousands of small kernel launches), elsewhere inductor's
default. Compiling happens at the first decodes (the first two canvases), so it pays only over many canvases.
Untested on a GPU: each graph writes its layer's canvas K/V into a `KVBuffer` input in place, and cudagraph trees
skip graphs that mutate inputs they do not own, so there it may fuse without graphing (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from megatron_bdgemma.generation.samplers import entropy
from megatron_bdgemma.model import BDGemmaModel

__all__ = ["compiled_decode", "compiled_distribution", "distribution"]

# Graphs per frame: 2 layer geometries x first/later decode of a canvas x static/dynamic prefix, with room for
# the stopped-rows batch sizes (the live rows are a new batch dimension until it too turns dynamic).
_RECOMPILE_LIMIT = 32


def compiled_decode(model: BDGemmaModel) -> Callable[..., Tensor]:
    """`model.decode` compiled (see module docstring): same arguments, same `[B, R, V]` fp32 logits.

    Made once per model and kept on it, so later `generate` calls reuse its graphs.
    """
    decode = getattr(model, "_compiled_decode", None)
    if decode is None:
        device = next(model.parameters()).device
        compiled = torch.compile(model.decode, mode="reduce-overhead" if device.type == "cuda" else None)

        def decode(*args, **kwargs) -> Tensor:
            with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
                return compiled(*args, **kwargs)

        model._compiled_decode = decode
    return decode


def distribution(processed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Tempered logits `[B, R, V]` → (fp32 softmax `[B, R, V]`, its entropy `[B, R]`, argmax `[B, R]`)."""
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    return probs, entropy(processed, probs), processed.argmax(dim=-1)


_compiled_distribution: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]] | None = None


def compiled_distribution() -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]:
    """`distribution` compiled, made once per process (it holds no weights)."""
    global _compiled_distribution
    if _compiled_distribution is None:
        _compiled_distribution = torch.compile(distribution)
    return _compiled_distribution
