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
import torch

# Before the project import below, and before pytest collects `tests.*`: spawned children copy this sys.path.
REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from megatron_bdgemma.runtime.cpu_support import apply_cpu_support  # noqa: E402
from megatron_bdgemma.runtime.distributed import DEFAULT_SEED, destroy_distributed, init_distributed  # noqa: E402

apply_cpu_support()
# Every test process computes on one thread, the spawned ranks of tests/multiproc.py included: a GEMM's reduction
# order, and so its last-bit rounding, depends on the thread count, and multi-rank runs are compared with
# one-process runs at 1e-5 relative after several optimizer steps, which would otherwise depend on the machine's
# core count rather than on the code (a 2-thread reference differed from 1-thread ranks by 1.3e-5 in a grad norm).
torch.set_num_threads(1)


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
