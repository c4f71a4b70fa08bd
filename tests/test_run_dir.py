"""Who owns a run directory (issue 21, item 3): the owner record, the lock, what a new run and a resume may use,
`--load` without `latest`, and saves that cannot be written (read-only mount, disk full), through the CLI where it
is CLI behaviour."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_bdgemma.training.run_dir import (
    LOCK, MEGATRON_TRACKER, METRICS, OWNER, RUN_CONFIG, RunDirectoryError, claim, claim_run_directory,
)
from tests.multiproc import run_in_processes

REPO = Path(__file__).resolve().parent.parent
SMALL = ["data.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4", "train.eval_interval=0",
         "optim.warmup_steps=1", "model.overrides={num_layers: 2, layer_types: [sliding_attention, full_attention]}",
         "train.log_interval=1"]


def _checkpoint(root: Path, step: int, latest: bool = True) -> None:
    """A stand-in for a complete checkpoint: what the ownership rules look at (the directory and `latest`)."""
    (root / f"iter_{step:07d}").mkdir(parents=True)
    (root / f"iter_{step:07d}" / "metadata.json").write_text("{}")
    if latest:
        (root / "latest").write_text(f"iter_{step:07d}")


def _listing(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def _record(root: Path) -> dict:
    return json.loads((root / OWNER).read_text())


def _refused(root: Path, message: str, resuming: Path | None = None) -> None:
    """`claim` refuses with `message` (a regex) and leaves the directory as it was (but for an empty `run.lock`,
    which is never removed: a process may be about to lock it)."""
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.name != LOCK}
    with pytest.raises(RunDirectoryError, match=message):
        claim(root, resuming)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.name != LOCK} == before


def test_a_new_run_refuses_any_trace_of_another_run(tmp_path):
    """Checkpoints with or without `latest`, a partial save only, or only another run's record: each is refused by
    name with what to do; a directory with unrelated files only, or a fresh one, is taken and recorded."""
    root = tmp_path / "run"
    _checkpoint(root, 2, latest=False)
    _checkpoint(root, 3, latest=False)
    _refused(root, rf"^checkpoint\.save={root} already holds a run \(checkpoints iter_0000002, iter_0000003; no "
                   rf"`latest`\); resume it with --load {root}/iter_0000003, or choose another checkpoint\.save$")
    (root / "latest").write_text("iter_0000003")
    _refused(root, rf"\(checkpoints iter_0000002, iter_0000003; latest: iter_0000003\); resume it with --load {root},")

    partial = tmp_path / "partial"
    (partial / "iter_0000004.tmp").mkdir(parents=True)
    _refused(partial, rf"^checkpoint\.save={partial} already holds a run that has no complete checkpoint \(incomplete "
                      rf"saves iter_0000004\.tmp\): nothing to resume; delete {partial} or choose another")

    recorded = tmp_path / "recorded"
    claim(recorded).release()  # a run that stopped before its first save
    first = _record(recorded)
    assert len(first["starts"]) == 1 and first["starts"][0]["pid"] == os.getpid()
    _refused(recorded, rf"already holds a run that has no complete checkpoint \(run {first['run_id']} started on "
                       rf"{re.escape(first['starts'][0]['host'])} at .*\): nothing to resume")

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    held = claim(other)
    assert _listing(other) == ["notes.txt", OWNER, LOCK] and held.run_id == _record(other)["run_id"]
    held.release()


def test_resume_continues_its_own_directory_and_refuses_anothers(tmp_path):
    """`--load DIR` (or DIR/iter_N) saving into DIR is the same run: one more start in its record, and its own torn
    saves are removed. A directory saved before records existed is adopted. Resuming into another run's directory is
    refused; into an empty one it starts a new record that says where it came from."""
    root = tmp_path / "run"
    held = claim(root)
    run_id = held.run_id
    held.release()
    _checkpoint(root, 2)
    (root / "iter_0000003.tmp").mkdir()  # a save the last start never finished
    claim(root, resuming=root).release()
    claim(root, resuming=root / "iter_0000002").release()
    record = _record(root)
    assert record["run_id"] == run_id and [s["resumed_from"] for s in record["starts"]] == [
        None, str(root), str(root / "iter_0000002")]
    assert _listing(root) == ["iter_0000002", "latest", OWNER, LOCK]

    legacy = tmp_path / "legacy"
    _checkpoint(legacy, 5)
    claim(legacy, resuming=legacy).release()
    assert _record(legacy)["starts"][0]["resumed_from"] == str(legacy)

    _refused(legacy, rf"^cannot resume {root} into checkpoint\.save={legacy}: it holds another run \(checkpoints "
                     rf"iter_0000005; latest: iter_0000005; run \w+ started .*\); `--load {root}` alone saves into "
                     rf"its own directory, or choose an empty checkpoint\.save$", resuming=root)
    fork = tmp_path / "fork"
    claim(fork, resuming=root).release()
    assert _record(fork)["run_id"] != run_id and _record(fork)["starts"][0]["resumed_from"] == str(root)


def test_a_requeued_job_starts_over_only_before_its_first_checkpoint(tmp_path, monkeypatch):
    """The same Slurm job started again (a requeue) into the directory it began may start over while there is no
    complete checkpoint (a partial save of its own is removed); another job may not, nor may the same job once a
    checkpoint exists (it resumes with --load, as the sbatch templates do)."""
    root = tmp_path / "run"
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    claim(root).release()
    (root / "iter_0000001.tmp").mkdir()
    claim(root).release()
    assert [s["job"] for s in _record(root)["starts"]] == ["slurm:42", "slurm:42"]
    assert _listing(root) == [OWNER, LOCK]
    monkeypatch.setenv("SLURM_JOB_ID", "43")
    _refused(root, r"already holds a run that has no complete checkpoint")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    _checkpoint(root, 1)
    _refused(root, rf"already holds a run \(checkpoints iter_0000001; .*resume it with --load {root},")


def test_without_file_locks_the_run_starts_and_says_what_is_not_guarded(tmp_path, monkeypatch, capsys):
    """Lustre without `-o flock` answers flock with ENOSYS: the run goes on unlocked, with one warning; the checks on
    the directory's contents still apply."""
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    root = tmp_path / "run"
    held = claim(root)
    assert held.lock is None and _record(root)["run_id"] == held.run_id
    held.release()
    assert capsys.readouterr().err == (f"warning: {root}/{LOCK} cannot be locked (Function not implemented): a second "
                                       f"run started into {root} while this one runs would not be refused\n")
    _refused(root, "already holds a run that has no complete checkpoint")


