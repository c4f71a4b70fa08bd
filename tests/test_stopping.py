"""Stopping early (issue 21, items 1 and 2; `megatron_bdgemma/training/stopping.py`), through the CLI where it is CLI
behaviour: a signal stops the run after its step with a checkpoint and one line, leaves no process behind, and the
run resumes bit for bit; a non-finite loss or gradient on any rank stops every rank before the update (or skips the
update, `train.skip_nonfinite_steps`), and nothing non-finite is ever saved."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import psutil
import pytest
import torch

from megatron_bdgemma.training.config import load_run_config
from tests.multiproc import run_in_processes
from tests.test_robustness import CONFIG, REPO, SMALL

SCRIPT = str(REPO / "examples" / "pretrain_bdgemma.py")
LINE = re.compile(r"^step +(\d+)/\d+ \| diffusion (\S+) \| ar (\S+) \|", re.M)


class _Job:
    """A CLI run in its own session, its output (stdout and stderr) read line by line as it comes."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.seen: set[int] = set()
        """Every process seen in the job's process tree (`children`)."""

    def _read(self) -> None:
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                raise AssertionError(f"ended before {pattern!r}:\n" + "\n".join(self.lines))
            self.lines.append(line)
            if re.search(pattern, line):
                return line

    def children(self) -> list[psutil.Process]:
        found = psutil.Process(self.process.pid).children(recursive=True)
        self.seen |= {self.process.pid, *(p.pid for p in found)}
        return found

    def finish(self, timeout: float = 300) -> str:
        self.process.wait(timeout=timeout)
        while (line := self._queue.get(timeout=timeout)) is not None:
            self.lines.append(line)
        self.process.stdout.close()
        return "\n".join(self.lines)

    def leftovers(self) -> list[str]:
        """Processes still alive from the job: in its tree as seen, or in the process group or session of any."""
        groups = {self.process.pid, *self.seen}
        left = []
        for process in psutil.process_iter(["pid", "cmdline", "status"]):
            try:
                mine = process.pid in self.seen or os.getpgid(process.pid) in groups or os.getsid(process.pid) in groups
            except OSError:
                continue
            if mine and process.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(f"{process.pid}: {' '.join(process.info['cmdline'] or [])[:120]}")
        return left


def _overrides(tmp: Path, *more: str) -> list[str]:
    return [f"data.cache_dir={tmp / 'data'}", *SMALL, "train.log_interval=1", *more]


def _build_data_cache(tmp: Path, *overrides: str) -> None:
    """Build the run's data cache in this process first: ranks that start on an empty cache race (issue 21, 5b)."""
    from megatron_bdgemma.training.data import build_step_data
    from megatron_bdgemma.training.trainer import build_model_config

    run = load_run_config(CONFIG, _overrides(tmp, *overrides))
    build_step_data(run, build_model_config(run))


