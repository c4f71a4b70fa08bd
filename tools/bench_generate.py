"""Generation throughput: our KV-cached block-diffusion loop vs `transformers` and vs our AR baseline, one run.

    python tools/bench_generate.py                       # a small random DiffusionGemma built here (CPU-sized)
    python tools/bench_generate.py --hf /path/to/diffusiongemma [--dtype bf16]
    python tools/bench_generate.py --load CKPT           # no HF side: its ratio prints as nan
    python tools/bench_generate.py --compile             # also ours with the canvas forward under torch.compile

On the same weights, prompts (left-padded batch, longer than the sliding window) and seed it times:
- ours: `megatron_bdgemma.generation.generate` with DiffusionGemma's default sampler;
- HF: `DiffusionGemmaForBlockDiffusion.generate` (dynamic cache, sdpa attention: its eager mask builder fails on
  padded batches), same sampler settings and seed. Both draw the same random numbers in the same order, but
  fp32 logits computed by different kernels differ in the last bits, and on a random model's near-flat
  distributions one near-tie is enough for the canvases to part; the share of equal tokens is printed (token
  equality on tiny models is tests/test_generation.py's job);
- AR: our autoregressive baseline (greedy next-token decoding from the encoder logits, cached K/V);
- with `--compile`, ours compiled: the same loop with `generate(..., compile=True)` (same tokens as ours but for
  rounding). Its warm-up call compiles; that call's wall time prints apart (`compile: first call ...`), and the
  timed rounds are steady state.
Each is run once untimed first (kernel/primitive warm-up), then `--rounds` rounds time every side once, the order
reversed every other round. On CPU every side runs single-threaded and is timed by the process CPU time it used
(robust to other jobs on a shared machine), wall time beside; on a GPU wall time is the measure. No EOS is set,
so every row generates the whole budget; tokens/s counts non-pad generated tokens. The last line is
machine-readable:

    RESULT tokens_per_s_ratio_vs_hf=<x> tokens_per_forward=<y> speedup_vs_ar=<z>

with x = our tokens/s over HF's, the median over rounds of the two sides' back-to-back runs (range printed above),
y = our tokens per forward (mean over rows), z = our tokens/s over the AR baseline's; with `--compile` it ends with
` speedup_compiled=<c>`, the compiled loop's tokens/s over the eager one's (median over rounds), and with an HF side
` compiled_ratio_vs_hf=<h>`, the compiled loop's tokens/s over HF's (steady state: compiling is the warm-up call).

Random weights never become confident, so the adaptive stop rarely fires and tokens per forward sits near its
floor, canvas_length / max_denoising_steps; a trained model stops earlier.
"""

from __future__ import annotations

import os

# Set before torch loads oneDNN: every step of a growing KV cache (one position per AR token) brings new matmul
# shapes, and oneDNN's default cache of 1024 primitives thrashes on CPU, costing up to 20x per AR step.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "65536")

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


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
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (each side once per round)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per side (1: timing robust to load)")
    parser.add_argument("--compile", action="store_true", help="also time ours with generate(..., compile=True)")
    return parser.parse_args()


if __name__ == "__main__":
    parse_args()  # `--help` and usage errors answer here, before the imports below load torch (seconds)

import torch  # noqa: E402
from bench_train import Measurement, measure, ratio_over_rounds, round_order, set_timing_threads  # noqa: E402

from megatron_bdgemma import hf_reference  # noqa: E402
from megatron_bdgemma.runtime.cli import entry_point  # noqa: E402

# DiffusionGemma's geometry scaled down so one CPU run is quick.
SMALL_TEXT = hf_reference.SMALL_TEXT | dict(vocab_size=2048)
SMALL_CANVAS = 256

OURS = "ours (block diffusion, KV cache)"
HF = "transformers DiffusionGemma.generate"
AR = "ours AR baseline (encoder logits, KV cache)"
COMPILED = "ours compiled (torch.compile canvas forward)"


def small_random_hf(path: Path) -> Path:
    """Build and save the small random DiffusionGemma (vision tower of one layer)."""
    hf_reference.random_diffusion_gemma(SMALL_TEXT, SMALL_CANVAS).save_pretrained(path)
    return path


