"""One short GPU check: environment, HF parity on the device, kernel support, training-step timings.

    python tools/device_check.py [--seq 1024] [--repeats 5]

Prints a table; every timing is measured in this run on this card (median of `--repeats` after a warm-up). It needs
a CUDA device; on CPU it says so and exits.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu-dry-run", action="store_true", help="run every section on CPU (to test this script)")
    return parser.parse_args()


if __name__ == "__main__":
    parse_args()  # `--help` and usage errors answer here, before the imports below load torch (seconds)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_bdgemma.runtime.cli import entry_point  # noqa: E402

DEVICE = "cuda"


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_mib() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else float("nan")


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` after one warm-up."""
    fn()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def environment() -> list[tuple[str, str]]:
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
    rows = [("torch", torch.__version__), ("device", name), ("CUDA", str(torch.version.cuda))]
    for name in ("megatron.core", "transformers", "transformer_engine"):
        try:
            module = importlib.import_module(name)
            rows.append((name, getattr(module, "__version__", "present")))
        except ImportError as error:
            rows.append((name, f"not importable ({error.__class__.__name__})"))
    return rows


def hf_parity() -> list[tuple[str, str]]:
    """Our encode+decode vs HF DiffusionGemma on the GPU, fp32 and bf16 (max-abs over canvas logits)."""
    import megatron_bdgemma
    from tests import hf_models

    rows = []
    hf = hf_models.diffusion_gemma(canvas_length=4)
    path = hf_models.save(hf, Path("/tmp/device_check_hf"))
    for dtype in (torch.float32, torch.bfloat16):
        ours = megatron_bdgemma.from_hf(path, dtype=dtype)
        reference = type(hf).from_pretrained(path, dtype=dtype, attn_implementation="eager").to(DEVICE).eval()
        prompt = torch.randint(2, 96, (2, 9), device=DEVICE)
        canvas = torch.randint(0, 96, (2, 4), device=DEVICE)
        positions = 9 + torch.arange(4, device=DEVICE).expand(2, 4)
        sc = torch.randn(2, 4, 96, device=DEVICE)
        with torch.no_grad():
            expected = reference(input_ids=prompt, decoder_input_ids=canvas, decoder_position_ids=positions,
                                 self_conditioning_logits=sc).logits
            got = ours.decode(canvas, ours.encode(prompt), canvas_position_ids=positions, self_conditioning_logits=sc)
        rows.append((f"HF parity {str(dtype).split('.')[-1]}", f"max-abs {(got - expected).abs().max().item():.2e}"))
    return rows


def attention_kernels(repeats: int) -> list[tuple[str, str]]:
    """SDPA with a boolean mask and FlexAttention with a block mask, head dims 256 and 512, bf16 fwd+bwd."""
    import torch.nn.functional as F

    rows = []
    heads, canvas, prefix = 16, 256, 4096
    keys = prefix + canvas
    for head_dim in (256, 512):
        q = torch.randn(1, heads, canvas, head_dim, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, heads, keys, head_dim, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        allowed = torch.ones(canvas, keys, dtype=torch.bool, device=DEVICE)

        def sdpa():
            F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).sum().backward()

        reset_peak()
        try:
            t = timed(sdpa, repeats)
            rows.append((f"SDPA bool mask d={head_dim}", f"{t * 1e3:.2f} ms, peak {peak_mib():.0f} MiB"))
        except Exception as error:  # noqa: BLE001 - a kernel that does not exist here is the finding
            rows.append((f"SDPA bool mask d={head_dim}", f"failed: {error.__class__.__name__}: {str(error)[:80]}"))
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            block = create_block_mask(lambda b, h, qi, ki: ki >= 0, 1, 1, canvas, keys, device=DEVICE)
            compiled = torch.compile(flex_attention)

            def flex():
                compiled(q, k, v, block_mask=block).sum().backward()

            reset_peak()
            t = timed(flex, repeats)
            rows.append((f"FlexAttention d={head_dim}", f"{t * 1e3:.2f} ms, peak {peak_mib():.0f} MiB"))
        except Exception as error:  # noqa: BLE001
            rows.append((f"FlexAttention d={head_dim}", f"failed: {error.__class__.__name__}: {str(error)[:80]}"))
    return rows