def test_load_without_latest_names_the_checkpoints_it_found(tmp_path):
    from megatron_bdgemma.training.resume import resume_run_config

    root = tmp_path / "run"
    _checkpoint(root, 10, latest=False)
    _checkpoint(root, 20, latest=False)
    with pytest.raises(ValueError, match=rf"^--load {root}: {root} has no `latest` marker to say which checkpoint is "
                                         rf"its newest; it holds iter_0000010, iter_0000020: give one, e\.g\. --load "
                                         rf"{root}/iter_0000020$"):
        resume_run_config(root)


def _claim_in_rank(rank: int, *roots: str) -> list[str]:
    outcomes = []
    for root in roots:
        try:
            held = claim_run_directory(root)
        except RunDirectoryError as error:
            outcomes.append(f"refused: {error}")
        else:
            outcomes.append("held" if held is not None else "not held")
    return outcomes


def test_every_rank_gets_the_refusal_and_only_rank_0_holds_the_directory(tmp_path):
    taken, foreign = tmp_path / "taken", tmp_path / "foreign"
    _checkpoint(foreign, 7)
    (ours, refused0), (theirs, refused1) = run_in_processes(_claim_in_rank, 2, str(taken), str(foreign), timeout_s=120)
    assert (ours, theirs) == ("held", "not held")
    assert refused0 == refused1 and refused0.startswith(f"refused: checkpoint.save={foreign} already holds a run")


# ---- through the CLI --------------------------------------------------------------------------------------------


def _cli_args(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "examples" / "pretrain_bdgemma.py"), "--sample", "", *SMALL,
            f"data.cache_dir={tmp_path / 'data'}", *args]


def _env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cli_args(tmp_path, *args), env=_env(), capture_output=True, text=True, timeout=300)


