"""Megatron's parallel linears for the `local` spec, with a plain matmul for inference at TP = 1.

A Megatron linear's forward is Python around one matmul: the copy-to / reduce-from region autograd functions
(identities at TP = 1), the linear's own autograd function and its process-group lookups. On small token counts
(a 32-token canvas decode) that glue costs more than the matmul. Outside autograd with one tensor-parallel rank
none of it does anything, so these subclasses run `matmul(x, Wᵀ)` (+ bias) directly there, the same product
Megatron's linear function computes; with grad enabled or TP > 1 they are Megatron's.

The same holds one level up: a dense GLU `MLP` built from these linears is, there, two matmuls around the gated
unit, and `plain_glu_mlp` runs it so, without `MLP.forward`'s own glue (a tenth of a small decode's dense branch).

`RowParallelLinear` also hands its tensor-parallel group to the linear function: Megatron's forward passes
`tp_group=None`, so every call falls back to the default group with a `DeprecationWarning` (whose machinery ran
on every forward, and which Dynamo cannot trace). The group is unused there (no sequence-parallel gather, no
dgrad all-reduce in a row-parallel linear), so passing it changes nothing else.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_pg_size


def runs_plain(tp_size: int) -> bool:
    """Whether a parallel linear's forward is its matmul alone: one tensor-parallel rank, outside autograd."""
    return tp_size == 1 and not torch.is_grad_enabled()


def plain_forward(
    linear: torch.nn.Module, input_: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(output, output bias) as the parallel linear `linear` returns them, by one matmul (where `runs_plain`)."""
    output = torch.nn.functional.linear(input_, weight)  # without a bias, aten's linear is `matmul(input, Wᵀ)`
    bias = linear.bias
    if bias is None:
        return output, None
    return (output, bias) if linear.skip_bias_add else (output + bias, None)


def glu_is_megatrons(config: TransformerConfig) -> bool:
    """Whether `glu` computes Megatron's MLP activation under `config`: a gated unit, no fused or TE activation."""
    return config.gated_linear_unit and not (config.bias_activation_fusion or config.use_te_activation_func)


def glu(projected: torch.Tensor, config: TransformerConfig) -> torch.Tensor:
    """Megatron's gated linear unit of an fc1 output `[..., 2I]` → `[..., I]`: activation(gate) · linear, with the
    config's clamp and linear offset (an offset of 0 adds nothing, so it is skipped)."""
    gate, linear = projected.chunk(2, dim=-1)
    if (clamp := config.activation_func_clamp_value) is not None:
        gate, linear = gate.clamp(max=clamp), linear.clamp(min=-clamp, max=clamp)
    if config.glu_linear_offset:
        linear = linear + config.glu_linear_offset
    return config.activation_func(gate) * linear


def plain_glu_mlp(mlp: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor | None:
    """A dense GLU `MLP`'s output as `MLP.forward` computes it, by two matmuls, where that is all it does (module
    docstring): bias-free linears of this module at TP = 1, outside autograd, no fused activation and no gate. None
    elsewhere: run the module."""
    fc1, fc2, config = mlp.linear_fc1, mlp.linear_fc2, mlp.config
    plain = (
        isinstance(fc1, ColumnParallelLinear) and isinstance(fc2, RowParallelLinear) and runs_plain(fc1.tp_size)
        and fc1.bias is None and fc2.bias is None and glu_is_megatrons(config)
        and not getattr(mlp, "use_shared_expert_gate", False)
    )
    if not plain:
        return None
    return torch.nn.functional.linear(glu(torch.nn.functional.linear(input_, fc1.weight), config), fc2.weight)


class ColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    """Megatron's `ColumnParallelLinear`; one matmul outside autograd at TP = 1 (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tp_size = get_pg_size(self.tp_group)

    def forward(
        self, input_: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if weight is None and self.weight is not None and runs_plain(self.tp_size):
            return plain_forward(self, input_, self.weight)
        return super().forward(input_, weight, runtime_gather_output)


class RowParallelLinear(tensor_parallel.RowParallelLinear):
    """Megatron's `RowParallelLinear` with its group passed to the linear function; one matmul outside autograd at
    TP = 1 (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tp_size = get_pg_size(self.tp_group)

    def _forward_impl(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Megatron's `forward` passes tp_group=None here (module docstring).
        return super()._forward_impl(*args, **(kwargs | {"tp_group": self.tp_group}))

    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if runs_plain(self.tp_size):
            return plain_forward(self, input_, self.weight)
        return super().forward(input_)
