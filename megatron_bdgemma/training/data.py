"""Which samples each data-parallel rank trains on at each step.

Step s covers the global sample stream positions `[s·G, (s+1)·G)` (G = global batch size). Micro-batch m of DP rank
r takes positions `s·G + m·(b·D) + r·b + [0, b)` (b = micro batch, D = DP size). The noise of a sample is keyed by
its stream position, so the losses of a step do not depend on D or on the micro-batch split, and resuming at step s
needs nothing but s.

With `data.packing` (docs/design.md §13) each DP rank packs its records of the step (first-fit decreasing, a pure
function of their lengths) into rows of `data.seq_length`; micro-batches hold b rows. SFT chats are dealt to the DP
ranks by size instead of by stride (`deal_by_size`: the longest first, each to the rank with the fewest tokens so far),
so the ranks carry nearly equal tokens and none waits long for the slowest; which rank trains a record changes
nothing computed (its noise is keyed by its stream position).
With `data.reset_document_masks` (pretraining) the records are the documents of the step's windows: packed, each
window is a row of its own documents; unpacked, each document has a row. Either way the ranks agree on the step's
micro-batch count (the most any rank needs); a rank short of rows runs all-padding micro-batches, which hold no
token and so add nothing to the losses, the token counts or the gradients.
Under pipeline parallelism every micro-batch has one shape: b rows of `data.seq_length`, each with the same canvas
blocks.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_bdgemma.config import BDGemmaConfig
from megatron_bdgemma.data import build_pretrain_datasets, embedded_pretrain_prefix, embedded_sft_path, load_tokenizer
from megatron_bdgemma.data.pretrain import document_records, pretrain_collate
from megatron_bdgemma.data.sft import SFTDataset, laid_out_tokens, sft_collate
from megatron_bdgemma.diffusion import DiffusionBatch
from megatron_bdgemma.diffusion.packing import PackedBatch, canvas_blocks_bound, first_fit_decreasing, pack_batch
from megatron_bdgemma.training.config import FP8_ALIGNMENT, RunConfig

T = TypeVar("T")

SFT_VALID_EVERY = 20
"""SFT holds out every 20th record for evaluation (chat files have no indexed split)."""


@dataclass
class StepData:
    splits: dict[str, Sequence[Any]]
    collate: Callable[[Sequence[Any]], tuple[DiffusionBatch, torch.Tensor]]
    global_batch_size: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int
    packing: PackedRows | None = None
    """`data.packing` / `data.reset_document_masks`: how the rank's records become rows; None = a sample per row."""

    def microbatches(self, step: int, split: str = "train") -> list[tuple[DiffusionBatch | PackedBatch, list[int]]]:
        """This rank's micro-batches of `step`: (batch, the keys of each example's noise: the stream positions, or
        for records (`self.packing`), those of `batch.records` or of the unpacked records)."""
        dataset = self.splits[split]
        b, per_round = self.micro_batch_size, self.micro_batch_size * self.dp_size
        starts = [step * self.global_batch_size + m * per_round + self.dp_rank * b
                  for m in range(self.global_batch_size // per_round)]
        positions = [list(range(start, start + b)) for start in starts]
        if self.packing is None:
            return [(self.collate([dataset[p % len(dataset)] for p in micro])[0], micro) for micro in positions]
        if self.packing.size is None:
            stream = [p for micro in positions for p in micro]
            return self.packing.microbatches([dataset[p % len(dataset)] for p in stream], stream, b)
        # The step's records dealt to the ranks by size: every rank reads them all once, then keeps its own.
        first = step * self.global_batch_size
        samples = [dataset[p % len(dataset)] for p in range(first, first + self.global_batch_size)]
        stream = deal_by_size(range(first, first + len(samples)), [self.packing.size(s) for s in samples],
                              self.dp_size)[self.dp_rank]
        return self.packing.microbatches([samples[p - first] for p in stream], stream, b)


Records = Callable[[Sequence[Any], list[int]], tuple[DiffusionBatch, list[int], list[list[int]] | None]]
"""The step's samples and their stream positions → the records laid out alone, each record's noise key, and the
records that share a row whatever the packer does (a pretraining window's documents; None: the packer decides)."""


def chats_as_records(collate: Callable[[Sequence[Any]], tuple[DiffusionBatch, Any]], samples: Sequence[Any],
                     positions: list[int]) -> tuple[DiffusionBatch, list[int], None]:
    """SFT: each chat is a record, keyed by its stream position."""
    return collate(samples)[0], positions, None


def deal_by_size(positions: Sequence[int], sizes: Sequence[int], ranks: int) -> list[list[int]]:
    """Each rank's share of `positions`, in stream order: the largest size first, each to the rank with the least
    total so far (ties: the earlier position, the lower rank). Every rank computes the same deal (a pure function of
    the sizes). Largest-first greedy keeps the most loaded rank within one item of the mean: on log-normal chats, 32
    per rank over 64 ranks, at 1.010× the mean, where a fixed stride is at 1.379× (docs/design.md §13)."""
    loads = [(0, rank) for rank in range(ranks)]
    owner = [0] * len(positions)
    for i in sorted(range(len(positions)), key=lambda i: (-sizes[i], i)):
        load, rank = heapq.heappop(loads)
        owner[i] = rank
        heapq.heappush(loads, (load + sizes[i], rank))
    return [[p for p, o in zip(positions, owner) if o == rank] for rank in range(ranks)]


@dataclass(frozen=True)
class PackedRows:
    """The rows of one rank's records of a step, in micro-batches (docs/design.md §13)."""

    seq_length: int
    """Row capacity (`data.seq_length`)."""
    seq_multiple: int
    """A row's width is its micro-batch's longest row rounded up to this (`sft_seq_multiple`; `seq_length` under
    pipeline parallelism: every row is `seq_length` wide)."""
    pad_id: int
    records: Records
    pack: bool = True
    """False: each record alone in its row, unpacked (`data.reset_document_masks` without `data.packing`)."""
    max_records_per_row: int | None = None
    """`data.max_records_per_row`: the packer's bound on records per row (a longer group is split)."""
    canvas_blocks: int | None = None
    """Pipeline parallelism: stages exchange `[S + R', b, H]` at one shape, so every row has this many canvas blocks
    (`pack_canvas(num_canvas_blocks=...)`, `canvas_blocks_bound`) and every micro-batch `b` rows (empty rows fill a
    short one). None: each micro-batch as it comes."""
    microbatch_multiple: int = 1
    """The interleaved pipeline schedule (`parallel.vpp`) runs micro-batches in groups of `parallel.pp` and refuses
    a count that is not a multiple of it: all-padding micro-batches round the count up."""
    size: Callable[[Any], int] | None = None
    """A sample's size: the step's samples are dealt to the DP ranks by it (`deal_by_size`; SFT: `laid_out_tokens`).
    None: by stride, as unpacked (pretraining windows, all `data.seq_length` long)."""

    def microbatches(self, samples: Sequence[Any], positions: list[int],
                     rows_per_microbatch: int) -> list[tuple[DiffusionBatch | PackedBatch, list[int]]]:
        """The records of `samples` in rows (their groups, at most `max_records_per_row` to a row, else first-fit
        decreasing; or one per row), `rows_per_microbatch` rows per micro-batch, then all-padding micro-batches up
        to the count every data-parallel rank agrees on (a multiple of `microbatch_multiple`)."""
        records, keys, groups = self.records(samples, positions)
        cap = self.max_records_per_row
        if not self.pack:
            rows = [[i] for i in range(records.batch_size)]
        elif groups is not None:  # a window's documents share its row, at most `cap` to a row
            size = cap or max(map(len, groups))
            rows = [group[k : k + size] for group in groups for k in range(0, len(group), size)]
        else:
            rows = first_fit_decreasing(records.encoder_valid.sum(dim=1).tolist(), self.seq_length,
                                        max_records_per_row=cap)
        needed = -(-len(rows) // rows_per_microbatch)
        count = agreed_count(-(-needed // self.microbatch_multiple) * self.microbatch_multiple)
        least = 1 if self.canvas_blocks is None else rows_per_microbatch
        out = []
        for m in range(count):
            chunk = rows[m * rows_per_microbatch : (m + 1) * rows_per_microbatch]
            chunk += [[]] * (least - len(chunk))  # empty rows: an all-padding micro-batch, or a fixed shape's filler
            members = [i for row in chunk for i in row]
            if members and not self.pack:  # the unpacked layout itself, not packed rows of one record
                out.append((records.select(members), [keys[i] for i in members]))
                continue
            local = {i: k for k, i in enumerate(members)}
            longest = max(int(records.encoder_valid[row].sum()) for row in chunk) if members else 1
            width = min(-(-longest // self.seq_multiple) * self.seq_multiple, self.seq_length)
            packed = pack_batch(records.select(members), [[local[i] for i in row] for row in chunk],
                                pad_id=self.pad_id, seq_len=width)
            out.append((packed, [keys[i] for i in members]))
        return out


def agreed_count(count: int) -> int:
    """The largest `count` over the data-parallel ranks (every rank of a DP group runs its step's micro-batches in
    the same collectives).

    The pipeline stages agree by construction: each stage reads the step's records itself, the same ones on every
    stage of a DP rank (`StepData.microbatches` depends on the DP rank only), packs them alike (a pure function of
    their lengths), and each stage's DP group then takes the maximum of the same counts."""
    if parallel_state.get_data_parallel_world_size() == 1:
        return count
    most = torch.tensor([count], dtype=torch.long)
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
    return int(most.item())


def sft_seq_multiple(config: BDGemmaConfig) -> int:
    """What an SFT batch width is padded to a multiple of: context parallelism cuts the sequence into 2·cp chunks
    (docs/design.md §14), sequence parallelism splits each rank's share over the TP ranks, FP8 GEMMs need dimensions
    in multiples of 16. The run config makes `data.seq_length` (the cap on the width) a multiple of all three, so a
    capped width is one too."""
    return math.lcm(sequence_split(config), FP8_ALIGNMENT if config.fp8 else 1)


def sequence_split(config: BDGemmaConfig) -> int:
    """Into how many equal pieces a sequence (encoder or canvas) is cut over the ranks: 2·cp chunks under context
    parallelism, each split over the TP ranks under sequence parallelism."""
    cp = config.context_parallel_size
    return (2 * cp if cp > 1 else 1) * (config.tensor_model_parallel_size if config.sequence_parallel else 1)


def rank_zero_first(write: Callable[[], T]) -> T:
    """`write()` on rank 0 first, then (after a barrier) on the other ranks, which find its files and return.

    The embedded data is written once into `data.cache_dir`. Written by every rank at once, each rank's file would
    replace the others' with another modification time, which is part of the index cache's key
    (`data.pretrain.inspect_corpus`): ranks then looked for index files that only another rank's key named.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return write()
    if dist.get_rank() == 0:
        result = write()
    dist.barrier()
    if dist.get_rank() != 0:
        result = write()
    return result


def build_step_data(run: RunConfig, config: BDGemmaConfig) -> StepData:
    """Datasets of the run (the embedded default when `data.paths` is empty) and the sampling scheme."""
    d = run.data
    tokenizer = load_tokenizer(d.tokenizer, d.chat_template)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"data.tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {config.vocab_size}")
    block = config.canvas_length
    if block % sequence_split(config):
        raise ValueError(f"the model's canvas_length ({block}, model.overrides.canvas_length) must be a multiple of "
                         f"{sequence_split(config)} (2 × parallel.cp, × tp under sequence parallelism): every canvas "
                         "is split over the ranks like the sequence")
    if d.mode == "pretrain":
        blend = d.paths or [rank_zero_first(lambda: embedded_pretrain_prefix(d.cache_dir))]
        g = run.train.global_batch_size
        # The test split is never read, and the valid split only when evaluating: 0 samples = not built, so a
        # corpus too small to give them documents still trains.
        splits = build_pretrain_datasets(
            blend, tokenizer=tokenizer, seq_length=d.seq_length, seed=run.train.seed,
            num_samples=(run.train.steps * g, run.train.eval_steps * g if run.train.eval_interval else 0, 0),
            split=d.split, cache_dir=d.cache_dir, vocab_size=config.vocab_size,
        )
        datasets = {"train": splits.train, "valid": splits.valid or splits.train}
        collate = partial(pretrain_collate, block_size=block, pad_id=tokenizer.pad)
    else:
        paths = d.paths or [rank_zero_first(lambda: embedded_sft_path(d.cache_dir))]
        if len(paths) != 1:
            raise ValueError(f"data.paths for sft takes one chat JSONL file, got {paths}")
        if not Path(paths[0]).is_file():
            raise ValueError(f"data.paths: {paths[0]} is not a file (sft reads one chat JSONL file)")
        full = SFTDataset(paths[0], tokenizer, max_length=d.seq_length, block_size=block, on_bad=d.on_bad,
                          truncation=d.truncation, mask_history=d.mask_history)
        if full.bad.total or full.ar_only or full.truncated:
            print(full.summary(), flush=True)
        if full.with_images and (config.vision_config is None or config.image_token_id != tokenizer.images.image_token_id):
            # Refused here, before a step: the model would meet placeholders it cannot fill.
            why = ("has no vision tower (model.hf: a DiffusionGemma checkpoint that has one)" if config.vision_config is None
                   else f"takes image_token_id {config.image_token_id}, not data.tokenizer's image token "
                        f"{tokenizer.images.image_token_id}")
            raise ValueError(f"data.paths: {paths[0]} has {full.with_images} record(s) with images, but the model {why}")
        if len(full) < 2:
            raise ValueError(f"{paths[0]} has {len(full)} usable chat record(s); SFT needs at least 2 (every "
                             f"{SFT_VALID_EVERY}th record, the first included, is held out for evaluation)")
        indices = range(len(full))
        datasets = {
            "train": torch.utils.data.Subset(full, [i for i in indices if i % SFT_VALID_EVERY]),
            "valid": torch.utils.data.Subset(full, [i for i in indices if i % SFT_VALID_EVERY == 0]),
        }
        # Pipeline stages exchange [S + R, B, H] at one shape: every batch is padded to data.seq_length (padding is
        # never attended nor scored, so the losses are those of the unpadded batch).
        collate = partial(sft_collate, block_size=block, eos_id=tokenizer.eod, pad_id=tokenizer.pad,
                          max_len=d.seq_length,
                          seq_multiple_of=d.seq_length if run.parallel.pp > 1 else sft_seq_multiple(config))
    packing = None
    if d.packing or d.reset_document_masks:
        records = (partial(document_records, block_size=block, pad_id=tokenizer.pad, eod_id=tokenizer.eod)
                   if d.mode == "pretrain" else partial(chats_as_records, collate))
        pipeline = run.parallel.pp > 1
        canvas = (canvas_blocks_bound(d.seq_length, block, all_blocks=run.score() == "all_blocks",
                                      max_records_per_row=d.max_records_per_row,
                                      documents=d.reset_document_masks) if pipeline else None)
        packing = PackedRows(d.seq_length, d.seq_length if pipeline else sft_seq_multiple(config), tokenizer.pad,
                             records, d.packing, d.max_records_per_row, canvas,
                             run.parallel.pp if run.parallel.vpp else 1,
                             partial(laid_out_tokens, block_size=block, max_len=d.seq_length) if d.mode == "sft" else None)
    return StepData(
        datasets, collate, run.train.global_batch_size, run.train.micro_batch_size,
        parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(), packing,
    )
