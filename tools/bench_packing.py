"""Packed vs unpacked SFT training steps on a synthetic chat set: valid tokens per CPU-second (issue #24).

    python tools/bench_packing.py            # default: 64 chats, seq_length 4096, about 5 minutes single-threaded
    python tools/bench_packing.py --score all_blocks   # every response block decoded: the canvas is padded too
    python tools/bench_packing.py --layout-only --records 2048 --dp 64    # padding removed and DP balance, seconds
    python tools/bench_packing.py --quick    # seconds: a smoke run (tests/test_bench_packing.py)

The chats are token ids drawn directly (no tokenizer): total lengths log-normal with median `--median` (300) and
σ `--sigma` (1.0), capped at `--seq-length` (4096); the prompt takes 20 to 80 % of a chat, the answer the rest, laid
out with the EOS block fill by the trainer's own collate (`sft_collate`, capped at `data.seq_length`). The
micro-batches are the trainer's own (`StepData.microbatches` of step 0, docs/design.md §13), noised as the trainer
noises them (each record keyed by its stream position; packed rows: the records alone, then `pack_canvas`), and each
is run through `BDGemmaModel.training_forward` (encode, pass 1 without grad, self-conditioned pass 2, diffusion + AR
loss sums) and backward, as tools/bench_train.py times a step. One side's step is all its micro-batches, so every
side trains the same records with the same noise; their loss sums must agree (`--loss-rtol`), or the run exits
non-zero.

Sides, all on one small random model with the same attention (`--attention`, default block-sparse, whose key spans
skip the chunks that lie across records, docs/design.md §13; eager would build dense `S × S` masks):

- **packed**: `data.packing=true`, first-fit decreasing into rows of `seq_length`, `--packed-rows` rows per
  micro-batch (1 by default: a row already holds about as many tokens as 4 padded chats);
- **micro-batch 4**: today's batching, 4 chats per micro-batch, each padded to the longest of its micro-batch;
- **fixed shape**: 4 chats per micro-batch, each padded to `seq_length` (what pipeline parallelism requires);
- **control**, at equal valid tokens with no padding on either side: `--records / 4` chats of one length
  (`seq_length / 4`, answers of whole blocks), packed four to a row against unpacked at micro-batch 4 (four full
  rows of that length). Packing may not make such a step cost more: its ratio should be about 1.

`--breakdown` also times, in the same rounds, the packed and micro-batch-4 sides' encoder alone (encode, AR loss,
backward: the step without pass 1, pass 2 and the diffusion loss) and prints the step split into encoder and canvas
(step minus encoder): packing shrinks the encoder's positions; under the SFT recipe's `--score one_block` the canvas is
one block per record on every side, so packing has no padding to remove there. `--score all_blocks` decodes every
response block, and the unpacked sides' canvases are padded to their longest response.

Timing conventions are tools/bench_train.py's: every side single-threaded (`--threads`), `--warmup` untimed runs of
each side's first micro-batch, then `--repeats` rounds each timing every side once, the order reversed every other
round; a side is timed by the **process CPU time** its step used (waiting for a core does not count), wall time
printed beside it. A ratio is the median over rounds of the two sides' times in that round (both taken in the same
round, so both met the same contention), printed with its range. Valid tokens are the records' laid-out tokens
(prompt, response, EOS fill); packing efficiency is valid tokens over encoder positions computed (the trainer's
`tokens / row_tokens`). The last line is machine-readable:

    RESULT packed_over_microbatch4=<packed tokens per CPU-s / micro-batch 4's>
           packed_over_fixed_shape=<packed / fixed shape> control_packed_over_unpacked=<control: packed step time /
           unpacked step time> efficiency_packed=<..> efficiency_microbatch4=<..> efficiency_fixed_shape=<..>
           valid_tokens=<..> records=<..> seq_length=<..> positions_ratio_encoder=<..> positions_ratio_canvas=<..>

(one line; the first two are speed-ups, above 1 = packing trains more tokens per CPU-second; the control is a cost
ratio, above 1 = the packed step costs more). The positions ratios are the padding packing removes: micro-batch 4's
encoder positions over the packed side's (1 / `efficiency_microbatch4` where packed rows have no padding, as with one
row per micro-batch), and its canvas positions over the packed side's (1 under `one_block`: one block per chat on
every side). The step's speed-up is the encoder's and the canvas's averaged with their costs as weights; at one cost
per position (the control) each would be its positions ratio, and padded rows' attention, quadratic in their length,
makes a padded position dearer (the encoder's measured ratio, `--breakdown`, passes its positions ratio). Then
`dp_balance_stride=<..> dp_balance_dealt=<..>`: over `--dp` data-parallel ranks, the most loaded rank's laid-out
tokens over the mean when the step's chats go to the ranks by stride (as unpacked micro-batches take them) and dealt
by size (`training.data.deal_by_size`, what `data.packing` does for SFT). A step waits for its most loaded rank, so
this is the step time's excess over a perfect balance (tokens as the proxy for work). `--layout-only` prints the
encoder's positions ratio and the DP balance alone (no model, no timing).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
from collections.abc import Sequence
from functools import partial


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=64, help="chats in the step (train.global_batch_size)")
    parser.add_argument("--seq-length", type=int, default=4096, help="data.seq_length: row capacity, longest chat")
    parser.add_argument("--median", type=float, default=300.0, help="median chat length (tokens)")
    parser.add_argument("--sigma", type=float, default=1.0, help="σ of the log-normal chat length")
    parser.add_argument("--packed-rows", type=int, default=1, help="packed rows per micro-batch")
    parser.add_argument("--attention", choices=["block_sparse", "eager"], default="block_sparse")
    parser.add_argument("--block", type=int, default=256, help="canvas block length (DiffusionGemma's 256)")
    parser.add_argument("--window", type=int, default=1024, help="sliding window (DiffusionGemma's 1024)")
    parser.add_argument("--score", choices=["one_block", "all_blocks"], default="one_block",
                        help="objective.score: one_block (the SFT recipe's default: one block decoded per chat) or "
                        "all_blocks (every response block decoded, so the canvas is padded like the encoder)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each side's first micro-batch")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (each runs every side's whole step)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: timing robust to load)")
    parser.add_argument("--loss-rtol", type=float, default=1e-4, help="allowed relative loss-sum difference")
    parser.add_argument("--dp", type=int, default=8, help="data-parallel ranks for the balance line: the step's chats "
                        "dealt by stride (unpacked) or by size (packed SFT), the most loaded rank's tokens over the mean")
    parser.add_argument("--layout-only", action="store_true", help="print the encoder's positions ratio (the padding "
                        "packing removes) and the DP balance only (no model, no timing: seconds even at --records "
                        "2048 --dp 64)")
    parser.add_argument("--breakdown", action="store_true", help="also time the packed and micro-batch-4 sides' "
                        "encoder alone (encode + AR loss + backward), to split each step into encoder and canvas")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run: 12 chats, seq_length 256, "
                        "block 16, window 64, no warm-up, 1 round, 4 ranks for the balance line")
    args = parser.parse_args(argv)
    if args.quick:
        args.records, args.seq_length, args.median, args.block, args.window = 12, 256, 40.0, 16, 64
        args.warmup, args.repeats, args.dp = 0, 1, 4
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    if args.records < 4 or args.records % 4:
        parser.error(f"--records must be a positive multiple of 4 (micro-batches of 4), got {args.records}")
    if args.dp < 1 or args.records % args.dp:
        parser.error(f"--dp must divide --records (a step's chats over the ranks), got {args.dp} and {args.records}")
    if args.seq_length % (4 * args.block):
        parser.error(f"--seq-length must be a multiple of 4 · --block (the control packs 4 chats of seq_length / 4 "
                     f"with whole answer blocks), got {args.seq_length} and {args.block}")
    return args


if __name__ == "__main__":
    parse_args()  # `--help` and usage errors answer here, before the imports below load torch (seconds)

import torch  # noqa: E402

from bench_train import Measurement, measure, ratio_over_rounds, round_order, set_timing_threads  # noqa: E402
from megatron_bdgemma.runtime.cli import entry_point  # noqa: E402

EOS, PAD = 1, 0
VOCAB = 2048


@dataclasses.dataclass
class Side:
    """One way of batching the step's records: its micro-batches (built once), timed per round."""

    name: str
    microbatches: list  # [(DiffusionBatch | PackedBatch, NoisedCanvas | PackedCanvas)]
    encoder_only: bool = False  # time the encoder alone: encode + AR loss + backward (`--breakdown`)
    times: list[Measurement] = dataclasses.field(default_factory=list)
    losses: tuple[float, float] = (math.nan, math.nan)

    @property
    def valid_tokens(self) -> int:
        return sum(int(batch.encoder_valid.sum()) for batch, _ in self.microbatches)

    @property
    def row_tokens(self) -> int:
        """Encoder positions computed (the trainer's `row_tokens`)."""
        return sum(batch.input_ids.numel() for batch, _ in self.microbatches)

    @property
    def canvas_tokens(self) -> int:
        """Canvas positions decoded (each in pass 1 and pass 2): one block per record with a response either way
        (`--score one_block`), or every response block, padded to the micro-batch's longest (`all_blocks`)."""
        return 0 if self.encoder_only else sum(getattr(noised, "noised", noised).canvas_ids.numel() for _, noised in self.microbatches)


