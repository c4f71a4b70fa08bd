"""tools/bench_scale.py runs end to end on CPU at the tiny width (the GPU run is the same code at the real width):
the RESULT line is printed and its numbers agree with each other."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def test_cpu_smoke_run_prints_consistent_result():
    command = [sys.executable, str(TOOLS / "bench_scale.py"), "--layers", "1", "--seq", "256", "--tiny-width",
               "--warmup", "0", "--repeats", "1", "--peak-tflops", "0.5"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TOOLS.parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, done.stdout
    result = {k: float(v) for k, v in (item.split("=") for item in lines[0].split()[1:])}
    assert set(result) == {"step_s", "model_tflop", "model_tflops", "mfu", "diffusion_over_ar", "flop_ratio",
                           "peak_mem_gib", "step_ratio_vs_hf"}
    assert all(math.isfinite(v) for v in result.values())
    assert all(result[k] > 0 for k in result if k != "peak_mem_gib") and result["peak_mem_gib"] >= 0
    assert result["model_tflops"] == pytest.approx(result["model_tflop"] / result["step_s"], rel=2e-3)
    assert result["mfu"] == pytest.approx(result["model_tflops"] / 0.5, rel=2e-3)
    assert result["flop_ratio"] > 1  # the diffusion step adds two canvas passes to the AR step's work
    assert "ours, diffusion step" in done.stdout and "HF DiffusionGemma" in done.stdout


def test_fp8_without_a_gpu_is_refused_by_name(capsys, monkeypatch):
    sys.path.insert(0, str(TOOLS))
    import bench_scale
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same refusal on a machine with a GPU
    with pytest.raises(SystemExit):
        bench_scale.parse_args(["--fp8", "tensorwise"])
    assert "--fp8 needs a GPU with Transformer Engine" in capsys.readouterr().err
    assert bench_scale.peak_tflops(torch.device("cpu"), None) is None
    assert bench_scale.peak_tflops(torch.device("cpu"), 989.4) == 989.4
