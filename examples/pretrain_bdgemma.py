"""Block-diffusion training of the `tiny` preset on CPU, on text that ships with Python (no downloads).

This is the embedded default of `make demo` until the full Megatron training loop lands (issue #4): byte-level
tokens of a standard-library module, the pretraining layout (every block scored), the two-pass training forward and
AdamW, with the diffusion and AR losses printed every few steps.

    python examples/pretrain_bdgemma.py [--steps 40] [--seq 64] [--batch 4]
"""

from __future__ import annotations

import argparse
import inspect
import json
import time

import torch


def byte_corpus() -> torch.Tensor:
    """UTF-8 bytes of `json/decoder.py`'s source, shifted past the special ids (0 pad, 1 EOS)."""
    import json.decoder

    return torch.tensor(list(inspect.getsource(json.decoder).encode()), dtype=torch.long) + 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    from megatron_bdgemma.config import tiny
    from megatron_bdgemma.diffusion import build_pretrain_batch, noise_batch, normalise
    from megatron_bdgemma.model import BDGemmaModel
    from megatron_bdgemma.runtime.distributed import ensure_model_parallel

    ensure_model_parallel()
    torch.manual_seed(args.seed)
    config = tiny()
    model = BDGemmaModel(config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.95, 0.99), weight_decay=1e-4)
    corpus = byte_corpus()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny preset: {n_params:,} parameters, {config.num_layers} layers, canvas {config.canvas_length}; "
          f"corpus {len(corpus):,} byte tokens")

    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        offsets = torch.randint(0, len(corpus) - args.seq, (args.batch,), generator=generator)
        ids = torch.stack([corpus[o : o + args.seq] for o in offsets.tolist()])
        batch = build_pretrain_batch(ids, block_size=config.canvas_length, pad_id=config.pad_token_id)
        sample_indices = list(range((step - 1) * args.batch, step * args.batch))
        noised = noise_batch(batch, sample_indices=sample_indices, step=step, seed=args.seed,
                             vocab_size=config.vocab_size, score="all_blocks")
        out = model.training_forward(batch, noised)
        diffusion = normalise(out.diffusion_loss_sum, out.diffusion_tokens)
        ar = normalise(out.ar_loss_sum, out.ar_tokens)
        optimizer.zero_grad(set_to_none=True)
        (diffusion + ar).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step == 1 or step % 5 == 0:
            elapsed = time.perf_counter() - start
            tokens = step * args.batch * args.seq
            print(f"step {step:4d}/{args.steps} | diffusion {diffusion.item():.3f} | ar {ar.item():.3f} | "
                  f"grad norm {grad_norm.item():.2f} | {tokens / elapsed:,.0f} tok/s | "
                  f"ETA {elapsed / step * (args.steps - step):.0f}s")

    model.eval()
    with torch.no_grad():
        logits = model.encode(ids[:1], return_logits=True).logits[0]
    summary = dict(shape=list(logits.shape), mean=round(logits.mean().item(), 4), std=round(logits.std().item(), 4),
                   max_abs=round(logits.abs().max().item(), 4))
    print("final encoder logits:", json.dumps(summary))


if __name__ == "__main__":
    main()