@entry_point
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

    def run_ours(compile: bool = False) -> Any:
        torch.manual_seed(args.seed)
        return generate(ours, input_ids, padding_mask=padding_mask, sampler=sampler, compile=compile, **common)

    def run_ar() -> Any:
        return generate(ours, input_ids, padding_mask=padding_mask, sampler=Autoregressive(), **common)

    sides: dict[str, Callable[[], Any]] = {OURS: run_ours}
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

        sides[HF] = run_hf
    sides[AR] = run_ar
    if args.compile:
        sides[COMPILED] = lambda: run_ours(compile=True)

    set_timing_threads(device, args.threads)
    outputs, warm_up = {}, {}
    for name, run in sides.items():
        outputs[name], warm_up[name] = measure(run, device)
    times: dict[str, list[Measurement]] = {name: [] for name in sides}
    for round_index in range(args.rounds):
        for name in round_order(list(sides), round_index):
            outputs[name], measurement = measure(sides[name], device)
            times[name].append(measurement)

    def generated(name: str) -> int:
        sequences = outputs[name].sequences
        return int((sequences[:, input_ids.shape[1]:] != pad).sum())

    def per_forward(name: str) -> float:
        return outputs[name].tokens_per_forward.float().mean().item()

    measure_name = "wall" if device.type == "cuda" else "CPU"
    print(f"device {device}, dtype {args.dtype}, {torch.get_num_threads()} threads, batch {len(prompts)} (prompt "
          f"lengths {args.prompt_lengths}, left-padded), canvas {config.canvas_length}, window "
          f"{config.sliding_window}, max_new_tokens {args.max_new_tokens}, max_denoising_steps "
          f"{args.max_denoising_steps}; {args.rounds} rounds, median process {measure_name} seconds (range)")
    print(f"{'':46s} {'tokens':>7s} {'seconds':>8s} {'range':>15s} {'wall s':>8s} {'tokens/s':>9s} {'tok/fwd':>8s}")
    for name in sides:
        seconds = [t.seconds(device) for t in times[name]]
        middle = statistics.median(seconds)
        wall = statistics.median(t.wall for t in times[name])
        print(f"{name:46s} {generated(name):7d} {middle:8.3f} {f'{min(seconds):.3f}..{max(seconds):.3f}':>15s} "
              f"{wall:8.3f} {generated(name) / middle:9.1f} {per_forward(name):8.3f}")

    def tokens_per_s_ratio(name: str, side: str = OURS) -> tuple[float, float, float]:
        """`side`'s tokens/s over `name`'s per round: its seconds over `side`'s, scaled by the token counts."""
        scale = generated(side) / generated(name)
        middle, low, high = ratio_over_rounds(times[side], times[name], device)
        return scale / middle, scale / high, scale / low  # (median, min, max) over rounds

    ratio_hf = (float("nan"),) * 3
    if HF in sides:
        ratio_hf = tokens_per_s_ratio(HF)
        if outputs[HF].sequences.shape == outputs[OURS].sequences.shape:
            share = (outputs[HF].sequences == outputs[OURS].sequences)[:, input_ids.shape[1]:].float().mean().item()
            print(f"generated tokens equal to transformers' (same seed): {share:.1%}")
        print(f"tokens/s ratio vs HF: median {ratio_hf[0]:.3f}, per round {ratio_hf[1]:.3f}..{ratio_hf[2]:.3f}")
    ratio_ar = tokens_per_s_ratio(AR)
    result = (
        f"RESULT tokens_per_s_ratio_vs_hf={ratio_hf[0]:.3f} tokens_per_forward={per_forward(OURS):.3f} "
        f"speedup_vs_ar={ratio_ar[0]:.3f}"
    )
    if args.compile:
        # Wall time: inductor compiles partly in worker processes, which the process CPU time would miss.
        steady = statistics.median(t.wall for t in times[COMPILED])
        print(f"compile: first call {warm_up[COMPILED].wall:.1f} s wall (steady state {steady:.3f} s)")
        same = (outputs[COMPILED].sequences == outputs[OURS].sequences)[:, input_ids.shape[1]:].float().mean().item()
        print(f"generated tokens equal to eager's (near-ties part them as they part from HF's): {same:.1%}")
        # The compiled side's tokens/s over ours: the inverse of `tokens_per_s_ratio(COMPILED)`.
        ratio_compiled = [1 / r for r in tokens_per_s_ratio(COMPILED)]
        print(f"compiled tokens/s over eager: median {ratio_compiled[0]:.3f}, per round "
              f"{ratio_compiled[2]:.3f}..{ratio_compiled[1]:.3f}")
        result += f" speedup_compiled={ratio_compiled[0]:.3f}"
        if HF in sides:
            compiled_hf = tokens_per_s_ratio(HF, side=COMPILED)
            print(f"compiled tokens/s over HF: median {compiled_hf[0]:.3f}, per round "
                  f"{compiled_hf[1]:.3f}..{compiled_hf[2]:.3f}")
            result += f" compiled_ratio_vs_hf={compiled_hf[0]:.3f}"
    print(result)
    workdir.cleanup()


if __name__ == "__main__":
    sys.exit(main())
