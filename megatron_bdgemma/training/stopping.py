"""When a run stops before its last step, decided in one place and by every rank alike: on a signal, or on a
non-finite loss or gradient.

Megatron-LM's `--exit-signal-handler` (a signal sets a flag on the rank that gets it, the flag is all-reduced every
iteration, every rank saves and exits) and `--check-for-nan-in-loss-and-grad` (a non-finite loss or gradient norm
stops the run before the update, naming the rank) are one all-reduce per step here, `StopCheck.agree`, called after
the backward and before the optimizer changes anything:

- every rank contributes one row: the signal it received (0: none), its own diffusion and AR losses (its
  micro-batches, before the sum over data-parallel ranks) and the L2 norm of its gradient buffers (after their
  reduction, before clipping);
- the all-reduce sums the rows into one table that every rank holds (a NaN or inf survives a sum with zeros, in its
  own cell), so every rank takes the same decision and a non-finite value is named with the ranks it came from. The
  table is world size x 4 float64 values (32 KiB at 1024 ranks), small next to the step's gradient reduction.

Decisions, in this order:
1. A non-finite value anywhere: the step's update is not applied. While fewer than `train.skip_nonfinite_steps`
   steps of the run were skipped, this one is skipped too (no update, no LR step; the step's samples are used up, as
   in Megatron-LM's skipped iterations); otherwise every rank raises `NonFiniteError`. Nothing non-finite reaches a
   checkpoint: a checkpoint is written only after a step whose values were finite, or one that was skipped (its
   state is the previous step's).
2. A signal (SIGTERM, SIGINT, SIGUSR1) on any rank since the last check: the step is finished (its update applied),
   then the trainer saves and ends the process with `EXIT_STOPPED` (`RunStopped`).

Signal handlers only record: a signal never interrupts a step or a checkpoint save. A second signal while stopping is
acknowledged on stderr and otherwise ignored, so the save in progress completes (SIGKILL still ends the process; a
save cut short leaves its `iter_N.tmp`, and `latest` keeps naming the previous checkpoint). The handlers are set
with SA_RESTART (`signal.siginterrupt(sig, False)`), so system calls of the C++ code running at that moment (gloo,
NCCL, file writes) resume instead of failing with EINTR.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""What Slurm sends at preemption and at the time limit (SIGTERM; SIGUSR1 when asked with `--signal`), and Ctrl-C."""

EXIT_STOPPED = 0
"""Exit status of a run stopped by a signal after saving. Zero, because the run did what was asked and lost nothing:
torchrun reports any non-zero rank exit as a failure (`ChildFailedError`, on top of the ranks' own output), and the
Slurm templates decide to requeue by the signal they trapped, not by this status. The printed line tells a stop from
the end of training (so does `latest` < `train.steps`)."""

EXIT_DIVERGED = 3
"""Exit status of a run stopped by a non-finite loss or gradient (`NonFiniteError`): distinct from 1 (any other
error) so that a job script does not requeue a diverged run."""

QUANTITIES = ("diffusion loss", "AR loss", "local gradient norm")
"""The table's columns after the signal, in the order `agree` takes them."""


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient at `step`, raised on every rank alike before the update is applied."""

    exit_code = EXIT_DIVERGED
    """`runtime/cli.py` prints the message alone and exits with this, so a job script can tell divergence (do not
    requeue) from other errors."""

    def __init__(self, step: int, message: str) -> None:
        super().__init__(message)
        self.step = step


class RunStopped(SystemExit):
    """Ends the process with `EXIT_STOPPED` after a signal stop has saved (and rank 0 has printed its line)."""

    def __init__(self, signal_name: str, step: int) -> None:
        super().__init__(EXIT_STOPPED)
        self.signal_name, self.step = signal_name, step


class RunFinished(SystemExit):
    """Ends the process with status 0 before anything is built when the run a resume continues is already at its
    `train.steps` (rank 0 has printed its line): nothing to train, and nothing to sample that the run has not."""

    def __init__(self, step: int) -> None:
        super().__init__(0)
        self.step = step


@dataclass(frozen=True)
class Verdict:
    """What every rank does after the step's check."""

    signal: str | None = None
    """The signal that stops the run after this step (the lowest rank's that got one), or None."""
    skipped: str | None = None
    """Why this step is skipped (its non-finite values), or None: the update is applied."""


