"""Make megatron-core 0.19.2 run on a machine without CUDA, with the gloo backend.

megatron-core assumes CUDA in a handful of places outside the model math: it asks for the current CUDA device, builds
small scratch tensors with `device="cuda"`, seeds and forks a CUDA RNG, and waits on CUDA streams. `apply_cpu_support()`
patches exactly those places, once per process and only when `torch.cuda.is_available()` is False (with CUDA it does
nothing). Call it in every process before megatron modules are built; `runtime.distributed.init_distributed`,
`tests/conftest.py` and `tests/multiproc.py` do.

Most patches are narrow: the listed megatron modules get `_CPU_TORCH`, a stand-in for their `torch` global that
forwards everything to torch except that factory functions map `device="cuda"` to the CPU and its `torch.cuda` has
CPU meanings (streams, events and `synchronize` are no-ops, since CPU work is synchronous; the RNG is the CPU
generator). Three patches are process-global because the CUDA use is spread over too many modules or is a
`torch.Tensor` method; on a torch without CUDA the originals only raise, so nothing that worked changes, except the
`Tensor.type()` strings (see the table).

Removal study against megatron-core 0.19.2 (torch 2.14, 2 gloo ranks): each patch was dropped in turn, and the
layouts of `tests/test_runtime.py` (1 process; TP=2; TP=2+SP MoE; EP=2 allgather and alltoall; DP=2 with DDP and the
fp32 and the distributed optimizer; PP=2 through `get_forward_backward_func`; dist_checkpointing save/load) rerun.
Every patch below makes some of them fail when dropped:

| patch | what it does | megatron 0.19.2 code that needs it | needed for |
|---|---|---|---|
| `current_device` | global: `torch.cuda.current_device()` returns `"cpu"` | ~40 modules pass it as `device=` (RoPE `inv_freq`, attention and MoE scratch tensors, TP all-gather buffers) | everything |
| `rng` | `tensor_parallel.random` gets `_CPU_TORCH`; its `_get/_set_cuda_rng_state` read and set the CPU generator; its logger is quieted | `model_parallel_cuda_manual_seed` and the RNG tracker's `add`/`fork` (embedding and attention dropout always fork) | everything |
| `causal_mask` | `_CPU_TORCH` in `transformer.utils` | `get_default_causal_mask`: `torch.ones(..., device="cuda")` when no mask is passed | the local `DotProductAttention` |
| `moe_streams` | `_CPU_TORCH` in `transformer.moe.token_dispatcher` | the alltoall dispatcher makes a `torch.cuda.Stream()` in `__init__` and syncs its DtoH copies with streams/events | MoE, alltoall dispatcher |
| `alltoall_splits` | the dispatcher's `maybe_move_tensor_to_cpu` also turns CPU tensors into numpy when asked | it only converts CUDA tensors, so the split sizes stay tensors and gloo's `all_to_all_single` raises TypeError | MoE, alltoall dispatcher |
| `ddp_streams` | `_CPU_TORCH` in `distributed.param_and_grad_buffer` | `start_grad_sync` calls `torch.cuda.current_stream()` | DDP grad sync (`finalize_model_grads`) |
| `schedules` | `_CPU_TORCH` in `pipeline_parallel.schedules` | `total_num_tokens = torch.zeros([], device="cuda")` in every schedule | any `get_forward_backward_func()` use, PP=1 included |
| `p2p_sync` | `_CPU_TORCH` in `pipeline_parallel.p2p_communication` | `torch.cuda.synchronize()` after `batch_isend_irecv` | PP > 1 |
| `optimizer` | `_CPU_TORCH` in `optimizer.optimizer`, `optimizer.clip_grads` and `megatron.core.utils` | `device='cuda'` scratch tensors in `step()` (found-inf, scale), in grad clipping and in the grad-norm all-reduce; each of the 3 is needed | `get_megatron_optimizer(...).step()` |
| `type_strings` | global: `Tensor.type()` without arguments names CPU tensors `torch.cuda.*` (other forms untouched) | `clip_grads` asserts `'torch.cuda.FloatTensor'`; the fp32/fp16 and distributed optimizers pick param groups by those strings | optimizer step |
| `tensor_cuda` | global: `Tensor.cuda()` returns the tensor (it is already on the only device) | `LanguageModule` syncs the tied embedding between first and last stage with `weight.data.cuda()` at build | PP > 1 with `share_embeddings_and_output_weights` |
| `checkpoint_sync` | `_CPU_TORCH` in `dist_checkpointing.strategies.filesystem_async` | `torch.cuda.synchronize()` before the writer copies tensors | `dist_checkpointing.save` |

Not needed any more (the list written for megatron-core 0.16 had them): the router's `te_general_gemm` NameError
(0.19 sets it to None without Transformer Engine); a psutil stub for the checkpoint writer (psutil is a dependency of
this project); and a sequence-parallel-capable local norm, which is megatron policy rather than a CPU limit (the stock
`WrappedTorchNorm` rejects SP on GPU too; this project's RMSNorm supports SP). Other megatron modules that mention
CUDA (`optimizer.distrib_optimizer`, `distributed.distributed_data_parallel`, `dist_checkpointing.exchange_utils`, the
async/fully-parallel checkpoint strategies) were patched in the study and found not to be reached.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import types
from collections.abc import Callable
from typing import Any

import torch

from megatron_bdgemma.runtime.log_filters import filter_cpu_noise

__all__ = ["apply_cpu_support"]

_applied = False
_original_tensor_type = torch.Tensor.type


def _cpu_if_cuda(device: Any) -> Any:
    if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


def _on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def make(*args: Any, **kwargs: Any) -> torch.Tensor:
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        return factory(*args, **kwargs)

    return make


class _Event:
    """A CUDA event on CPU: the work it marks is already done when it is recorded."""

    def synchronize(self) -> None:
        pass


class _Stream:
    """A CUDA stream on CPU: all work runs in order on the calling thread, so there is never anything to wait for."""

    def wait_stream(self, stream: Any) -> None:
        pass

    def record_event(self, event: _Event | None = None) -> _Event:
        return event or _Event()


_CURRENT_STREAM = _Stream()


class _CpuCuda(types.ModuleType):
    """`torch.cuda` with CPU meanings for what the patched modules call; everything else is the real `torch.cuda`."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")
        self.Stream = _Stream
        self.current_stream = lambda device=None: _CURRENT_STREAM
        self.stream = lambda stream=None: contextlib.nullcontext()
        self.synchronize = lambda device=None: None
        # The "CUDA" generator is the CPU one: dropout on CPU tensors draws from it.
        self.get_rng_state = lambda device="cuda": torch.get_rng_state()
        self.manual_seed = torch.manual_seed

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """`torch` for one megatron module: `device="cuda"` factories build CPU tensors; `torch.cuda` is `_CpuCuda`."""

    def __init__(self) -> None:
        super().__init__("torch")
        # The factories the patched modules call with device="cuda".
        self.tensor, self.zeros, self.ones = _on_cpu(torch.tensor), _on_cpu(torch.zeros), _on_cpu(torch.ones)
        self.cuda = _CpuCuda()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


