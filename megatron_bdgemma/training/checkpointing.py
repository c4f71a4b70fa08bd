"""Distributed checkpoints (`torch_dist`) with a crash-safe `latest` marker.

A save goes to `iter_N.tmp/` in the run directory, is renamed to `iter_N/` only after every rank has finished
writing, and `latest` is replaced atomically after that (`run_dir.publish`, which also prunes to `keep_last`). A
crash at any point leaves `latest` naming the previous complete checkpoint; a save that runs out of disk removes its
`iter_N.tmp/` and says so. `training/run_dir.py` owns the directory: layout, owner record, lock, `latest`, pruning.

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
import itertools
import os
import queue
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica

from megatron_bdgemma.training.run_dir import (
    STAGING, checkpoint_name, complete_checkpoints, latest_checkpoint, locate_checkpoint, publish,
)


class DamagedCheckpointError(ValueError):
    """A checkpoint file is missing or shorter than the checkpoint's index says; the message names it and the newest
    intact checkpoint beside it."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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
    """Save model (+ optimizer) shards and `extra` (scheduler state, data position: plain picklable values) as the
    newest checkpoint of the run directory `root`. A training checkpoint's run config, `extra["run"]`, is also
    written readable beside the shards (`run_config.yaml`).

    `optimizer_format`: how a distributed optimizer's state is stored (see `OPTIMIZER_FORMATS`)."""
    root = Path(root)
    staging = root / (checkpoint_name(step) + STAGING)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of a crashed save of the same step
        staging.mkdir(parents=True)
    _barrier()
    state = _sharded_state(_chunks(model), optimizer, is_loading=False, optimizer_format=optimizer_format)
    state["extra"] = extra or {}
    needed = _bytes_to_write(state)
    try:
        with write_results_in_this_process():
            dist_checkpointing.save(state, str(staging))
    except BaseException as error:  # torch's CheckpointException is a BaseException
        # Whether or not rank 0 has removed the partial save yet, a file system with less free space than the whole
        # checkpoint could not have held it: every rank reaches the same verdict without another collective.
        free = _free_bytes(root)
        if rank0:
            shutil.rmtree(staging, ignore_errors=True)  # every rank has failed too: DCP gathers the failures
        if _is_disk_full(error) or free < needed:
            previous = latest_checkpoint(root)
            raise OSError(errno.ENOSPC, f"no space left on {root} while saving {checkpoint_name(step)} ({_mib(free)} "
                          f"free, the checkpoint needs {_mib(needed)}): removed the partial {staging.name}; "
                          f"{f'{previous} is kept' if previous else 'no earlier checkpoint exists'}") from error
        raise
    _barrier()
    final = publish(root, staging, keep_last, state["extra"].get("run")) if rank0 else root / checkpoint_name(step)
    _barrier()
    return final


