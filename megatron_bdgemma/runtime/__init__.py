"""Runtime plumbing: process groups and model parallelism (`distributed`), megatron-core on CPU (`cpu_support`), how
an entry point ends an error (`cli`)."""

from megatron_bdgemma.runtime.cpu_support import apply_cpu_support
from megatron_bdgemma.runtime.distributed import destroy_distributed, ensure_model_parallel, init_distributed

__all__ = ["apply_cpu_support", "destroy_distributed", "ensure_model_parallel", "init_distributed"]
