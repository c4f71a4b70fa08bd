"""Peak memory of the eager vs block-sparse core attention in one training step, at growing prompt lengths.

    python tools/bench_attention.py                          # prompts of 1K, 2K, 4K, 8K and 16K tokens (CPU)
    python tools/bench_attention.py --lengths 256 512        # a quick smoke run
    python tools/bench_attention.py --layout pretrain --mem-limit-gib 16   # the canvas spans the whole sequence

A small random `BDGemmaModel` (fp32, TP=1; default 2 layers, one sliding with a 512-token window and one full, hidden
128, 2 query heads over 1 KV head, 4 experts top-2, vocabulary 512, the real Gemma 4 structure otherwise) is built
twice from the same seed, once per `attention_impl` ("eager": dense mask and full score matrix; "block_sparse": one
query chunk at a time over the keys it can see, recomputed in backward). For each prompt length n, one SFT
micro-batch of batch 1 (prompt n tokens, a response of `--response` tokens, block = canvas length `--block`,
`noise_batch` with `--score`: one scored block decoded, as the SFT recipe trains, or every block; or, with
`--layout pretrain`, a document of n tokens whose every block is decoded and scored, so the canvas grows with n)
is run through:

- step: `BDGemmaModel.training_forward` (causal encode with grad, decode pass 1 without grad, pass 2 with grad,
  diffusion + AR loss sums) and backward of their sum: what the trainer runs;
- canvas: the canvas attention alone: the encoder K/V computed without grad (then made leaves that require grad), one
  `decode` of the canvas under the training masks, backward of its diffusion loss sum.

Each (impl, n) runs in its own subprocess, so one run's allocator state cannot affect another's and a run that
outgrows memory is reported as such. Peak memory is the kernel's resident high-water mark above the resident size
just before the measured call: the process resets `VmHWM` (`echo 5 > /proc/self/clear_refs`) right before it and
reads `VmHWM - VmRSS(before)` from `/proc/self/status` right after. Children run with
`MALLOC_MMAP_THRESHOLD_=65536`, so every large tensor is its own mapping that goes back to the OS when freed (glibc's
dynamic threshold would otherwise keep freed memory and hide later peaks). A calibration child first allocates a
known 1 GiB tensor and prints what the method reads for it. While a child runs, the parent watches its RSS and
stops it above `--mem-limit-gib` (default: 85% of the memory available at start), reporting the RSS it reached.

Both impls' loss sums and gradients are compared at every n (same weights: the parameter checksums must agree):
"loss rel diff" is the largest relative difference of the step's diffusion and AR sums and the canvas loss, "grad
rel diff" the max-abs difference of all parameter gradients over their max-abs. Step seconds are one step after a
short warm-up at a small length, with every large tensor freshly page-faulted (the malloc setting above): a rough
guide on a shared CPU, not a timing benchmark.
The last line is machine-readable, for the largest n where both impls finished:

    RESULT peak_mem_eager_over_sparse=<eager / block-sparse step peak> at_prompt_len=<n>
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from megatron_bdgemma.runtime.cli import entry_point

IMPLS = ("eager", "block_sparse")
MIB = 2**20
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # fixed threshold: large frees go back to the OS at once


# ---- memory readings (in the measured process) -----------------------------------------------------------------


def _status_kib(pid: int | str = "self") -> dict[str, int]:
    """`VmRSS` and `VmHWM` of a process in KiB (empty once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return {key: int(value) for key, value in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.MULTILINE)}


class PeakMeter:
    """Resident-memory peak of this process over a region, above its resident size at the start of the region."""

    def __enter__(self) -> PeakMeter:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
        self.base_kib = _status_kib()["VmRSS"]
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
        self.peak_mib = (_status_kib()["VmHWM"] - self.base_kib) / 1024
        self.base_mib = self.base_kib / 1024