_CPU_TORCH = _CpuTorch()

# Megatron modules whose `torch` global becomes `_CPU_TORCH`, with their row in the table.
_CPU_TORCH_MODULES = (
    "megatron.core.transformer.utils",  # causal_mask
    "megatron.core.transformer.moe.token_dispatcher",  # moe_streams
    "megatron.core.distributed.param_and_grad_buffer",  # ddp_streams
    "megatron.core.pipeline_parallel.schedules",  # schedules
    "megatron.core.pipeline_parallel.p2p_communication",  # p2p_sync
    "megatron.core.optimizer.optimizer",  # optimizer
    "megatron.core.optimizer.clip_grads",  # optimizer
    "megatron.core.utils",  # optimizer
    "megatron.core.dist_checkpointing.strategies.filesystem_async",  # checkpoint_sync
)


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random

    random.torch = _CPU_TORCH
    random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    # `fork()` warns when the CPU generator moved inside a fork; here the forked generator *is* the CPU one, so the
    # warning would fire on every dropout call.
    logging.getLogger(random.__name__).setLevel(logging.ERROR)


def _patch_alltoall_splits() -> None:
    from megatron.core.transformer.moe import token_dispatcher

    move_to_cpu = token_dispatcher.maybe_move_tensor_to_cpu

    def move_to_cpu_on_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return move_to_cpu(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = move_to_cpu_on_cpu


def _type_string(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    if args or kwargs or self.is_cuda:
        return _original_tensor_type(self, *args, **kwargs)
    return "torch.cuda." + _original_tensor_type(self).removeprefix("torch.")


def apply_cpu_support() -> None:
    """Apply the patches in the module docstring's table; idempotent, and a no-op when CUDA is available."""
    global _applied
    if _applied or torch.cuda.is_available():
        return
    _applied = True  # also guards the Tensor.type wrapper against wrapping itself
    filter_cpu_noise()
    torch.cuda.current_device = lambda: "cpu"  # current_device
    torch.Tensor.type = _type_string  # type_strings
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # tensor_cuda
    _patch_rng()
    _patch_alltoall_splits()
    for name in _CPU_TORCH_MODULES:
        importlib.import_module(name).torch = _CPU_TORCH
