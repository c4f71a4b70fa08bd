"""The warning filters of the pytest configuration (pyproject.toml, issue 22 item 6): the dependencies' known warnings
about themselves are dropped, and warnings attributed to this project still show."""

from __future__ import annotations

import warnings

import pytest

CASES = [  # message, category, the module `warn()` attributes it to, whether it shows
    ("Apex is not installed. Falling back to Torch Norm", UserWarning, "megatron.core.models.backends", False),
    ("Warning: tp_group is None, using default tp group.", DeprecationWarning, "megatron.core.tensor_parallel.layers",
     False),
    ("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning,
     "torch.distributed.checkpoint.planner_helpers", False),
    ("torch.distributed is disabled, unavailable or uninitialized", UserWarning, "torch.distributed.checkpoint.utils",
     False),
    # the same messages from this project, and a message of megatron-core's that no filter names
    ("Apex is not installed. Falling back to Torch Norm", UserWarning, "megatron_bdgemma.layers.norm", True),
    ("Warning: tp_group is None, using default tp group.", DeprecationWarning, "megatron_bdgemma.model", True),
    ("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning,
     "megatron_bdgemma.training.checkpointing", True),
    ("a message no filter names", UserWarning, "megatron.core.transformer.transformer_config", True),
]


@pytest.mark.parametrize("message,category,module,shown", CASES,
                         ids=[f"{category.__name__}-{module}" for _, category, module, _ in CASES])
def test_dependency_warnings_are_dropped_and_ours_show(message, category, module, shown):
    """Each warning raised here under the filters pytest applies to every test (the configuration's)."""
    with warnings.catch_warnings(record=True) as caught:  # keeps the active filters; records what passes them
        warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module, registry={})
    assert len(caught) == shown, (message, module, [str(w.message) for w in caught])