# ---- command line -----------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384],
                        help="prompt lengths n (tokens before the response); sequence lengths with --layout pretrain")
    parser.add_argument("--layout", choices=["sft", "pretrain"], default="sft",
                        help="sft: prompt n + response; pretrain: a document of n tokens, every block decoded and "
                             "scored (the canvas spans the sequence; --response and --score are ignored)")
    parser.add_argument("--response", type=int, default=256, help="response tokens (a multiple of --block)")
    parser.add_argument("--block", type=int, default=64, help="block size = canvas length")
    parser.add_argument("--score", choices=["one_block", "all_blocks"], default="one_block",
                        help="decode and score one block per example (SFT recipe) or every block")
    parser.add_argument("--chunk", type=int, default=256, help="encoder queries per block-sparse chunk")
    parser.add_argument("--layers", type=int, default=2, help="layers: sliding, full, sliding, full, ... (last full)")
    parser.add_argument("--window", type=int, default=512, help="sliding window")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2, help="query heads (one KV head on every layer)")
    parser.add_argument("--head-dim", type=int, default=64, help="sliding layers' head dim (full layers: twice it)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="which impls to measure")
    parser.add_argument("--mem-limit-gib", type=float, default=None,
                        help="stop a child whose RSS exceeds this (default: 85%% of MemAvailable at start)")
    parser.add_argument("--seed", type=int, default=0)
    # Internal: run one measurement and write its result to this JSON file.
    parser.add_argument("--child", choices=[*IMPLS, "calibrate"], help=argparse.SUPPRESS)
    parser.add_argument("--child-length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.response % args.block:
        parser.error(f"--response ({args.response}) must be a multiple of --block ({args.block})")
    return args


# ---- child: one (impl, n) measurement ---------------------------------------------------------------------------


def build_model(args: argparse.Namespace, impl: str, cp: int = 1):
    """The small random model (module docstring); the same weights for every impl at the same seed, and on every
    rank of a context-parallel group of `cp` ranks (tools/bench_context_parallel.py)."""
    import torch

    from megatron_bdgemma.config import FULL, SLIDING, tiny
    from megatron_bdgemma.model import BDGemmaModel
    from megatron_bdgemma.runtime import init_distributed

    init_distributed(seed=args.seed, cp=cp)  # also reseeds torch's CPU generator, which initialises the weights
    layer_types = [SLIDING if i % 2 == 0 else FULL for i in range(args.layers)]
    layer_types[-1] = FULL
    config = tiny(
        num_layers=args.layers, layer_types=layer_types, hidden_size=args.hidden, num_attention_heads=args.heads,
        kv_channels=args.head_dim, num_query_groups=1, global_kv_channels=2 * args.head_dim,
        num_global_query_groups=1, ffn_hidden_size=2 * args.hidden, num_moe_experts=args.experts,
        moe_ffn_hidden_size=args.hidden // 2, vocab_size=args.vocab, sliding_window=args.window,
        canvas_length=args.block, max_position_embeddings=max(args.lengths) + args.response,
        attention_impl=impl, attention_chunk_size=args.chunk,
    )
    model = BDGemmaModel(config).train()
    with torch.no_grad():
        # Megatron's init (std 0.02) gives near-uniform logits, on which every loss is about log V and the loss
        # comparison could not tell the impls apart; spread the tied embedding as a trained model's is.
        generator = torch.Generator().manual_seed(args.seed)
        weight = model.embedding.word_embeddings.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
    return model


def example(args: argparse.Namespace, n: int):
    """One example of random tokens and its noised canvas.

    sft: an `n`-token prompt, then a `--response`-token answer (a whole number of blocks), scored as `--score` says;
    pretrain: an `n`-token document, every block scored.
    """
    import torch

    from megatron_bdgemma.diffusion import build_pretrain_batch, build_sft_batch, noise_batch

    length = n + args.response if args.layout == "sft" else n
    generator = torch.Generator().manual_seed(args.seed + n)
    ids = torch.randint(2, args.vocab, (1, length), generator=generator)
    if args.layout == "sft":
        loss_mask = torch.zeros(1, length, dtype=torch.bool)
        loss_mask[0, n:] = True
        valid = torch.ones(1, length, dtype=torch.bool)
        batch = build_sft_batch(ids, loss_mask, valid, block_size=args.block, eos_id=1, pad_id=0)
        score = args.score
    else:
        batch, score = build_pretrain_batch(ids, block_size=args.block, pad_id=0), "all_blocks"
    noised = noise_batch(batch, sample_indices=[0], step=0, seed=args.seed, vocab_size=args.vocab, score=score)
    return batch, noised


def training_step(model, batch, noised) -> tuple[float, float]:
    """What the trainer runs on one micro-batch: `training_forward`, backward of diffusion + AR loss sums."""
    out = model.training_forward(batch, noised)
    (out.diffusion_loss_sum + out.ar_loss_sum).backward()
    return out.diffusion_loss_sum.item(), out.ar_loss_sum.item()


def canvas_step(model, batch, noised, encoder_kv) -> float:
    """The canvas attention alone: one decode over given encoder K/V under the training masks, backward of its loss."""
    from megatron_bdgemma.diffusion import diffusion_loss

    logits = model.decode(noised.canvas_ids, encoder_kv, canvas_position_ids=noised.position_ids,
                          attention_mask=model.training_masks(batch, noised))
    loss, _ = diffusion_loss(logits, noised.targets, noised.scored, noised.weights)
    loss.backward()
    return loss.item()


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.child == "calibrate":  # what the method reads for a known 1 GiB allocation
        with PeakMeter() as meter:
            torch.ones(MIB // 4 * 1024, dtype=torch.float32).sum()  # allocated, written, read, freed
        return dict(peak_mib=meter.peak_mib)

    model = build_model(args, args.child)
    params = [p for p in model.parameters() if p.requires_grad]
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    training_step(model, *example(args, 2 * args.block))  # warm-up: lazy init of torch/oneDNN/megatron state
    model.zero_grad(set_to_none=True)
    batch, noised = example(args, args.child_length)

    print(f"BASELINE {_status_kib()['VmRSS'] / 1024:.1f}", flush=True)  # for the parent's over-limit report
    with PeakMeter() as step:
        diffusion, ar = training_step(model, batch, noised)
    grads = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in params])
    torch.save(grads, args.child_out.with_suffix(".grads.pt"))
    del grads
    model.zero_grad(set_to_none=True)

    with torch.no_grad():
        encoded = model.encode(batch.input_ids, padding_mask=~batch.encoder_valid)
    kv = [(k.requires_grad_(), v.requires_grad_()) for k, v in encoded.kv]
    del encoded
    print(f"BASELINE {_status_kib()['VmRSS'] / 1024:.1f}", flush=True)
    with PeakMeter() as canvas:
        canvas_loss = canvas_step(model, batch, noised, kv)
    return dict(
        step_peak_mib=step.peak_mib, step_s=step.seconds, base_mib=step.base_mib, diffusion=diffusion, ar=ar,
        canvas_peak_mib=canvas.peak_mib, canvas_s=canvas.seconds, canvas_loss=canvas_loss, checksum=checksum,
        seq_len=batch.seq_len, canvas_len=noised.canvas_ids.shape[1], threads=torch.get_num_threads(),
    )


# ---- parent: one subprocess per measurement --------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    impl: str
    length: int
    result: dict[str, Any] | None  # None when the child did not finish
    failure: str = ""
    grads_path: Path | None = None


def measure(args: argparse.Namespace, impl: str, length: int, workdir: Path, limit_kib: int) -> Outcome:
    """Run one child, watching its RSS; stop it above `limit_kib`."""
    out = workdir / f"{impl}-{length}.json"
    command = [sys.executable, __file__, *sys.argv[1:], "--child", impl, "--child-length", str(length),
               "--child-out", str(out)]
    stderr = (workdir / f"{impl}-{length}.log").open("w")
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                             env=os.environ | CHILD_ENV)
    watch = {"max_rss_kib": 0, "over": False}

    def watchdog() -> None:
        while child.poll() is None:
            rss = _status_kib(child.pid).get("VmRSS", 0)
            watch["max_rss_kib"] = max(watch["max_rss_kib"], rss)
            if rss > limit_kib:
                watch["over"] = True
                child.send_signal(signal.SIGKILL)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watchdog, daemon=True)
    thread.start()
    baseline_mib = 0.0
    for line in child.stdout:  # BASELINE lines while it runs
        if line.startswith("BASELINE"):
            baseline_mib = baseline_mib or float(line.split()[1])
    child.wait()
    thread.join()
    stderr.close()
    if child.returncode == 0:
        return Outcome(impl, length, json.loads(out.read_text()), grads_path=out.with_suffix(".grads.pt"))
    reached = (watch["max_rss_kib"] / 1024 - baseline_mib) if baseline_mib else float("nan")
    if watch["over"]:
        failure = f"stopped above the {limit_kib / MIB:.1f} GiB RSS limit, {reached:.0f} MiB above the step's baseline"
    elif child.returncode < 0:
        failure = (f"killed by signal {-child.returncode} (out of memory?) at RSS {watch['max_rss_kib'] / 1024:.0f} "
                   f"MiB, {reached:.0f} MiB above the step's baseline")
    else:
        tail = (workdir / f"{impl}-{length}.log").read_text().strip().splitlines()[-1:]
        failure = f"exit code {child.returncode}: {' '.join(tail)}"
    return Outcome(impl, length, None, failure)