def training_steps(seq: int, repeats: int) -> list[tuple[str, str]]:
    """bf16 fwd+bwd of a mid-size model: block-diffusion step vs an AR-only step on the same weights."""
    from megatron_bdgemma.config import tiny
    from megatron_bdgemma.diffusion import ar_loss, build_pretrain_batch, noise_batch, normalise
    from megatron_bdgemma.model import BDGemmaModel
    from megatron_bdgemma.training.metrics import active_params_per_token

    config = tiny(
        num_layers=6, layer_types=None, hidden_size=1024, num_attention_heads=8, kv_channels=128, num_query_groups=4,
        global_kv_channels=256, num_global_query_groups=2, ffn_hidden_size=2048, num_moe_experts=16, moe_router_topk=4,
        moe_ffn_hidden_size=512, vocab_size=32768, sliding_window=512, canvas_length=256, bf16=True,
        params_dtype=torch.bfloat16, use_cpu_initialization=False,
    )
    model = BDGemmaModel(config).to(DEVICE).train()
    ids = torch.randint(2, config.vocab_size, (2, seq), device=DEVICE)
    batch = build_pretrain_batch(ids, block_size=config.canvas_length, pad_id=0)
    sft_like = noise_batch(batch, sample_indices=[0, 1], step=0, seed=0, vocab_size=config.vocab_size)
    all_blocks = noise_batch(batch, sample_indices=[0, 1], step=0, seed=0, vocab_size=config.vocab_size, score="all_blocks")

    def diffusion(noised):
        def step():
            out = model.training_forward(batch, noised)
            (normalise(out.diffusion_loss_sum, out.diffusion_tokens) + normalise(out.ar_loss_sum, out.ar_tokens)).backward()
        return step

    def ar():
        encoded = model.encode(batch.input_ids, return_logits=True)
        total, count = ar_loss(encoded.logits, batch.ar_labels, batch.ar_loss_mask)
        normalise(total, count).backward()

    t_ar = timed(ar, repeats)
    t_one = timed(diffusion(sft_like), repeats)
    t_all = timed(diffusion(all_blocks), repeats)
    flops = active_params_per_token(config) * 2 * seq
    return [
        ("train model", f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, seq {seq}, batch 2, bf16"),
        ("AR-only step", f"{t_ar * 1e3:.1f} ms, {6 * flops / t_ar / 1e12:.1f} model TFLOP/s"),
        ("diffusion step, one block", f"{t_one * 1e3:.1f} ms ({t_one / t_ar:.2f}x AR)"),
        ("diffusion step, all blocks", f"{t_all * 1e3:.1f} ms ({t_all / t_ar:.2f}x AR)"),
    ]


@entry_point
def main() -> None:
    args = parse_args()
    global DEVICE
    if args.cpu_dry_run:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check (use --cpu-dry-run to exercise the script)")
        return
    from megatron_bdgemma.runtime.distributed import ensure_model_parallel

    ensure_model_parallel()
    rows = environment()
    for section in (hf_parity, lambda: attention_kernels(args.repeats), lambda: training_steps(args.seq, args.repeats)):
        try:
            rows += section()
        except Exception as error:  # noqa: BLE001 - report and go on: one short run must return every finding
            rows.append((getattr(section, "__name__", "section"), f"failed: {error.__class__.__name__}: {str(error)[:160]}"))
        print(*(f"{k:32s} {v}" for k, v in rows[-4:]), sep="\n", flush=True)
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"| {k:{width}s} | {v} |" for k, v in rows))


if __name__ == "__main__":
    sys.exit(main())
