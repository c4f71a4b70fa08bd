"""Distributed checkpoints (`torch_dist`) with a crash-safe `latest` marker.

Layout of a save directory:

    iter_0000020/      a complete checkpoint (model, optimizer, scheduler, progress)
    iter_0000040/
    latest             "iter_0000040", written last

A save goes to `iter_N.tmp/`, is renamed to `iter_N/` only after every rank has finished writing, and `latest` is
replaced atomically after that. A crash at any point leaves `latest` naming the previous complete checkpoint.
Only the newest `keep_last` complete checkpoints up to the one just written are kept.

Any layout loads any checkpoint: the model and (in the default `fully_reshardable` format) the distributed
optimizer's state are stored in model space, sharded like the parameters, so a checkpoint saved at TP=2, EP=2 or
DP=2 continues at TP=1, EP=1 or DP=1 and back (tests/test_training.py checks each against a run that never changed
layout). What resume needs is all in the checkpoint: weights, Adam moments and step count, the LR scheduler, the
step (which is also the data position: the step's samples are global indices derived from it) and the run and model
configs. What it does not need: RNG states, because every random draw of a step (corruption, the scored block,
self-conditioning coins) is keyed by (seed, global sample index, step, purpose) rather than drawn from a generator
that advances; dropout is 0.0 in every preset; and data-loader state, since batches are indexed, not streamed.
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


# How the distributed optimizer's state is saved. `fully_reshardable` (the default) stores it in model space (one
# tensor per parameter and state, sharded like the parameter), so a checkpoint loads at any TP / EP / PP / DP layout;
# saving gathers each rank's state over its DP group. `dp_reshardable` writes each rank's flat buffer shard as is
# (no gather, fully parallel) but loads only at the same TP / EP / PP sizes. Loading reads the format from the
# checkpoint. `chained_optim_avoid_prefix` keeps model-space keys free of the chained-optimizer index.
OPTIMIZER_FORMATS = ("fully_reshardable", "dp_reshardable")


def _optimizer_metadata(optimizer_format: str) -> dict[str, Any]:
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise ValueError(f"optimizer checkpoint format {optimizer_format!r} is not one of {OPTIMIZER_FORMATS}")
    return {"distrib_optim_sharding_type": optimizer_format, "chained_optim_avoid_prefix": True}


def _sharded_state(model: torch.nn.Module, optimizer: Any | None, is_loading: bool,
                   optimizer_format: str = OPTIMIZER_FORMATS[0]) -> dict[str, Any]:
    model_state = model.sharded_state_dict()
    state = {"model": model_state}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=is_loading, metadata=_optimizer_metadata(optimizer_format))
    return state


def _saved_optimizer_format(path: Path) -> str:
    """The distributed-optimizer format a checkpoint was saved in (the default when it holds a plain optimizer)."""
    common = dist_checkpointing.load_common_state_dict(str(path)).get("optimizer", {})
    for state in [common, *(common.values() if isinstance(common, dict) else [])]:
        if isinstance(state, dict) and "param_state_sharding_type" in state:
            return state["param_state_sharding_type"]
    return OPTIMIZER_FORMATS[0]


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
    keep_last: int = 2, optimizer_format: str = OPTIMIZER_FORMATS[0],
) -> Path:
    """Save model (+ optimizer) shards and `extra` (scheduler state, data position: plain picklable values).

    `optimizer_format`: how a distributed optimizer's state is stored (see `OPTIMIZER_FORMATS`)."""
    root = Path(root)
    final, staging = root / _name(step), root / (_name(step) + ".tmp")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of a crashed save of the same step
        staging.mkdir(parents=True)
    _barrier()
    state = _sharded_state(model, optimizer, is_loading=False, optimizer_format=optimizer_format)
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
    """Load a checkpoint directory (or a save root, via `latest`) into `model` / `optimizer`; return `extra`.

    The optimizer's learning rates are left to the LR scheduler's `load_state_dict` (from `extra["scheduler"]`)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if (path / LATEST).is_file():
        path = latest_checkpoint(path)
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete Megatron distributed checkpoint (no metadata.json)")
    if optimizer is not None:
        _materialise_optimizer_state(optimizer)
    optimizer_format = _saved_optimizer_format(path)
    template = _sharded_state(model, optimizer, is_loading=True, optimizer_format=optimizer_format)
    template["extra"] = {}
    loaded = dist_checkpointing.load(template, str(path))
    model.load_state_dict(loaded["model"], strict=True)
    if optimizer is not None:
        _load_optimizer_state(optimizer, loaded["optimizer"], optimizer_format)
    return loaded.get("extra", {})


def _saved_steps(state: Any) -> set[float]:
    """Every Adam step count in the param groups of a loaded optimizer state (nested in any chained layout)."""
    if isinstance(state, dict):
        groups = state.get("param_groups", [])
        found = {float(g["step"]) for g in groups if isinstance(g, dict) and g.get("step") is not None}
        return found.union(*(_saved_steps(v) for k, v in state.items() if k != "param_groups"))
    return set()


def _load_optimizer_state(optimizer: Any, state: Any, optimizer_format: str) -> None:
    """Load a saved optimizer state; a distributed optimizer's at any layout, as megatron-core 0.19's local path needs.

    The plain optimizer loads as saved (torch keeps `step` per parameter state). For the distributed optimizer:
    - Its parameter state (main params, Adam moments) sits in the loaded dict where the load template put it;
      megatron-core's loader for the format slices this rank's part out of it.
    - Its param groups are the ones built for this layout (their count and grouping change with it: EP=1 builds one
      chained optimizer, EP=2 one for dense and one for expert parameters, so the saved common state need not have
      this layout's shape); their learning rate and weight decay come from the LR scheduler's state, loaded after.
    - Adam's step count is the saved one: a tensor per parameter for torch's Adam, the param groups' `step` for
      TE / Apex FusedAdam. Without Apex/TE megatron-core keeps it in the
      saved param groups and restores it wrongly: `load_state_dict` gives every parameter ONE shared tensor (torch's
      Adam increments `state["step"]` in place once per parameter, so the next update would count N steps), and the
      parameter-state loaders then treat `step` as a state tensor: dp_reshardable `copy_`s in the load template's
      dummy step (1), fully_reshardable has none to copy and raises KeyError.
    - fp32 main params are views of the model params, which require grad: the loaders' `copy_` runs under no_grad.
    """
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    if not hasattr(inners[0], "load_parameter_state_from_dp_reshardable"):
        optimizer.load_state_dict(state)
        return
    steps = _saved_steps(state)
    if len(steps) != 1:
        raise ValueError(f"the checkpoint's optimizer state holds {len(steps)} Adam step counts ({sorted(steps)}), expected one")
    step = steps.pop()
    param_states = [state["param_state"]] if len(inners) == 1 else [state[i]["param_state"] for i in range(len(inners))]
    with torch.no_grad():
        for inner, param_state in zip(inners, param_states, strict=True):
            # torch's Adam keeps `step` in each parameter's state; TE / Apex FusedAdam keeps it in the param group.
            per_parameter = any("step" in one for one in inner.optimizer.state.values())
            for one in inner.optimizer.state.values():
                one.pop("step", None)
            getattr(inner, f"load_parameter_state_from_{optimizer_format}")(param_state)
            for group in inner.optimizer.param_groups:
                if not per_parameter:
                    group["step"] = int(step)
                    continue
                for param in group["params"]:
                    inner.optimizer.state[param]["step"] = torch.tensor(step, dtype=torch.float32)