def chats(count: int, seq_length: int, median: float, sigma: float, vocab: int, seed: int,
          length: int | None = None) -> list[dict]:
    """Synthetic chat records as the SFT dataset yields them (`input_ids`, `loss_mask`): log-normal total lengths
    (or all `length`, then with answers of whole blocks: no EOS fill), prompts 20-80 % of a chat."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for index in range(count):
        if length is None:
            total = int(torch.empty(()).log_normal_(math.log(median), sigma, generator=generator).round())
            total = min(max(total, 2), seq_length)
            prompt = max(1, round(total * float(torch.empty(()).uniform_(0.2, 0.8, generator=generator))))
        else:
            total, prompt = length, length // 4
        ids = torch.randint(2, vocab, (total,), generator=generator)
        loss_mask = torch.arange(total) >= prompt
        out.append(dict(input_ids=ids, loss_mask=loss_mask, sample_index=index))
    return out


def build_side(name: str, records: list[dict], *, micro_batch: int, packing: bool, seq_multiple: int, seq_length: int,
               block: int, vocab: int, seed: int, score: str) -> Side:
    """The trainer's micro-batches of step 0 over `records` (`StepData.microbatches`), noised as `_microbatches`
    noises them (SFT: `score` blocks per record, self-conditioning coin p = 0.5)."""
    from megatron_bdgemma.data.sft import sft_collate
    from megatron_bdgemma.diffusion import noise_batch
    from megatron_bdgemma.diffusion.packing import PackedBatch, pack_canvas
    from megatron_bdgemma.training.data import PackedRows, StepData, chats_as_records

    collate = partial(sft_collate, block_size=block, eos_id=EOS, pad_id=PAD, max_len=seq_length,
                      seq_multiple_of=seq_multiple)
    rows = PackedRows(seq_length, seq_multiple, PAD, partial(chats_as_records, collate)) if packing else None
    data = StepData({"train": records}, collate, len(records), micro_batch, 0, 1, rows)
    out = []
    for batch, positions in data.microbatches(0):
        packed = isinstance(batch, PackedBatch)
        noised = noise_batch(batch.records if packed else batch, sample_indices=positions, step=0, seed=seed,
                             vocab_size=vocab, score=score, self_conditioning_p=0.5)
        out.append((batch, pack_canvas(batch, noised) if packed else noised))
    return Side(name, out)


def step(model: torch.nn.Module, side: Side) -> tuple[float, float]:
    """Forward + backward of every micro-batch of `side` (gradients accumulate, as over a step) → loss sums (the
    diffusion one NaN for an encoder-only side)."""
    from megatron_bdgemma.diffusion import ar_loss

    model.zero_grad(set_to_none=True)
    diffusion = ar = 0.0
    for batch, noised in side.microbatches:
        if side.encoder_only:  # training_forward's encode and AR loss, without the canvas passes
            inputs = model.training_layout(batch, noised)
            encoded = model.encode(inputs.input_ids, position_ids=inputs.positions, attention_mask=inputs.encoder_mask)
            ar_sum, _ = ar_loss(model.logits(encoded.hidden), inputs.ar_labels, inputs.ar_loss_mask)
            ar_sum.backward()
            diffusion, ar = math.nan, ar + ar_sum.item()
            continue
        out = model.training_forward(batch, noised)
        (out.diffusion_loss_sum + out.ar_loss_sum).backward()
        diffusion, ar = diffusion + out.diffusion_loss_sum.item(), ar + out.ar_loss_sum.item()
    return diffusion, ar


def time_sides(model: torch.nn.Module, sides: list[Side], warmup: int, repeats: int, device: torch.device) -> None:
    """`warmup` untimed runs of each side's first micro-batch (first calls, allocator), then `repeats` timed
    rounds of every side's whole step, the order reversed every other round."""
    for side in sides:
        for _ in range(warmup):
            step(model, dataclasses.replace(side, microbatches=side.microbatches[:1]))
    for round_index in range(repeats):
        for side in round_order(sides, round_index):
            side.losses, elapsed = measure(partial(step, model, side), device)
            side.times.append(elapsed)


