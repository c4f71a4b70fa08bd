"""Every command answers `--help` without loading torch, megatron-core or transformers (seconds each): it parses
its arguments first, and its help is its module docstring.

A time limit would be a timed assertion on a shared machine; what makes `--help` slow is known (those imports), so
this checks that none of them happens, with `python -X importtime`, the interpreter's own record of every import.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COMMANDS = sorted([*REPO.glob("tools/*.py"), *REPO.glob("tools/*/*.py"), REPO / "examples" / "pretrain_bdgemma.py"])
HEAVY = {"torch", "megatron", "transformers"}


@pytest.mark.parametrize("script", COMMANDS, ids=lambda p: str(p.relative_to(REPO)))
def test_help_loads_nothing_heavy(script: Path):
    done = subprocess.run([sys.executable, "-X", "importtime", str(script), "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "argparse" in imported  # the record is there: it lists what the command imported
    assert not {name.split(".")[0] for name in imported} & HEAVY, sorted(n for n in imported if n.split(".")[0] in HEAVY)
    summary = ast.get_docstring(ast.parse(script.read_text())).splitlines()[0]
    assert done.stdout.startswith("usage: ") and " ".join(summary.split()) in " ".join(done.stdout.split())
