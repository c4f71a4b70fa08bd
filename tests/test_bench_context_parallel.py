"""tools/bench_context_parallel.py runs end to end on CPU at its `--quick` size (S = 1024, CP = 1 and CP = 2 gloo
processes): the RESULT line is printed and agrees with the table, the CP = 2 ranks' collectives are the design's
schedule and byte count, and the loss sums agree (no timing or memory target is asserted: at this size fixed costs
dominate and the machine's load varies; docs/performance.md has the real run)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
LAYOUTS = ("pretrain", "sft")


def test_quick_run_prints_consistent_result():
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TOOLS.parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(TOOLS / "bench_context_parallel.py"), "--quick"], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-1].startswith("RESULT "), done.stdout
    result = {k: float(v) for k, v in (item.split("=") for item in lines[-1].split()[1:])}
    assert set(result) == {f"{layout}_{what}_ratio" for layout in LAYOUTS
                           for what in ("peak", "torch_peak", "attention_cpu", "step_cpu")} | {"seq"}
    assert all(math.isfinite(v) and v > 0 for v in result.values()) and result["seq"] == 1024
    assert "attention block_sparse" in done.stdout and "1 thread(s) per rank" in done.stdout

    sections = done.stdout.split("\n\n")[1:]
    assert [s.split(":")[0] for s in sections] == list(LAYOUTS)
    for layout, section in zip(LAYOUTS, sections, strict=True):
        rows = {m["name"].strip(): m for m in (re.match(
            r"(?P<name>[A-Za-z ]+?(?:MiB|s|forward|backward|1e9))\s+(?P<one>[\d.]+)\s+(?P<r0>[\d.]+)\s+(?P<r1>[\d.]+)\s+"
            r"(?P<ratio>[\d.]+)\s+(?P<low>[\d.]+)\.\.\s*(?P<high>[\d.]+)", line) for line in section.splitlines()) if m}
        assert set(rows) == {"peak MiB", "torch peak MiB", "attention CPU s", "forward", "backward",
                             "attention reads 1e9", "step CPU s", "step wall s"}, section
        # The kernel's work is split, not repeated: the ranks' reads sum to one process's, each about half (1/2 on the
        # full layer, a little more on the sliding one for the rank without chunk 0: at most 1/(2(1 − W/2L)) = 0.533
        # of the whole at W = 128, L = 1024, docs/design.md §14).
        reads = {column: float(rows["attention reads 1e9"][column]) for column in ("one", "r0", "r1")}
        assert reads["r0"] + reads["r1"] == pytest.approx(reads["one"], rel=2e-3), (layout, reads)
        assert 0.45 < float(rows["attention reads 1e9"]["ratio"]) <= 0.533, (layout, reads)
        # One round: the ratio is the worse CP = 2 rank over CP = 1, and the range is that one value.
        for name, key in (("peak MiB", "peak"), ("torch peak MiB", "torch_peak"), ("attention CPU s", "attention_cpu"),
                          ("step CPU s", "step_cpu")):
            row = rows[name]
            assert float(row["ratio"]) == result[f"{layout}_{key}_ratio"] == float(row["low"]) == float(row["high"])
            if float(row["one"]) >= 10:  # printed to 0.1 MiB / 1 ms: the ratio of the printed cells is meaningful
                worse = max(float(row["r0"]), float(row["r1"]))
                assert float(row["ratio"]) == pytest.approx(worse / float(row["one"]), rel=0.01), (layout, name)
        for column in ("one", "r0", "r1"):  # attention = its forward + its backward
            parts = float(rows["forward"][column]) + float(rows["backward"][column])
            assert float(rows["attention CPU s"][column]) == pytest.approx(parts, abs=0.0015), (layout, column)
        # The design's collectives (docs/design.md §14), per rank: per layer and K/V tensor one all-gather for the
        # encoder, pass 1 and pass 2 each, one reduce-scatter for the encoder and for pass 2; 2 layers.
        for rank in (0, 1):
            line = next(line for line in section.splitlines() if line.startswith(f"CP=2 rank {rank} collectives:"))
            moved, expected = re.search(r": ([\d.]+) MiB moved .*design §14: ([\d.]+) MiB$", line).groups()
            assert moved == expected and float(moved) > 0, line
            assert "all_gather_into_tensor 12×" in line and "reduce_scatter_tensor 8×" in line, line
            assert "all_reduce" not in line, line
        agreement = re.search(r"agrees to ([\d.e+-]+) relative \(allowed 1e-04\)", section)
        assert agreement and float(agreement[1]) <= 1e-4, section


@pytest.mark.parametrize("argv,message", [
    (["--seq", "1000"], "--seq must be a multiple of 4 · --block"),
    (["--rounds", "0"], "--rounds must be >= 1"),
])
def test_bad_arguments_are_refused_by_name(argv, message, capsys):
    sys.path.insert(0, str(TOOLS))
    import bench_context_parallel

    with pytest.raises(SystemExit) as exit_info:
        bench_context_parallel.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
