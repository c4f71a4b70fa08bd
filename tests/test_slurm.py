"""The Slurm templates: valid bash, their log folder exists, and a resubmitted or requeued job resumes its run.

The job scripts run for real with `sbatch`'s environment stubbed: `.venv/bin/activate` puts stand-ins for
`torchrun`, `srun` and `scontrol` first on PATH; the `torchrun` stand-in records the command line it was given.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
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
    _executable(stubs / "torchrun", '#!/bin/bash\nprintf "%s\\n" "$@" > torchrun_args\n')
    _executable(stubs / "srun", '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    _executable(stubs / "scontrol", "#!/bin/bash\necho node0\n")
    return tmp_path


def _job(submit_dir: Path, template: Path, *args: str) -> list[str]:
    """Run `template` as Slurm would and return the arguments its torchrun got."""
    env = os.environ | dict(SLURM_JOB_NODELIST="node[0-1]", SLURM_NNODES="2", SLURM_JOB_ID="42",
                            SLURM_GPUS_PER_NODE="8", OMP_NUM_THREADS="1")
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
