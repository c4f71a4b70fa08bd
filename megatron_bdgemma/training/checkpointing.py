"""Distributed checkpoints (`torch_dist`) with a crash-safe `latest` marker.

Layout of a save directory:

    iter_0000020/      a complete checkpoint (model, optimizer, scheduler, progress)
    iter_0000040/
    latest             "iter_0000040", written last

A save goes to `iter_N.tmp/`, is renamed to `iter_N/` only after every rank has finished writing, and `latest` is
replaced atomically after that. A crash at any point leaves `latest` naming the previous complete checkpoint.
Only the newest `keep_last` complete checkpoints up to the one just written are kept.

Any layout loads any checkpoint: the model and (in the default `fully_reshardable` format) the distributed
optimizer's state are stored in model space, sharded like the parameters and keyed by global names (layer numbers
count from the model's first layer, whatever the pipeline stage or virtual chunk), so a checkpoint saved at TP=2,
EP=2, DP=2, PP=2 or PP=2 × VPP=2 continues in one process and back (tests/test_training.py and
tests/test_pipeline_parallel.py check each against a run that never changed layout). What resume needs is all in the
checkpoint: weights, Adam moments and step count, the LR scheduler, the step (which is also the data position: the
step's samples are global indices derived from it) and the run and model configs. What it does not need: RNG states,
because every random draw of a step (corruption, the scored block, self-conditioning coins) is keyed by (seed,
global sample index, step, purpose) rather than drawn from a generator that advances; dropout is 0.0 in every
preset; and data-loader state, since batches are indexed, not streamed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import queue
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor

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


Model = torch.nn.Module | Sequence[torch.nn.Module]
"""A model, or its chunks under virtual pipeline parallelism (one per virtual stage, in order)."""


def _chunks(model: Model) -> list[torch.nn.Module]:
    return [model] if isinstance(model, torch.nn.Module) else list(model)


def _model_keys(chunks: list[torch.nn.Module]) -> list[str]:
    """Where each chunk's state sits in the checkpoint's state dict: `model`, or `model0`, `model1`, ... for virtual
    pipeline chunks (megatron's training loop's names). Tensors are found by their global keys (layer numbers count
    from the first layer of the whole model), not by this nesting, so either loads into the other."""
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def _sharded_state(chunks: list[torch.nn.Module], optimizer: Any | None, is_loading: bool,
                   optimizer_format: str = OPTIMIZER_FORMATS[0]) -> dict[str, Any]:
    state = {key: chunk.sharded_state_dict() for key, chunk in zip(_model_keys(chunks), chunks)}
    if optimizer is not None:
        with _stripped_bucket_offsets(optimizer, enabled=optimizer_format == "fully_reshardable"):
            state["optimizer"] = optimizer.sharded_state_dict(
                state, is_loading=is_loading, metadata=_optimizer_metadata(optimizer_format))
        if optimizer_format == "dp_reshardable" and _distributed_optimizers(optimizer):
            for inner_state in _per_inner_optimizer(optimizer, state["optimizer"]):
                _clip_padding_to_unpadded_buckets(inner_state["param_state"])
    return state


def _inner_optimizers(optimizer: Any) -> list[Any]:
    """The optimizers of a chained one (megatron-core chains one per parameter kind), or [optimizer]."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _per_inner_optimizer(optimizer: Any, state: dict[Any, Any]) -> list[dict[str, Any]]:
    """The state of each optimizer of a chained one, in order (with `chained_optim_avoid_prefix` megatron-core nests
    them under their index, unless there is only one)."""
    count = len(_inner_optimizers(optimizer))
    return [state] if count == 1 else [state[i] for i in range(count)]


def _distributed_optimizers(optimizer: Any) -> list[Any]:
    """The distributed optimizers in `optimizer` (chained: one per parameter kind), or [] for a plain optimizer."""
    return [o for o in _inner_optimizers(optimizer) if hasattr(o, "buffers")]


def _clip_padding_to_unpadded_buckets(param_state: dict[Any, Any]) -> None:
    """Keep megatron-core 0.19.2's `dp_reshardable` padding entries inside the bucket tensors they belong to.

    The format stores each bucket as one tensor of the bucket's unpadded size and covers a rank's gaps between
    parameters with padding entries, each running to the next parameter or to the end of the rank's padded share. A
    bucket that ends in the 64-element alignment gap before the tied embedding's own bucket (pipeline parallelism)
    has its unpadded end inside such a gap, and the padding entry ran past it: torch's planner refused the save ("out
    of bounds chunk"). Padding is never read back (the loader drops it), so cutting it at the bucket's end loses
    nothing (the same clamp is proposed in radixark/Megatron-LM PR #95).
    """
    for buffer_index, by_dtype in param_state.items():
        if not isinstance(buffer_index, int):  # per_bucket_numel(_unpadded), stored alongside
            continue
        for buckets in by_dtype.values():
            for entries in buckets:
                for entry in (e for e in entries if e["padding"].unwrap()):
                    for key, tensor in list(entry.items()):
                        if not isinstance(tensor, ShardedTensor):
                            continue
                        room = tensor.global_shape[0] - tensor.global_offset[0]
                        if tensor.local_shape[0] > room:
                            entry[key] = dataclasses.replace(tensor, data=tensor.data[:room], local_shape=(room,))