class StopCheck:
    """The per-step stop decision of a run; as a context manager it also handles `STOP_SIGNALS` in between.

    Args:
        skip_nonfinite_steps: how many steps of the run may be skipped for non-finite values (`train.skip_nonfinite_steps`).
        skipped: the steps skipped so far (from the checkpoint a run resumes); appended to as steps are skipped.
        save: the run's `checkpoint.save`, named in the error.
    """

    def __init__(self, skip_nonfinite_steps: int = 0, skipped: list[int] | None = None, save: str | None = None) -> None:
        self.skip_nonfinite_steps, self.save = skip_nonfinite_steps, save
        self.skipped = [] if skipped is None else skipped
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._rank0 = int(os.environ.get("RANK", "0")) == 0

    def __enter__(self) -> StopCheck:
        if threading.current_thread() is threading.main_thread():  # Python takes signals in the main thread only
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
                signal.siginterrupt(sig, False)
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc_info: Any) -> None:
        for sig, previous in self._previous.items():
            # Leaving because of a stop, the process is ending: one more signal (Slurm and torchrun send them to every
            # process, Ctrl-C may be pressed twice) would turn its clean exit into a death by signal.
            signal.signal(sig, signal.SIG_IGN if kind is not None and issubclass(kind, RunStopped) else previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        elif self._rank0:  # os.write: print() could be inside a write to the same stream right now
            os.write(2, f"{signal.Signals(signum).name} again: the run is already stopping after its current step; "
                        "that step and its checkpoint save complete first (SIGKILL would abort the save; the previous "
                        "checkpoint would stay in use)\n".encode())

    def agree(self, step: int, losses: torch.Tensor, grad_norm: torch.Tensor) -> Verdict:
        """The decision after `step`'s backward, the same on every rank (one all-reduce over all of them).

        Args:
            losses: this rank's [diffusion, AR] losses of the step (its micro-batches; zeros off the last stage).
            grad_norm: the L2 norm of this rank's gradient buffers.

        Raises `NonFiniteError` (on every rank) for a non-finite value when no skip is left.
        """
        world, rank = dist.get_world_size(), dist.get_rank()
        table = torch.zeros(world, 1 + len(QUANTITIES), dtype=torch.float64, device=losses.device)
        table[rank, 0] = self.received or 0
        table[rank, 1:3] = losses.detach().to(torch.float64)
        table[rank, 3] = grad_norm.detach().to(torch.float64)
        dist.all_reduce(table)
        rows = table.cpu().tolist()
        signals = [int(row[0]) for row in rows if row[0]]
        stop = signal.Signals(signals[0]).name if signals else None
        bad = _nonfinite(rows)
        if not bad:
            return Verdict(signal=stop)
        if len(self.skipped) < self.skip_nonfinite_steps:
            self.skipped.append(step)
            return Verdict(signal=stop, skipped=bad)
        raise NonFiniteError(step, self._message(step, bad))

    def _message(self, step: int, bad: str) -> str:
        from megatron_bdgemma.training.checkpointing import latest_checkpoint

        newest = latest_checkpoint(self.save) if self.save and Path(self.save).is_dir() else None
        where = (f"the newest checkpoint, {newest}, is from before it: resume with --load {self.save} and a lower "
                 "optim.lr" if newest else "no checkpoint of this run was saved before it")
        skips = (f"train.skip_nonfinite_steps={self.skip_nonfinite_steps} already skipped step"
                 f"{'s' if len(self.skipped) > 1 else ''} {', '.join(map(str, self.skipped))}" if self.skipped
                 else "train.skip_nonfinite_steps=N skips up to N such steps")
        return (f"step {step}: non-finite {bad}; the update was not applied and nothing was saved at this step; "
                f"{where}; {skips}")


def _nonfinite(rows: Sequence[Sequence[float]]) -> str:
    """The non-finite values of the table, by quantity and value, with their ranks ('' when all are finite)."""
    parts = []
    for column, quantity in enumerate(QUANTITIES, start=1):
        ranks_by_value: dict[str, list[int]] = {}
        for rank, row in enumerate(rows):
            if not math.isfinite(row[column]):
                ranks_by_value.setdefault(str(row[column]), []).append(rank)
        if ranks_by_value:
            parts.append(f"{quantity} (" + ", ".join(f"{value} on {_ranks(ranks)}"
                                                     for value, ranks in ranks_by_value.items()) + ")")
    return " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 1 else parts)


def _ranks(ranks: list[int], shown: int = 8) -> str:
    listed = ", ".join(map(str, ranks[:shown])) + (f" and {len(ranks) - shown} more" if len(ranks) > shown else "")
    return f"rank{'s' if len(ranks) > 1 else ''} {listed}"
