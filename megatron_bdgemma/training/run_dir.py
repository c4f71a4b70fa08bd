"""The run directory (`checkpoint.save`): who owns it, the lock that keeps a second live run out, the checkpoints in
it, `latest`, and pruning. Every decision about what may be written there is made here.

    run.json            the owner record: the run's id and each start of it (time, host, pid, command, launcher job)
    run.lock            locked by the live run's rank 0 for the life of its process
    run_config.yaml     the resolved run config of the latest start (`--config` reads it back)
    iter_0000020/       complete checkpoints, each with the run_config.yaml it was trained with
    iter_0000040.tmp/   a save in progress (or one a crash tore)
    latest              "iter_0000040", written after the rename
    latest_checkpointed_iteration.txt   "40": the same, in Megatron-LM's form (its tools look for this file)
    metrics.jsonl       a row per log step and evaluation (`training/metrics.py`), continued by a resumed run

The record is written when a run starts, independently of `latest`, so a directory whose `latest` was deleted, or
whose run stopped before its first save, still says whose it is. Which start is the same run:

- a resume (`--load DIR` or `--load DIR/iter_N`) saving into DIR continues DIR's run: its record gets one more start
  (a directory saved before records existed gets one now);
- a new start whose launcher job (Slurm's `SLURM_JOB_ID`, else torchrun's `TORCHELASTIC_RUN_ID`) is the one that
  started the record, in a directory with no complete checkpoint, is that job started over: Slurm requeued it (or
  torchrun restarted it) before its first save finished. With a complete checkpoint the job must resume instead
  (the Slurm templates add `--load`);
- anything else that finds a checkpoint (complete or `.tmp`), `latest` or a record is another run, and is refused.

The lock is `fcntl.flock` on `run.lock`, taken without waiting: a second live run is refused at start, and the
kernel drops the lock when its process dies, however it dies (SIGKILL included), so a crash never leaves it stuck.
Shared file systems: on Linux NFS clients flock is carried by NFS byte-range locks (NLM for v3, built into v4), so
it holds across nodes and a process's death still releases it; but a node that dies keeps its locks until the
server's lease runs out (NFSv4: typically 90 s) or, over NFSv3, until that node reboots, and a `nolock` or
`local_lock=flock|all` mount makes it node-local. Lustre honours flock across nodes only when mounted with
`-o flock`; `localflock` makes it node-local, and without either flock fails (ENOSYS): the run then starts without
the lock and says so, keeping every other check here (they need no lock, only the directory's contents).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from megatron_bdgemma.training.config import config_yaml

LATEST = "latest"
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
"""Megatron-LM's `latest`: the newest checkpoint's iteration as plain text (`get_checkpoint_tracker_filename`)."""
OWNER = "run.json"
LOCK = "run.lock"
RUN_CONFIG = "run_config.yaml"
STAGING = ".tmp"
METRICS = "metrics.jsonl"


class RunDirectoryError(ValueError):
    """A run directory this run may not use, or a checkpoint path that does not name one checkpoint."""


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints (`iter_N/`) in `root`, oldest first."""
    return sorted(p for p in Path(root).glob("iter_*") if p.is_dir() and not p.name.endswith(STAGING))


def partial_saves(root: str | Path) -> list[Path]:
    """The saves in `root` that never completed (`iter_N.tmp/`)."""
    return sorted(p for p in Path(root).glob(f"iter_*{STAGING}") if p.is_dir())


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
                         f"directory name such as {checkpoint_name(40)}")
    if not name:
        raise ValueError(f"{marker} is empty; it should name the newest complete checkpoint, e.g. {checkpoint_name(40)} "
                         f"(present here: {sorted(p.name for p in Path(root).glob('iter_*'))})")
    path = Path(root) / name
    if not path.is_dir():
        raise FileNotFoundError(f"{marker} names {path.name}, which does not exist")
    return path


