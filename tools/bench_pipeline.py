"""CPU cost of pipeline parallelism for the two-pass training step: PP=2 (2 gloo processes) vs PP=1 (1 process).

    python tools/bench_pipeline.py                       # tiny preset, 4 layers, pretraining, 3 timed steps
    python tools/bench_pipeline.py --objective sft --steps 4

Same global batch and weights source (the `tiny` preset cut to `--layers`, seed 1234) on both sides; every process
runs single-threaded, the sides alternate (`--rounds`), and each step is timed after `--warmup` steps. CPU time of a
step is the sum over the side's processes (PP=2 does the work of one model on two processes, so equal CPU time means
no overhead); wall time beside it. PP=2 adds, per step, one encoder + pass-1 forward without grad (the forward-only
schedule that feeds self-conditioning to the first stage) and the pipeline's p2p traffic; the FLOP share of the
extra forward is S / (3S + 4R) of the PP=1 step (S encoder positions, R canvas positions; see the README). The last
line is machine-readable:

    RESULT cpu_ratio=... wall_ratio=... flop_overhead=...
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megatron_bdgemma.runtime.cli import entry_point  # noqa: E402


def _overrides(args: argparse.Namespace, tmp: str, pp: int) -> list[str]:
    layer_types = ", ".join(["sliding_attention", "full_attention"] * (args.layers // 2))
    return [
        f"data.cache_dir={tmp}/data", f"data.seq_length={args.seq}", f"train.steps={args.warmup + args.steps}",
        "train.micro_batch_size=2", "train.global_batch_size=4", "train.eval_interval=0", "optim.warmup_steps=1",
        "checkpoint.save=null", f"parallel.pp={pp}", "train.log_interval=1000",
        f"model.overrides={{num_layers: {args.layers}, layer_types: [{layer_types}]}}",
        *(["data.truncation=true"] if args.objective == "sft" else []),
    ]


def _timed_steps(rank: int, args: argparse.Namespace, tmp: str, pp: int) -> list[tuple[float, float]]:
    import torch

    from megatron_bdgemma.training.config import load_run_config
    from megatron_bdgemma.training.trainer import setup, train_step

    torch.set_num_threads(1)
    config = ROOT / "examples" / "configs" / f"tiny_{'sft' if args.objective == 'sft' else 'pretrain'}.yaml"
    state = setup(load_run_config(config, _overrides(args, tmp, pp)))
    for chunk in state.model:
        chunk.train()
    times = []
    for step in range(args.warmup + args.steps):
        cpu, wall = time.process_time(), time.perf_counter()
        train_step(state)
        if step >= args.warmup:
            times.append((time.process_time() - cpu, time.perf_counter() - wall))
    return times


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", choices=["pretrain", "sft"], default="pretrain")
    parser.add_argument("--layers", type=int, default=4, help="even, split in half between the two stages")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if args.layers % 2:
        parser.error("--layers must be even (two pipeline stages)")
    # After parsing (it imports torch): the repo's gloo launcher (spawn, env vars, CPU patches).
    from tests.multiproc import run_in_processes

    per_side: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for pp in (1, 2):
                ranks = run_in_processes(_timed_steps, pp, args, tmp, pp, timeout_s=1800)
                # A step's CPU time is the sum over the side's processes; its wall time the slowest process's.
                per_side[pp] += [(sum(r[i][0] for r in ranks), max(r[i][1] for r in ranks)) for i in range(args.steps)]
    cpu = {pp: statistics.median(t[0] for t in per_side[pp]) for pp in per_side}
    wall = {pp: statistics.median(t[1] for t in per_side[pp]) for pp in per_side}
    from megatron_bdgemma.config import PRESETS

    # Pretraining decodes the whole canvas (R = S), SFT one block per example.
    seq, canvas = args.seq, args.seq if args.objective == "pretrain" else PRESETS["tiny"]().canvas_length
    flop_overhead = seq / (3 * seq + 4 * canvas)
    print(f"{args.objective}, tiny preset, {args.layers} layers, S {seq}, global batch 4 (micro-batch 2), fp32, "
          f"1 thread per process; median over {args.rounds} rounds × {args.steps} steps")
    print(f"{'':22}{'CPU s/step':>12}{'wall s/step':>13}")
    for pp in (1, 2):
        print(f"{f'PP={pp} ({pp} process' + ('es)' if pp > 1 else ')'):22}{cpu[pp]:12.3f}{wall[pp]:13.3f}")
    print(f"RESULT cpu_ratio={cpu[2] / cpu[1]:.3f} wall_ratio={wall[2] / wall[1]:.3f} flop_overhead={flop_overhead:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
