"""Training-step time: our block-diffusion step vs `transformers`' DiffusionGemma and vs an AR-only step, one run.

    python tools/bench_train.py                      # a small random DiffusionGemma built here (CPU-sized)
    python tools/bench_train.py --hf /path/to/diffusiongemma [--dtype bf16] [--batch 2 --seq-len 2048]

On the same weights and SFT micro-batch (prompt + response per example, EOS-filled to whole blocks, one t and one
scored block per example, self-conditioning coins with p = 0.5) it times forward + backward of:

- ours: `BDGemmaModel.training_forward` as the trainer calls it: causal encode with grad, decode pass 1 without
  grad, pass 2 with grad on the pass-1 signal, diffusion + AR loss sums, backward. Only the scored block is decoded
  (exact: canvas blocks never see each other, docs/design.md §5);
- ours, vocab-parallel loss: the same with `loss_chunk_size` (no full-vocabulary logits);
- ours, whole canvas: the same, decoding every response block as the references do (one still scored);
- ours, block-sparse attention: the first and third rows with `attention_impl="block_sparse"` (one query chunk at a
  time over only the keys it can see, recomputed in backward) instead of the eager dense-mask attention;
- HF, Automodel-style: `DiffusionGemmaForBlockDiffusion`'s own modules driven the way NeMo Automodel trains
  (its DiffusionGemma recipe): `model.encoder` over the clean sequence (causal, 2-D padding
  mask) fills a `DynamicCache` whose layers all keep every position (a config-built cache would cut sliding layers
  to the window, while the training mask indexes all S encoder keys); encoder logits `lm_head` + fp32 softcap;
  `model.decoder` over the whole response canvas with the dense block-diffusion masks `{full, sliding}`
  `[B, 1, R, S + R]` (additive, eager attention) over `[encoder K/V ; canvas K/V]`, pass 1 under `no_grad` with no
  signal, pass 2 with the pass-1 logits and the coins; flat CE summed over the scored block plus AR CE over valid
  pairs; backward. Router projection and scale frozen, as in the recipe. Not included: FSDP, Automodel's own
  grouped-experts kernels, padding tokens kept out of routing;
- HF, scored block only: the same HF step on our one-block canvas (how TRL's reference script trains);
- ours, AR only: encode with the AR logits, AR loss sum, backward (what the same model costs as a plain LM).

Every diffusion variant's loss is checked against ours (same batch, same numbers up to rounding): the run exits
non-zero when one differs by more than `--loss-rtol`. Each step is run `--warmup` times untimed, then `--repeats`
rounds time every variant once per round, the order reversed every other round, the compared variants next to each
other. On CPU every side runs single-threaded and is timed by the **process CPU time** it used
(`time.process_time`), which waiting for a core does not count; wall time is printed beside it. On a GPU the wall
time (after a synchronize) is the measure. A ratio is the median over rounds of the two sides' times in that round
(taken back to back, so both met the same contention), printed with its range; each row shows its median step.
Tokens/s counts the batch's valid sequence tokens (prompt + response + EOS fill) per step. Model FLOPs use
`active_params_per_token` N (attention projections, dense MLP, top-k experts, router, LM head): 6·N per token
with grad (encoder over B·S positions, pass 2 over the decoded canvas), 2·N per token for pass 1; attention scores
and the soft-embedding matmul are not counted. The last line is machine-readable:

    RESULT step_ratio_vs_hf_same_work=<ours whole canvas / HF Automodel-style>
           step_ratio_vs_hf_same_work_block_sparse=<ours block-sparse whole canvas / HF Automodel-style>
           step_ratio_vs_hf_recipe=<ours scored block / HF Automodel-style> diffusion_over_ar=<ours / AR only>

(one line). `same_work` decodes the same whole canvas on both sides under the same dense additive masks (ours
`attention_impl="eager"`, which on CPU runs PyTorch's fused SDPA kernel; HF eager matmuls);
`same_work_block_sparse` is the same step with our block-sparse attention (same losses and gradients, masked-out
scores never computed); `recipe` is what our trainer runs (only the scored block decoded, exact by DESIGN §5)
against what the Automodel recipe runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", type=Path, help="local HF DiffusionGemma directory (default: a small random one)")
    parser.add_argument("--batch", type=int, default=4, help="examples per micro-batch")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per example, prompt + response + fill")
    parser.add_argument("--loss-chunk-size", type=int, default=512, help="tokens per chunk, vocab-parallel variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per side (1: timing robust to load)")
    parser.add_argument("--loss-rtol", type=float, help="allowed relative loss difference (default 1e-4 fp32, 2e-2 "
                        "bf16)")
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    return args


if __name__ == "__main__":
    parse_args()  # `--help` and usage errors answer here, before the imports below load torch (seconds)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_bdgemma import hf_reference  # noqa: E402
from megatron_bdgemma.runtime.cli import entry_point  # noqa: E402

# DiffusionGemma's geometry scaled down so one CPU run is quick.
SMALL_TEXT = hf_reference.SMALL_TEXT | dict(vocab_size=8192, final_logit_softcapping=30.0)
SMALL_CANVAS = 64

OURS = "ours (training_forward, scored block decoded)"
OURS_WHOLE = "ours, whole canvas decoded"
OURS_SPARSE_WHOLE = "ours, block-sparse, whole canvas"
HF_AUTOMODEL = "HF, Automodel-style (whole canvas, dense mask)"
OURS_AR = "ours, AR only (encode + AR loss)"

Step = Callable[[], tuple[float, float]]
T = TypeVar("T")


@dataclasses.dataclass
class Measurement:
    """What one timed call cost: process CPU seconds (all its threads) and wall seconds."""

    cpu: float
    wall: float

    def seconds(self, device: torch.device) -> float:
        """The measure ratios use: CPU time on CPU (robust to other jobs on the cores), wall time on a GPU (the
        host mostly waits there)."""
        return self.wall if device.type == "cuda" else self.cpu


@dataclasses.dataclass
class Variant:
    name: str
    step: Step
    canvas_positions: int  # B · decoded canvas length (pass 1 and pass 2 each run over these); 0 = AR only
    times: list[Measurement] = dataclasses.field(default_factory=list)


def set_timing_threads(device: torch.device, threads: int) -> None:
    """Run CPU sides with `threads` threads (1 by default): a single-threaded side's CPU time does not depend on how
    many cores other processes leave free, and intra-op threading cannot favour one side."""
    if device.type == "cpu":
        torch.set_num_threads(threads)


def measure(fn: Callable[[], Any], device: torch.device) -> tuple[Any, Measurement]:
    """Call `fn` once → (its result, `Measurement`), the device synchronized before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, Measurement(time.process_time() - cpu, time.perf_counter() - wall)


