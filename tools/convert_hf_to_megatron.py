"""Convert a local Hugging Face DiffusionGemma / Gemma 4 MoE directory into a Megatron `torch_dist` checkpoint.

    python tools/convert_hf_to_megatron.py --hf /models/diffusiongemma-26B-A4B-it --out ckpt/dg --tp 2 --ep 8
    python tools/convert_hf_to_megatron.py --hf /models/gemma-4-26B-A4B --out ckpt/from_ar --dtype bf16 --verify

Sources: `DiffusionGemmaForBlockDiffusion`, or the text weights of a MoE `Gemma4ForCausalLM` /
`Gemma4ForConditionalGeneration` (whose self-conditioning module is then freshly initialised; the tool says so).
The vision tower and embedder are carried unchanged (bytes and dtype, whatever `--dtype` does to the text stack) and
duplicate tied copies merged, with a one-line summary; an audio tower is refused.

The checkpoint is layout independent: Megatron reshards it on load, so it is written by this one process and loads
at any TP / EP / PP (`examples/pretrain_bdgemma.py --load DIR`, `tools/generate.py --load DIR`). `--tp/--ep/--pp` check
that the model fits the layout you mean to run. Tensors are read one at a time and written layer by layer, so memory
stays near one layer's experts. The output appears only when complete; `--verify` then compares logits of both sides.
Exit status: 0 done, 1 `--verify` above tolerance or another error, 2 bad input (the message names it); an error is
one line `error: <message>` (`BDGEMMA_TRACEBACK=1` adds the traceback).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from megatron_bdgemma.runtime.cli import EXIT_BAD_INPUT, entry_point, report_error


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", type=Path, required=True, help="local HF model directory")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to create")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check the model against")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size to check the model against")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to check the model against")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="stored dtype (default: the source's)")
    parser.add_argument("--canvas-length", type=int, help="block size B (an AR source has none; default 256)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of a freshly initialised self-conditioning module")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out")
    parser.add_argument("--verify", action="store_true", help="compare logits of the HF and converted models")
    parser.add_argument("--verify-tolerance", type=float, default=1e-4, help="max-abs logit difference allowed")
    return parser.parse_args(argv)


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        one_process = ValueError("run the converter as one process; its checkpoint loads at any TP/EP/PP")
        return report_error(one_process, EXIT_BAD_INPUT)
    # torch's checkpoint code warns about its own deprecated ShardedTensor on every call; Megatron uses it on purpose.
    warnings.filterwarnings("ignore", module=r"torch\.distributed\.checkpoint")
    from megatron_bdgemma.conversion.megatron_checkpoint import (
        DTYPES,
        ConversionError,
        convert_hf_to_megatron,
        report_verification,
    )

    log = functools.partial(print, flush=True)
    overrides = {"canvas_length": args.canvas_length} if args.canvas_length else {}
    try:
        convert_hf_to_megatron(args.hf, args.out, dtype=DTYPES.get(args.dtype), tp=args.tp, ep=args.ep, pp=args.pp,
                               overwrite=args.overwrite, seed=args.seed, log=log, **overrides)
    except (ConversionError, FileExistsError, FileNotFoundError, NotADirectoryError) as error:
        return report_error(error, EXIT_BAD_INPUT)
    return report_verification(args.out, args.hf, args.verify_tolerance, log) if args.verify else 0


if __name__ == "__main__":
    sys.exit(main())
