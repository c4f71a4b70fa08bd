"""tools/bench_packing.py runs end to end on CPU at its `--quick` size: the RESULT line is printed and its numbers agree
with each other and with the table (no timing is asserted: only what the figures must satisfy whatever the load)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.mark.parametrize("score", ["one_block", "all_blocks"])
def test_quick_run_prints_consistent_result(score):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TOOLS.parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(TOOLS / "bench_packing.py"), "--quick", "--breakdown", "--score", score],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-1].startswith("RESULT "), done.stdout
    result = {k: float(v) for k, v in (item.split("=") for item in lines[-1].split()[1:])}
    assert set(result) == {"packed_over_microbatch4", "packed_over_fixed_shape", "control_packed_over_unpacked",
                           "efficiency_packed", "efficiency_microbatch4", "efficiency_fixed_shape", "valid_tokens",
                           "records", "seq_length", "positions_ratio_encoder", "positions_ratio_canvas",
                           "dp_balance_stride", "dp_balance_dealt"}
    assert all(math.isfinite(v) and v > 0 for v in result.values())
    assert (result["records"], result["seq_length"]) == (12, 256)
    # Every side trains the same tokens; fixed-shape rows are 4 chats × seq_length per micro-batch of 4.
    assert result["efficiency_fixed_shape"] == pytest.approx(
        result["valid_tokens"] / (result["records"] * result["seq_length"]), abs=1e-4)
    assert 1 >= result["efficiency_packed"] > result["efficiency_microbatch4"] > result["efficiency_fixed_shape"]
    # The padding removed: packed rows have none, so the encoder's ratio is 1 / micro-batch 4's efficiency; the
    # canvas has none under one_block (one block per chat everywhere) and unpacked padding under all_blocks.
    assert result["efficiency_packed"] == 1
    assert result["positions_ratio_encoder"] == pytest.approx(1 / result["efficiency_microbatch4"], abs=2e-3)
    assert (result["positions_ratio_canvas"] == 1) == (score == "one_block")
    assert "attention block_sparse" in done.stdout and "loss sums agree" in done.stdout
    assert f"objective.score {score}" in done.stdout
    # Dealt by size, the most loaded rank carries at most one chat more than the mean (largest-first's bound).
    longest_chat = max(int(m) for m in re.findall(r"laid out \d+ to (\d+) tokens", done.stdout))
    assert 1 <= result["dp_balance_dealt"] <= 1 + longest_chat * 4 / result["valid_tokens"] + 1e-3
    assert result["dp_balance_stride"] >= 1

    # The table: each side's valid tokens / row tokens is its efficiency, and with one round each speed-up is the
    # ratio of the two sides' tokens per CPU-second (integers in the table, so compared to 1e-2).
    table = {m["side"]: m for m in (re.match(
        r"(?P<side>[a-z][a-z0-9 ,-]+?)\s+(?P<mbs>\d+)\s+(?P<rows>\d+)\s+(?P<canvas>\d+)\s+(?P<eff>[\d.]+)\s+"
        r"(?P<cpu>[\d.]+)\s+\S+\s+(?P<wall>[\d.]+)\s+(?P<tps>\d+)$", line) for line in lines) if m}
    assert set(table) == {"packed", "micro-batch 4", "fixed shape", "control, packed", "control, micro-batch 4",
                          "packed, encoder", "micro-batch 4, encoder"}
    for side, key in (("packed", "efficiency_packed"), ("micro-batch 4", "efficiency_microbatch4"),
                      ("fixed shape", "efficiency_fixed_shape")):
        assert result["valid_tokens"] / int(table[side]["rows"]) == pytest.approx(result[key], abs=1e-4), side
    canvas = {s: int(table[s]["canvas"]) for s in ("packed", "micro-batch 4", "fixed shape")}
    if score == "one_block":  # one block per chat on every side: the same canvas work
        assert len(set(canvas.values())) == 1, canvas
    else:  # every response block: unpacked canvases are padded to their micro-batch's longest response
        assert canvas["packed"] < canvas["micro-batch 4"] <= canvas["fixed shape"], canvas
    assert table["control, packed"]["eff"] == table["control, micro-batch 4"]["eff"] == "1.000"
    # --breakdown: each step is its encoder-only row plus the canvas, the encoder rows decode no canvas.
    for side in ("packed", "micro-batch 4"):
        line = next(line for line in lines if line.startswith(f"breakdown {side} "))
        step_s, encoder_s, canvas_s = (float(x) for x in re.findall(r"([\d.]+) (?:CPU s|\+|\()", line)[:3])
        assert step_s == float(table[side]["cpu"]) and encoder_s == float(table[f"{side}, encoder"]["cpu"]), line
        assert canvas_s == pytest.approx(step_s - encoder_s, abs=0.011), line
        assert f"{table[side]['canvas']} canvas positions" in line and table[f"{side}, encoder"]["canvas"] == "0"
    tps = {side: int(m["tps"]) for side, m in table.items()}
    assert result["packed_over_microbatch4"] == pytest.approx(tps["packed"] / tps["micro-batch 4"], rel=1e-2)
    assert result["packed_over_fixed_shape"] == pytest.approx(tps["packed"] / tps["fixed shape"], rel=1e-2)
    assert result["control_packed_over_unpacked"] == pytest.approx(
        tps["control, micro-batch 4"] / tps["control, packed"], rel=1e-2)


def test_layout_only_prints_the_padding_removed_and_dp_balance_alone():
    """`--layout-only`: no model, the encoder's positions ratio, the balance line and their RESULT; dealt by size,
    the most loaded rank is nearer the mean than by stride (largest-first's bound is checked in
    tests/test_packing.py)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TOOLS.parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(TOOLS / "bench_packing.py"), "--layout-only", "--records", "256",
                           "--dp", "16"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and lines[1].startswith("DP balance, 16 ranks of 16 chats"), done.stdout
    result = {k: float(v) for k, v in (item.split("=") for item in lines[-1].split()[1:])}
    assert (result["records"], result["dp"], result["sigma"]) == (256, 16, 1)
    assert 1 < result["positions_ratio_encoder"] < 4  # a micro-batch of 4 pads to at most 4× its valid tokens
    assert 1 <= result["dp_balance_dealt"] < result["dp_balance_stride"]


@pytest.mark.parametrize("argv,message", [
    (["--dp", "3"], "--dp must divide --records"),
    (["--records", "10"], "--records must be a positive multiple of 4"),
    (["--seq-length", "1000"], "--seq-length must be a multiple of 4 · --block"),
    (["--repeats", "0"], "--repeats must be >= 1"),
])
def test_bad_arguments_are_refused_by_name(argv, message, capsys):
    sys.path.insert(0, str(TOOLS))
    import bench_packing

    with pytest.raises(SystemExit) as exit_info:
        bench_packing.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
