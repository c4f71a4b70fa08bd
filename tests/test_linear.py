"""Contract: the `local` spec's parallel linears (`layers/linear.py`) return what Megatron's return, bit for bit, on
their plain-matmul path (TP = 1, no autograd) and on Megatron's (grad enabled); and the row linear's forward no
longer warns that its group is None."""

from __future__ import annotations

import warnings

import pytest
import torch
from megatron.core import tensor_parallel

from megatron_bdgemma.config import tiny
from megatron_bdgemma.layers import linear


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
