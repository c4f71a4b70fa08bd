"""Layer specs as data: which module fills each slot of the Gemma 4 MoE layer, per backend.

`local` (Megatron's parallel linears, as `layers.linear` subclasses that skip their TP glue at inference on one TP
rank; experts as `GroupedGemmMLP`, one `torch._grouped_mm` per projection,
or Megatron's `SequentialMLP`, one MLP per expert, with `moe_grouped_gemm=False`; same parameters and checkpoints)
always works, CPU included. `te` swaps in Transformer Engine linears and grouped-GEMM experts through Megatron's
`TESpecProvider`; it is import-guarded and only used on GPU. Both run the core attention chosen by `BDGemmaConfig.attention_impl` (`layers.core_attention`):
the block-diffusion masks are rules that Megatron's and TE's mask types cannot express.
"""

from __future__ import annotations

import importlib.util
from functools import partial
from typing import Literal

from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.models.gpt.moe_module_specs import _build_shared_experts
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_bdgemma.config import BDGemmaConfig
from megatron_bdgemma.layers.attention import BDGemmaAttention, BDGemmaAttentionSubmodules
from megatron_bdgemma.layers.core_attention import CORE_ATTENTION
from megatron_bdgemma.layers.grouped_experts import GroupedGemmMLP
from megatron_bdgemma.layers.layer import BDGemmaLayer, BDGemmaLayerSubmodules
from megatron_bdgemma.layers.linear import ColumnParallelLinear, RowParallelLinear
from megatron_bdgemma.layers.moe import BDGemmaMoELayer, BDGemmaRouter
from megatron_bdgemma.layers.norm import RMSNorm

Backend = Literal["local", "te"]


class _LocalSpecProvider(LocalSpecProvider):
    """Megatron's local provider with our `layers.linear` parallel linears."""

    def column_parallel_linear(self) -> type:
        return ColumnParallelLinear

    def row_parallel_linear(self) -> type:
        return RowParallelLinear


def _provider(backend: Backend) -> BackendSpecProvider:
    if backend == "local":
        return _LocalSpecProvider()
    if backend == "te":
        # megatron-core imports its TE provider without Transformer Engine too (it stands mocks in for TE's classes,
        # which then fail deep inside layer construction), so ask for the package itself.
        if importlib.util.find_spec("transformer_engine") is None:
            raise ImportError("backend='te' needs Transformer Engine, which is not installed: pip install -e .[te] "
                              "(or pip install 'megatron_bdgemma[te]'); backend='local' runs without it")
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    raise ValueError(f"unknown backend {backend!r}: expected 'local' or 'te'")


def get_glu_mlp_submodules(backend: Backend = "local") -> MLPSubmodules:
    """The dense GeGLU (the layers' shared expert and the self-conditioning MLP)."""
    provider = _provider(backend)
    return MLPSubmodules(linear_fc1=provider.column_parallel_linear(), linear_fc2=provider.row_parallel_linear())


def get_experts_spec(backend: Backend = "local", grouped_gemm: bool = True) -> partial:
    """The routed experts: TE's grouped MLP on `te`; on `local` `GroupedGemmMLP` (grouped GEMM) or `SequentialMLP`."""
    if backend == "te":
        return _provider(backend).grouped_mlp_modules(True)
    return partial(GroupedGemmMLP if grouped_gemm else SequentialMLP, submodules=get_glu_mlp_submodules(backend))


def get_bdgemma_layer_spec(
    backend: Backend = "local", attention_impl: str = "eager", grouped_gemm: bool = True
) -> ModuleSpec:
    """Spec of one `BDGemmaLayer` (per-layer geometry comes from the config, not the spec)."""
    provider = _provider(backend)
    mlp = get_glu_mlp_submodules(backend)
    moe = partial(
        BDGemmaMoELayer,
        submodules=MoESubmodules(
            experts=get_experts_spec(backend, grouped_gemm),
            shared_experts=partial(_build_shared_experts, submodules=mlp),
            router=BDGemmaRouter,
        ),
    )
    attention = ModuleSpec(
        module=BDGemmaAttention,
        submodules=BDGemmaAttentionSubmodules(
            linear_qkv=provider.column_parallel_linear(),
            core_attention=CORE_ATTENTION[attention_impl],
            linear_proj=provider.row_parallel_linear(),
            q_layernorm=RMSNorm,
            k_layernorm=RMSNorm,
        ),
    )
    return ModuleSpec(
        module=BDGemmaLayer,
        submodules=BDGemmaLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=attention,
            post_attention_layernorm=RMSNorm,
            pre_feedforward_layernorm=RMSNorm,
            pre_feedforward_layernorm_2=RMSNorm,
            mlp=moe,
            post_feedforward_layernorm_1=RMSNorm,
            post_feedforward_layernorm_2=RMSNorm,
            post_feedforward_layernorm=RMSNorm,
        ),
    )


def get_bdgemma_block_spec(
    config: BDGemmaConfig, backend: Backend = "local", vp_stage: int | None = None, pp_rank: int | None = None
) -> TransformerBlockSubmodules:
    """The layers of this pipeline stage plus the final RMSNorm."""
    layer = get_bdgemma_layer_spec(backend, config.attention_impl, config.moe_grouped_gemm)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage, pp_rank), layer_norm=RMSNorm
    )