def compare(eager: Outcome, sparse: Outcome) -> tuple[float, float]:
    """(largest relative loss difference, gradient max-abs difference / gradient max-abs)."""
    import torch

    a, b = eager.result, sparse.result
    if a["checksum"] != b["checksum"]:
        raise SystemExit(f"weights differ between impls at n={eager.length}: checksums {a['checksum']} {b['checksum']}")
    losses = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-30) for k in ("diffusion", "ar", "canvas_loss"))
    ga, gb = torch.load(eager.grads_path), torch.load(sparse.grads_path)
    return losses, float((ga - gb).abs().max() / ga.abs().max())


def per_doubling(peaks: list[tuple[int, float]]) -> str:
    """Growth factor per doubling of n between consecutive measured lengths, e.g. '1K→2K ×3.9'."""
    steps = []
    for (n1, p1), (n2, p2) in zip(peaks, peaks[1:]):
        factor = (p2 / p1) ** (1 / math.log2(n2 / n1)) if p1 > 0 and p2 > 0 else float("nan")
        steps.append(f"{_k(n1)}→{_k(n2)} ×{factor:.2f}")
    return ", ".join(steps) if steps else "(one length)"


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _mib(outcome: Outcome | None, key: str) -> str:
    if outcome is None:
        return "-"
    return f"{outcome.result[key]:.0f}" if outcome.result else "failed"


