"""Runtime plumbing: process groups and model parallelism (`distributed`), megatron-core on CPU (`cpu_support`), how
an entry point ends an error (`cli`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron_bdgemma.runtime.cpu_support import apply_cpu_support
    from megatron_bdgemma.runtime.distributed import destroy_distributed, ensure_model_parallel, init_distributed

__all__ = ["apply_cpu_support", "destroy_distributed", "ensure_model_parallel", "init_distributed"]


def __getattr__(name: str) -> Any:
    # Lazy: every command imports `runtime.cli` for its entry point, and its `--help` must not wait for torch.
    if name == "apply_cpu_support":
        from megatron_bdgemma.runtime import cpu_support

        return cpu_support.apply_cpu_support
    if name in ("destroy_distributed", "ensure_model_parallel", "init_distributed"):
        from megatron_bdgemma.runtime import distributed

        return getattr(distributed, name)
    raise AttributeError(f"module 'megatron_bdgemma.runtime' has no attribute {name!r}")
