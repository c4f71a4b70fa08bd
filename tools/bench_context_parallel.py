"""Context parallelism on CPU: per-rank peak memory and attention CPU time of a training step, CP = 2 vs CP = 1
(issue #25, docs/design.md §14).

    python tools/bench_context_parallel.py            # S = 16384: pretraining and SFT layouts, 2 rounds (minutes)
    python tools/bench_context_parallel.py --quick    # seconds: a smoke run (tests/test_bench_context_parallel.py)

One training step of a small random `BDGemmaModel` (tools/bench_attention.py's model: fp32, 2 layers, one sliding
and one full, hidden 128, 2 query heads over 1 KV head, head dim 64 sliding / 128 full, 4 experts top-2, vocabulary
512; here with DiffusionGemma's block 256 and sliding window 1024, `attention_impl=block_sparse`, chunk 256), the
same weights on every side, on one example of `--seq` tokens in two layouts:

- **pretrain**: a document of S tokens, every block decoded and scored: canvas R = S;
- **sft**: a prompt of S − 256 tokens and one 256-token answer block, decoded and scored: canvas R = 256.

The step is what the trainer runs on a micro-batch: `BDGemmaModel.training_forward` (encode with grad, decode pass 1
without grad, self-conditioned pass 2, diffusion + AR loss sums) and backward of their sum. It runs on each side:

- **CP = 1**: one process, the whole rows;
- **CP = 2**: two gloo processes of one CP group (`init_distributed(cp=2)`), each on its load-balanced shard
  (`training_layout`: chunks r and 3 − r of the encoder and of the canvas), gathering K/V per layer.

Each side runs in fresh processes (`tests.multiproc.run_in_processes`, one thread each), which first run a step of
every layout at 2 blocks (lazy initialisation of torch, oneDNN and megatron-core), then the measured step of each
layout. The sides alternate over `--rounds` (CP = 1 first on even rounds, CP = 2 first on odd ones). Per rank:

- **peak**: the step's resident high-water mark above the resident size just before it, MiB: `VmHWM` is reset
  right before the step (`echo 5 > /proc/self/clear_refs`), then `VmHWM − VmRSS(before)` from `/proc/self/status`
  (tools/bench_attention.py's `PeakMeter`), with `MALLOC_MMAP_THRESHOLD_=65536` so freed tensors go back to the OS
  and cannot hide a later peak, and `malloc_trim(0)` right before the reset, which returns the free pages of the C
  heap (blocks under that threshold) left by earlier steps: without it a step measured after another one reused
  them unseen (at `--quick` size the second layout's peak read half of torch's count). The example's tensors are
  built before the reset; the step's parameter gradients (the same on both sides) are inside it;
- **torch peak** (first round; `--no-torch-memory` skips it): the cross-check, a second step of the same example
  under `torch.profiler` with `profile_memory=True`: the largest sum of the bytes of the CPU allocator's blocks
  allocated during that step and still live (its `[memory]` events in order), so the torch tensors alone, without
  oneDNN/MKL scratch, gloo buffers or page granularity;
- **attention CPU s**: the thread CPU time (`time.thread_time`, this single-threaded rank's main thread) inside every
  layer's core attention (`BDGemmaAttention.core_attention`, the block-sparse kernel: query chunks over their key
  spans, fwd and bwd including its recomputation in backward) in the encoder, pass 1 and pass 2, forward and
  backward. Each core attention is wrapped in an autograd function that runs it on a local graph and, in
  backward, calls `torch.autograd.grad` on that graph, so its backward is timed as one piece; the K/V gathers
  and their reduce-scatters sit outside it (counted below). Beside it, **attention reads**: the work the kernel
  is given, counted (not timed) from the rank's masks as it schedules it: the (query, key) pairs of every query
  chunk's key spans, × head dim, × 3 for the encoder and pass 2 (forward and backward) and × 1 for pass 1;
- **step CPU s**: the process CPU time of the whole step (all threads: gloo's included), wall time beside;
- **CP bytes**: what the step's collectives moved per rank: per all-gather the `(N − 1)/N` of its output received
  from the other ranks, per reduce-scatter the `(N − 1)/N` of its input sent to them, per all-reduce the tensor's
  bytes. It must equal the design's count (§14): per layer `(N − 1)/N · 2·g·d · 4 B · (2S + 3R)` (encoder K/V
  gathered in forward and reduce-scattered in backward, the canvas's in pass 1's forward and in pass 2's forward
  and backward), or the run exits non-zero.

A CP = 2 figure is the worse of the two ranks (the rank holding chunk 0 reads fewer keys under the window). Ratios
are CP = 2 over CP = 1 per round, their median over rounds with the range. The loss sums (summed over the CP ranks)
must agree with CP = 1's to `--loss-rtol`, or the run exits non-zero. The last line is machine-readable:

    RESULT pretrain_peak_ratio=<..> pretrain_attention_cpu_ratio=<..> pretrain_step_cpu_ratio=<..>
           pretrain_torch_peak_ratio=<..> sft_peak_ratio=<..> ... seq=<S>

(one line; each layout measured gives its four ratios, the torch one only when it was measured).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import functools
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `tests.multiproc`, as tools/bench_pipeline.py

LAYOUTS = ("pretrain", "sft")
SIDES = (1, 2)
TARGET = 0.6  # issue #25: CP = 2's per-rank peak memory and attention CPU time ≤ 0.6 × CP = 1's


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=16384, help="sequence length S (encoder positions of the row)")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds, the sides alternating")
    parser.add_argument("--block", type=int, default=256, help="canvas block (DiffusionGemma's 256)")
    parser.add_argument("--window", type=int, default=1024, help="sliding window (DiffusionGemma's 1024)")
    parser.add_argument("--chunk", type=int, default=256, help="encoder queries per block-sparse chunk")
    parser.add_argument("--layers", type=int, default=2, help="layers: sliding, full, sliding, ... (last full)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2, help="query heads (one KV head on every layer)")
    parser.add_argument("--head-dim", type=int, default=64, help="sliding layers' head dim (full layers: twice it)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-torch-memory", action="store_true",
                        help="skip the torch.profiler cross-check of the peak (a second, profiled step per layout)")
    parser.add_argument("--loss-rtol", type=float, default=1e-4, help="allowed relative loss-sum difference")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: S 1024, block 64, window 128, chunk 64, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.seq, args.block, args.window, args.chunk, args.rounds = 1024, 64, 128, 64, 1
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.seq % (2 * max(SIDES) * args.block) or args.block % (2 * max(SIDES)):
        parser.error(f"--seq must be a multiple of {2 * max(SIDES)} · --block and --block of {2 * max(SIDES)} (each "
                     f"CP rank holds two equal chunks of the sequence and of a block), got {args.seq} and {args.block}")
    # tools/bench_attention.py's model and example read these.
    args.response, args.score, args.lengths = args.block, "one_block", [args.seq]
    return args


if __name__ == "__main__":
    parse_args()  # `--help` and usage errors answer here, before the imports below load torch (seconds)

import torch  # noqa: E402

from bench_attention import PeakMeter, build_model, example, training_step  # noqa: E402
from megatron_bdgemma.runtime.cli import entry_point  # noqa: E402

MIB = 2**20


# ---- inside a rank ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AttentionClock:
    """Thread CPU seconds spent in the core attention, forward and backward, since the last `reset`."""

    forward: float = 0.0
    backward: float = 0.0

    def reset(self) -> None:
        self.forward = self.backward = 0.0


class _TimedAttention(torch.autograd.Function):
    """Runs the core attention on a local graph, so that its whole backward is one `torch.autograd.grad` call and
    can be timed as one piece (the same saved tensors, the same kernels)."""

    @staticmethod
    def forward(ctx, clock: AttentionClock, core: torch.nn.Module, mask: Any, *qkv: torch.Tensor) -> torch.Tensor:
        start = time.thread_time()
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(t.requires_grad) for t in qkv]
            out = core(*inputs, mask)
        clock.forward += time.thread_time() - start
        ctx.clock, ctx.out, ctx.inputs = clock, out, inputs
        return out.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        start = time.thread_time()
        found = iter(torch.autograd.grad(ctx.out, [t for t in ctx.inputs if t.requires_grad], grad))
        grads = [next(found) if t.requires_grad else None for t in ctx.inputs]
        ctx.clock.backward += time.thread_time() - start
        del ctx.out, ctx.inputs
        return None, None, None, *grads


class TimedCoreAttention(torch.nn.Module):
    """A layer's core attention with its CPU time counted on `clock` (replaces `BDGemmaAttention.core_attention`)."""

    def __init__(self, core: torch.nn.Module, clock: AttentionClock) -> None:
        super().__init__()
        self.core, self.clock, self.softmax_scale = core, clock, core.softmax_scale

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any) -> torch.Tensor:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            return _TimedAttention.apply(self.clock, self.core, mask, query, key, value)
        start = time.thread_time()  # pass 1: no graph
        out = self.core(query, key, value, mask)
        self.clock.forward += time.thread_time() - start
        return out


