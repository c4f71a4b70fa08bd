"""Shared test setup: the repo root on `sys.path`, megatron-core's CPU support, and a 1-process model-parallel world.

Tests that build megatron modules request `model_parallel`: a gloo world of one process (created once per session)
with all parallel sizes 1, the RNG tracker reseeded for every test so results do not depend on test order.
Multi-rank tests spawn their own ranks with `tests.multiproc.run_in_processes`.
"""

from __future__ import annotations

import getpass
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
# The suite runs on one machine both with the default instruction sets and restricted ones (e.g. AVX2). TorchInductor
# (torch 2.14) reused the compiled kernels the default run had cached when `ATEN_CPU_CAPABILITY=avx2` was set, and
# the compiled decode test (tests/test_generation.py) then died of SIGSEGV; with a cache of its own it passes. So a
# restricted run compiles into a cache directory named for its settings (spawned ranks inherit it).
if any(os.environ.get(name) for name in ISA_VARIABLES) and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    isa = "_".join(re.sub(r"\W", "", os.environ.get(name, "")) or "default" for name in ISA_VARIABLES)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}_{isa}")

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
