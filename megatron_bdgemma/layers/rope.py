"""The one RoPE of the project: HF `rope_parameters` per layer type → (inverse frequencies, cos/sin scale) → tables
from explicit positions, applied rotate-half.

Every RoPE type transformers' Gemma 4 / DiffusionGemma text rotary embedding accepts is computed here as it computes
it (same formulas, same float32 operations, so the tables are bit-equal):

- ``default``: ``theta^(-2j/D)`` over the whole head dim D; ``factor`` is not read.
- ``linear``: the default frequencies divided by ``factor``.
- ``proportional`` (Gemma 4's full layers): the first ``int(partial·D/2)`` pairs get ``theta^(-2j/D)`` with the
  exponent over the **full** D, the remaining pairs frequency 0 (unrotated), all divided by ``factor`` (default 1).
  With D=512 and partial 0.25 the rotated dims are {0..63} ∪ {256..319}; Megatron's ``rotary_percent`` rotates a
  contiguous prefix instead and is not used.
- ``llama3``: default frequencies, long wavelengths divided by ``factor``, a smooth blend between.
- ``yarn``: per-pair blend of the plain and the ``factor``-interpolated frequencies along a ramp between the
  ``beta_fast`` / ``beta_slow`` correction dims; cos/sin scaled by ``attention_factor`` (derived from ``factor``,
  ``mscale``, ``mscale_all_dim`` when absent). The correction range is always rounded outwards: transformers reads
  ``truncate`` from the outer per-layer-type dict, never from a layer type's own parameters, so Gemma 4 ignores it.
- ``dynamic`` (NTK): for a call whose largest position p has ``p + 1 > max_position_embeddings`` the base grows to
  ``theta·(factor·(p+1)/max_pos − (factor−1))^(D/(D−2))``; otherwise the default table.
- ``longrope``: ``short_factor`` divides the frequencies, or ``long_factor`` when ``p + 1 >
  original_max_position_embeddings``; cos/sin scaled by ``attention_factor`` (derived from ``factor`` when absent).

``dynamic`` and ``longrope`` depend on the call's largest position, read from the positions of each call (one host
sync, only for these two types). transformers' ``dynamic`` cache is stateful: after a call beyond
``max_position_embeddings`` it keeps that longer table for later calls up to the same length, and only resets when a
call is shorter than ``max_position_embeddings``. We do not reproduce that history: each call uses the table of its
own largest position, which equals transformers on the first call and whenever calls never get shorter.

A ``partial_rotary_factor`` below 1 is honoured by ``proportional`` only. transformers' other types shorten the
table to the partial dim (it then no longer fits the head and HF fails, or, for Gemma 4's ``default``, silently
ignores it), so it is refused for them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

ROPE_TYPES = ("default", "linear", "proportional", "dynamic", "yarn", "longrope", "llama3")
"""The text RoPE types transformers' Gemma 4 / DiffusionGemma rotary embeddings build (its `ROPE_INIT_FUNCTIONS`
plus `default`); anything else (e.g. the vision tower's `axial`) fails there and is refused here."""

LENGTH_DEPENDENT = ("dynamic", "longrope")
"""Types whose table depends on the largest position of the call."""

_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
}


def default_rope_parameters() -> dict[str, dict[str, Any]]:
    """Gemma 4's own: default θ=1e4 on sliding layers, proportional θ=1e6 over a quarter of the head on full ones."""
    return {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }


def rope_problems(params: Mapping[str, Any], head_dim: int, where: str) -> list[str]:
    """What makes `params` (one layer type's HF rope parameters) unusable, each naming `where` and the key."""
    kind = params.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        return [f"{where}.rope_type {kind!r} is not a text RoPE type of HF Gemma 4 (supported: {', '.join(ROPE_TYPES)})"]
    problems = [f"{where}: {kind!r} RoPE needs {key!r}" for key in _REQUIRED.get(kind, ()) if key not in params]
    if "rope_theta" not in params:
        problems.append(f"{where}: 'rope_theta' is missing")
    partial = float(params.get("partial_rotary_factor", 1.0))
    if kind != "proportional" and partial != 1.0:
        problems.append(f"{where}: {kind!r} RoPE with partial_rotary_factor {partial} (only 'proportional' RoPE "
                        "rotates part of the head)")
    if kind == "longrope" and not problems:
        for key in ("short_factor", "long_factor"):
            if len(params[key]) != head_dim // 2:
                problems.append(f"{where}.{key} has {len(params[key])} entries, expected head_dim / 2 = {head_dim // 2}")
    return problems


