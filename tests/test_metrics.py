"""What a run leaves to look at (issue 22, items 2-4): the progress line, `metrics.jsonl` (continued exactly by a
resumed run), TensorBoard and W&B scalars (through fakes: nothing reaches the network), the loss-curve picture of
`tools/plot_metrics.py`, and the demo's final losses beside baselines and its samples. CLI behaviour through the CLI."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import resource
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from megatron_bdgemma.training.config import load_run_config
from tests.test_robustness import CONFIG, REPO, SMALL

SCRIPT = str(REPO / "examples" / "pretrain_bdgemma.py")
PLOT = REPO / "tools" / "plot_metrics.py"
LINE = re.compile(r"^step +(\d+)/\d+ \| diffusion (\S+) \| ar (\S+) \| lr \S+ \| grad norm \S+ \| [\d,]+ tok/s, packing [\d.]+% \| "
                  r"([\d,]+) ms/step \| \S+ model TFLOP/s/rank \| peak mem (\S+) GiB( \| ETA (\S+))?$", re.M)
EVAL = re.compile(r"^eval +(\d+) \| diffusion (\S+) \| ar (\S+)$", re.M)
FAKE_WANDB = '''"""A stand-in for the wandb package: records each call as a JSON line in $FAKE_WANDB_LOG."""
import json, os

def _record(*event):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as log:
        log.write(json.dumps(event) + "\\n")

class _Run:
    def log(self, data, step=None):
        _record("log", data, step)

    def finish(self):
        _record("finish")

def init(**kwargs):
    _record("init", {key: value for key, value in kwargs.items() if key != "config"}, sorted(kwargs["config"]))
    return _Run()
'''
DETERMINISTIC = {"step", "diffusion", "ar", "lr", "grad_norm", "consumed_samples", "consumed_tokens", "eval_diffusion",
                 "eval_ar", "skipped"}
"""Row fields a resumed run reproduces bit for bit (the others are timings and memory)."""


def _no_constants(name: str):
    raise AssertionError(f"a metrics row holds {name}; its fields are numbers or absent")


def _rows(path: Path) -> list[dict]:
    """The metrics file's rows, refusing NaN / Infinity (json.dumps writes them unless the writer keeps them out)."""
    rows = [json.loads(line, parse_constant=_no_constants) for line in path.read_text().splitlines()]
    for row in rows:
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in row.items() if k != "device"), row
    return rows


def _tags(row: dict) -> dict[str, float]:
    """The scalars TensorBoard and W&B must get for a row, written out independently of `scalar_tags`."""
    if "eval_ar" in row:
        return {"eval/diffusion": row["eval_diffusion"], "eval/ar": row["eval_ar"]}
    return {f"train/{key}": value for key, value in row.items() if key != "step"}


