"""Silence the start-up and checkpoint messages of our dependencies that say nothing about a run of this project.

Every process that imports `megatron_bdgemma` gets these filters (the package `__init__` installs them before any
megatron-core module is imported, which is when most of them fire). Each filter matches one message by its text
and category or logger, so any other warning, from the same modules included, still shows. Why each is noise:

| message (start) | from | why it is noise here |
|---|---|---|
| "Transformer Engine and Apex are not installed" / "Apex is not installed" | megatron-core imports | the `local` backend is a supported path; `model.backend=te` and FP8 check for TE themselves |
| "absl.logging is not installed" | megatron-core `hyper_comm_grid` | megatron falls back to `logging` |
| "full scope is deprecated" | megatron-core `TransformerConfig` defaults | we set no CUDA-graph scope |
| "MimoModelConfig is experimental" | megatron-core import | we do not use MIMO models |
| "GPTModel IS DEPRECATED" | megatron-core `GPTModel.__init__` (a log line per model built) | `BDGemmaModel` subclasses it on purpose (its layer specs, DDP and checkpoint plumbing) |
| "MCore's async save is deprecated" | megatron-core `dist_checkpointing` | megatron's own synchronous save path names that strategy; saves here are synchronous |
| "torch.distributed is disabled, unavailable or uninitialized" / "The argument order of load has been changed" / "Please use DTensor instead" | torch.distributed.checkpoint, called by megatron-core | megatron-core's calls, not ours; checkpoints load and save as tested |
| "`torch.distributed.all_gather_into_tensor` / `reduce_scatter_tensor` is deprecated" | torch, called by megatron-core's TP/SP and DDP collectives | megatron-core's calls; the renamed functions are not in its 0.19 code |
| "When using sequence parallelism it is recommended to set ... CUDA_DEVICE_MAX_CONNECTIONS" (`filter_cpu_noise`, without CUDA only) | megatron-core `tensor_parallel.layers` | a CUDA launch setting; on GPU it stays (the Slurm templates set the variable) |
| "No CUDA runtime is found" | torch `cpp_extension` (imported by megatron-core) on machines without CUDA | CPU runs are supported (`runtime.cpu_support`) |
| "DistributedDataParallel: full_param_layout not provided" | megatron-core DDP with the distributed optimizer | DDP then computes the layout with `DistributedOptimizer.compute_full_param_layout`, the call megatron's own trainer makes before it |
| "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed" (from megatron-core's optimizer module only) | megatron-core `_zero_grad_group_helper` | with fp32 parameters the distributed optimizer's main parameters are views of the model's; megatron zeroes their (unused) `.grad` each step |
| "`sequence_parallel` is set to `True`, but tensor model parallel size is 1" (from megatron-core's `tensor_parallel.layers` only) | megatron-core's expert linears at expert-TP 1 under TP > 1 with SP | the routed experts run on their own expert-TP group by design; SP applies to the dense layers, which keep it |
"""

from __future__ import annotations

import logging
import warnings

_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"Transformer Engine and Apex are not installed", UserWarning),
    (r"Apex is not installed", UserWarning),
    (r"absl\.logging is not installed", UserWarning),
    (r"full scope is deprecated", UserWarning),
    (r"MimoModelConfig is experimental", UserWarning),
    (r"torch\.distributed is disabled, unavailable or uninitialized", UserWarning),
    (r"The argument order of load has been changed", UserWarning),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
    (r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated", FutureWarning),
)
# (message, category, the module that warns): filtered only where that module raises it.
_MODULE_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed", UserWarning,
     r"megatron\.core\.optimizer\.optimizer"),
    (r"`sequence_parallel` is set to `True`, but tensor model parallel size is 1", UserWarning,
     r"megatron\.core\.tensor_parallel\.layers"),
)
_CPU_ONLY_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"When using sequence parallelism it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS",
     UserWarning),
)

# logger name → message prefixes dropped from it
_LOG_LINES: dict[str, tuple[str, ...]] = {
    "megatron.core.models.gpt.gpt_model": ("GPTModel IS DEPRECATED",),
    "megatron.core.dist_checkpointing.strategies.torch": ("MCore's async save is deprecated",),
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
    "megatron.core.distributed.distributed_data_parallel": ("DistributedDataParallel: full_param_layout not provided",),
}


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_installed = False


def filter_dependency_noise() -> None:
    """Install the filters of the module docstring's table (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    for message, category in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for message, category, module in _MODULE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefixes in _LOG_LINES.items():
        logging.getLogger(name).addFilter(_DropMessages(prefixes))


def filter_cpu_noise() -> None:
    """Also drop the CUDA-tuning advice that means nothing without CUDA (`cpu_support.apply_cpu_support` calls this;
    asking torch whether CUDA exists here, at import, could initialise it before a fork)."""
    for message, category in _CPU_ONLY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