def check_losses(reference: Side, others: Sequence[Side], rtol: float) -> float:
    """The largest relative difference of any side's loss sums from `reference`'s; exits if above `rtol` (the
    sides would not be training the same thing)."""
    worst = max(abs(o.losses[i] - reference.losses[i]) / abs(reference.losses[i]) for o in others for i in (0, 1)
                if not math.isnan(reference.losses[i]))
    if not worst <= rtol:
        raise SystemExit(f"loss mismatch: a side's loss sums differ from {reference.name!r}'s by {worst:.1e} "
                         f"relative (> {rtol:.0e}); the timings would compare different computations")
    return worst


def dp_balance(laid_out: list[int], ranks: int) -> tuple[float, float]:
    """The most loaded of `ranks` data-parallel ranks over the mean, in laid-out tokens, when the step's chats go to
    the ranks by stride (one at a time, as unpacked micro-batches of one deal them) and by size (`deal_by_size`, what
    packed SFT does)."""
    from megatron_bdgemma.training.data import deal_by_size

    stride = [list(range(rank, len(laid_out), ranks)) for rank in range(ranks)]
    dealt = deal_by_size(range(len(laid_out)), laid_out, ranks)
    mean = sum(laid_out) / ranks
    return tuple(max(sum(laid_out[i] for i in share) for share in shares) / mean for shares in (stride, dealt))