def _plot_tool():
    spec = importlib.util.spec_from_file_location("plot_metrics", PLOT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a script, not a package: its dataclass looks its module up here
    spec.loader.exec_module(module)
    return module


def _cli(args: list[str], cwd: Path, pythonpath: list[Path] = (), **env: str) -> subprocess.CompletedProcess:
    import os

    env = os.environ | {"PYTHONPATH": ":".join(map(str, [REPO, *pythonpath])), "OMP_NUM_THREADS": "1"} | env
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _unigram_entropy_of_corpus(cache: Path) -> float:
    """Entropy of the token frequencies of the training corpus as written to disk (megatron's reader of the .bin)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    (bin_file,) = cache.glob("embedded-stdlib-byte-*.bin")
    corpus = IndexedDataset(str(bin_file.with_suffix("")))
    counts = np.bincount(np.concatenate([corpus[i] for i in range(len(corpus))]).astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_cli_run_leaves_metrics_wandb_a_picture_baselines_and_samples(tmp_path):
    """One CLI run (4 steps, log and eval every 2, W&B through a fake package): the progress lines, the metrics rows
    and the W&B scalars agree with each other and with arithmetic; the ETA leaves out step 1; the demo's summary holds
    the corpus's unigram entropy; both samples continue a line of the training text. Then the picture: written, a
    valid PNG, its lines the metrics file's series; `--help` imports neither matplotlib nor torch."""
    run, fake = tmp_path / "run", tmp_path / "fake"
    fake.mkdir()
    (fake / "wandb.py").write_text(FAKE_WANDB)
    calls = tmp_path / "wandb_calls.jsonl"
    done = _cli([SCRIPT, f"data.cache_dir={tmp_path / 'data'}", *SMALL, "train.steps=4", "train.log_interval=2",
                 "train.eval_interval=2", f"checkpoint.save={run}", "logging.wandb_project=demo"], tmp_path, [fake],
                FAKE_WANDB_LOG=str(calls))
    out = done.stdout
    assert done.returncode == 0 and done.stderr == "", (done.returncode, out, done.stderr)
    run_id = json.loads((run / "run.json").read_text())["run_id"]
    assert f"metrics: {run / 'metrics.jsonl'}\n" in out
    assert f"wandb: logging to project demo, run id {run_id} (a resumed run continues it)\n" in out

    rows = _rows(run / "metrics.jsonl")
    assert [(r["step"], "eval_ar" in r) for r in rows] == [(1, False), (2, False), (2, True), (4, False), (4, True)]
    train = [r for r in rows if "ar" in r]
    lines = {int(m[0]): m for m in LINE.findall(out)}
    assert sorted(lines) == [1, 2, 4], out
    assert out.count(" tok/s, packing 100.0% | ") == 3, out
    for r in train:
        step, diffusion, ar, ms, peak, _, eta = lines[r["step"]]
        assert (diffusion, ar) == (f"{r['diffusion']:.4f}", f"{r['ar']:.4f}")
        assert (ms, peak) == (f"{r['ms_per_step']:,.0f}", f"{r['peak_memory_gib']:.2f}")
        # Pretraining rows are full: 4 samples x 32 tokens per step, all read.
        assert (r["consumed_samples"], r["consumed_tokens"]) == (4 * r["step"], 128 * r["step"])
        assert r["tokens_per_s"] * r["ms_per_step"] / 1000 == pytest.approx(128, rel=1e-9), r
        assert r["packing_efficiency"] == 1.0, r  # no padding in a pretraining window
        assert r["model_tflops_per_rank"] * r["ms_per_step"] == pytest.approx(train[0]["model_tflops_per_rank"]
                                                                              * train[0]["ms_per_step"], rel=1e-9)
        assert "mfu" not in r and "device" not in r  # a CPU has no bf16 peak to compare with
    assert 0.1 < max(r["peak_memory_gib"] for r in train) <= resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    assert lines[1][6] == "", "step 1 (start-up) gives no ETA"
    # The ETA at step 2 is step 2's time (the median of the steps after the first) times the 2 steps left.
    assert abs(int(lines[2][6].removesuffix("s")) - 2 * train[1]["ms_per_step"] / 1000) <= 0.5 + 1e-3, lines[2]
    evals = {int(step): (d, a) for step, d, a in EVAL.findall(out)}
    assert evals == {r["step"]: (f"{r['eval_diffusion']:.4f}", f"{r['eval_ar']:.4f}") for r in rows if "eval_ar" in r}

    events = [json.loads(line) for line in calls.read_text().splitlines()]
    assert events[0][:2] == ["init", {"project": "demo", "name": "run", "id": run_id, "resume": "allow", "dir": str(run)}]
    assert events[0][2] == ["checkpoint", "data", "logging", "model", "objective", "optim", "parallel", "train"]
    assert events[1:-1] == [["log", _tags(r), r["step"]] for r in rows] and events[-1] == ["finish"]

    # Item 4: final losses beside the baselines, computed on the corpus the run read; samples of the training text.
    entropy = _unigram_entropy_of_corpus(tmp_path / "data")
    assert 2.5 < entropy < math.log(256)
    assert re.search(rf"^final losses, nats per byte: train diffusion \S+, AR \S+ \(mean of steps 3-4\); held-out "
                     rf"diffusion {rows[-1]['eval_diffusion']:.2f}, AR {rows[-1]['eval_ar']:.2f} \(step 4\)$", out, re.M)
    assert (f"\nbaselines on the same text: {entropy:.2f} for a model that knows only how often each byte occurs (the "
            f"unigram entropy of the training text), 5.55 = ln 256 for a model that knows nothing\n") in out
    from megatron_bdgemma.data.embedded import stdlib_documents

    prompt = "    def __init__(self, "
    assert any(prompt in doc for doc in stdlib_documents()), "the default prompt is a line of the training text"
    samples = re.findall(r"^sample \((block diffusion, entropy_bound|AR head of the same weights, temperature 0\.7, "
                         r"top-k 10), seed 1234, \S+ tokens per forward\): '(.*)'$", out, re.M)
    assert [how for how, _ in samples] == ["block diffusion, entropy_bound", "AR head of the same weights, temperature "
                                           "0.7, top-k 10"], out
    # 4 steps teach nothing (the diffusion sample may be all spaces); the AR head's seeded sampling still draws bytes.
    assert all(text.startswith(prompt) for _, text in samples) and samples[1][1][len(prompt):].strip(), samples

    # Item 3: the picture.
    help_done = _cli(["-X", "importtime", str(PLOT), "--help"], tmp_path)
    assert help_done.returncode == 0 and "usage: plot_metrics.py" in help_done.stdout
    imported = {line.split("|")[-1].strip() for line in help_done.stderr.splitlines()}
    assert not {"torch", "matplotlib", "numpy"} & imported, "--help must not import torch, matplotlib or numpy"
    done = _cli([str(PLOT), str(run)], tmp_path)
    png = run / "loss.png"
    assert (done.returncode, done.stdout, done.stderr) == (0, f"loss curves: {png}\n", "")
    from PIL import Image

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with Image.open(png) as image:
        image.verify()
        assert image.format == "PNG" and image.size == (1200, 450)

    tool = _plot_tool()
    figure = tool.plot(tool.curves("run", tool.read_rows(run / "metrics.jsonl"), smooth=2), tmp_path / "again.png")
    for ax, loss in zip(figure.axes, ["diffusion", "ar"]):
        drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
        values = [r[loss] for r in train]
        smoothed = [values[0], (values[0] + values[1]) / 2, (values[1] + values[2]) / 2]  # trailing mean of 2
        raw = next(xy for label, xy in drawn.items() if label.startswith("_"))  # the faint rows: no legend entry
        assert raw == ([1, 2, 4], values)
        assert drawn["run"][0] == [1, 2, 4] and drawn["run"][1] == pytest.approx(smoothed, rel=1e-15)
        assert drawn["run, held-out"] == ([2, 4], [r[f"eval_{loss}"] for r in rows if "eval_ar" in r])


def test_wandb_project_without_wandb_is_one_line_before_training(tmp_path):
    """`logging.wandb_project` with no importable wandb (a stand-in that fails like a missing one, so the test does
    not depend on what is installed): one named line, exit 1, before any step."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "wandb.py").write_text('raise ModuleNotFoundError("No module named \'wandb\'", name="wandb")\n')
    done = _cli([SCRIPT, f"data.cache_dir={tmp_path / 'data'}", *SMALL, "train.steps=2",
                 f"checkpoint.save={tmp_path / 'run'}", "logging.wandb_project=demo"], tmp_path, [blocker])
    assert done.returncode == 1, done
    assert done.stderr == ("error: logging.wandb_project=demo is set but the wandb package is not installed (No module "
                           "named 'wandb'): pip install 'megatron_bdgemma[wandb]', or set logging.wandb_project=null\n")
    assert "step" not in done.stdout and not (tmp_path / "run").exists(), done.stdout


class _FakeSummaryWriter:
    """torch.utils.tensorboard's SummaryWriter, recording its scalars."""

    scalars: list[tuple[str, float, int]] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def close(self) -> None:
        pass


@pytest.fixture
def fake_backends(monkeypatch) -> dict[str, list]:
    """TensorBoard's writer and wandb replaced in-process; returns what each received."""
    _FakeSummaryWriter.scalars = []
    inits: list[dict] = []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=_FakeSummaryWriter))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(
        init=lambda **kwargs: inits.append(kwargs) or types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None)))
    return {"tensorboard": _FakeSummaryWriter.scalars, "wandb_inits": inits}