@contextlib.contextmanager
def write_results_in_this_process() -> Iterator[None]:
    """Let megatron-core 0.19.2's synchronous save pass its write results through a plain queue of this process.

    Every synchronous save of the project runs inside (the trainer's and the HF converter's). Its writer hands them
    over through `filesystem_async.get_write_results_queue()`, which on first use starts a
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


def _is_disk_full(error: BaseException) -> bool:
    """Whether ENOSPC is in `error`'s chain: torch and megatron-core wrap a writer's OSError in their own exceptions
    (chained, or per rank in `CheckpointException.failures`)."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or os.strerror(errno.ENOSPC) in str(e):
            return True
        todo += [e.__cause__, e.__context__]
        todo += [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
    return False


def _free_bytes(root: Path) -> int | float:
    try:
        return shutil.disk_usage(root).free
    except OSError:  # the directory itself is gone: nothing to say about its space
        return float("inf")


def _bytes_to_write(state: dict[str, Any]) -> int:
    """The tensor bytes the whole checkpoint of `state` holds (every rank's main replicas; tensors built only while
    saving are left out, so it errs low). A save that failed with less than this free on the file system ran out of
    space, whatever the writer reported: megatron-core's writer process keeps only the class of its error, and
    torch's file writer turns a short write into `RuntimeError: [enforce fail at inline_container.cc]`."""
    values = list(nested_values(state))
    sharded = [v.data for v in values if isinstance(v, ShardedTensor) and v.data is not None
               and is_main_replica(v.replica_id)]
    plain = [v for v in values if isinstance(v, torch.Tensor)] if not dist.is_initialized() or dist.get_rank() == 0 else []
    total = torch.tensor([sum(t.numel() * t.element_size() for t in sharded + plain)], dtype=torch.int64,
                         device=torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
    if dist.is_initialized():
        dist.all_reduce(total)
    return int(total.item())


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def load_checkpoint(path: str | Path, model: Model, optimizer: Any | None = None) -> dict[str, Any]:
    """Load a checkpoint directory (or a run directory, via `latest`) into `model` / `optimizer`; return `extra`.

    The optimizer's hyperparameters stay this run's (the param groups built from its config, not the saved ones),
    so a resumed run's changed `optim.*` values apply; learning rates are set by the LR scheduler (`setup`)."""
    path = locate_checkpoint(path)
    if optimizer is not None:
        _materialise_optimizer_state(optimizer)
    with naming_damaged_files(path):
        optimizer_format = _saved_optimizer_format(path)
        chunks = _chunks(model)
        template = _sharded_state(chunks, optimizer, is_loading=True, optimizer_format=optimizer_format)
        template["extra"] = {}
        loaded = dist_checkpointing.load(template, str(path))
    for key, chunk in zip(_model_keys(chunks), chunks):
        chunk.load_state_dict(loaded[key], strict=True)
    if optimizer is not None:
        configured = [{k: v for k, v in group.items() if k not in ("params", "step")} for group in optimizer.param_groups]
        _load_optimizer_state(optimizer, loaded["optimizer"], optimizer_format)
        # torch's `load_state_dict` (the plain optimizer) replaces each group's hyperparameters with the saved ones,
        # the lr schedule's `max_lr` / `min_lr` included.
        for group, values in zip(optimizer.param_groups, configured, strict=True):
            group.update(values)
    return loaded.get("extra", {})


def damaged_files(path: str | Path) -> list[str]:
    """What is wrong with the files of the `torch_dist` checkpoint at `path`: its index (`.metadata`) unreadable, or
    a data file missing or shorter than the index's entries in it (a copy or save cut short). Empty: intact."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as error:  # noqa: BLE001 - any failure to read the index means it is damaged
        return [f"{path / '.metadata'} cannot be read ({type(error).__name__})"]
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif file.stat().st_size < size:
            problems.append(f"{file} is truncated ({file.stat().st_size} of {size} bytes)")
    return problems


@contextlib.contextmanager
def naming_damaged_files(path: str | Path) -> Iterator[None]:
    """Reading the checkpoint at `path` inside: a failure caused by a damaged file (torch raises a bare EOFError or
    an unpickling error, with no file name) becomes a `DamagedCheckpointError` naming the file and the newest
    intact checkpoint beside it; any other failure passes unchanged."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:  # torch's CheckpointException is a BaseException
        problems = damaged_files(path)
        if not problems:
            raise
        path = Path(path)
        others = [p for p in reversed(complete_checkpoints(path.parent))
                  if p.resolve() != path.resolve() and (p / "metadata.json").is_file()]
        intact = next((p for p in others if not damaged_files(p)), None)
        hint = (f"the newest intact checkpoint is {intact}: give that directory instead (training resumes from it with "
                f"--load {intact})" if intact else "no other complete checkpoint beside it is intact")
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {'; '.join(problems)}; {hint}") from error


def _saved_steps(state: Any) -> set[float]:
    """Every Adam step count in the param groups of a loaded optimizer state (nested in any chained layout)."""
    if isinstance(state, dict):
        groups = state.get("param_groups", [])
        found = {float(g["step"]) for g in groups if isinstance(g, dict) and g.get("step") is not None}
        return found.union(*(_saved_steps(v) for k, v in state.items() if k != "param_groups"))
    return set()


# The param-group fields megatron-core's LR / weight-decay scheduler reads (its `ParamGroupOverride` bounds).
_SCHEDULE_GROUP_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")


def _pair_groups_under_this_schedule(optimizer: Any, state: Any) -> None:
    """Let a plain optimizer's saved param groups pair with this run's when the run's lr / min_lr changed.

    megatron-core 0.19's `load_state_dict` pairs saved groups with the current ones by a tuple of per-group settings
    that includes the scheduler bounds `max_lr` / `min_lr` (`param_group_identifier_keys`, Megatron-LM PR #4705),
    so a resume with a new `optim.lr` found no saved group ("Could not find parameter group with key ...";
    tests/test_robustness.py `test_resume_runs_the_schedule_it_prints[plain]`). Here every group has the run's
    bounds (no per-group overrides), so the saved groups take them before the pairing, which then goes by the
    remaining, structural fields (`wd_mult`, expert parallelism, ...). Where groups differ in their bounds, the
    pairing is left as it is.
    """
    bounds = {tuple(group.get(key) for key in _SCHEDULE_GROUP_KEYS) for group in optimizer.param_groups}
    if len(bounds) != 1:
        return
    ours = dict(zip(_SCHEDULE_GROUP_KEYS, bounds.pop()))
    for inner_state in _per_inner_optimizer(optimizer, state):
        groups = inner_state["param_groups"] if "param_groups" in inner_state else inner_state["optimizer"]["param_groups"]
        for group, (key, value) in itertools.product(groups, ours.items()):
            if value is None:  # absent: the scheduler then uses its own value (the pairing reads absent as None)
                group.pop(key, None)
            else:
                group[key] = value


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
        _pair_groups_under_this_schedule(optimizer, state)
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