def rope_frequencies(
    params: Mapping[str, Any], head_dim: int, max_position_embeddings: int, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """(inverse frequencies `[head_dim / 2]` fp32, cos/sin scale) of one layer type's HF rope parameters.

    `seq_len` (largest position + 1 of the call) matters for `LENGTH_DEPENDENT` types only; None gives the table
    transformers builds at init. Parameters are assumed valid (`rope_problems`).
    """
    kind = params.get("rope_type", "default")
    theta = params["rope_theta"]
    # theta^(2j/D) of every pair, as transformers computes it (int64 arange cast to fp32, pow in fp32).
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    plain = 1.0 / (theta**exponents)

    if kind == "default":
        return plain, 1.0
    if kind == "linear":
        return plain / params["factor"], 1.0
    if kind == "proportional":
        rotated = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
        inv = 1.0 / (theta ** (torch.arange(0, 2 * rotated, 2, dtype=torch.int64).float() / head_dim))
        inv = torch.cat([inv, torch.zeros(head_dim // 2 - rotated)])
        return inv / params.get("factor", 1.0), 1.0
    if kind == "dynamic":
        if seq_len is None or seq_len <= max_position_embeddings:
            return plain, 1.0  # (factor·L/L − (factor−1)) = 1: transformers' init table, kept up to max positions
        # transformers grows the base from the call's length as an fp32 tensor; do the same arithmetic.
        length = torch.tensor(seq_len, dtype=torch.int64)
        factor = params["factor"]
        grown = theta * ((factor * length / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / (grown**exponents), 1.0
    if kind == "llama3":
        return _llama3(plain, params), 1.0
    if kind == "yarn":
        return _yarn(theta, head_dim, max_position_embeddings, params)
    if kind == "longrope":
        return _longrope(theta, exponents, max_position_embeddings, params, seq_len)
    raise ValueError(f"rope_type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")


def _llama3(plain: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
    """Llama 3.1: wavelengths shorter than `original/high_freq_factor` keep their frequency, longer than
    `original/low_freq_factor` are divided by `factor`, and the band between is blended linearly in
    `original / wavelength`."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    original = params["original_max_position_embeddings"]
    wavelength = 2 * math.pi / plain
    scaled = torch.where(wavelength > original / low, plain / factor, plain)
    blend = (original / wavelength - low) / (high - low)
    blended = (1 - blend) * scaled / factor + blend * scaled
    in_band = ~(wavelength < original / high) * ~(wavelength > original / low)
    return torch.where(in_band, blended, scaled)


def _yarn(theta: float, head_dim: int, max_position_embeddings: int, params: Mapping[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN: high-frequency pairs extrapolate (plain frequency), low-frequency ones interpolate (divided by
    `factor`), with a linear ramp over the pairs between the dims that turn `beta_fast` and `beta_slow` times in the
    original context; cos/sin are scaled by the attention factor."""
    original = params["original_max_position_embeddings"]
    factor = params["factor"] if params["factor"] is not None else max_position_embeddings / original

    def mscale(scale: float, weight: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        weight, weight_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = float(mscale(factor, weight) / mscale(factor, weight_all)) if weight and weight_all else mscale(factor)
    fast, slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def pair_turning(rotations: float) -> float:  # the (fractional) dim whose wavelength fits `rotations` times
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(pair_turning(fast)), 0)
    high = min(math.ceil(pair_turning(slow)), head_dim - 1)
    if low == high:
        high += 0.001  # a one-dim ramp would divide by zero
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    wavelengths = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    keep = 1 - ramp  # weight of the extrapolated (plain) frequency
    inv = 1.0 / (factor * wavelengths) * (1 - keep) + 1.0 / wavelengths * keep
    return inv, attention


def _longrope(
    theta: float, exponents: torch.Tensor, max_position_embeddings: int, params: Mapping[str, Any], seq_len: int | None
) -> tuple[torch.Tensor, float]:
    """LongRoPE: per-pair divisors, the long set once the call passes the original context; cos/sin scaled by
    `attention_factor`, by default `sqrt(1 + ln(factor) / ln(original))`."""
    original = params["original_max_position_embeddings"]
    factor = params.get("factor")
    if factor is None:
        factor = max_position_embeddings / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    divisors = params["long_factor"] if seq_len is not None and seq_len > original else params["short_factor"]
    return 1.0 / (torch.tensor(divisors, dtype=torch.float32) * theta**exponents), attention


def rope_tables(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[S, B, 1, D]` for positions `[B, S]`, times `scale` (yarn's / longrope's attention factor).

    Angles are computed in fp32 and then cast to the activation dtype, as HF does (so bf16 runs match HF's rounding).
    """
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq.to(position_ids.device)  # [B, S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1).transpose(0, 1)[:, :, None, :]  # [S, B, 1, D]
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


class RotaryTables(torch.nn.Module):
    """cos/sin per layer type of a `BDGemmaConfig`: fixed tables are kept as buffers (they follow `.to()`), the
    `LENGTH_DEPENDENT` ones are rebuilt from each call's largest position."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.max_position_embeddings = config.max_position_embeddings
        self.layers = {t: (config.rope_parameters[t], config.head_dim_of(t)) for t in sorted(set(config.layer_types))}
        self.scale: dict[str, float] = {}
        for layer_type, (params, head_dim) in self.layers.items():
            inv_freq, self.scale[layer_type] = rope_frequencies(params, head_dim, self.max_position_embeddings)
            self.register_buffer(f"inv_freq_{layer_type}", inv_freq, persistent=False)

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype, length: int | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin `[S, B, 1, D]` per layer type for positions `[B, S]`. `length`: the call's largest position + 1
        when `position_ids` are only part of the call (a context-parallel shard, docs/design.md §14: every rank must
        scale as the whole row does); default read from `position_ids`."""
        tables = {}
        for layer_type, (params, head_dim) in self.layers.items():
            inv_freq, scale = getattr(self, f"inv_freq_{layer_type}"), self.scale[layer_type]
            if params.get("rope_type") in LENGTH_DEPENDENT:
                seq_len = int(position_ids.max()) + 1 if length is None else length
                inv_freq, scale = rope_frequencies(params, head_dim, self.max_position_embeddings, seq_len)
            tables[layer_type] = rope_tables(position_ids, inv_freq, dtype, scale)
        return tables


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[S, B, heads, D]` by tables `[S, B, 1, D]`."""
    return x * cos + rotate_half(x) * sin