@contextlib.contextmanager
def _stripped_bucket_offsets(optimizer: Any, enabled: bool) -> Iterator[None]:
    """Give megatron-core 0.19.2's `fully_reshardable` format the parameter offsets its gathered state uses.

    The format gathers each gradient buffer's optimizer state into one flat tensor per state kind with every bucket's
    end padding left out (`get_parameter_state_dp_zero`), then slices each parameter out of it at the parameter's
    offset in the padded buffer (`buffer.param_index_map`). They agree while a buffer has one bucket. Under pipeline
    parallelism the tied embedding (`shared_embedding`) gets a bucket of its own, so every parameter after the first
    bucket was read shifted by the padding before it: partly another parameter's state and partly zeros, and a
    resumed run diverged. For the time of the call each buffer's map holds offsets in the stripped tensor instead (the
    fix merged upstream in Megatron-LM PR #5077); the order of the map, which the loader relies on, is kept.
    """
    buffers = [b for o in _distributed_optimizers(optimizer) for b in o.buffers] if enabled else []
    padded = [b.param_index_map for b in buffers]
    for buffer in buffers:
        stripped_before = [bucket.offset - sum(b.numel_unpadded for b in buffer.buckets[:i])
                           for i, bucket in enumerate(buffer.buckets)]
        buffer.param_index_map = {param: (start - stripped_before[bucket], end - stripped_before[bucket], bucket)
                                  for param, (start, end, bucket) in buffer.param_index_map.items()}
    try:
        yield
    finally:
        for buffer, index_map in zip(buffers, padded):
            buffer.param_index_map = index_map


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
    for inner in _inner_optimizers(optimizer):
        init = getattr(inner, "_init_optimizer_states_with_dummy_values", None)
        if init is not None and not inner.optimizer.state:
            init()


def save_checkpoint(
    root: str | Path, step: int, model: Model, optimizer: Any | None = None, extra: dict[str, Any] | None = None,
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
    state = _sharded_state(_chunks(model), optimizer, is_loading=False, optimizer_format=optimizer_format)
    state["extra"] = extra or {}
    try:
        with _write_results_in_this_process():
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


@contextlib.contextmanager
def _write_results_in_this_process() -> Iterator[None]:
    """Let megatron-core 0.19.2's synchronous save pass its write results through a plain queue of this process.

    Its writer hands them over through `filesystem_async.get_write_results_queue()`, which on first use starts a
    `multiprocessing.Manager` server: a spawned second Python process that imports torch (about 750 MB) and lives as
    long as the trainer, in the trainer's process group. A trainer killed by a signal leaves it running, orphaned; and a
    SIGTERM sent to the whole process group (torchrun's way of stopping a rank, Slurm's) ends it before the stopping
    trainer's last save, which then fails. A synchronous save writes and reads the results in this process (the
    writer's threads, then `retrieve_write_results`), so a `queue.Queue` serves; no process is started.
    tests/test_stopping.py checks that megatron-core still starts that process.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous, filesystem_async._results_queue = filesystem_async._results_queue, queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = previous


def _is_disk_full(error: BaseException, root: Path, model: Model) -> bool:
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
    needed = sum(p.numel() * p.element_size() for chunk in _chunks(model) for p in chunk.parameters())
    return oserror and shutil.disk_usage(root).free < needed


def load_checkpoint(path: str | Path, model: Model, optimizer: Any | None = None) -> dict[str, Any]:
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
    chunks = _chunks(model)
    template = _sharded_state(chunks, optimizer, is_loading=True, optimizer_format=optimizer_format)
    template["extra"] = {}
    loaded = dist_checkpointing.load(template, str(path))
    for key, chunk in zip(_model_keys(chunks), chunks):
        chunk.load_state_dict(loaded[key], strict=True)
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
    inners = _distributed_optimizers(optimizer)
    if not inners:
        optimizer.load_state_dict(state)
        return
    steps = _saved_steps(state)
    if len(steps) != 1:
        raise ValueError(f"the checkpoint's optimizer state holds {len(steps)} Adam step counts ({sorted(steps)}), expected one")
    step = steps.pop()
    param_states = [inner_state["param_state"] for inner_state in _per_inner_optimizer(optimizer, state)]
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