def locate_checkpoint(path: str | Path, option: str = "") -> Path:
    """The checkpoint `path` names: itself, or the one its `latest` marker names. A run directory without `latest`
    is refused with the checkpoints it holds and how to give one (`option`: what precedes a path, e.g. "--load ")."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if (path / LATEST).is_file():
        path = latest_checkpoint(path)
    elif not (path / "metadata.json").is_file() and complete_checkpoints(path):
        found = complete_checkpoints(path)
        raise RunDirectoryError(
            f"{path} has no `{LATEST}` marker to say which checkpoint is its newest; it holds {_names(found)}: give "
            f"one, e.g. {option}{found[-1]}"
        )
    if path.name.endswith(STAGING) and re.fullmatch(r"iter_\d+", path.name.removesuffix(STAGING)):
        raise RunDirectoryError(f"{path} is the staging directory of a save that did not finish (a complete save is "
                                f"renamed to {path.name.removesuffix(STAGING)}); use a complete checkpoint")
    if not (path / "metadata.json").is_file():
        hint = "; it is a Hugging Face model directory (config.json)" if (path / "config.json").is_file() else ""
        raise FileNotFoundError(f"{path} is not a Megatron distributed checkpoint (no metadata.json){hint}")
    return path


def save_root(path: str | Path) -> Path:
    """The run directory a checkpoint path belongs to: `path` itself, or the parent of an `iter_N` checkpoint."""
    path = Path(path)
    return path.parent if (path / "metadata.json").is_file() and not (path / LATEST).is_file() else path


def publish(root: Path, staging: Path, keep_last: int, run_config: dict[str, Any] | None = None) -> Path:
    """Make the complete save `staging` (`iter_N.tmp`) the run's newest checkpoint: write `run_config` (the run
    config it was trained with, if given) into it, rename it to `iter_N`, point `latest` and Megatron-LM's tracker
    file at it (each atomically), then keep the newest `keep_last` checkpoints up to it. Rank 0 only."""
    if run_config is not None:  # before the rename: a checkpoint is never without it
        write_run_config(staging, run_config)
    final = staging.with_name(staging.name.removesuffix(STAGING))
    shutil.rmtree(final, ignore_errors=True)  # an earlier save of this step that `latest` no longer names
    staging.rename(final)
    _write_atomically(root / LATEST, final.name)
    _write_atomically(root / MEGATRON_TRACKER, str(int(final.name.removeprefix("iter_"))))
    # Prune only this run's past: a later-numbered checkpoint (left when a resume went back to an earlier step) is
    # not the past of the one just written and must never push it out.
    earlier = [p for p in complete_checkpoints(root) if p.name <= final.name]
    for old in earlier[:-keep_last]:
        shutil.rmtree(old)
    return final


# ---- ownership ------------------------------------------------------------------------------------------------------


@dataclass
class RunDirectory:
    """A run directory this process holds: its lock stays taken until `release` (or the process ends)."""

    root: Path
    run_id: str
    lock: IO[str] | None
    """The open `run.lock`; None where the file system has no locks."""

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()  # closing the only descriptor drops the flock
            self.lock = None


def claim_run_directory(root: str | Path, resuming: str | Path | None = None,
                        run_config: dict[str, Any] | None = None) -> RunDirectory | None:
    """Take `root` for this run on rank 0 (see the module docstring for what is refused); every rank raises the same
    RunDirectoryError when it is refused. Returns the held directory on rank 0, None on the other ranks.

    `resuming`: the checkpoint path this run resumes (`checkpoint.load`), or None for a new run. `run_config`: this
    start's resolved run config (`RunConfig.to_dict`), written as `run_config.yaml`."""
    import torch.distributed as dist  # here, so that reading a run directory's names (tools) does not import torch

    distributed = dist.is_initialized() and dist.get_world_size() > 1
    held, outcome = None, [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            held = claim(root, resuming, run_config)
        except Exception as error:  # every rank raises it, so none waits for the others at the next collective
            outcome = [error]
    if distributed:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise outcome[0]
    return held


def claim(root: str | Path, resuming: str | Path | None = None,
          run_config: dict[str, Any] | None = None) -> RunDirectory:
    """Lock `root`, check that this run may write there, remove the partial saves of its own run, record this
    start and write its `run_config` (if given). One process (rank 0) claims for the whole run."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / LOCK, "a")  # a probe too: a read-only mount is refused here, before step 1
    except OSError as error:
        raise RunDirectoryError(f"checkpoint.save={root} cannot be written: {error.strerror} ({error.filename}); "
                                "choose a writable directory") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        live = f"is in use by a live run ({_describe_start(_last_start(root))}, holding {root / LOCK})"
        raise RunDirectoryError(f"cannot resume {resuming}: {root} {live}; wait for it to end, or stop it first"
                                if resuming else
                                f"checkpoint.save={root} {live}; wait for it to end, or choose another checkpoint.save"
                                ) from None
    except OSError as error:  # a file system without locks (Lustre without -o flock): see the module docstring
        lock.close()
        lock = None
        print(f"warning: {root / LOCK} cannot be locked ({error.strerror}): a second run started into {root} "
              "while this one runs would not be refused", file=sys.stderr, flush=True)
    try:
        record = _read_record(root)
        problem = _refusal(root, record, resuming)
        if problem:
            raise RunDirectoryError(problem)
        for partial in partial_saves(root):  # this run's, torn by a crash (no live writer: we hold the lock)
            shutil.rmtree(partial)
        record = record or {"run_id": uuid.uuid4().hex[:12], "starts": []}
        record["starts"].append(_this_start(resuming))
        _write_atomically(root / OWNER, json.dumps(record, indent=1) + "\n")
        if run_config is not None:
            write_run_config(root, run_config)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    return RunDirectory(root, record["run_id"], lock)


def _refusal(root: Path, record: dict[str, Any] | None, resuming: str | Path | None) -> str | None:
    """Why this run may not use `root`, or None."""
    if resuming and save_root(resuming).resolve() == root.resolve():
        return None  # resuming the directory's own run
    complete, partial, latest = complete_checkpoints(root), partial_saves(root), (root / LATEST).is_file()
    starts = (record or {}).get("starts") or [{}]
    job = _launcher_job()
    if not resuming and not complete and job and any(start.get("job") == job for start in starts):
        return None  # the same launcher job started over before its first complete save (a requeue)
    if not (complete or partial or latest or record):
        return None
    found = "; ".join(filter(None, [
        complete and f"checkpoints {_names(complete)}",
        partial and f"incomplete saves {_names(partial)}",
        f"latest: {_marker_text(root)}" if latest else complete and f"no `{LATEST}`",
        record and f"run {record.get('run_id')} started {_describe_start(starts[0], pid=False)}",
    ]))
    if resuming:
        return (f"cannot resume {resuming} into checkpoint.save={root}: it holds another run ({found}); "
                f"`--load {resuming}` alone saves into its own directory, or choose an empty checkpoint.save")
    if complete:
        target = root if latest else complete[-1]
        return (f"checkpoint.save={root} already holds a run ({found}); resume it with --load {target}, "
                "or choose another checkpoint.save")
    return (f"checkpoint.save={root} already holds a run that has no complete checkpoint ({found}): nothing to "
            f"resume; delete {root} or choose another checkpoint.save")


def _names(paths: list[Path]) -> str:
    names = [p.name for p in paths]
    return ", ".join(names) if len(names) <= 4 else f"{names[0]}, {names[1]}, ..., {names[-1]} ({len(names)})"


def _marker_text(root: Path) -> str:
    try:
        return (root / LATEST).read_text().strip() or "empty"
    except (OSError, UnicodeDecodeError):
        return "unreadable"


def _launcher_job() -> str | None:
    """The launcher job this process belongs to, which a requeue or an elastic restart keeps."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm:{os.environ['SLURM_JOB_ID']}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return f"torchrun:{run_id}" if run_id and run_id != "none" else None


def _this_start(resuming: str | Path | None) -> dict[str, Any]:
    return dict(time=datetime.now(timezone.utc).isoformat(timespec="seconds"), host=socket.gethostname(),
                pid=os.getpid(), job=_launcher_job(), command=shlex.join(sys.argv),
                resumed_from=str(resuming) if resuming else None)


def _describe_start(start: dict[str, Any] | None, pid: bool = True) -> str:
    if not start:
        return "its record is not written yet"
    where = f"pid {start.get('pid')} on {start.get('host')}" if pid else f"on {start.get('host')}"
    return f"{where} at {start.get('time')}"


def _last_start(root: Path) -> dict[str, Any] | None:
    record = _read_record(root)
    return record["starts"][-1] if record and record["starts"] else None


def _read_record(root: Path) -> dict[str, Any] | None:
    """The owner record, None when there is none; refused by name when it is not one."""
    path = root / OWNER
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunDirectoryError(f"{path} is not a run record ({error}); a run directory's record is written by the "
                                "trainer: restore it, or choose another checkpoint.save") from None
    if not isinstance(record, dict) or not isinstance(record.get("starts"), list) or "run_id" not in record:
        raise RunDirectoryError(f"{path} is not a run record (no run_id and starts); restore it, or choose another "
                                "checkpoint.save")
    return record


def write_run_config(directory: Path, run_config: dict[str, Any]) -> None:
    """`run_config` (`RunConfig.to_dict`) as `directory/run_config.yaml`, readable and loadable with `--config`."""
    _write_atomically(directory / RUN_CONFIG, config_yaml(run_config))


def _write_atomically(path: Path, text: str) -> None:
    """Replace `path` by `text` so that a reader sees the old file or the new one, never part of it."""
    staging = path.with_name(path.name + STAGING)
    staging.write_text(text)
    os.replace(staging, path)

