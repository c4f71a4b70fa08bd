"""Generation throughput: our KV-cached block-diffusion loop vs `transformers` and vs our AR baseline, one run.

    python tools/bench_generate.py                       # a small random DiffusionGemma built here (CPU-sized)
    python tools/bench_generate.py --hf /path/to/diffusiongemma [--dtype bf16]
    python tools/bench_generate.py --load CKPT           # no HF side: its ratio prints as nan

On the same weights, prompts (left-padded batch, longer than the sliding window) and seed it times:
- ours: `megatron_bdgemma.generation.generate` with DiffusionGemma's default sampler;
- HF: `DiffusionGemmaForBlockDiffusion.generate` (dynamic cache, sdpa attention: its eager mask builder fails on
  padded batches), same sampler settings and seed. Both draw the same random numbers in the same order, but
  fp32 logits computed by different kernels differ in the last bits, and on a random model's near-flat
  distributions one near-tie is enough for the canvases to part; the share of equal tokens is printed (token
  equality on tiny models is tests/test_generation.py's job);
- AR: our autoregressive baseline (greedy next-token decoding from the encoder logits, cached K/V).
Each is run once untimed first (kernel/primitive warm-up) and then timed. No EOS is set, so every row generates the
whole budget; tokens/s counts non-pad generated tokens. The last line is machine-readable:

    RESULT tokens_per_s_ratio_vs_hf=<x> tokens_per_forward=<y> speedup_vs_ar=<z>

with x = our tokens/s over HF's, y = our tokens per forward (mean over rows), z = our tokens/s over the AR
baseline's.

Random weights never become confident, so the adaptive stop rarely fires and tokens per forward sits near its
floor, canvas_length / max_denoising_steps; a trained model stops earlier.
"""

from __future__ import annotations

import os

# Set before torch loads oneDNN: every step of a growing KV cache (one position per AR token) brings new matmul
# shapes, and oneDNN's default cache of 1024 primitives thrashes on CPU, costing up to 20x per AR step.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "65536")

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_bdgemma import hf_reference

# DiffusionGemma's geometry scaled down so one CPU run is quick.
SMALL_TEXT = hf_reference.SMALL_TEXT | dict(vocab_size=2048)
SMALL_CANVAS = 256


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--hf", type=Path, help="local HF DiffusionGemma directory (default: a small random one)")
    source.add_argument("--load", type=Path, help="Megatron checkpoint (megatron_bdgemma.checkpointing); no HF side")
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[200, 100], help="one prompt per length")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--max-denoising-steps", type=int, default=48)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def small_random_hf(path: Path) -> Path:
    """Build and save the small random DiffusionGemma (vision tower of one layer, dropped on import)."""
    hf_reference.random_diffusion_gemma(SMALL_TEXT, SMALL_CANVAS).save_pretrained(path)
    return path


def timed(run: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Run once to warm up, then once timed → (result of the timed run, seconds)."""
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    import megatron_bdgemma
    from megatron_bdgemma.generation import Autoregressive, EntropyBound, generate, left_pad
    from megatron_bdgemma.runtime.distributed import init_distributed

    init_distributed(seed=args.seed)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workdir = tempfile.TemporaryDirectory()
    hf_path = args.hf
    if args.load is not None:
        try:
            from megatron_bdgemma.checkpointing import load_model
        except ImportError as error:
            raise SystemExit(f"--load needs megatron_bdgemma.checkpointing.load_model, which this installation "
                             f"lacks ({error}); use --hf") from error
        ours = load_model(args.load, dtype=dtype, sequence_parallel=False)
    else:
        hf_path = hf_path or small_random_hf(Path(workdir.name) / "hf")
        ours = megatron_bdgemma.from_hf(hf_path, dtype=dtype)
    ours = ours.to(device).eval()
    config = ours.config
    pad = config.pad_token_id

    generator = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(2, config.vocab_size, (n,), generator=generator).tolist() for n in args.prompt_lengths]
    input_ids, padding_mask = left_pad(prompts, pad)
    input_ids, padding_mask = input_ids.to(device), padding_mask.to(device)
    sampler = EntropyBound(max_denoising_steps=args.max_denoising_steps)
    common = dict(max_new_tokens=args.max_new_tokens, eos_token_ids=[], pad_token_id=pad)

    def run_ours() -> Any:
        torch.manual_seed(args.seed)
        return generate(ours, input_ids, padding_mask=padding_mask, sampler=sampler, **common)

    def run_ar() -> Any:
        return generate(ours, input_ids, padding_mask=padding_mask, sampler=Autoregressive(), **common)

    rows: list[tuple[str, int, float, float]] = []
    ours_out, ours_s = timed(run_ours, device)
    ours_tokens = int((ours_out.generated != pad).sum())
    rows.append(("ours (block diffusion, KV cache)", ours_tokens, ours_s, ours_out.tokens_per_forward.mean().item()))

    hf_tps, same_share = float("nan"), None
    if hf_path is not None:
        from transformers import DiffusionGemmaForBlockDiffusion

        hf = DiffusionGemmaForBlockDiffusion.from_pretrained(hf_path, dtype=dtype).to(device).eval()
        hf.set_attn_implementation("sdpa")

        def run_hf() -> Any:
            torch.manual_seed(args.seed)
            return hf.generate(
                input_ids, attention_mask=(~padding_mask).long(), max_new_tokens=args.max_new_tokens,
                max_denoising_steps=args.max_denoising_steps, pad_token_id=pad,
            )

        hf_out, hf_s = timed(run_hf, device)
        hf_tokens = int((hf_out.sequences[:, input_ids.shape[1]:] != pad).sum())
        hf_per_forward = hf_out.tokens_per_forward.float().mean().item()
        rows.append(("transformers DiffusionGemma.generate", hf_tokens, hf_s, hf_per_forward))
        hf_tps = hf_tokens / hf_s
        if hf_out.sequences.shape == ours_out.sequences.shape:
            same_share = (hf_out.sequences == ours_out.sequences)[:, input_ids.shape[1]:].float().mean().item()

    ar_out, ar_s = timed(run_ar, device)
    ar_tokens = int((ar_out.generated != pad).sum())
    ar_per_forward = ar_out.tokens_per_forward.mean().item()
    rows.append(("ours AR baseline (encoder logits, KV cache)", ar_tokens, ar_s, ar_per_forward))

    print(f"device {device}, dtype {args.dtype}, batch {len(prompts)} (prompt lengths {args.prompt_lengths}, "
          f"left-padded), canvas {config.canvas_length}, window {config.sliding_window}, "
          f"max_new_tokens {args.max_new_tokens}, max_denoising_steps {args.max_denoising_steps}")
    print(f"{'':46s} {'tokens':>7s} {'seconds':>8s} {'tokens/s':>9s} {'tok/fwd':>8s}")
    for name, tokens, seconds, per_forward in rows:
        print(f"{name:46s} {tokens:7d} {seconds:8.3f} {tokens / seconds:9.1f} {per_forward:8.3f}")
    if same_share is not None:
        print(f"generated tokens equal to transformers' (same seed): {same_share:.1%}")
    ours_tps = ours_tokens / ours_s
    print(
        f"RESULT tokens_per_s_ratio_vs_hf={ours_tps / hf_tps:.3f} "
        f"tokens_per_forward={ours_out.tokens_per_forward.mean().item():.3f} "
        f"speedup_vs_ar={ours_tps / (ar_tokens / ar_s):.3f}"
    )
    workdir.cleanup()


if __name__ == "__main__":
    main()
