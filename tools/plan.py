"""Plan a run on paper: parameters and memory per rank for a config at its layout, on the meta device.

    python tools/plan.py --config examples/configs/diffusiongemma_26b_sft.yaml --gpus 8 --gpu-gib 80 \
        model.hf=null model.preset=diffusiongemma-26b-a4b

Builds one rank's model per pipeline stage at the configured TP / CP / PP (VPP) / EP layout on the meta device (no
memory, any size) inside a fake world of `--gpus` ranks, and prints per rank: parameters (dense, expert,
embedding), weight, gradient and optimizer bytes with and without the distributed optimizer, an activation estimate
(the micro-batches the pipeline schedule holds in flight, and the tensors passed between stages), and whether the
peak fits `--gpu-gib`; under PP a table of every stage, the details of the worst; under CP (`parallel.cp`) each
rank's share of the sequence, the K/V each layer gathers and keeps, and the CP collectives' bytes per layer type.
The last line is machine-readable (peak: the worst stage):

    RESULT params_total=N params_active_per_token=M peak_gib_per_rank=X

`model.hf` configs read the shape from the HF config.json only (no weights); without the checkpoint at hand,
override `model.hf=null model.preset=...`. Formulas: `megatron_bdgemma/training/plan.py`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_bdgemma.runtime.cli import entry_point  # noqa: E402


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a run config YAML (examples/configs/*.yaml)")
    parser.add_argument("--gpus", type=int, default=8, help="world size: GPUs of the run (default 8)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, as for training")
    args = parser.parse_args(argv)
    # After parsing: these import torch and megatron-core (seconds), which `--help` need not wait for.
    from megatron_bdgemma.training.config import load_run_config
    from megatron_bdgemma.training.plan import format_plan, plan_run

    run = load_run_config(args.config, args.overrides)
    print(format_plan(plan_run(run, args.gpus), args.gpu_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
