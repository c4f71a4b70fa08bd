"""Contract: the `local` spec's parallel linears (`layers/linear.py`) return what Megatron's return, bit for bit, on
their plain-matmul path (TP = 1, no autograd) and on Megatron's (grad enabled); the row linear's forward no longer
warns that its group is None; and `plain_glu_mlp` returns Megatron `MLP.forward`'s output bit for bit where it runs
(and declines under autograd)."""

from __future__ import annotations

import warnings

import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.mlp import MLP

from megatron_bdgemma.config import tiny
from megatron_bdgemma.layers import linear
from megatron_bdgemma.spec import get_glu_mlp_submodules


@pytest.mark.parametrize("kind", ["ColumnParallelLinear", "RowParallelLinear"])
def test_linear_matches_megatron(model_parallel, kind):
    config = tiny()
    options = dict(config=config, init_method=config.init_method, bias=False, skip_bias_add=False, is_expert=False)
    options |= dict(gather_output=False) if kind == "ColumnParallelLinear" else dict(input_is_parallel=True)
    ours, theirs = getattr(linear, kind)(64, 48, **options), getattr(tensor_parallel, kind)(64, 48, **options)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 64)
    with torch.no_grad():
        plain, expected = ours(x)[0], theirs(x)[0]
    assert torch.equal(plain, expected)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trained = ours(x.requires_grad_())[0]
    assert torch.equal(trained, expected)
    assert not [w for w in caught if "tp_group is None" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.parametrize("options", [{}, dict(glu_linear_offset=1.0, activation_func_clamp_value=0.5)],
                         ids=["gemma", "offset-and-clamp"])
def test_plain_glu_mlp_matches_megatron_mlp(model_parallel, options):
    mlp = MLP(tiny(**options), get_glu_mlp_submodules("local"))
    x = torch.randn(5, 2, mlp.config.hidden_size) * 3  # wide enough that the clamp bites
    with torch.no_grad():
        plain, expected = linear.plain_glu_mlp(mlp, x), mlp(x)[0]
    assert plain is not None and torch.equal(plain, expected)
    assert linear.plain_glu_mlp(mlp, x.requires_grad_()) is None  # autograd keeps Megatron's forward
