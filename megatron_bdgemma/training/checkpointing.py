"""Distributed checkpoints (`torch_dist`) with a crash-safe `latest` marker.

Layout of a save directory:

    iter_0000020/      a complete checkpoint (model, optimizer, scheduler, progress)
    iter_0000040/
    latest             "iter_0000040", written last

A save goes to `iter_N.tmp/`, is renamed to `iter_N/` only after every rank has finished writing, and `latest` is
replaced atomically after that. A crash at any point leaves `latest` naming the previous complete checkpoint.
Only the newest `keep_last` complete checkpoints up to the one just written are kept. Megatron's sharded state dicts make every checkpoint
loadable under another TP / EP layout.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

LATEST = "latest"


def _name(step: int) -> str:
    return f"iter_{step:07d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def latest_checkpoint(root: str | Path) -> Path | None:
    """The directory `latest` names, or None when there is none yet."""
    marker = Path(root) / LATEST
    if not marker.is_file():
        return None
    raw = marker.read_bytes()
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        name = None
    if name is None or not name.isprintable() or "/" in name:
        raise ValueError(f"{marker} is not a checkpoint marker (binary or garbled: {raw[:32]!r}); it should hold a "
                         f"directory name such as {_name(40)}")
    if not name:
        raise ValueError(f"{marker} is empty; it should name the newest complete checkpoint, e.g. {_name(40)} "
                         f"(present here: {sorted(p.name for p in Path(root).glob('iter_*'))})")
    path = Path(root) / name
    if not path.is_dir():
        raise FileNotFoundError(f"{marker} names {path.name}, which does not exist")
    return path


# The distributed optimizer's state is saved DP-reshardable. megatron-core's default `fully_sharded_model_space`
# and `fully_reshardable` formats fail on its local (non-TE/Apex) path: flattened ranges, and no per-parameter
# Adam `step` to restore. Measured on CPU: the plain (non-distributed) optimizer resumes bit-exactly; the bf16
# distributed optimizer reloads but its first post-resume update differs, and the fp32 one cannot reload.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _sharded_state(model: torch.nn.Module, optimizer: Any | None, is_loading: bool) -> dict[str, Any]:
    model_state = model.sharded_state_dict()
    state = {"model": model_state}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
    return state


def _materialise_optimizer_state(optimizer: Any) -> None:
    """Give a never-stepped optimizer its state tensors (and `step`) so a checkpoint can be loaded into them.

    torch's Adam creates its state lazily at the first step; without Apex/TE megatron-core's distributed optimizer
    reads `step` from that state when building the state dict to load into.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(inner, "_init_optimizer_states_with_dummy_values", None)
        if init is not None and not inner.optimizer.state:
            init()


def save_checkpoint(
    root: str | Path, step: int, model: torch.nn.Module, optimizer: Any | None = None, extra: dict[str, Any] | None = None,
    keep_last: int = 2,
) -> Path:
    """Save model (+ optimizer) shards and `extra` (scheduler state, data position: plain picklable values)."""
    root = Path(root)
    final, staging = root / _name(step), root / (_name(step) + ".tmp")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of a crashed save of the same step
        staging.mkdir(parents=True)
    _barrier()
    state = _sharded_state(model, optimizer, is_loading=False)
    state["extra"] = extra or {}
    try:
        dist_checkpointing.save(state, str(staging))
    except BaseException as error:  # torch's CheckpointException is a BaseException
        disk_full = _is_disk_full(error, root, model)  # before the partial save is removed and frees space again
        if rank0:
            shutil.rmtree(staging, ignore_errors=True)  # every rank has failed too: DCP gathers the failures
        if disk_full:
            previous = latest_checkpoint(root)
            raise OSError(errno.ENOSPC, f"no space left on {root} while saving {final.name}: removed the partial "
                          f"{staging.name}; {f'{previous} is kept' if previous else 'no earlier checkpoint exists'}"
                          ) from error
        raise
    _barrier()
    if rank0:
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        marker = root / (LATEST + ".tmp")
        marker.write_text(final.name)
        os.replace(marker, root / LATEST)
        # Prune only this run's past: a later-numbered checkpoint left by another run is not ours to delete, and
        # must never push out the one just written.
        earlier = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp") and p.name <= final.name)
        for old in earlier[:-keep_last]:
            shutil.rmtree(old)
    _barrier()
    return final


def _is_disk_full(error: BaseException, root: Path, model: torch.nn.Module) -> bool:
    """Whether a failed save ran out of space on `root`.

    torch and megatron-core wrap a writer's OSError in their own exceptions (chained, or per rank in
    `CheckpointException.failures`); megatron's threaded writer keeps only the class name (`<class 'OSError'>`). So
    ENOSPC is recognised in the chain, or an OSError with less room left on `root` than this rank's weights need.
    """
    seen, todo, oserror = set(), [error], False
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or os.strerror(errno.ENOSPC) in str(e):
            return True
        oserror |= isinstance(e, OSError) or "OSError" in str(e)
        todo += [e.__cause__, e.__context__]
        todo += [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
    needed = sum(p.numel() * p.element_size() for p in model.parameters())
    return oserror and shutil.disk_usage(root).free < needed


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: Any | None = None) -> dict[str, Any]:
    """Load a checkpoint directory (or a save root, via `latest`) into `model` / `optimizer`; return `extra`."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if (path / LATEST).is_file():
        path = latest_checkpoint(path)
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete Megatron distributed checkpoint (no metadata.json)")
    if optimizer is not None:
        _materialise_optimizer_state(optimizer)
    template = _sharded_state(model, optimizer, is_loading=True)
    template["extra"] = {}
    loaded = dist_checkpointing.load(template, str(path))
    model.load_state_dict(loaded["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    return loaded.get("extra", {})