def test_resumed_run_continues_the_metrics_file_as_one_uninterrupted_run(tmp_path, model_parallel, fake_backends,
                                                                        capsys):
    """6 steps, a row every 4 and at the end, eval every 3, checkpoints at 2, 4, 6. As if the run died after writing
    step 6's rows (and half a line of step 7's, which the plot leaves out) but before its checkpoint: `latest` back
    on step 4. The resume (first step 5: a progress line, no row) leaves the file equal, bit for bit in its
    deterministic fields, to the uninterrupted run's; TensorBoard got each row's scalars; the W&B run of the
    directory is continued."""
    from megatron_bdgemma.training.resume import resume_run_config
    from megatron_bdgemma.training.trainer import train

    root = tmp_path / "run"
    train(load_run_config(CONFIG, [f"data.cache_dir={tmp_path / 'data'}", *SMALL, "train.steps=6",
                                   "train.log_interval=4", "train.eval_interval=3", "checkpoint.interval=2",
                                   f"checkpoint.save={root}", f"logging.tensorboard_dir={tmp_path / 'tb'}",
                                   "logging.wandb_project=demo"]))
    uninterrupted = _rows(root / "metrics.jsonl")
    assert [(r["step"], "eval_ar" in r) for r in uninterrupted] == [(1, False), (3, True), (4, False), (6, False),
                                                                    (6, True)]
    assert fake_backends["tensorboard"] == [(tag, value, r["step"]) for r in uninterrupted for tag, value in _tags(r).items()]
    assert f"tensorboard: writing to {tmp_path / 'tb'} (view with: tensorboard --logdir {tmp_path / 'tb'})" in \
        capsys.readouterr().out

    shutil.rmtree(root / "iter_0000006")
    (root / "latest").write_text("iter_0000004")
    with (root / "metrics.jsonl").open("a") as torn:
        torn.write('{"step": 7, "diffusion": 4.')
    assert _plot_tool().read_rows(root / "metrics.jsonl") == uninterrupted, "the plot leaves the cut row out"
    assert capsys.readouterr().err == f"warning: {root / 'metrics.jsonl'}:6: the last row is cut short; left out\n"
    train(resume_run_config(str(root), None, []))
    resumed = _rows(root / "metrics.jsonl")
    assert [{k: v for k, v in r.items() if k in DETERMINISTIC} for r in resumed] == \
        [{k: v for k, v in r.items() if k in DETERMINISTIC} for r in uninterrupted]
    assert [sorted(r) for r in resumed] == [sorted(r) for r in uninterrupted]
    out, err = capsys.readouterr()
    assert re.search(r"^step +5/6 \| .* ms/step \| .*peak mem \S+ GiB$", out, re.M), out  # no ETA on its first step
    assert re.search(r"^step +6/6 \| .* \| ETA 0s$", out, re.M), out
    assert f"warning: {root / 'metrics.jsonl'}:6 is not a JSON row (cut short?); dropped" in err
    inits = fake_backends["wandb_inits"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] == json.loads((root / "run.json").read_text())["run_id"]


