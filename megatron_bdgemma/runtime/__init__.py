"""Runtime plumbing: process groups and model parallelism (`distributed`), megatron-core on CPU (`cpu_support`), how
an entry point ends an error (`cli`)."""

from __future__ import annotations

from typing import Any

__all__ = ["apply_cpu_support", "destroy_distributed", "ensure_model_parallel", "init_distributed"]


def __getattr__(name: str) -> Any:
    # Lazy: `runtime.cli` is imported by every command before its arguments are parsed, and must not import torch.
    if name == "apply_cpu_support":
        from megatron_bdgemma.runtime.cpu_support import apply_cpu_support

        return apply_cpu_support
    if name in ("destroy_distributed", "ensure_model_parallel", "init_distributed"):
        from megatron_bdgemma.runtime import distributed

        return getattr(distributed, name)
    raise AttributeError(f"module 'megatron_bdgemma.runtime' has no attribute {name!r}")
