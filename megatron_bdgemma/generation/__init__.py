"""Native block-diffusion generation: the KV-cached block loop, samplers, and the autoregressive baseline.

    from megatron_bdgemma.generation import generate, parse_sampler
    out = generate(model, input_ids, padding_mask=pad, sampler=parse_sampler("entropy_bound"), max_new_tokens=512)
    out.generated, out.tokens_per_forward

`generate` reproduces HF `DiffusionGemmaForBlockDiffusion.generate` token for token under the same seed
(docs/design.md §10); `EncoderKVCache` / `encode_into` are the cache it runs on.
"""

from megatron_bdgemma.generation.cache import EncoderKVCache, encode_into
from megatron_bdgemma.generation.generate import CanvasCallback, GenerationOutput, generate, left_pad
from megatron_bdgemma.generation.samplers import (
    SAMPLERS,
    Autoregressive,
    CanvasSampler,
    EntropyBound,
    Greedy,
    MaxProbThreshold,
    Sampler,
    build_sampler,
    parse_sampler,
)

__all__ = [
    "SAMPLERS",
    "Autoregressive",
    "CanvasCallback",
    "CanvasSampler",
    "EncoderKVCache",
    "EntropyBound",
    "GenerationOutput",
    "Greedy",
    "MaxProbThreshold",
    "Sampler",
    "build_sampler",
    "encode_into",
    "generate",
    "left_pad",
    "parse_sampler",
]
