"""One training step at DiffusionGemma-26B-A4B's real layer width: time, model TFLOP/s, MFU, vs AR and vs HF.

    python tools/bench_scale.py --layers 4 --seq 4096                 # GPU, bf16 (the issue's target shape)
    python tools/bench_scale.py --layers 4 --seq 4096 --fp8 blockwise # FP8 GEMMs through Transformer Engine
    python tools/bench_scale.py --layers 1 --seq 256 --tiny-width     # CPU smoke run (what the tests run)

The model is `diffusiongemma_26b_a4b` cut to `--layers` (Gemma 4's 5:1 sliding/full pattern, last layer full):
hidden 2816, 128 experts top-8 of width 704, dense GeGLU 2112, sliding layers 16 query / 8 KV heads of dim 256
(window 1024), full layers 16 / 2 of dim 512 (K = V), canvas 256, vocabulary 262,144; random weights; the text
stack only (the preset's vision tower is dropped: the batch holds no image). The batch is
the pretraining layout (`build_pretrain_batch`): `--batch` documents of `--seq` tokens, every block scored, so the
decoded canvas is the whole sequence (R = S), as Automodel trains.

Timed, forward + backward from cleared gradients, alternating the variants each round (medians of `--repeats`
after `--warmup`):

- ours: `BDGemmaModel.training_forward` (causal encode with grad, decode pass 1 without grad, pass 2 with grad on
  the pass-1 signal, diffusion + AR loss sums) and backward; `--fp8 RECIPE` runs it with the `te` spec and FP8;
- ours, AR only: encode with the AR head, AR loss sum, backward (the same model as a plain LM);
- HF: `DiffusionGemmaForBlockDiffusion` at the same shape, the Automodel-style step of tools/bench_train.py
  (encoder, then the decoder twice over the whole canvas with the dense block-diffusion masks, eager attention),
  its own random weights (`--no-hf` skips it).

Model FLOPs are `training_step_flops` (megatron_bdgemma/training/metrics.py): every matmul of the three passes
and the backward, attention counted over the query-key pairs the masks allow (the work any exact kernel must do).
MFU = model TFLOP/s / the card's dense bf16 peak (the table in megatron_bdgemma/training/metrics.py; `--peak-tflops`
overrides; FP8 runs are measured against the bf16 peak too). On CPU the sides run single-threaded and ratios use
process CPU time (wall beside); on GPU, wall time between synchronisations. Peak memory: `torch.cuda.max_memory_allocated` per variant (GPU),
resident high-water mark above the start (CPU). The last line is machine-readable:

    RESULT step_s=... model_tflop=... model_tflops=... mfu=... diffusion_over_ar=... flop_ratio=... peak_mem_gib=...
           step_ratio_vs_hf=...
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="layers of the 5:1 pattern (last one full)")
    parser.add_argument("--seq", type=int, default=4096, help="tokens per document")
    parser.add_argument("--batch", type=int, default=1, help="documents per step")
    parser.add_argument("--fp8", choices=["tensorwise", "blockwise", "mxfp8"], help="FP8 recipe (needs TE and a GPU)")
    parser.add_argument("--attention", choices=["eager", "block_sparse", "flex"],
                        help="our core attention (default: flex on GPU, eager on CPU)")
    parser.add_argument("--loss-chunk-size", type=int, help="vocab-parallel loss in chunks of this many tokens")
    parser.add_argument("--tiny-width", action="store_true", help="the tiny preset's widths (CPU smoke runs)")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF DiffusionGemma step")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (default: the card's, if known)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import torch  # only here: `--help` does not wait for it

    if args.fp8 and not torch.cuda.is_available():
        parser.error("--fp8 needs a GPU with Transformer Engine (this machine has no CUDA device)")
    if args.layers < 1 or args.seq < 1 or args.batch < 1:
        parser.error("--layers, --seq and --batch must be positive")
    return args


if __name__ == "__main__":
    parse_args()  # `--help` and usage errors answer here, before the imports below load torch (seconds)

import torch  # noqa: E402

from bench_attention import PeakMeter  # noqa: E402
from bench_train import hf_training_step, measure, round_order, set_timing_threads  # noqa: E402

from megatron_bdgemma.runtime.cli import entry_point  # noqa: E402


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    from megatron_bdgemma.training.metrics import bf16_peak_tflops

    return bf16_peak_tflops(torch.cuda.get_device_name(device))


def model_config(args: argparse.Namespace, device: torch.device):
    from megatron_bdgemma.config import default_layer_types, diffusiongemma_26b_a4b, tiny

    on_gpu = device.type == "cuda"
    common = dict(
        num_layers=args.layers, layer_types=default_layer_types(args.layers),
        attention_impl=args.attention or ("flex" if on_gpu else "eager"),
        bf16=on_gpu, params_dtype=torch.bfloat16 if on_gpu else torch.float32, use_cpu_initialization=not on_gpu,
        moe_token_dispatcher_type="alltoall" if on_gpu else "allgather",
    )
    if args.fp8:  # megatron-core rejects fp8 fields without Transformer Engine: set only when asked
        common |= dict(fp8="hybrid", fp8_recipe=args.fp8)
    if args.tiny_width:
        return tiny(**common, sliding_window=64, canvas_length=32, num_moe_experts=8, max_position_embeddings=8192)
    # The text stack the step times: no vision tower (here and in the HF twin, which gets the stand-in instead).
    return diffusiongemma_26b_a4b(**common, vision_config=None, image_token_id=None, vision_bidirectional=False)


def hf_model(config, device: torch.device, dtype: torch.dtype):
    """`DiffusionGemmaForBlockDiffusion` of the same shape, built on the device with HF's random init."""
    from transformers import DiffusionGemmaForBlockDiffusion

    from megatron_bdgemma import hf_reference
    from megatron_bdgemma.conversion.hf_export import hf_configs

    hf_config, _ = hf_configs(config, None, dtype)  # text-only: the one-layer, 8-wide stand-in vision tower
    hf_config._attn_implementation = "eager"  # Automodel forces eager: the dense additive canvas mask
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = DiffusionGemmaForBlockDiffusion(hf_config)
    finally:
        torch.set_default_dtype(default)
    hf_reference.automodel_train_mode(hf)
    return hf