def test_skipped_step_has_a_row_without_its_nonfinite_values_and_mfu_names_the_card(tmp_path, model_parallel,
                                                                                    fake_backends, monkeypatch, capsys):
    """`optim.lr=1e6` (tests/test_stopping.py's divergence): step 3's gradient norm is NaN and it is skipped, step 4
    stops the run. The file has step 1's row (the log interval is 25) and step 3's with `skipped: 1` and no
    grad_norm; nothing non-finite reaches the file or TensorBoard. Then, with a GPU's answers put in place of
    torch.cuda's: the row names the card and its MFU is the model TFLOP/s over the card's bf16 peak."""
    from megatron_bdgemma.training import metrics
    from megatron_bdgemma.training.stopping import NonFiniteError
    from megatron_bdgemma.training.trainer import train

    root = tmp_path / "run"
    run = load_run_config(CONFIG, [f"data.cache_dir={tmp_path / 'data'}", *SMALL, "train.steps=8", "optim.lr=1.0e+6",
                                   "train.skip_nonfinite_steps=1", f"checkpoint.save={root}",
                                   f"logging.tensorboard_dir={tmp_path / 'tb'}"])
    with pytest.raises(NonFiniteError):
        train(run)
    rows = _rows(root / "metrics.jsonl")
    assert [(r["step"], r.get("skipped")) for r in rows] == [(1, None), (3, 1)]
    assert "grad_norm" not in rows[1] and {"diffusion", "ar", "lr", "consumed_samples"} <= rows[1].keys()
    assert all(math.isfinite(value) for _, value, _ in fake_backends["tensorboard"])
    assert [step for _, _, step in fake_backends["tensorboard"]] == [1] * len(_tags(rows[0])) + [3] * len(_tags(rows[1]))
    assert not re.search(r"^step +3/", capsys.readouterr().out, re.M), "a skipped step has its own line, not progress"

    assert metrics.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == metrics.bf16_peak_tflops("NVIDIA H200") == 989.4
    assert (metrics.bf16_peak_tflops("NVIDIA H100 PCIe"), metrics.bf16_peak_tflops("NVIDIA H100 NVL")) == (756.0, 835.0)
    assert metrics.bf16_peak_tflops("Tesla T4") is None
    monkeypatch.setattr(metrics.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(metrics.torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(metrics.torch.cuda, "max_memory_allocated", lambda device=None: 5 * 2**30)
    gpu = load_run_config(CONFIG, [*SMALL, f"checkpoint.save={tmp_path / 'gpu'}"])
    (tmp_path / "gpu").mkdir()
    logger = metrics.MetricsLogger(gpu)
    step = dict(diffusion=1.0, ar=2.0, lr=1e-3, grad_norm=1.0, tokens=128, row_tokens=128, busiest_rank_rows=128,
                consumed_tokens=128, flops=0.4 * 989.4e12 * 0.5, seconds=0.5)  # 40% of the peak at 0.5 s per step
    logger.log_step(1, step)
    logger.close()
    (row,) = _rows(tmp_path / "gpu" / "metrics.jsonl")
    assert row["device"] == "NVIDIA H100 80GB HBM3" and row["mfu"] == pytest.approx(0.4, rel=1e-12)
    assert row["peak_memory_gib"] == 5.0 and row["model_tflops_per_rank"] == pytest.approx(0.4 * 989.4, rel=1e-12)
    assert "dp_balance" not in row  # one data-parallel rank
    out = capsys.readouterr().out
    assert "MFU against NVIDIA H100 80GB HBM3's dense bf16 peak of 989.4 TFLOP/s\n" in out
    assert "| 395.760 model TFLOP/s/rank (40.0% MFU) | peak mem 5.00 GiB\n" in out

    # 4 data-parallel ranks computing 400 positions a step, the busiest 130 (step 1), then 120 and 110: the DP balance
    # of a logging interval is its busiest ranks' positions over the mean, (120 + 110) / (800 / 4) = 1.15 for 2-3.
    (tmp_path / "dp4").mkdir()
    logger = metrics.MetricsLogger(load_run_config(CONFIG, [*SMALL, f"checkpoint.save={tmp_path / 'dp4'}",
                                                            "train.log_interval=3"]))
    logger.dp = 4
    for index, busiest in ((1, 130), (2, 120), (3, 110)):
        logger.log_step(index, step | dict(tokens=300, row_tokens=400, busiest_rank_rows=busiest))
    logger.close()
    assert [r["dp_balance"] for r in _rows(tmp_path / "dp4" / "metrics.jsonl")] == pytest.approx([1.3, 1.15])
    assert "tok/s, packing 75.0%, DP balance 1.15 | " in capsys.readouterr().out
