"""Process-group and model-parallel setup: one call for scripts, tests and library code.

    init_distributed(tp=2, ep=2, seed=1234)   # torchrun ranks, or a 1-process world when run plainly
    ensure_model_parallel()                  # library code: a 1-process world unless one is already set up
    destroy_distributed()

The backend is nccl when CUDA is available and gloo otherwise; on a CPU-only machine the CPU support patches
(`cpu_support.apply_cpu_support`) are applied first, so megatron-core runs there.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from megatron_bdgemma.runtime.cpu_support import apply_cpu_support

DEFAULT_SEED = 1234
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port on localhost that is free now (the OS picks it; another process could take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init_process_group(backend: str | None) -> None:
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if all(name in os.environ for name in _TORCHRUN_ENV):
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, init_method="env://")
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def _check_sizes(world: int, tp: int, pp: int, ep: int, etp: int, vpp: int | None, cp: int = 1) -> None:
    for name, size in dict(tp=tp, pp=pp, ep=ep, etp=etp, cp=cp).items():
        if size < 1:
            raise ValueError(f"{name} must be a positive integer, got {size}")
    # A plain `python script.py` is a world of one process; model parallelism needs one process per rank.
    launch = " (start one process per rank: torchrun --nproc-per-node N ...)" if world == 1 else ""
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tp * pp = {tp} * {pp}; "
                         f"the data-parallel size would not be an integer{launch}")
    if world % (tp * pp * cp):
        raise ValueError(f"world size {world} is not divisible by tp * pp * cp = {tp} * {pp} * {cp}; "
                         f"the data-parallel size would not be an integer{launch}")
    if world % (etp * ep * pp):
        raise ValueError(f"world size {world} is not divisible by etp * ep * pp = {etp} * {ep} * {pp}; "
                         f"the expert data-parallel size would not be an integer{launch}")
    if vpp is not None and (vpp < 1 or pp == 1):
        raise ValueError(f"vpp (virtual pipeline stages per rank) needs pp > 1 and vpp >= 1, got pp={pp}, vpp={vpp}")


def _current_sizes() -> tuple[int, int, int, int, int | None, int] | None:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None
    return (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size(),
            ps.get_virtual_pipeline_model_parallel_world_size(), ps.get_context_parallel_world_size())


def init_distributed(tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None, vpp: int | None = None,
                     seed: int = DEFAULT_SEED, backend: str | None = None, cp: int = 1) -> None:
    """Set up torch.distributed (if needed), megatron's model-parallel groups and its RNG tracker.

    Args:
        tp, pp, ep: tensor-, pipeline- and expert-parallel sizes; data parallelism takes the remaining ranks.
        etp: expert tensor-parallel size (defaults to `tp`, megatron's default).
        cp: context-parallel size (docs/design.md §14): ranks that split each sequence; their group is
            `parallel_state.get_context_parallel_group()`, and data parallelism takes `world / (tp·pp·cp)` ranks.
        vpp: virtual pipeline stages per rank (interleaved schedule), or None.
        seed: passed to `model_parallel_cuda_manual_seed` (which also reseeds torch's default generator on CPU).
        backend: process-group backend when this call creates the group; default nccl with CUDA, else gloo.

    The process group comes from the torchrun env vars when they are set, else it is a 1-process world on a free
    localhost port; an existing group is kept. Existing model-parallel groups of other sizes are destroyed first;
    with the same sizes they are kept and only the RNG tracker is reseeded.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    apply_cpu_support()
    etp = tp if etp is None else etp
    if not dist.is_initialized():
        _init_process_group(backend)
    _check_sizes(dist.get_world_size(), tp, pp, ep, etp, vpp, cp)
    current = _current_sizes()
    if current != (tp, pp, ep, etp, vpp, cp):
        if current is not None:
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp, expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp, context_parallel_size=cp)
    model_parallel_cuda_manual_seed(seed)


def ensure_model_parallel() -> None:
    """Give library code a model-parallel state: a 1-process world with all sizes 1, unless one exists already.

    An existing state (any sizes) is left untouched, RNG tracker included.
    """
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        init_distributed()


def destroy_distributed() -> None:
    """Tear down megatron's model-parallel groups and the default process group (each only if present)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