def _tensors(checkpoint: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds (model and optimizer), by key, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp_to_torch_save(str(checkpoint), str(scratch))
    return {k: v for k, v in torch.load(scratch, weights_only=False).items() if isinstance(v, torch.Tensor)}


def _printed_losses(output: str) -> dict[int, tuple[str, str]]:
    return {int(step): (diffusion, ar) for step, diffusion, ar in LINE.findall(output)}


def _iters(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("iter_*"))


def test_ctrl_c_stops_after_the_step_saves_and_resumes_bit_for_bit(tmp_path, model_parallel):
    """SIGINT (Ctrl-C), sent again and again until the process has exited, also while its save is written: one line,
    no traceback, exit status 0, the step's checkpoint, no process left (megatron-core's checkpoint writer starts
    none: `checkpointing.write_results_in_this_process`). The run resumed from it to the end: its losses and final
    checkpoint (every model and optimizer tensor) equal an uninterrupted run's, and it leaves no process either."""
    from megatron_bdgemma.training.trainer import train

    root, steps = tmp_path / "run", 12
    overrides = _overrides(tmp_path, f"train.steps={steps}", "checkpoint.interval=2")
    cli = [sys.executable, SCRIPT, "--sample", ""]

    first = _Job([*cli, *overrides, f"checkpoint.save={root}"], tmp_path)
    first.wait_for(r"^saved checkpoint .*iter_0000002$")
    assert first.children() == []  # after a save: the checkpoint writer left no helper process
    during_save = 0
    while first.process.poll() is None:
        during_save += any(root.glob("iter_*.tmp"))
        first.process.send_signal(signal.SIGINT)
        time.sleep(0.002)
    output = first.finish()
    stopped = re.search(rf"^stopped by SIGINT at step (\d+); saved iter_(\d+); resume with --load {root}$", output, re.M)
    assert first.process.returncode == 0 and stopped and stopped[1] == stopped[2].lstrip("0"), output
    assert during_save > 0 and "SIGINT again: the run is already stopping" in output, output
    assert "KeyboardInterrupt" not in output and "Traceback" not in output and first.leftovers() == []
    n = int(stopped[1])
    assert (root / "latest").read_text() == f"iter_{n:07d}" and (root / f"iter_{n:07d}" / "metadata.json").is_file()

    resumed = _Job([*cli, "--load", str(root)], tmp_path)
    output += "\n" + resumed.finish()
    assert resumed.process.returncode == 0 and f"saved checkpoint {root}/iter_{steps:07d}" in output, output
    assert resumed.leftovers() == []

    reference = train(load_run_config(CONFIG, [*overrides, f"checkpoint.save={tmp_path / 'reference'}"]))
    # Each step printed once over the two runs, with the uninterrupted run's losses.
    assert _printed_losses(output) == {h["step"]: (f"{h['diffusion']:.4f}", f"{h['ar']:.4f}") for h in reference}
    assert len(LINE.findall(output)) == steps and n < steps
    final = _tensors(root / f"iter_{steps:07d}", tmp_path / "resumed.pt")
    uninterrupted = _tensors(tmp_path / "reference" / f"iter_{steps:07d}", tmp_path / "reference.pt")
    assert final.keys() == uninterrupted.keys() and len(final) > 100
    assert [k for k in final if not torch.equal(final[k], uninterrupted[k])] == []


def test_sigusr1_stops_a_run_without_checkpoint_save_and_handlers_are_put_back(tmp_path, model_parallel, capsys,
                                                                              monkeypatch):
    """SIGUSR1 (what `#SBATCH --signal=USR1@T` sends) stops like SIGTERM and SIGINT; without `checkpoint.save` the
    line says nothing was saved. The run's handlers replace the previous ones only while it trains; after a stop,
    further signals are ignored until the process exits."""
    from megatron_bdgemma.training.metrics import MetricsLogger
    from megatron_bdgemma.training.stopping import STOP_SIGNALS, RunStopped, StopCheck
    from megatron_bdgemma.training.trainer import train

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    log_step = MetricsLogger.log_step

    def signalled_after_step_1(self, step, metrics):
        log_step(self, step, metrics)
        if step == 1:  # after step 1's check: step 2 is finished, then the run stops
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(MetricsLogger, "log_step", signalled_after_step_1)
    try:
        with StopCheck():
            assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} != previous
        assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == previous
        with pytest.raises(RunStopped) as stopped:
            train(load_run_config(CONFIG, _overrides(tmp_path, "train.steps=5", "checkpoint.save=null")))
        assert stopped.value.code == 0 and (stopped.value.signal_name, stopped.value.step) == ("SIGUSR1", 2)
        assert capsys.readouterr().out.splitlines()[-1] == ("stopped by SIGUSR1 at step 2; not saved: checkpoint.save "
                                                           "is not set")
        assert {signal.getsignal(sig) for sig in STOP_SIGNALS} == {signal.SIG_IGN}
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_nonfinite_values_skip_then_stop_before_the_update_and_are_never_saved(tmp_path):
    """`optim.lr=1e6` (the issue's divergence): steps 1-2 are finite, step 3's gradients are not and it is skipped
    (`train.skip_nonfinite_steps=1`), step 4 stops the run with a named one-line error and exit status 3. Every checkpoint
    is finite; the skipped step's (iter_3) equals step 2's in every model and optimizer tensor; `keep_last=2` with a
    save per step kept step 2's, the newest of a step with finite values; nothing was saved at or after step 4."""
    from megatron_bdgemma.conversion.megatron_checkpoint import read_extra

    root = tmp_path / "run"
    job = _Job([sys.executable, SCRIPT, "--sample", "", *_overrides(tmp_path), f"checkpoint.save={root}",
                "train.steps=8", "checkpoint.interval=1", "checkpoint.keep_last=2", "optim.lr=1.0e+6",
                "train.skip_nonfinite_steps=1"], tmp_path)
    output = job.finish()
    assert job.process.returncode == 3, output  # EXIT_DIVERGED
    assert re.search(r"^step 3: skipped, non-finite local gradient norm \(nan on rank 0\); no update applied "
                     r"\(1 of train.skip_nonfinite_steps=1\)$", output, re.M), output
    error = re.search(r"^error: step 4: non-finite (.+); the update was not applied and nothing was saved at this step; the "
                      rf"newest checkpoint, {root}/iter_0000003, is from before it: resume with --load {root} and a "
                      r"lower optim.lr; train.skip_nonfinite_steps=1 already skipped step 3$", output, re.M)
    assert error and "nan on rank 0" in error[1], output
    assert sorted(_printed_losses(output)) == [1, 2]

    assert _iters(root) == ["iter_0000002", "iter_0000003"] and (root / "latest").read_text() == "iter_0000003"
    before, skipped = (_tensors(root / name, tmp_path / f"{name}.pt") for name in _iters(root))
    assert all(torch.isfinite(t).all() for t in [*before.values(), *skipped.values()] if t.is_floating_point())
    assert before.keys() == skipped.keys() and [k for k in before if not torch.equal(before[k], skipped[k])] == []
    extra = read_extra(root / "iter_0000003")
    assert (extra["step"], extra["skipped_steps"]) == (3, [3])


