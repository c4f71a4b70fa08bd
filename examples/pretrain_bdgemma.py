"""Pretraining and SFT of block-diffusion Gemma 4 MoE models on Megatron-Core.

    python examples/pretrain_bdgemma.py                                    # embedded default: tiny model, CPU
    python examples/pretrain_bdgemma.py --config examples/configs/tiny_sft.yaml train.steps=20
    torchrun --nproc-per-node 8 examples/pretrain_bdgemma.py --config examples/configs/diffusiongemma_26b_sft.yaml

Positional `section.key=value` arguments override the YAML (values are parsed as YAML).

`--load DIR` resumes the training run in DIR (its run directory, or one of its `iter_N` checkpoints) exactly: with
the run config stored in its checkpoint, saving into DIR unless `checkpoint.save=...` is given here (a YAML's does
not move it); `--config` and overrides apply on top, each change is printed and takes effect (the LR schedule is
rebuilt from the new values at the checkpoint's step), and changes to the data, objective, sample stream or model
are refused. `--init-from DIR` starts a new run
(the `--config` and overrides given) from DIR's model: a checkpoint converted from HF, or another run's (e.g. SFT
from a pretraining run); optimizer, schedule and step start fresh.
`--sample PROMPT` generates from the saved model at the end (byte tokenizer runs only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny_pretrain.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help=f"YAML run config (default: {DEFAULT_CONFIG.name}; with --load: the run's own, this on top)")
    parser.add_argument("--load", default=None, help="resume the training run in this save root or iter_N directory")
    parser.add_argument("--init-from", default=None,
                        help="start a new run from this checkpoint's model (converted from HF, or another run's)")
    parser.add_argument("--sample", default="def ", help="prompt to generate from after training ('' = none)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_intermixed_args()

    if args.load and args.init_from:
        parser.error("--load resumes a run, --init-from starts a new one from weights: give one")

    from megatron_bdgemma.training.config import load_run_config
    from megatron_bdgemma.training.resume import resume_run_config
    from megatron_bdgemma.training.trainer import train

    if args.load:
        run = resume_run_config(args.load, args.config, list(args.overrides))
    else:
        start = [f"checkpoint.init_from={args.init_from}", "model.hf=null"] if args.init_from else []
        run = load_run_config(args.config or DEFAULT_CONFIG, [*args.overrides, *start])
    train(run)
    if args.sample and run.checkpoint.save and run.data.tokenizer == "byte":
        print_sample(run.checkpoint.save, args.sample)


def print_sample(checkpoint: str, prompt: str) -> None:
    """Greedy block-diffusion continuation of `prompt` from the saved checkpoint (rank 0 prints)."""
    import torch
    import torch.distributed as dist

    from megatron_bdgemma.checkpointing import load_model
    from megatron_bdgemma.data import ByteTokenizer
    from megatron_bdgemma.generation import Greedy, generate

    tokenizer = ByteTokenizer()
    model = load_model(checkpoint, sequence_parallel=False).eval()
    ids = torch.tensor([tokenizer.encode(prompt)], device=next(model.parameters()).device)
    out = generate(model, ids, sampler=Greedy(), max_new_tokens=2 * model.config.canvas_length,
                   eos_token_ids=[tokenizer.eod], pad_token_id=tokenizer.pad)
    if not dist.is_initialized() or dist.get_rank() == 0:
        text = tokenizer.decode([t for t in out.generated[0].tolist() if t != tokenizer.pad])
        print(f"sample ({out.tokens_per_forward[0]:.2f} tokens per forward): {prompt + text!r}")


if __name__ == "__main__":
    main()