@entry_point
def main() -> None:
    args = parse_args()
    if args.child:
        result = run_child(args)
        args.child_out.write_text(json.dumps(result))
        return

    available_kib = int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    limit_kib = int(args.mem_limit_gib * MIB) if args.mem_limit_gib else int(0.85 * available_kib)
    load_before = os.getloadavg()[0]
    workdir = tempfile.TemporaryDirectory()
    work = Path(workdir.name)
    calibration = measure(args, "calibrate", 0, work, limit_kib)
    if calibration.result is None:
        raise SystemExit(f"calibration failed: {calibration.failure}")
    print(f"measurement check: a 1024 MiB tensor reads as {calibration.result['peak_mib']:.0f} MiB "
          f"(VmHWM after clear_refs, MALLOC_MMAP_THRESHOLD_={CHILD_ENV['MALLOC_MMAP_THRESHOLD_']}); "
          f"RSS limit per child {limit_kib / MIB:.1f} GiB", flush=True)

    outcomes: dict[tuple[str, int], Outcome] = {}
    total = len(args.lengths) * len(args.impls)
    for length in args.lengths:
        for impl in args.impls:
            start = time.perf_counter()
            outcome = outcomes[impl, length] = measure(args, impl, length, work, limit_kib)
            done = len(outcomes)
            if outcome.result:
                r = outcome.result
                print(f"[{done}/{total}] {impl:12s} n={length:6d}: step peak {r['step_peak_mib']:8.1f} MiB "
                      f"({r['step_s']:.1f} s), canvas peak {r['canvas_peak_mib']:7.1f} MiB ({r['canvas_s']:.2f} s); "
                      f"child {time.perf_counter() - start:.0f} s", flush=True)
            else:
                print(f"[{done}/{total}] {impl:12s} n={length:6d}: {outcome.failure}", flush=True)

    first = next(o.result for o in outcomes.values() if o.result)
    print()
    layout = (f"SFT: prompt n + response {args.response}, block {args.block}, score {args.score} (canvas "
              f"{first['canvas_len']})" if args.layout == "sft" else
              f"pretraining: document of n tokens, block {args.block}, every block decoded and scored (canvas n)")
    print(f"device cpu, fp32, {first['threads']} threads; {args.layers} layers (sliding window {args.window} / full), "
          f"hidden {args.hidden}, {args.heads} query heads over 1 KV head, head dim {args.head_dim}/"
          f"{2 * args.head_dim}, {args.experts} experts top-2, vocab {args.vocab}; batch 1, {layout}; "
          f"block-sparse chunk {args.chunk}")
    print(f"S encoder positions, R canvas positions; peak = VmHWM above VmRSS just before the call, MiB; "
          f"step = training_forward + backward, canvas = one decode over given encoder K/V + backward; "
          f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    header = (f"{'n':>6s} {'S':>6s} {'R':>6s} | {'step peak MiB':^17s} {'ratio':>6s} | {'step s':^13s} | "
              f"{'canvas peak MiB':^15s} | {'loss rel':>8s} {'grad rel':>8s}")
    print(header)
    print(f"{'':6s} {'':6s} {'':6s} | {'eager':>8s} {'sparse':>8s} {'':6s} | {'eager':>6s} {'sparse':>6s} | "
          f"{'eager':>7s} {'sparse':>7s} | {'diff':>8s} {'diff':>8s}")
    result_line = None
    for length in args.lengths:
        eager, sparse = outcomes.get(("eager", length)), outcomes.get(("block_sparse", length))
        done = next((o.result for o in (eager, sparse) if o and o.result), {"seq_len": 0, "canvas_len": 0})
        both = eager is not None and sparse is not None and eager.result and sparse.result
        ratio = f"{eager.result['step_peak_mib'] / sparse.result['step_peak_mib']:6.1f}" if both else f"{'-':>6s}"
        diffs = "{:8.1e} {:8.1e}".format(*compare(eager, sparse)) if both else f"{'-':>8s} {'-':>8s}"
        secs = [f"{o.result['step_s']:6.1f}" if o and o.result else f"{'-':>6s}" for o in (eager, sparse)]
        print(f"{length:6d} {done['seq_len']:6d} {done['canvas_len']:6d} | {_mib(eager, 'step_peak_mib'):>8s} "
              f"{_mib(sparse, 'step_peak_mib'):>8s} {ratio} | {secs[0]} {secs[1]} | "
              f"{_mib(eager, 'canvas_peak_mib'):>7s} {_mib(sparse, 'canvas_peak_mib'):>7s} | {diffs}")
        if both:
            result_line = (eager.result["step_peak_mib"] / sparse.result["step_peak_mib"], length)
    for outcome in outcomes.values():
        if not outcome.result:
            print(f"{outcome.impl} n={outcome.length}: {outcome.failure}")
    print("growth of the peak per doubling of n (linear in n: ×2, quadratic: ×4):")
    for impl in args.impls:
        for key, what in (("step_peak_mib", "step"), ("canvas_peak_mib", "canvas")):
            peaks = [(n, outcomes[impl, n].result[key]) for n in args.lengths if outcomes[impl, n].result]
            print(f"  {impl:12s} {what:6s}: {per_doubling(peaks)}")
    workdir.cleanup()
    if result_line:
        print(f"RESULT peak_mem_eager_over_sparse={result_line[0]:.2f} at_prompt_len={result_line[1]}")


if __name__ == "__main__":
    sys.exit(main())