def attention_pairs(model, batch, noised) -> tuple[dict[str, int], dict[str, int]]:
    """Query-key pairs the masks allow per layer type over the batch: (encoder pass, each canvas pass)."""
    from megatron_bdgemma import masks

    encoder = {t: int(masks.EncoderMask(batch.encoder_valid, model.config.window_of(t)).dense().sum())
               for t in set(model.config.layer_types)}
    canvas = {t: int(mask.dense().sum()) for t, mask in model.training_masks(batch, noised).items()}
    return encoder, canvas


@dataclass
class Variant:
    name: str
    step: Callable[[], object]
    flops: float
    models: tuple[torch.nn.Module, ...]
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    peak_gib: float = 0.0

    def seconds(self, on_gpu: bool) -> float:
        """The ratio basis: wall time on GPU, process CPU time on CPU."""
        return statistics.median(self.wall if on_gpu else self.cpu)


def run(variant: Variant, device: torch.device, record: bool) -> None:
    """One step from cleared gradients; with `record`, its times and peak memory."""
    for model in variant.models:
        model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakMeter() if device.type == "cpu" else contextlib.nullcontext() as meter:
        _, took = measure(variant.step, device)
    if not record:
        return
    variant.wall.append(took.wall)
    variant.cpu.append(took.cpu)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else meter.peak_mib / 1024
    variant.peak_gib = max(variant.peak_gib, peak)