def round_order(items: Sequence[T], round_index: int) -> list[T]:
    """The order of one timing round: as given on even rounds, reversed on odd ones, so no side always runs first
    (caches, allocator state and a machine's load drift then fall on each side alike)."""
    return list(items) if round_index % 2 == 0 else list(reversed(items))


def ratio_over_rounds(
    ours: Sequence[Measurement], reference: Sequence[Measurement], device: torch.device
) -> tuple[float, float, float]:
    """`ours / reference` per round → (median, min, max) over the rounds.

    Pairing each round's two measurements (taken back to back where the caller orders them so) cancels most of a
    shared machine's drift: both sides of a pair met about the same contention for caches and cores.
    """
    ratios = [a.seconds(device) / b.seconds(device) for a, b in zip(ours, reference, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def small_random_hf(path: Path) -> Path:
    """Build and save the small random DiffusionGemma (vision tower of one layer)."""
    model = hf_reference.random_diffusion_gemma(SMALL_TEXT, SMALL_CANVAS)
    with torch.no_grad():
        # HF's init (std 0.02) gives near-uniform logits, on which every loss is about log V and the loss check
        # below could not tell implementations apart; spread the tied embedding as a trained model's is.
        model.model.decoder.embed_tokens.weight.normal_(0.0, 0.5)
    model.save_pretrained(path)
    return path


def sft_batch(batch: int, seq_len: int, block_size: int, vocab: int, eos: int, pad: int, seed: int):
    """Random single-turn examples: prompts of S/16..S/2 tokens, answers filling the rest but for up to a block."""
    from megatron_bdgemma.diffusion import build_sft_batch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, seq_len), generator=generator)
    loss_mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    valid = torch.zeros(batch, seq_len, dtype=torch.bool)
    for b in range(batch):
        prompt = int(torch.randint(seq_len // 16, seq_len // 2, (), generator=generator))
        room = (seq_len - prompt) // block_size * block_size  # the answer plus its EOS fill must fit
        answer = room - int(torch.randint(0, block_size, (), generator=generator))
        loss_mask[b, prompt : prompt + answer] = True
        valid[b, : prompt + answer] = True
    return build_sft_batch(ids, loss_mask, valid, block_size=block_size, eos_id=eos, pad_id=pad)


def whole_canvas(batch, one, vocab: int, seed: int):
    """The response window with every block decoded, holding `one`'s noisy scored blocks: Automodel's canvas."""
    from megatron_bdgemma.diffusion import NoisedCanvas, block_mask, noise_batch

    bs = batch.block_size
    full = noise_batch(batch, sample_indices=list(range(batch.batch_size)), step=0, seed=seed, vocab_size=vocab,
                       score="all_blocks")
    chosen = one.block_ids[:, 0]
    canvas = full.canvas_ids.clone()
    for b, block in enumerate(chosen.tolist()):
        canvas[b, block * bs : (block + 1) * bs] = one.canvas_ids[b]
    scored = block_mask(chosen, batch.canvas_supervised, bs)
    return NoisedCanvas(canvas, full.targets, full.position_ids, full.block_ids, scored, scored.float(),
                        one.self_conditioning)


def hf_training_step(hf, batch, noised) -> Step:
    """One Automodel-style HF step (module docstring) on `noised`'s canvas → (diffusion sum, AR sum)."""
    from transformers import DynamicCache

    from megatron_bdgemma import masks

    text = hf.config.text_config
    dtype = hf.lm_head.weight.dtype
    attention = {
        t: masks.to_additive(
            masks.BlockDiffusionTrainingMask(
                batch.prefix_lens, batch.response_lens, batch.seq_len, noised.canvas_ids.shape[1], batch.block_size,
                text.sliding_window if t == hf_reference.SLIDING else None, canvas_block_ids=noised.block_ids,
            ).dense(),
            dtype,
        )
        for t in set(text.layer_types)
    }
    scored = noised.scored.bool()

    def head(hidden: torch.Tensor) -> torch.Tensor:
        cap = text.final_logit_softcapping
        return cap * torch.tanh(hf.lm_head(hidden).float() / cap)

    def step() -> tuple[float, float]:
        encoded = hf.model.encoder(input_ids=batch.input_ids, attention_mask=batch.encoder_valid.long(),
                                   cache=DynamicCache(), use_cache=True)

        def decode(**self_conditioning: torch.Tensor) -> torch.Tensor:
            return head(hf.model.decoder(
                decoder_input_ids=noised.canvas_ids, cache=encoded.cache, decoder_attention_mask=attention,
                decoder_position_ids=noised.position_ids, **self_conditioning,
            ).last_hidden_state)

        with torch.no_grad():
            first = decode()
        logits = decode(self_conditioning_logits=first, self_conditioning_mask=noised.self_conditioning)
        diffusion = F.cross_entropy(logits[scored], noised.targets[scored], reduction="sum")
        pairs = batch.ar_loss_mask
        ar = F.cross_entropy(head(encoded.last_hidden_state)[pairs], batch.ar_labels[pairs], reduction="sum")
        (diffusion + ar).backward()
        return diffusion.item(), ar.item()

    return step


@entry_point
def main() -> None:
    args = parse_args()
    import megatron_bdgemma
    from megatron_bdgemma.diffusion import ar_loss, noise_batch
    from megatron_bdgemma.runtime.distributed import init_distributed
    from megatron_bdgemma.training.metrics import active_params_per_token
    from transformers import DiffusionGemmaForBlockDiffusion

    init_distributed(seed=args.seed)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workdir = tempfile.TemporaryDirectory()
    hf_path = args.hf or small_random_hf(Path(workdir.name) / "hf")

    ours = megatron_bdgemma.from_hf(hf_path, dtype=dtype).to(device).train()
    sparse = megatron_bdgemma.from_hf(hf_path, dtype=dtype, attention_impl="block_sparse").to(device).train()
    hf = hf_reference.automodel_train_mode(DiffusionGemmaForBlockDiffusion.from_pretrained(hf_path, dtype=dtype).to(device))
    config = ours.config
    vocab, bs = config.vocab_size, config.canvas_length

    batch = sft_batch(args.batch, args.seq_len, bs, vocab, config.eos_token_ids[0], config.pad_token_id, args.seed)
    one = noise_batch(batch, sample_indices=list(range(args.batch)), step=0, seed=args.seed, vocab_size=vocab)
    whole = whole_canvas(batch, one, vocab, args.seed)
    batch, one, whole = batch.to(device), one.to(device), whole.to(device)

    def our_step(noised, loss_chunk_size: int | None = None, model=ours) -> Step:
        def step() -> tuple[float, float]:
            out = model.training_forward(batch, noised, loss_chunk_size=loss_chunk_size)
            (out.diffusion_loss_sum + out.ar_loss_sum).backward()
            return out.diffusion_loss_sum.item(), out.ar_loss_sum.item()

        return step

    def ar_step() -> tuple[float, float]:
        encoded = ours.encode(batch.input_ids, padding_mask=~batch.encoder_valid, return_logits=True)
        loss, _ = ar_loss(encoded.logits, batch.ar_labels, batch.ar_loss_mask)
        loss.backward()
        return float("nan"), loss.item()

    one_canvas, whole_canvas_positions = one.canvas_ids.numel(), whole.canvas_ids.numel()
    # Ordered so that each compared pair is timed back to back: block-sparse whole | whole | HF whole | ours | AR.
    variants = [
        Variant(f"ours, vocab-parallel loss (chunks of {args.loss_chunk_size})",
                our_step(one, args.loss_chunk_size), one_canvas),
        Variant("ours, block-sparse attention", our_step(one, model=sparse), one_canvas),
        Variant("HF, scored block only (TRL-style)", hf_training_step(hf, batch, one), one_canvas),
        Variant(OURS_SPARSE_WHOLE, our_step(whole, model=sparse), whole_canvas_positions),
        Variant(OURS_WHOLE, our_step(whole), whole_canvas_positions),
        Variant(HF_AUTOMODEL, hf_training_step(hf, batch, whole), whole_canvas_positions),
        Variant(OURS, our_step(one), one_canvas),
        Variant(OURS_AR, ar_step, 0),
    ]
    models = (ours, sparse, hf)
    set_timing_threads(device, args.threads)
    load_before = os.getloadavg()[0]
    losses = {}
    for variant in variants:
        for _ in range(args.warmup):
            losses[variant.name] = run(variant.step, models, device)[0]
    for round_index in range(args.repeats):
        for variant in round_order(variants, round_index):
            losses[variant.name], elapsed = run(variant.step, models, device)
            variant.times.append(elapsed)

    n = active_params_per_token(config)
    encoder_positions = batch.input_ids.numel()
    tokens = int(batch.encoder_valid.sum())
    measure_name = "wall" if device.type == "cuda" else "CPU"
    print(f"device {device}, dtype {args.dtype}, {torch.get_num_threads()} threads; batch {args.batch} × S "
          f"{batch.seq_len} ({tokens} valid tokens), block {bs}, whole canvas R {whole.canvas_ids.shape[1]}, "
          f"vocab {vocab}, hidden {config.hidden_size}, {config.num_layers} layers, {config.num_moe_experts} experts "
          f"top-{config.moe_router_topk}; N = active_params_per_token = {n:,}")
    print(f"{args.repeats} rounds after {args.warmup} warm-up, order reversed every other round; step = median "
          f"process {measure_name} seconds (range over rounds), median wall; 1-min load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after; losses are sums (diffusion, AR)")
    print(f"{'':50s} {'step s':>8s} {'range':>13s} {'wall s':>8s} {'tokens/s':>9s} {'GFLOP':>8s} {'TFLOP/s':>8s}  "
          f"losses")
    for variant in variants:
        times = [t.seconds(device) for t in variant.times]
        seconds = statistics.median(times)
        wall = statistics.median(t.wall for t in variant.times)
        canvas = variant.canvas_positions
        flops = 6 * n * encoder_positions + (2 + 6) * n * canvas if canvas else 6 * n * encoder_positions
        diffusion, ar = losses[variant.name]
        print(f"{variant.name:50s} {seconds:8.3f} {f'{min(times):.3f}..{max(times):.3f}':>13s} {wall:8.3f} "
              f"{tokens / seconds:9.0f} {flops / 1e9:8.1f} {flops / seconds / 1e12:8.4f}  {diffusion:.4f}, {ar:.4f}")
    reference = losses[OURS]
    diffusion_variants = [v.name for v in variants if v.name not in (OURS, OURS_AR)]
    worst = max(abs(losses[name][i] - reference[i]) / abs(reference[i]) for name in diffusion_variants for i in (0, 1))
    rtol = args.loss_rtol if args.loss_rtol is not None else (2e-2 if args.dtype == "bf16" else 1e-4)
    print(f"loss agreement with ours (relative, all diffusion variants, HF included): {worst:.1e} (allowed {rtol:.0e})")
    if not worst <= rtol:
        raise SystemExit(f"loss mismatch: a diffusion variant's loss differs from ours by {worst:.1e} relative "
                         f"(> {rtol:.0e}); the timings compare different computations")
    by_name = {v.name: v.times for v in variants}
    same_work = ratio_over_rounds(by_name[OURS_WHOLE], by_name[HF_AUTOMODEL], device)
    same_work_sparse = ratio_over_rounds(by_name[OURS_SPARSE_WHOLE], by_name[HF_AUTOMODEL], device)
    recipe = ratio_over_rounds(by_name[OURS], by_name[HF_AUTOMODEL], device)
    over_ar = ratio_over_rounds(by_name[OURS], by_name[OURS_AR], device)
    for label, (middle, low, high) in (("same work (ours whole canvas / HF)", same_work),
                                     ("same work, block-sparse (ours / HF)", same_work_sparse),
                                       ("recipe (ours scored block / HF whole canvas)", recipe),
                                       ("diffusion / AR only", over_ar)):
        print(f"ratio {label:46s} median {middle:.3f}, per round {low:.3f}..{high:.3f}")
    print(f"RESULT step_ratio_vs_hf_same_work={same_work[0]:.3f} "
          f"step_ratio_vs_hf_same_work_block_sparse={same_work_sparse[0]:.3f} step_ratio_vs_hf_recipe={recipe[0]:.3f} "
          f"diffusion_over_ar={over_ar[0]:.3f}")
    workdir.cleanup()


def run(step: Step, models: tuple[torch.nn.Module, ...], device: torch.device) -> tuple[tuple[float, float], Measurement]:
    """One forward + backward from cleared gradients → (loss sums, `Measurement`)."""
    for model in models:
        model.zero_grad(set_to_none=True)
    return measure(step, device)  # `.item()` on the losses waits for the device


if __name__ == "__main__":
    sys.exit(main())
