"""Pretraining and SFT of block-diffusion Gemma 4 MoE models on Megatron-Core.

    python examples/pretrain_bdgemma.py                                    # embedded default: tiny model, CPU
    python examples/pretrain_bdgemma.py --config examples/configs/tiny_sft.yaml train.steps=20
    torchrun --nproc-per-node 8 examples/pretrain_bdgemma.py --config examples/configs/diffusiongemma_26b_sft.yaml

Positional `section.key=value` arguments override the YAML (values are parsed as YAML). `--load DIR` resumes from a
checkpoint root (its `latest`) or a checkpoint directory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny_pretrain.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML run config")
    parser.add_argument("--load", default=None, help="resume from this checkpoint root or directory")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_intermixed_args()

    from megatron_bdgemma.training.config import load_run_config
    from megatron_bdgemma.training.trainer import train

    overrides = list(args.overrides) + ([f"checkpoint.load={args.load}"] if args.load else [])
    run = load_run_config(args.config, overrides)
    train(run)


if __name__ == "__main__":
    main()
