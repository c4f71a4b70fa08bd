"""Export a Megatron checkpoint of DiffusionGemma to a Hugging Face `DiffusionGemmaForBlockDiffusion` directory.

    python tools/convert_megatron_to_hf.py --megatron ckpt/dg --out hf/exported
    python tools/convert_megatron_to_hf.py --megatron runs/sft --out hf/sft --dtype bf16 --verify

`--megatron` is a checkpoint directory or a save root with a `latest` marker, saved at any TP / EP / PP, with its
model config recorded (`extra["model_config"]`). The output holds safetensors shards with an index, `config.json`
and `generation_config.json`; `transformers` loads it with `from_pretrained` (no missing weights: a carried vision
tower is written back bit-identical, a text-only model gets a zero stand-in) and generates with it. Tensors are
read one layer at a time and written as they are ready. The output appears only when complete; `--verify` then
compares logits of both sides.
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
    parser.add_argument("--megatron", type=Path, required=True, help="Megatron checkpoint directory or save root")
    parser.add_argument("--out", type=Path, required=True, help="HF directory to create")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="written dtype (default: the checkpoint's)")
    parser.add_argument("--max-shard-size", default="5GB", help="bytes per safetensors shard, e.g. 5GB, 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out")
    parser.add_argument("--verify", action="store_true", help="compare logits of the checkpoint and the HF export")
    parser.add_argument("--verify-tolerance", type=float, default=1e-4, help="max-abs logit difference allowed")
    return parser.parse_args(argv)


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        one_process = ValueError("run the exporter as one process; it reads a checkpoint saved at any layout")
        return report_error(one_process, EXIT_BAD_INPUT)
    # torch's checkpoint code warns about its own deprecated ShardedTensor on every call; Megatron uses it on purpose.
    warnings.filterwarnings("ignore", module=r"torch\.distributed\.checkpoint")
    from megatron_bdgemma.conversion.hf_export import convert_megatron_to_hf, parse_size
    from megatron_bdgemma.conversion.megatron_checkpoint import DTYPES, ConversionError, report_verification
    from megatron_bdgemma.training.checkpointing import DamagedCheckpointError

    log = functools.partial(print, flush=True)
    try:
        convert_megatron_to_hf(args.megatron, args.out, dtype=DTYPES.get(args.dtype),
                               max_shard_size=parse_size(args.max_shard_size), overwrite=args.overwrite, log=log)
    except (ConversionError, DamagedCheckpointError, FileExistsError, FileNotFoundError, NotADirectoryError) as error:
        return report_error(error, EXIT_BAD_INPUT)
    return report_verification(args.megatron, args.out, args.verify_tolerance, log) if args.verify else 0


if __name__ == "__main__":
    sys.exit(main())