def time_core_attention(model: torch.nn.Module) -> AttentionClock:
    """Wrap every layer's core attention; → the clock they count on."""
    from megatron_bdgemma.layers.attention import BDGemmaAttention

    clock = AttentionClock()
    for module in [m for m in model.modules() if isinstance(m, BDGemmaAttention)]:
        module.core_attention = TimedCoreAttention(module.core_attention, clock)
    return clock


class CollectiveBytes:
    """Bytes each collective of `torch.distributed` moved for this rank while `counting` (groups of > 1 rank):
    all-gather: the part of the output received from the others; reduce-scatter: the part of the input sent to
    them; all-reduce: the tensor. Any other collective is counted by its first tensor, so it shows up."""

    MOVED: dict[str, Callable[..., int]] = {
        "all_gather_into_tensor": lambda output, input, *a, **k: output.nbytes - input.nbytes,
        "reduce_scatter_tensor": lambda output, input, *a, **k: input.nbytes - output.nbytes,
        "all_reduce": lambda tensor, *a, **k: tensor.nbytes,
    }
    OTHERS = ("all_gather", "reduce_scatter", "broadcast", "all_to_all_single", "all_to_all", "send", "recv",
              "isend", "irecv", "gather", "scatter", "reduce")

    def __init__(self) -> None:
        self.counting, self.bytes, self.calls = False, {}, {}
        for name in (*self.MOVED, *self.OTHERS):
            setattr(torch.distributed, name, self._counted(name, getattr(torch.distributed, name)))

    def _counted(self, name: str, collective: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            group = kwargs.get("group")
            if self.counting and torch.distributed.get_world_size(group) > 1:
                moved = self.MOVED.get(name, lambda first, *a, **k: getattr(first, "nbytes", 0))
                self.bytes[name] = self.bytes.get(name, 0) + moved(*args, **kwargs)
                self.calls[name] = self.calls.get(name, 0) + 1
            return collective(*args, **kwargs)

        return counted


def expected_cp_bytes(model: torch.nn.Module, seq: int, canvas: int, cp: int) -> int:
    """docs/design.md §14: per layer and rank, `(N − 1)/N · 2·g·d` elements of K/V per position, for the encoder's S
    twice (gather, reduce-scatter) and the canvas's R three times (pass 1 gather; pass 2 gather, reduce-scatter)."""
    from megatron_bdgemma.config import FULL

    config = model.config
    per_position = sum(
        2 * (config.num_global_query_groups if t == FULL else config.num_query_groups) * config.head_dim_of(t)
        for t in config.layer_types
    )
    return (cp - 1) * per_position * 4 * (2 * seq + 3 * canvas) // cp


def attention_reads(model: torch.nn.Module, batch, noised) -> int:
    """The core attention's work on this rank as the block-sparse kernel schedules it: the (query, key) pairs it
    reads, summed over every layer's query chunks (`query_chunks`, `key_spans` of this rank's masks), weighted by the
    head dim and by the passes: encoder and pass 2 forward and backward (1 + 2), pass 1 forward (1)."""
    inputs = model.training_layout(batch, noised)
    chunk, total = model.config.attention_chunk_size, 0
    for layer_type in model.config.layer_types:
        for mask, passes in ((inputs.encoder_mask[layer_type], 3), (inputs.canvas_mask[layer_type], 1 + 3)):
            pairs = sum((end - start) * sum(b - a for a, b in mask.key_spans(start, end))
                        for start, end in mask.query_chunks(mask.query_chunk or chunk))
            total += passes * model.config.head_dim_of(layer_type) * pairs
    return total


def torch_live_peak(step: Callable[[], Any]) -> tuple[Any, float]:
    """Run `step` under `torch.profiler` with `profile_memory`: → (its result, the largest sum of the CPU
    allocator's blocks allocated during it and live at once, MiB)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:  # + bytes at an allocation, − at a free (frees of blocks from before are reported as 0)
        live += event.nbytes()
        peak = max(peak, live)
    return result, peak / MIB


def release_free_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc's `malloc_trim`): blocks below the mmap threshold freed by
    an earlier step stay resident otherwise, and a later step reusing them would not raise `VmHWM` for them."""
    gc.collect()
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def layout_args(args: argparse.Namespace, layout: str) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "layout": layout})