@entry_point
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from megatron_bdgemma.diffusion import ar_loss, build_pretrain_batch, noise_batch
    from megatron_bdgemma.model import BDGemmaModel
    from megatron_bdgemma.runtime.distributed import init_distributed
    from megatron_bdgemma.training.metrics import training_step_flops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    set_timing_threads(device, 1)  # CPU: each side single-threaded, compared on process CPU time
    init_distributed(seed=args.seed)
    config = model_config(args, device)
    dtype = config.params_dtype
    ours = BDGemmaModel(config, backend="te" if args.fp8 else "local").to(device).train()

    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(2, config.vocab_size, (args.batch, args.seq), generator=generator)
    batch = build_pretrain_batch(ids, block_size=config.canvas_length, pad_id=config.pad_token_id)
    noised = noise_batch(batch, sample_indices=list(range(args.batch)), step=0, seed=args.seed,
                         vocab_size=config.vocab_size, score="all_blocks")
    batch = batch.to(device)
    noised = noised.to(device)

    encoder_pairs, canvas_pairs = attention_pairs(ours, batch, noised)
    shape = dict(tokens=batch.input_ids.numel(), canvas_tokens=noised.canvas_ids.numel(),
                 encoder_pairs=encoder_pairs, canvas_pairs=canvas_pairs)
    flops = training_step_flops(config, **shape)
    ar_flops = training_step_flops(config, **shape, ar_only=True)

    def diffusion_step() -> None:
        out = ours.training_forward(batch, noised, loss_chunk_size=args.loss_chunk_size)
        (out.diffusion_loss_sum + out.ar_loss_sum).backward()

    def ar_step() -> None:
        encoded = ours.encode(batch.input_ids, padding_mask=~batch.encoder_valid, return_logits=True)
        ar_loss(encoded.logits, batch.ar_labels, batch.ar_loss_mask)[0].backward()

    recipe = f"FP8 {args.fp8} (te spec)" if args.fp8 else f"{str(dtype).split('.')[-1]} (local spec)"
    variants = [Variant(f"ours, diffusion step, {recipe}", diffusion_step, flops.total, (ours,)),
                Variant("ours, AR-only step", ar_step, ar_flops.total, (ours,))]
    if not args.no_hf:
        hf = hf_model(config, device, dtype)
        variants.append(Variant("HF DiffusionGemma, Automodel-style (eager)", hf_training_step(hf, batch, noised),
                                flops.total, (hf,)))
    for _ in range(args.warmup):
        for variant in variants:
            run(variant, device, record=False)
    for index in range(args.repeats):
        for variant in round_order(variants, index):
            run(variant, device, record=True)

    peak = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if on_gpu else f"cpu, {torch.get_num_threads()} thread"
    kinds = "".join("F" if t == "full_attention" else "S" for t in config.layer_types)
    print(f"device {name}; torch {torch.__version__}; {recipe}; attention {config.attention_impl}")
    print(f"{config.num_layers} layers ({kinds}), hidden {config.hidden_size}, {config.num_moe_experts} experts "
          f"top-{config.moe_router_topk} of {config.moe_ffn_hidden_size}, dense {config.ffn_hidden_size}, heads "
          f"{config.num_attention_heads}/{config.num_query_groups} d={config.kv_channels} sliding (window "
          f"{config.sliding_window}), {config.num_attention_heads}/{config.num_global_query_groups} "
          f"d={config.global_kv_channels} full, vocab {config.vocab_size}; batch {args.batch} x seq {batch.seq_len}, "
          f"canvas {noised.canvas_ids.shape[1]} (every block of {config.canvas_length} scored)")
    print(f"model TFLOP per step: diffusion {flops.total / 1e12:.4g} (encode {flops.encode / 1e12:.4g}, pass 1 "
          f"{flops.pass1 / 1e12:.4g}, pass 2 {flops.pass2 / 1e12:.4g}, backward {flops.backward / 1e12:.4g}), AR "
          f"{ar_flops.total / 1e12:.4g}; attention over the pairs the masks allow")
    basis = "wall time" if on_gpu else "process CPU time (wall beside)"
    print(f"median of {args.repeats} after {args.warmup} warm-up, alternating; ratios on {basis}; MFU vs dense bf16 "
          f"peak {f'{peak:.1f} TFLOP/s' if peak else 'unknown (--peak-tflops)'}")
    print(f"{'':50s} {'step ms':>9s} {'wall ms':>9s} {'TFLOP/s':>9s} {'MFU':>7s} {'peak GiB':>9s}")
    for variant in variants:
        seconds = variant.seconds(on_gpu)
        tflops = variant.flops / seconds / 1e12
        mfu = f"{tflops / peak:7.1%}" if peak else f"{'-':>7s}"
        print(f"{variant.name:50s} {seconds * 1e3:9.1f} {statistics.median(variant.wall) * 1e3:9.1f} "
              f"{tflops:9.3f} {mfu} {variant.peak_gib:9.2f}")
    diff, ar = variants[0], variants[1]
    step_s = diff.seconds(on_gpu)
    tflops = flops.total / step_s / 1e12
    result = dict(step_s=f"{step_s:.4g}", model_tflop=f"{flops.total / 1e12:.6g}", model_tflops=f"{tflops:.4g}",
                  mfu=f"{tflops / peak:.4g}" if peak else "nan", diffusion_over_ar=f"{step_s / ar.seconds(on_gpu):.3f}",
                  flop_ratio=f"{flops.total / ar_flops.total:.3f}", peak_mem_gib=f"{diff.peak_gib:.3f}")
    if not args.no_hf:
        result["step_ratio_vs_hf"] = f"{step_s / variants[2].seconds(on_gpu):.3f}"
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    sys.exit(main())
