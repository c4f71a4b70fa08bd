"""The Slurm templates: valid bash, their log folder exists, a resubmitted or requeued job resumes its run, and the
early time-limit signal stops the ranks and requeues the job.

The job scripts run for real with `sbatch`'s environment stubbed: `.venv/bin/activate` puts stand-ins for
`torchrun`, `srun` and `scontrol` first on PATH; the `torchrun` stand-in records the command line it was given (and,
with FAKE_TRAINING_S set, trains until a SIGTERM), and it and `scontrol` record what they do in `events`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = sorted((REPO / "examples" / "slurm").glob("*.sbatch"))
CONFIG = "examples/configs/tiny_pretrain.yaml"


def test_templates_are_valid_bash_and_their_log_folder_ships():
    assert len(TEMPLATES) == 2, TEMPLATES
    for template in TEMPLATES:
        subprocess.run(["bash", "-n", str(template)], check=True)
        output = re.search(r"^#SBATCH --output=(\S+)$", template.read_text(), re.M).group(1)
        folder = REPO / Path(output).parent
        # Slurm opens the log file before the script runs: the folder must exist in a fresh clone.
        assert (folder / ".gitkeep").is_file(), f"{template.name}: {folder} is not in the repository"


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def submit_dir(tmp_path) -> Path:
    """The directory `sbatch` runs the job from: the repository's examples, a stub venv and stub Slurm tools."""
    shutil.copytree(REPO / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    stubs = tmp_path / ".venv" / "bin"
    stubs.mkdir(parents=True)
    (stubs / "activate").write_text(f'export PATH="{stubs}:$PATH"\n')
    _executable(stubs / "python", f'#!/bin/bash\nPYTHONPATH="{REPO}" exec "{sys.executable}" "$@"\n')
    _executable(stubs / "torchrun", """#!/bin/bash
printf "%s\\n" "$@" > torchrun_args
if [[ -n ${FAKE_TRAINING_S:-} ]]; then
  # the ranks take a while to save; torchrun exits 1 after passing a signal on to them
  trap 'echo "torchrun: TERM" >> events; sleep 0.3; echo "torchrun: exit" >> events; exit 1' TERM
  touch torchrun_started
  for _ in $(seq $((FAKE_TRAINING_S * 20))); do sleep 0.05; done
fi
exit ${FAKE_TORCHRUN_RC:-0}
""")
    _executable(stubs / "srun", '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    _executable(stubs / "scontrol", '#!/bin/bash\nif [[ $1 == show ]]; then echo node0; else echo "scontrol $*" >> events; fi\n')
    return tmp_path


JOB_ENV = dict(SLURM_JOB_NODELIST="node[0-1]", SLURM_NNODES="2", SLURM_JOB_ID="42", SLURM_GPUS_PER_NODE="8",
               OMP_NUM_THREADS="1")


def _job(submit_dir: Path, template: Path, *args: str) -> list[str]:
    """Run `template` as Slurm would and return the arguments its torchrun got."""
    env = os.environ | JOB_ENV
    subprocess.run(["bash", str(template), CONFIG, *args], cwd=submit_dir, env=env, check=True,
                   capture_output=True, text=True)
    args_file = submit_dir / "torchrun_args"
    words = args_file.read_text().splitlines()
    args_file.unlink()
    return words


@pytest.mark.parametrize("template", TEMPLATES, ids=[t.stem for t in TEMPLATES])
def test_resubmitted_job_resumes_its_run(submit_dir, template):
    job_args = ["checkpoint.save=runs/job", "train.steps=50", "--load", "ckpt/from_hf"]
    first = _job(submit_dir, template, *job_args)
    script = first.index("examples/pretrain_bdgemma.py")
    assert first[script:] == ["examples/pretrain_bdgemma.py", "--config", CONFIG, *job_args], first

    # The first submission saved a checkpoint; the resubmitted (or requeued) job resumes from it.
    save = submit_dir / "runs" / "job"
    (save / "iter_0000010").mkdir(parents=True)
    (save / "latest").write_text("iter_0000010")
    again = _job(submit_dir, template, *job_args)
    assert again[script:] == first[script:] + ["--load", "runs/job"], again


@pytest.mark.parametrize("template", TEMPLATES, ids=[t.stem for t in TEMPLATES])
def test_time_limit_signal_stops_the_ranks_and_requeues(submit_dir, template):
    """Slurm's early SIGUSR1 (to the batch shell only) becomes a SIGTERM to the launcher, which the script outlives;
    then the job is requeued. A SIGTERM (preemption, scancel) is passed on the same way without a requeue; a run that
    ends by itself is not requeued and its exit status is the job's."""
    text = template.read_text()
    for line in ("#SBATCH --signal=B:USR1@600", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
        assert re.search(f"^{re.escape(line)}$", text, re.M), f"{template.name}: no {line!r}"

    # A new run each time (resume_dir.py prints nothing): its torch import would cost seconds per job.
    _executable(submit_dir / ".venv" / "bin" / "python", "#!/bin/bash\necho\n")

    def job(signal_to_send: signal.Signals | None, **env: str) -> tuple[int, list[str]]:
        for name in ("torchrun_started", "events"):
            (submit_dir / name).unlink(missing_ok=True)
        process = subprocess.Popen(["bash", str(template), CONFIG], cwd=submit_dir, env=os.environ | JOB_ENV | env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if signal_to_send is not None:
            deadline = time.monotonic() + 30
            while not (submit_dir / "torchrun_started").exists():
                assert time.monotonic() < deadline and process.poll() is None, process.communicate()[0]
                time.sleep(0.05)
            process.send_signal(signal_to_send)
        output = process.communicate(timeout=60)[0]
        events = submit_dir / "events"
        return process.returncode, events.read_text().splitlines() if events.exists() else [], output

    rc, events, output = job(signal.SIGUSR1, FAKE_TRAINING_S="20")
    assert (rc, events) == (0, ["torchrun: TERM", "torchrun: exit", "scontrol requeue 42"]), output
    rc, events, output = job(signal.SIGTERM, FAKE_TRAINING_S="20")
    assert (rc, events) == (1, ["torchrun: TERM", "torchrun: exit"]), output
    rc, events, output = job(None, FAKE_TORCHRUN_RC="3")
    assert (rc, events) == (3, []), output