def layout_example(args: argparse.Namespace, layout: str, seq: int):
    """(batch, noised) of one row of `seq` tokens: a document (pretrain) or a prompt and one answer block (sft)."""
    return example(layout_args(args, layout), seq if layout == "pretrain" else seq - args.block)


def rank_run(rank: int, args: argparse.Namespace, cp: int, torch_memory: bool) -> dict[str, dict[str, Any]]:
    """One rank of one side: warm-up, then per layout the measured step (and the profiled one) → its figures."""
    from megatron.core import parallel_state

    model = build_model(args, "block_sparse", cp=cp)
    clock, collectives = time_core_attention(model), CollectiveBytes()
    group = parallel_state.get_context_parallel_group()
    assert group.size() == cp, (group.size(), cp)
    for layout in args.layouts:  # lazy initialisation (torch, oneDNN, megatron-core), at 2 blocks
        training_step(model, *layout_example(args, layout, 2 * max(SIDES) * args.block))
        model.zero_grad(set_to_none=True)
    results = {}
    for layout in args.layouts:
        batch, noised = layout_example(args, layout, args.seq)
        release_free_memory()
        clock.reset()
        collectives.bytes, collectives.calls, collectives.counting = {}, {}, True
        cpu = time.process_time()
        with PeakMeter() as meter:
            losses = training_step(model, batch, noised)
        cpu = time.process_time() - cpu
        collectives.counting = False
        model.zero_grad(set_to_none=True)
        total = torch.tensor(losses, dtype=torch.float64)
        torch.distributed.all_reduce(total, group=group)  # the step's sums over the CP ranks
        result = dict(
            peak_mib=meter.peak_mib, base_mib=meter.base_mib, step_cpu=cpu, step_wall=meter.seconds,
            attention_forward=clock.forward, attention_backward=clock.backward, losses=total.tolist(),
            cp_bytes=sum(collectives.bytes.values()), cp_calls=dict(collectives.calls),
            cp_bytes_by_op=dict(collectives.bytes),
            attention_reads=attention_reads(model, batch, noised) / 1e9,
            expected_cp_bytes=expected_cp_bytes(model, batch.seq_len, noised.canvas_ids.shape[1], cp),
            seq=batch.seq_len, canvas=noised.canvas_ids.shape[1], threads=torch.get_num_threads(),
        )
        if torch_memory:
            gc.collect()
            _, result["torch_peak_mib"] = torch_live_peak(functools.partial(training_step, model, batch, noised))
            model.zero_grad(set_to_none=True)
        del batch, noised
        results[layout] = result
    return results