def encoder_positions_ratio(laid_out: list[int], micro_batch: int = 4) -> float:
    """Encoder positions of today's batching (micro-batches of `micro_batch` chats in stream order, each padded to its
    longest) over the chats' laid-out tokens, all that packing computes (efficiency 1)."""
    padded = sum(micro_batch * max(laid_out[i:i + micro_batch]) for i in range(0, len(laid_out), micro_batch))
    return padded / sum(laid_out)


def small_model(block: int, window: int, seq_length: int, attention: str) -> torch.nn.Module:
    """A small random DiffusionGemma, CPU-sized: 2 layers (sliding, full), hidden 128, 8 experts top-2, vocab 2048."""
    from megatron_bdgemma.config import FULL, SLIDING, tiny
    from megatron_bdgemma.model import BDGemmaModel

    config = tiny(num_layers=2, layer_types=[SLIDING, FULL], hidden_size=128, num_attention_heads=4, kv_channels=32,
                  num_query_groups=2, global_kv_channels=64, num_global_query_groups=1, ffn_hidden_size=256,
                  num_moe_experts=8, moe_ffn_hidden_size=64, vocab_size=VOCAB, canvas_length=block,
                  sliding_window=window, max_position_embeddings=max(seq_length, 4096), attention_impl=attention)
    torch.manual_seed(0)
    return BDGemmaModel(config).train()


