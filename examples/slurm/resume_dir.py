"""Print the directory a Slurm job must resume from: its run's `checkpoint.save` when that already holds a run.

    SAVE=$(python examples/slurm/resume_dir.py CONFIG [job arguments ...])   # empty: a new run

The job's arguments are those of `examples/pretrain_bdgemma.py`; only its `section.key=value` overrides matter
here. A resubmitted job, or one Slurm requeued after preemption or a node failure, then resumes with `--load` of
its own save directory (the trainer refuses to start a new run in a directory that holds one).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from megatron_bdgemma.training.config import load_run_config

# The marker `megatron_bdgemma.training.run_dir` writes last in a run directory; read here without importing
# torch, which that module needs.
LATEST = "latest"


def resume_dir(config: str, job_args: list[str]) -> Path | None:
    overrides = [arg for arg in job_args if re.match(r"^\w+(\.\w+)+=", arg)]
    save = load_run_config(config, overrides).checkpoint.save
    return Path(save) if save and (Path(save) / LATEST).is_file() else None


if __name__ == "__main__":
    found = resume_dir(sys.argv[1], sys.argv[2:])
    print(found or "")