def _last_line(done: subprocess.CompletedProcess) -> str:
    return (done.stderr.strip() or done.stdout.strip()).splitlines()[-1]


def test_cli_a_second_live_run_is_refused_and_a_killed_run_leaves_no_lock(tmp_path):
    """Run A saves every step; B, `--load` of A's directory while A runs, is refused by the lock, naming A's pid.
    A is then SIGKILLed (no clean-up runs): its lock is gone with it, so the directory resumes (the partial save
    the kill may have torn is removed)."""
    root = tmp_path / "run"
    # Its own session, so A and the checkpoint writer's helper process die together; at the lowest priority, so
    # that it does not slow B down on a small machine.
    a = subprocess.Popen(["nice", "-n", "19", *_cli_args(tmp_path, "train.steps=100000", "checkpoint.interval=1",
                                                          f"checkpoint.save={root}")],
                         env=_env(), stdout=subprocess.DEVNULL, stderr=open(tmp_path / "a.txt", "w"),
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (root / "latest").is_file():
            assert a.poll() is None and time.monotonic() < deadline, (tmp_path / "a.txt").read_text()[-3000:]
            time.sleep(0.5)
        b = _cli(tmp_path, "--load", str(root))
        assert a.poll() is None, "A must still be running while B starts"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(a.pid, signal.SIGKILL)
        a.wait()
    assert b.returncode != 0 and "step " not in b.stdout
    assert re.search(rf"cannot resume {root}: {root} is in use by a live run \(pid {a.pid} on .* at .*, holding "
                     rf"{root}/{LOCK}\); wait for it to end, or stop it first$", _last_line(b)), b.stderr[-3000:]

    claim(root, resuming=root).release()
    assert [s["pid"] for s in _record(root)["starts"]] == [a.pid, os.getpid()]
    assert not list(root.glob("*.tmp")) and (root / "latest").is_file(), _listing(root)


@pytest.fixture
def tmpfs(tmp_path):
    """Mounts a tmpfs with the given options (a full or read-only file system: root ignores permissions, so a
    chmod'ed directory would not do); unmounted afterwards."""
    mounted = []

    def mount(name: str, options: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
        if done.returncode:  # a check that cannot run here fails rather than passing unseen
            pytest.fail(f"cannot mount a tmpfs here ({done.stderr.strip()}): this test needs a full and a read-only "
                        "file system; run the suite as root or inside `unshare -rm` (a user and mount namespace)")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_cli_a_full_disk_and_a_read_only_save_are_named(tmp_path, tmpfs, model_parallel):
    """A 5 MiB file system holds the first checkpoint (3.4 MB) but not the second: the run stops naming the directory,
    the partial save is gone and the first checkpoint still loads. A read-only one is refused before step 1."""
    from megatron_bdgemma.checkpointing import load_model
    from megatron_bdgemma.conversion.megatron_checkpoint import read_extra

    root = tmpfs("full", "size=5m") / "run"
    done = _cli(tmp_path, "train.steps=3", "checkpoint.interval=1", f"checkpoint.save={root}")
    assert done.returncode != 0 and f"saved checkpoint {root}/iter_0000001" in done.stdout, done.stderr[-3000:]
    assert re.search(rf"no space left on {root} while saving iter_0000002 \([\d.]+ MiB free, the checkpoint needs "
                     rf"[\d.]+ MiB\): removed the partial iter_0000002\.tmp; {root}/iter_0000001 is kept$",
                     _last_line(done)), done.stderr[-3000:]
    assert _listing(root) == ["iter_0000001", "latest", MEGATRON_TRACKER, METRICS, OWNER, LOCK, RUN_CONFIG]
    assert read_extra(root)["step"] == 1 and (root / MEGATRON_TRACKER).read_text() == "1"
    load_model(root)

    read_only = tmpfs("ro", "ro,size=1m") / "run"
    done = _cli(tmp_path, "train.steps=2", f"checkpoint.save={read_only}")
    assert done.returncode != 0 and "step " not in done.stdout
    assert re.search(rf"checkpoint\.save={read_only} cannot be written: Read-only file system \({read_only}\); "
                     "choose a writable directory$", _last_line(done)), done.stderr[-3000:]
