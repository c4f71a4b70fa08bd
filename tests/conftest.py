"""Shared test setup: the repo root on `sys.path`, megatron-core's CPU support, and a 1-process model-parallel world.

Tests that build megatron modules request `model_parallel`: a gloo world of one process (created once per session)
with all parallel sizes 1, the RNG tracker reseeded for every test so results do not depend on test order.
Multi-rank tests spawn their own ranks with `tests.multiproc.run_in_processes`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before the project import below, and before pytest collects `tests.*`: spawned children copy this sys.path.
REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from megatron_bdgemma.runtime.cpu_support import apply_cpu_support  # noqa: E402
from megatron_bdgemma.runtime.distributed import DEFAULT_SEED, destroy_distributed, init_distributed  # noqa: E402

apply_cpu_support()


@pytest.fixture(scope="session")
def distributed_world() -> Iterator[None]:
    """The session's 1-process gloo world (torch.distributed plus megatron's parallel state)."""
    init_distributed()
    yield
    destroy_distributed()


@pytest.fixture
def model_parallel(distributed_world: None) -> None:
    """All parallel sizes 1 (re-created if a test changed them) and the RNG tracker reseeded with `DEFAULT_SEED`."""
    init_distributed(seed=DEFAULT_SEED)