# ---- the parent: sides alternating over rounds ------------------------------------------------------------------


def ratios(per_round: list[dict[int, float]]) -> tuple[float, float, float]:
    """CP = 2 over CP = 1 in each round → (median, min, max)."""
    values = [r[2] / r[1] if r[1] > 0 else float("nan") for r in per_round]  # a tiny step may not grow the RSS
    return statistics.median(values), min(values), max(values)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Before the ranks start (they inherit it): large frees go straight back to the OS (see the module docstring).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    from tests.multiproc import run_in_processes  # the repo's gloo launcher (spawn, env vars, CPU patches)

    load_before = os.getloadavg()
    runs: list[dict[int, list[dict[str, dict[str, Any]]]]] = []  # [round][cp] → per rank: layout → figures
    for round_index in range(args.rounds):
        sides = SIDES if round_index % 2 == 0 else tuple(reversed(SIDES))
        runs.append({cp: run_in_processes(rank_run, cp, args, cp, round_index == 0 and not args.no_torch_memory,
                                          timeout_s=3600) for cp in sides})
        print(f"[round {round_index + 1}/{args.rounds}] done, 1-min load average {os.getloadavg()[0]:.1f}", flush=True)

    first = runs[0][1][0][args.layouts[0]]
    print(f"device cpu, fp32, {first['threads']} thread(s) per rank; model: {args.layers} layers (sliding window "
          f"{args.window} / full), hidden {args.hidden}, {args.heads} query heads over 1 KV head, head dim "
          f"{args.head_dim}/{2 * args.head_dim}, {args.experts} experts top-2, vocab {args.vocab}; attention "
          f"block_sparse (chunk {args.chunk}), block {args.block}; batch 1, S {args.seq}")
    print(f"{args.rounds} round(s), the sides alternating, each side in fresh processes after a warm-up step; "
          f"1/5/15-min load average {'/'.join(f'{x:.1f}' for x in load_before)} before, "
          f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} after")
    print("peak = VmHWM above VmRSS just before the step (clear_refs, MALLOC_MMAP_THRESHOLD_=65536, malloc_trim); "
          "torch peak = live bytes of the CPU allocator's blocks allocated during the step (torch.profiler, first "
          "round); attention = thread CPU s in the core attention (fwd + bwd, every layer and pass); reads = its "
          "(query, key) pairs × head dim × passes, from the masks; step = process CPU s; CP = 2 figures: the worse "
          "rank; ratio = CP 2 / CP 1, median over rounds (range)")
    failures, result = [], []
    for layout in args.layouts:
        def figure(run: dict[int, list[dict[str, dict[str, Any]]]], cp: int, key: str) -> float:
            return max(rank[layout][key] for rank in run[cp])

        def attention(rank: dict[str, dict[str, Any]]) -> float:
            return rank[layout]["attention_forward"] + rank[layout]["attention_backward"]

        for run in runs:
            for rank in (r for cp in SIDES for r in run[cp]):
                rank[layout]["attention"] = attention(rank)
        one = runs[0][1][0][layout]
        decoded = "every block decoded" if layout == "pretrain" else "one answer block decoded"
        print(f"\n{layout}: S {one['seq']}, R {one['canvas']} ({decoded})")
        print(f"{'':26s}{'CP=1':>10s}{'CP=2 r0':>10s}{'CP=2 r1':>10s}   {'ratio':>6s} {'range':>13s}  target")
        rows = [("peak MiB", "peak_mib", "{:10.1f}", TARGET), ("torch peak MiB", "torch_peak_mib", "{:10.1f}", None),
                ("attention CPU s", "attention", "{:10.3f}", TARGET),
                ("  forward", "attention_forward", "{:10.3f}", None),
                ("  backward", "attention_backward", "{:10.3f}", None),
                ("attention reads 1e9", "attention_reads", "{:10.3f}", None),
                ("step CPU s", "step_cpu", "{:10.3f}", None), ("step wall s", "step_wall", "{:10.3f}", None)]
        for name, key, fmt, target in rows:
            measured = [run for run in runs if key in run[1][0][layout]]
            if not measured:
                continue
            per_round = [{cp: figure(run, cp, key) for cp in SIDES} for run in measured]
            median, low, high = ratios(per_round)
            cells = [statistics.median(r[1][0][layout][key] for r in measured),
                     *(statistics.median(r[2][i][layout][key] for r in measured) for i in range(2))]
            verdict = "" if target is None else f"<= {target}: {'met' if median <= target else 'MISSED'}"
            row = "".join(fmt.format(c) for c in cells)
            print(f"{name:26s}{row}   {median:6.3f} {low:6.3f}..{high:6.3f}  {verdict}")
            short = {"peak_mib": "peak", "torch_peak_mib": "torch_peak", "attention": "attention_cpu",
                     "step_cpu": "step_cpu"}.get(key)
            if short:
                result.append(f"{layout}_{short}_ratio={median:.3f}")
        for i, rank in enumerate(runs[0][2]):
            figures = rank[layout]
            ops = ", ".join(f"{op} {figures['cp_calls'][op]}× {figures['cp_bytes_by_op'][op] / MIB:.2f} MiB"
                            for op in sorted(figures["cp_calls"]))
            print(f"CP=2 rank {i} collectives: {figures['cp_bytes'] / MIB:.2f} MiB moved ({ops}); design §14: "
                  f"{figures['expected_cp_bytes'] / MIB:.2f} MiB")
            if any(r[2][i][layout]["cp_bytes"] != figures["expected_cp_bytes"] for r in runs):
                failures.append(f"{layout}: CP=2 rank {i} moved {figures['cp_bytes']} bytes, the design's count is "
                                f"{figures['expected_cp_bytes']}")
        worst = 0.0
        for run in runs:
            a, b = run[1][0][layout]["losses"], run[2][0][layout]["losses"]
            worst = max(worst, *(abs(x - y) / max(abs(x), 1e-30) for x, y in zip(a, b, strict=True)))
        print(f"loss sums (diffusion, AR) {one['losses'][0]:.4f}, {one['losses'][1]:.4f}; CP=2 (summed over the ranks) "
              f"agrees to {worst:.1e} relative (allowed {args.loss_rtol:.0e})")
        if worst > args.loss_rtol:
            failures.append(f"{layout}: CP=2 loss sums differ from CP=1's by {worst:.2e} relative (> --loss-rtol "
                            f"{args.loss_rtol})")
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    print(f"RESULT {' '.join(result)} seq={args.seq}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
