"""Gemma 4's MoE block on Megatron's `MoELayer`: the dense GeGLU as shared expert, a Gemma router, three inputs.

Stock Megatron feeds one input to router, experts and shared experts and adds the shared output un-normed. Gemma 4
routes on the raw residual `h`, feeds the experts `pre_feedforward_layernorm_2(h)` and the dense branch
`pre_feedforward_layernorm(h)`, and post-norms each branch before the sum. So `BDGemmaMoELayer.forward` takes the
three inputs and returns the two branch outputs; the layer applies the norms.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

from megatron_bdgemma.layers.linear import plain_glu_mlp
from megatron_bdgemma.layers.norm import cast
from megatron_bdgemma.precision import compute_dtype


class BDGemmaRouter(TopKRouter):
    """`softmax_fp32(W · (rmsnorm_noscale(h) * scale * H^-0.5))` → top-k → renormalised to sum 1, from the
    `rmsnorm_noscale(h)` the layer computes once for this and both pre-FFN norms.

    HF's `per_expert_scale[e]` multiplies expert e's output, which is linear in its fc2, so it is folded into fc2
    on import (exact) and trains with it; the router itself is frozen in training (`freeze()`).
    """

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False) -> None:
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self.scale = torch.nn.Parameter(torch.ones(config.hidden_size, dtype=config.params_dtype))
        self.scale.sequence_parallel = config.sequence_parallel

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`rms_normalize(h)` `[S, B, H]` (the layer normalises h once for this and both pre-FFN norms) →
        (probs, routing_map), each `[S*B, E]`; probs is zero off the routing map."""
        top_weights, top_index = self.top_k(input)
        shape = (top_index.shape[0], self.config.num_moe_experts)
        routing_map = torch.zeros(shape, dtype=torch.bool, device=input.device).scatter(1, top_index, True)
        probs = torch.zeros(shape, dtype=top_weights.dtype, device=input.device).scatter(1, top_index, top_weights)
        return probs, routing_map

    def top_k(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`rms_normalize(h)` `[S, B, H]` → (weights, expert indices), each `[S*B, k]`, the weights summing to 1."""
        dtype = compute_dtype(input.dtype)  # fp32 as HF's router; float64 in a float64 model
        x = cast(input, dtype) * cast(self.scale, dtype) * self.config.hidden_size**-0.5
        logits = torch.nn.functional.linear(x, cast(self.weight, dtype)).view(-1, self.config.num_moe_experts)
        probs = torch.softmax(logits, dim=-1)
        top_weights, top_index = torch.topk(probs, k=self.topk, dim=-1)
        return top_weights / top_weights.sum(dim=-1, keepdim=True), top_index

    def freeze(self) -> None:
        """DiffusionGemma's recipe trains with a frozen router (and no aux loss)."""
        self.weight.requires_grad_(False)
        self.scale.requires_grad_(False)


class BDGemmaMoELayer(MoELayer):
    """Megatron MoE with Gemma's separate router / expert / dense inputs (see module docstring).

    Expert weights are initialised apart from the rest of the model, so random init does not depend on the expert
    layout: Megatron draws each rank's local experts from one RNG stream (or a per-EP-rank tracker on GPU), which
    makes EP=2 start from other weights than one process, and shifts every parameter drawn after the experts.
    Here the experts are built with the RNG state put back afterwards, and each global expert is then drawn whole
    from its own seed (the run seed, layer number, expert index) and sliced to this rank's expert-TP shard.
    """

    def __init__(self, config: TransformerConfig, submodules: MoESubmodules, layer_number: int | None = None,
                 **kwargs: Any) -> None:
        submodules = dataclasses.replace(submodules, experts=partial(_built_apart, submodules.experts))
        super().__init__(config, submodules, layer_number=layer_number, **kwargs)
        if layer_number is not None:
            self._initialise_experts_by_global_index()

    @torch.no_grad()
    def _initialise_experts_by_global_index(self) -> None:
        config = self.config
        local_weights = _local_expert_weights(self.experts)
        if not config.perform_initialization or any(w.is_meta for ws in local_weights for w in ws.values()):
            return
        rank = parallel_state.get_expert_tensor_parallel_rank()
        size = parallel_state.get_expert_tensor_parallel_world_size()
        base = torch.initial_seed()  # the run seed (train.seed), the same on every rank
        for global_index, weights in zip(self.local_expert_indices, local_weights, strict=True):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(((base * 1_000_003 + self.layer_number) * 10_007 + global_index) % (1 << 63))
                for fc, init in (("linear_fc1", config.init_method), ("linear_fc2", config.output_layer_init_method)):
                    weight = weights[fc]
                    dim = getattr(weight, "partition_dim", 0)
                    sharded = getattr(weight, "tensor_model_parallel", False) and size > 1
                    shape = list(weight.shape)
                    if sharded:
                        shape[dim] *= size
                    full = torch.empty(shape, dtype=torch.float32)
                    init(full)
                    if sharded and fc == "linear_fc1":  # a GLU shard holds [gate_r ; up_r]
                        gate, up = full.chunk(2, dim=0)
                        full = torch.cat([gate.chunk(size, dim)[rank], up.chunk(size, dim)[rank]], dim=0)
                    elif sharded:
                        full = full.chunk(size, dim)[rank]
                    weight.copy_(full)

    def forward(
        self, router_input: torch.Tensor, expert_input: torch.Tensor, dense_input: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs `[S, B, H]`: the router's `rms_normalize(h)` (fp32, or float64 in a float64 model) and the two
        pre-normed branch inputs → (dense branch output, weighted expert sum), each `[S, B, H]`."""
        dense_output = plain_glu_mlp(self.shared_experts, dense_input)
        if dense_output is None:
            dense_output = self.shared_experts_compute(dense_input)
        if not torch.is_grad_enabled() and self.token_dispatcher.tp_size == self.token_dispatcher.ep_size == 1:
            return dense_output, self._sorted_experts(router_input, expert_input)
        probs, routing_map = self.route(router_input)
        hidden, probs = self.preprocess(expert_input, probs, routing_map)
        if hidden.requires_grad and isinstance(self.token_dispatcher, MoEAllGatherTokenDispatcher):
            # The all-gather dispatcher's backward reduce-scatters this tensor's gradient into megatron's shared
            # global buffer. Our router / expert / dense inputs come from different norms, so autograd may run a
            # sequence-parallel linear's backward (which reuses that buffer) before the gradient is consumed:
            # copy it out at once (measured: wrong gradients under TP=2 + SP without this).
            hidden.register_hook(torch.clone)
        return dense_output, self._dispatched_experts(hidden, probs)

    # Both expert paths run eagerly under `torch.compile` (the compiled decode, generation/compiled.py): token counts
    # per expert are data dependent (host syncs, output shapes from `masked_select`), the dispatcher keeps per-call
    # state between dispatch and combine, so tracing would split the graph at each of their steps anyway; and the
    # grouped GEMM has no fp32 fake kernel.
    @torch.compiler.disable
    def _sorted_experts(self, router_input: torch.Tensor, expert_input: torch.Tensor) -> torch.Tensor:
        """Routed experts without the token dispatcher, for inference with every expert whole on this rank.

        There the dispatcher's permutation is a stable sort of the (token, choice) pairs by expert and its combine
        an index-add in that order: done here directly, the same products summed in the same order (so the same
        values, tests/test_grouped_experts.py), without the routing-map round trip and the per-call bookkeeping
        that were a third of a small decode's MoE ops.
        """
        weights, choices = self.router.top_k(router_input)
        choices = choices.flatten()
        order = choices.argsort(stable=True)
        tokens = order // self.router.topk  # the token of each sorted pair
        hidden = expert_input.view(-1, expert_input.shape[-1])
        counts = torch.bincount(choices, minlength=self.config.num_moe_experts)
        output, _ = self.experts(hidden.index_select(0, tokens), counts, weights.flatten().index_select(0, order))
        return output.new_zeros(hidden.shape).index_add_(0, tokens, output).view_as(expert_input)

    @torch.compiler.disable
    def _dispatched_experts(self, hidden: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Dispatch → routed experts → combine: preprocessed tokens, probs → weighted expert sum `[S, B, H]`."""
        hidden, probs = self.dispatch(hidden, probs)
        if self.moe_layer_recompute and self.training and torch.is_grad_enabled():
            expert_output = self._recomputed_experts(hidden, probs)
        else:
            expert_output, _ = self.routed_experts_compute(hidden, probs)
        return self.token_dispatcher.combine_postprocess(self.combine(expert_output))

    def _recomputed_experts(self, hidden: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """`routed_experts_compute` under selective recompute (`recompute_modules` has moe): the experts' fc1,
        activation and fc2 run again in backward. Only the experts module is checkpointed: the dispatcher keeps
        per-call state (routing map, permutation) that its combine clears, so its steps cannot be replayed; and
        unlike Megatron's `moe` recompute, no dispatch or combine communication is repeated."""
        dispatched, tokens_per_expert, permuted_probs = self.token_dispatcher.dispatch_postprocess(hidden, probs)
        output, _ = torch.utils.checkpoint.checkpoint(
            self.experts, dispatched, tokens_per_expert, permuted_probs, use_reentrant=False
        )
        return self.token_dispatcher.combine_preprocess(output)

def _built_apart(build: Any, *args: Any, **kwargs: Any) -> torch.nn.Module:
    """Build the experts with the RNG state restored afterwards: what is drawn after them does not depend on how
    many of them this rank holds."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        return build(*args, **kwargs)


def _local_expert_weights(experts: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    """{"linear_fc1": w, "linear_fc2": w} per local expert: `SequentialMLP` (local) or `TEGroupedMLP` (te)."""
    if hasattr(experts, "local_experts"):
        return [{fc: getattr(e, fc).weight for fc in ("linear_fc1", "linear_fc2")} for e in experts.local_experts]
    return [{fc: getattr(getattr(experts, fc), f"weight{i}") for fc in ("linear_fc1", "linear_fc2")}
            for i in range(experts.num_local_experts)]
