"""Routed experts of the `local` spec as one grouped GEMM per projection (`torch._grouped_mm`).

`SequentialMLP` runs each local expert as its own `MLP`: per expert two parallel linears, the GLU and the prob
scaling, so a layer with E local experts issues ~6·E small kernels and as many module calls. `GroupedGemmMLP`
keeps `SequentialMLP`'s parameters (`local_experts.{e}.linear_fc{1,2}.weight`, the same TP shards), so its
state dict, sharded state dict (interchangeable with `TEGroupedMLP`'s by Megatron's own contract), the HF key map
and the EP/TP layouts are `SequentialMLP`'s unchanged; only the forward differs: all local experts' fc1 in one
grouped GEMM over the permuted tokens, one GLU + prob scaling, all fc2 in a second grouped GEMM.

The experts' linears are built with `is_expert=True`, so under TP or EP they communicate nothing themselves (the
token dispatcher gathers and reduces), which is why plain matmuls on the local shards are the same computation.
Each forward stacks the experts' weights afresh (a copy of all of them); `stacked_weights_held(model)` stacks them
once for a span of inference forwards (a generation), where restacking was the largest glue cost of a
small-canvas decode. Where `torch._grouped_mm` cannot run (no such op, a dtype/device it lacks, a width that breaks its 16-byte stride
rule, FP8, biases, fused activations) the forward is `SequentialMLP`'s.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_bdgemma.layers.linear import glu, glu_is_megatrons

__all__ = ["GroupedGemmMLP", "stacked_weights_held"]

_PROJECTIONS = ("linear_fc1", "linear_fc2")


class GroupedGemmMLP(SequentialMLP):
    """`SequentialMLP` with all local experts in one grouped GEMM per projection (see module docstring)."""

    # {projection: stacked weights `[E, in, out]`} while `stacked_weights_held` holds them, else None.
    _held_stacks: dict[str, torch.Tensor] | None = None

    def forward(
        self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        """Tokens sorted by local expert `[T, H]`, counts `[E_local]`, probs `[T]` → (expert outputs `[T, H]`, None)."""
        hidden = permuted_local_hidden_states
        if not self._grouped_gemm_runs(hidden):
            return super().forward(hidden, tokens_per_expert, permuted_probs)
        # Stacked per call unless held: each expert's weights stay their own parameters, and autograd returns each
        # expert's gradient slice to its own parameter through the stack.
        stacks = self._held_stacks if self._held_stacks is not None else self.stacked_weights()
        fc1, fc2 = stacks["linear_fc1"], stacks["linear_fc2"]  # [E, H, 2I], [E, I, H]
        group_ends = torch.cumsum(torch.as_tensor(tokens_per_expert, device=hidden.device), 0, dtype=torch.int32)
        intermediate = glu(_grouped_matmul(hidden, fc1, group_ends), self.config)
        intermediate = (intermediate * permuted_probs.unsqueeze(-1)).to(hidden.dtype)
        return _grouped_matmul(intermediate, fc2, group_ends), None

    def stacked_weights(self) -> dict[str, torch.Tensor]:
        """{projection: the local experts' weights stacked and transposed to `[E, in, out]`}."""
        return {
            fc: torch.stack([getattr(expert, fc).weight for expert in self.local_experts]).transpose(1, 2)
            for fc in _PROJECTIONS
        }

    def _grouped_gemm_runs(self, hidden: torch.Tensor) -> bool:
        """Whether the grouped path computes exactly what `SequentialMLP.forward` would, on this input (decided once
        per device, dtype and width: a decode asks at every layer)."""
        key = (hidden.device, hidden.dtype, hidden.shape[-1])
        runs = self._grouped_gemm_decisions.get(key)
        if runs is None:
            runs = self._grouped_gemm_decisions[key] = self._grouped_gemm_supports(hidden)
        return runs

    @functools.cached_property
    def _grouped_gemm_decisions(self) -> dict[tuple[torch.device, torch.dtype, int], bool]:
        return {}

    def _grouped_gemm_supports(self, hidden: torch.Tensor) -> bool:
        config = self.config
        if not hasattr(torch, "_grouped_mm") or not glu_is_megatrons(config):
            return False
        if config.add_bias_linear or config.fp8 or config.fp4 or config.moe_apply_probs_on_input:
            return False
        if hidden.device.type == "cuda":
            supported = hidden.dtype == torch.bfloat16 and torch.cuda.get_device_capability(hidden.device) >= (9, 0)
        else:
            supported = hidden.device.type == "cpu" and hidden.dtype in (torch.float32, torch.bfloat16)
        # `_grouped_mm` needs every row stride to be a multiple of 16 bytes.
        intermediate = self.local_experts[0].linear_fc2.weight.shape[1]
        aligned = all(width * hidden.element_size() % 16 == 0 for width in (hidden.shape[-1], intermediate))
        return supported and aligned


@contextmanager
def stacked_weights_held(model: torch.nn.Module) -> Iterator[None]:
    """Within: every `GroupedGemmMLP` in `model` uses its experts' weights as stacked on entry, instead of stacking
    them per forward. Inference only (the stacks carry no gradient, and later weight updates would not reach them):
    entering with grad enabled is an error."""
    if torch.is_grad_enabled():
        raise RuntimeError("stacked_weights_held is for inference (enter it under torch.no_grad/inference_mode)")
    experts = [module for module in model.modules() if isinstance(module, GroupedGemmMLP)]
    for module in experts:
        module._held_stacks = module.stacked_weights()
    try:
        yield
    finally:
        for module in experts:
            module._held_stacks = None


def _grouped_matmul(tokens: torch.Tensor, weights: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    """Rows of group g (`group_ends[g-1]:group_ends[g]`) of `tokens` `[T, K]` times `weights[g]` `[K, N]` → `[T, N]`."""
    out = torch._grouped_mm(tokens, weights, offs=group_ends)
    if out.requires_grad:
        # The op's backward rejects gradients with zero strides (an expanded `sum()` gradient, say).
        out.register_hook(torch.Tensor.contiguous)
    return out