@entry_point
def main() -> None:
    args = parse_args()
    from megatron_bdgemma.data.sft import laid_out_tokens
    from megatron_bdgemma.diffusion.packing import PackedBatch
    from megatron_bdgemma.runtime.distributed import init_distributed

    S, vocab = args.seq_length, VOCAB
    records = chats(args.records, S, args.median, args.sigma, vocab, args.seed)
    laid_out = [laid_out_tokens(record, block_size=args.block, max_len=S) for record in records]
    balance = dp_balance(laid_out, args.dp)
    balance_line = (f"DP balance, {args.dp} ranks of {args.records // args.dp} chats: the most loaded rank's valid "
                    f"tokens over the mean, chats dealt by stride {balance[0]:.3f}, by size (data.packing) "
                    f"{balance[1]:.3f}")
    encoder_positions = encoder_positions_ratio(laid_out)
    if args.layout_only:
        print(f"{args.records} chats, log-normal median {args.median:g}, σ {args.sigma:g}, seed {args.seed}: "
              f"micro-batch 4 computes {encoder_positions:.3f}× the packed side's encoder positions")
        print(balance_line)
        print(f"RESULT positions_ratio_encoder={encoder_positions:.3f} dp_balance_stride={balance[0]:.3f} "
              f"dp_balance_dealt={balance[1]:.3f} records={args.records} dp={args.dp} sigma={args.sigma:g}")
        return
    init_distributed(seed=args.seed)
    device = torch.device("cpu")
    model = small_model(args.block, args.window, args.seq_length, args.attention)
    control_records = chats(max(4, args.records // 4), S, args.median, args.sigma, vocab, args.seed + 1, length=S // 4)
    common = dict(seq_length=S, block=args.block, vocab=vocab, seed=args.seed, score=args.score)
    packed = build_side("packed", records, micro_batch=args.packed_rows, packing=True, seq_multiple=1, **common)
    longest = build_side("micro-batch 4", records, micro_batch=4, packing=False, seq_multiple=1, **common)
    fixed = build_side("fixed shape", records, micro_batch=4, packing=False, seq_multiple=S, **common)
    control_packed = build_side("control, packed", control_records, micro_batch=1, packing=True,
                                seq_multiple=1, **common)
    control_unpacked = build_side("control, micro-batch 4", control_records, micro_batch=4, packing=False,
                                  seq_multiple=1, **common)
    sides = [longest, packed, fixed, control_packed, control_unpacked]  # the compared pairs side by side
    encoders = [dataclasses.replace(side, name=f"{side.name}, encoder", encoder_only=True, times=[])
                for side in (longest, packed)] if args.breakdown else []
    sides += encoders
    assert all(isinstance(b, PackedBatch) for side in (packed, control_packed) for b, _ in side.microbatches)
    assert len({side.valid_tokens for side in (packed, longest, fixed)}) == 1, "the sides train different tokens"
    assert control_packed.valid_tokens == control_unpacked.valid_tokens == control_unpacked.row_tokens

    set_timing_threads(device, args.threads)
    load_before = os.getloadavg()
    time_sides(model, sides, args.warmup, args.repeats, device)
    load_after = os.getloadavg()
    worst = max(check_losses(packed, [longest, fixed], args.loss_rtol),
                check_losses(control_unpacked, [control_packed], args.loss_rtol),
                *([check_losses(encoders[1], encoders[:1], args.loss_rtol)] if encoders else []))

    lengths = [int(b.encoder_valid[i].sum()) for b, _ in longest.microbatches for i in range(b.batch_size)]
    config = model.config
    print(f"device cpu, {torch.get_num_threads()} thread(s); model: {config.num_layers} layers, hidden "
          f"{config.hidden_size}, {config.num_moe_experts} experts top-{config.moe_router_topk}, vocab {vocab}, "
          f"block {config.canvas_length}, sliding window {config.sliding_window}, attention {args.attention} "
          f"(chunk {config.attention_chunk_size}) on every side; objective.score {args.score}")
    print(f"{args.records} chats, log-normal median {args.median:g}, σ {args.sigma:g}, capped at seq_length {S}: laid "
          f"out {min(lengths)} to {max(lengths)} tokens (median {statistics.median(lengths):g}), {packed.valid_tokens} "
          f"valid tokens; packed into {sum(b.batch_size for b, _ in packed.microbatches)} rows, "
          f"{args.packed_rows} per micro-batch; control: {len(control_records)} chats of {S // 4} tokens")
    print(f"{args.repeats} rounds after {args.warmup} warm-up, order reversed every other round; step = median "
          f"process CPU seconds over rounds (range), median wall; 1/5/15-min load average "
          f"{'/'.join(f'{x:.1f}' for x in load_before)} before, {'/'.join(f'{x:.1f}' for x in load_after)} after; "
          f"loss sums agree to {worst:.1e} relative (allowed {args.loss_rtol:.0e})")
    print(f"{'side':24s} {'micro-batches':>13s} {'row tokens':>10s} {'canvas':>7s} {'efficiency':>10s} "
          f"{'step CPU s':>10s} {'range':>15s} {'wall s':>8s} {'tokens/CPU-s':>12s}")
    for side in sides:
        cpu = [t.cpu for t in side.times]
        seconds = statistics.median(cpu)
        print(f"{side.name:24s} {len(side.microbatches):13d} {side.row_tokens:10d} {side.canvas_tokens:7d} "
              f"{side.valid_tokens / side.row_tokens:10.3f} {seconds:10.2f} {f'{min(cpu):.2f}..{max(cpu):.2f}':>15s} "
              f"{statistics.median(t.wall for t in side.times):8.2f} {side.valid_tokens / seconds:12.0f}")
    # Equal valid tokens on both sides of each pair: tokens per CPU-second, packed over other = other's time / packed.
    over_longest = ratio_over_rounds(longest.times, packed.times, device)
    over_fixed = ratio_over_rounds(fixed.times, packed.times, device)
    control = ratio_over_rounds(control_packed.times, control_unpacked.times, device)
    for label, (middle, low, high) in (("packed / micro-batch 4, tokens per CPU-s", over_longest),
                                       ("packed / fixed shape, tokens per CPU-s", over_fixed),
                                       ("control: packed / unpacked step CPU time", control)):
        print(f"ratio {label:42s} median {middle:.3f}, per round {low:.3f}..{high:.3f}")
    if encoders:
        # Per side, the canvas is the step minus its encoder, round by round (both timed in the same round).
        canvas = {side.name: [a.cpu - b.cpu for a, b in zip(side.times, encoder.times, strict=True)]
                  for side, encoder in zip((longest, packed), encoders)}
        for side, encoder in zip((longest, packed), encoders):
            step_s, canvas_s = statistics.median(t.cpu for t in side.times), statistics.median(canvas[side.name])
            print(f"breakdown {side.name:14s} step {step_s:6.2f} CPU s = encoder + AR loss "
                  f"{statistics.median(t.cpu for t in encoder.times):6.2f} + canvas (passes 1 and 2, diffusion loss) "
                  f"{canvas_s:6.2f} ({canvas_s / step_s:.0%} of the step); {side.row_tokens} encoder positions, "
                  f"{side.canvas_tokens} canvas positions")
        encoder_ratio = ratio_over_rounds(encoders[0].times, encoders[1].times, device)
        canvas_ratio = statistics.median(a / b for a, b in zip(canvas[longest.name], canvas[packed.name]))
        print(f"breakdown micro-batch 4 / packed: encoder {encoder_ratio[0]:.3f} (per round {encoder_ratio[1]:.3f}.."
              f"{encoder_ratio[2]:.3f}), canvas {canvas_ratio:.3f}")
    assert lengths == laid_out, "the trainer's layout and laid_out_tokens disagree"
    positions = (longest.row_tokens / packed.row_tokens, longest.canvas_tokens / packed.canvas_tokens)
    assert math.isclose(longest.row_tokens / longest.valid_tokens, encoder_positions), (
        "encoder_positions_ratio and the micro-batches disagree")
    print(f"padding removed, micro-batch 4 / packed positions: encoder {positions[0]:.3f}, canvas {positions[1]:.3f} "
          f"(packed efficiency {packed.valid_tokens / packed.row_tokens:.3f}); the step's speed-up is the encoder's "
          f"and the canvas's averaged with their costs as weights")
    print(balance_line)
    print(f"RESULT packed_over_microbatch4={over_longest[0]:.3f} packed_over_fixed_shape={over_fixed[0]:.3f} "
          f"control_packed_over_unpacked={control[0]:.3f} "
          f"efficiency_packed={packed.valid_tokens / packed.row_tokens:.4f} "
          f"efficiency_microbatch4={longest.valid_tokens / longest.row_tokens:.4f} "
          f"efficiency_fixed_shape={fixed.valid_tokens / fixed.row_tokens:.4f} valid_tokens={packed.valid_tokens} "
          f"records={args.records} seq_length={S} positions_ratio_encoder={positions[0]:.3f} "
          f"positions_ratio_canvas={positions[1]:.3f} "
          f"dp_balance_stride={balance[0]:.3f} dp_balance_dealt={balance[1]:.3f}")


if __name__ == "__main__":
    sys.exit(main())