def test_torchrun_one_rank_signalled_every_rank_stops(tmp_path, model_parallel):
    """torchrun, 2 gloo ranks (DP=2, distributed optimizer): SIGTERM reaches rank 1 only, the ranks agree to stop at
    the same step, save, rank 0 prints the one line, both exit 0, so torchrun does too, without a failure report."""
    root = tmp_path / "run"
    _build_data_cache(tmp_path, "train.steps=200")
    job = _Job([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", SCRIPT,
                "--sample", "", *_overrides(tmp_path), f"checkpoint.save={root}", "train.steps=200"], tmp_path)
    job.wait_for(r"^step +2/")
    ranks = {int(p.environ().get("RANK", -1)): p for p in job.children() if "RANK" in p.environ()}
    assert sorted(ranks) == [0, 1], ranks
    ranks[1].send_signal(signal.SIGTERM)
    output = job.finish()
    lines = re.findall(rf"^stopped by SIGTERM at step (\d+); saved iter_(\d+); resume with --load {root}$", output, re.M)
    assert job.process.returncode == 0 and len(lines) == 1, output
    assert "ChildFailedError" not in output and "Traceback" not in output and job.leftovers() == []
    assert (root / "latest").read_text() == f"iter_{int(lines[0][0]):07d}"


def _one_rank_nonfinite(rank: int, tmp: str) -> tuple[list[bool], list[str]]:
    """2 ranks (DP=2, distributed optimizer), 1 clean step, then rank 1's diffusion loss is NaN for two steps: the
    first is skipped on both ranks, the second raises on both; neither changes a parameter or optimizer tensor."""
    from unittest import mock

    from megatron_bdgemma.model import BDGemmaModel
    from megatron_bdgemma.training.stopping import NonFiniteError
    from megatron_bdgemma.training.trainer import setup, train_step

    state = setup(load_run_config(CONFIG, _overrides(Path(tmp), "train.steps=4", "checkpoint.save=null",
                                                     "train.skip_nonfinite_steps=1")))
    for chunk in state.model:
        chunk.train()
    train_step(state)

    def tensors() -> list[torch.Tensor]:
        optimizers = getattr(state.optimizer, "chained_optimizers", [state.optimizer])
        moments = [v for o in optimizers for s in o.optimizer.state.values() for v in s.values()]
        return [t.detach().clone() for t in [*state.model[0].parameters(), *moments] if isinstance(t, torch.Tensor)]

    forward = BDGemmaModel.training_forward

    def nan_on_rank_1(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if rank == 1:
            out.diffusion_loss_sum = out.diffusion_loss_sum * float("nan")
        return out

    unchanged, messages = [], []
    with mock.patch.object(BDGemmaModel, "training_forward", nan_on_rank_1):
        before = tensors()
        _, verdict = train_step(state)
        messages.append(verdict.skipped)
        unchanged.append(all(torch.equal(a, b) for a, b in zip(before, tensors(), strict=True)))
        try:
            train_step(state)
        except NonFiniteError as error:
            messages.append(str(error))
        unchanged.append(all(torch.equal(a, b) for a, b in zip(before, tensors(), strict=True)))
    return unchanged, messages


def test_nonfinite_on_one_rank_stops_every_rank_before_the_update(tmp_path, model_parallel):
    _build_data_cache(tmp_path, "train.steps=4")
    ranks = run_in_processes(_one_rank_nonfinite, 2, str(tmp_path))
    assert ranks[0] == ranks[1], ranks  # the same decision and the same message on both ranks
    unchanged, (skipped, error) = ranks[0]
    assert unchanged == [True, True]
    assert skipped == "diffusion loss (nan on rank 1) and local gradient norm (nan on ranks 0, 1)"
    assert error == ("step 3: non-finite diffusion loss (nan on rank 1) and local gradient norm (nan on ranks 0, 1); "
                     "the update was not applied and nothing was saved at this step; no checkpoint of this run was "
                     "saved before it; train.skip_nonfinite_steps=1 already skipped step 2")


def test_megatron_checkpoint_writer_still_starts_a_process(monkeypatch):
    """Why `checkpointing.write_results_in_this_process` exists: megatron-core's writer gets its results queue from
    a `multiprocessing.Manager`, a second process. When this fails, megatron no longer does that: drop the workaround."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # As in a fresh process (a test that saved through megatron-core directly, without the workaround, made one).
    monkeypatch.setattr(filesystem_async, "_results_queue", None)
    before = {p.pid for p in psutil.Process().children()}
    results = filesystem_async.get_write_results_queue()
    try:
        started = [p for p in psutil.Process().children() if p.pid not in before]
        assert started and "multiprocessing" in " ".join(started[0].cmdline()), started
    finally:
        results._manager.shutdown()
