"""Loss curves of one or more training runs, drawn from their `metrics.jsonl` (megatron_bdgemma/training/metrics.py).

    python tools/plot_metrics.py runs/tiny_pretrain                  # writes runs/tiny_pretrain/loss.png
    python tools/plot_metrics.py runs/a runs/b --out ab.png --smooth 20 --log-steps

RUN is a run directory (`checkpoint.save`, which holds `metrics.jsonl`) or a metrics file. Two panels, the diffusion
and the AR loss (nats per token), each with every run on the same axes, one colour per run, named in the legend:
the training losses as a trailing moving average over `--smooth` rows (the rows themselves faint behind it) and the
held-out losses as points joined by dashes. `--log-steps` puts the steps on a log scale. The picture is a PNG
(matplotlib, Agg backend: no display needed).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LOSSES = ("diffusion", "ar")
TITLES = {"diffusion": "diffusion loss", "ar": "AR loss"}


@dataclass
class Curve:
    """One line of the picture: `values` over `steps` of one run's loss (`diffusion` or `ar`)."""

    run: str
    loss: str
    kind: str
    """"train" (the rows), "train, smoothed" (their moving average) or "held-out" (the evaluation rows)."""
    steps: list[int]
    values: list[float]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="a run directory (its metrics.jsonl) or a metrics file")
    parser.add_argument("--out", type=Path,
                        help="the PNG to write (default with one RUN: loss.png beside its metrics.jsonl)")
    parser.add_argument("--smooth", type=int, default=0, metavar="N",
                        help="moving-average window over training rows (1 = none; default: a twentieth of the rows)")
    parser.add_argument("--log-steps", action="store_true", help="log-scaled steps")
    args = parser.parse_args(argv)
    if args.out is None and len(args.runs) > 1:
        parser.error("--out is required with several runs")
    if args.smooth < 0:
        parser.error(f"--smooth must be >= 0 (0 = a twentieth of the rows, 1 = none), got {args.smooth}")
    return args


def metrics_file(run: str | Path) -> Path:
    """The metrics file RUN names: itself, or the `metrics.jsonl` of a run directory."""
    from megatron_bdgemma.training.run_dir import METRICS

    path = Path(run)
    if path.is_dir():
        if not (path / METRICS).is_file():
            raise FileNotFoundError(f"{path} has no {METRICS} (a run writes it into its checkpoint.save)")
        return path / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (give a run directory or its {METRICS})")
    return path


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics file; a line that is not a JSON object with a step is named with its line number, except
    a last line cut short (a run killed while writing it), which is left out with a warning."""
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                print(f"warning: {path}:{number}: the last row is cut short; left out", file=sys.stderr, flush=True)
                break
            raise ValueError(f"{path}:{number}: not a JSON row ({error.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{number}: a metrics row is a JSON object with an integer step, got {line[:80]!r}")
        rows.append(row)
    if not any(loss in row for row in rows for loss in LOSSES):
        raise ValueError(f"{path} has no training row yet (the first is written after step 1)")
    return rows


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def curves(run: str, rows: list[dict], smooth: int = 0) -> list[Curve]:
    """What `plot` draws of one run: per loss, the training rows, their moving average (when `smooth` != 1; 0 = a
    window of a twentieth of the rows) and the held-out rows."""
    out = []
    for loss in LOSSES:
        train = [(row["step"], row[loss]) for row in rows if loss in row]
        held_out = [(row["step"], row[f"eval_{loss}"]) for row in rows if f"eval_{loss}" in row]
        steps, values = [s for s, _ in train], [v for _, v in train]
        out.append(Curve(run, loss, "train", steps, values))
        window = smooth or max(1, len(values) // 20)
        if window > 1:
            out.append(Curve(run, loss, "train, smoothed", steps, moving_average(values, window)))
        if held_out:
            out.append(Curve(run, loss, "held-out", [s for s, _ in held_out], [v for _, v in held_out]))
    return out


def run_names(runs: list[str]) -> list[str]:
    """Legend names: each run's directory name, or the paths as given where two names would be the same."""
    names = [metrics_file(run).parent.resolve().name or str(run) for run in runs]
    return names if len(set(names)) == len(names) else [str(run) for run in runs]


def plot(all_curves: list[Curve], out: Path, log_steps: bool = False):
    """Draw `all_curves` (runs in order of appearance) into `out`; returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(LOSSES), figsize=(12, 4.5), sharex=True)
    colours = {}
    for curve in all_curves:
        colour = colours.setdefault(curve.run, f"C{len(colours)}")
        smoothed = any(c.run == curve.run and c.loss == curve.loss and c.kind == "train, smoothed" for c in all_curves)
        style = {
            "train": dict(alpha=0.25, linewidth=1) if smoothed else dict(linewidth=1.5, label=curve.run),
            "train, smoothed": dict(linewidth=1.5, label=curve.run),
            "held-out": dict(linestyle="--", marker="o", markersize=4, label=f"{curve.run}, held-out"),
        }[curve.kind]
        axes[LOSSES.index(curve.loss)].plot(curve.steps, curve.values, color=colour, **style)
    for ax, loss in zip(axes, LOSSES):
        ax.set_title(TITLES[loss])
        ax.set_xlabel("step")
        ax.set_ylabel("nats per token")
        ax.grid(alpha=0.3)
        if log_steps:
            ax.set_xscale("log")
        ax.legend()
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", dpi=100)
    plt.close(figure)
    return figure


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # before any heavy import: --help answers at once
    from megatron_bdgemma.runtime.cli import entry_point

    @entry_point
    def draw() -> None:
        files = [metrics_file(run) for run in args.runs]
        out = args.out or files[0].parent / "loss.png"
        drawn = [curve for name, path in zip(run_names(args.runs), files)
                 for curve in curves(name, read_rows(path), args.smooth)]
        plot(drawn, out, args.log_steps)
        print(f"loss curves: {out}", flush=True)

    return draw()


if __name__ == "__main__":
    sys.exit(main())
