"""Which samples each data-parallel rank trains on at each step.

Step s covers the global sample stream positions `[s·G, (s+1)·G)` (G = global batch size). Micro-batch m of DP rank
r takes positions `s·G + m·(b·D) + r·b + [0, b)` (b = micro batch, D = DP size). The noise of a sample is keyed by
its stream position, so the losses of a step do not depend on D or on the micro-batch split, and resuming at step s
needs nothing but s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_bdgemma.config import BDGemmaConfig
from megatron_bdgemma.data import build_pretrain_datasets, embedded_pretrain_prefix, embedded_sft_path, load_tokenizer
from megatron_bdgemma.data.pretrain import pretrain_collate
from megatron_bdgemma.data.sft import SFTDataset, sft_collate
from megatron_bdgemma.diffusion import DiffusionBatch
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

    def microbatches(self, step: int, split: str = "train") -> list[tuple[DiffusionBatch, list[int]]]:
        """This rank's micro-batches of `step`: (batch, stream positions that key each example's noise)."""
        dataset = self.splits[split]
        per_round = self.micro_batch_size * self.dp_size
        out = []
        for m in range(self.global_batch_size // per_round):
            start = step * self.global_batch_size + m * per_round + self.dp_rank * self.micro_batch_size
            positions = list(range(start, start + self.micro_batch_size))
            batch, _ = self.collate([dataset[p % len(dataset)] for p in positions])
            out.append((batch, positions))
        return out


def sft_seq_multiple(config: BDGemmaConfig) -> int:
    """What an SFT batch width is padded to a multiple of: sequence parallelism splits the sequence over the TP
    ranks, FP8 GEMMs need dimensions in multiples of 16. The run config makes `data.seq_length` (the cap on the
    width) a multiple of both, so a capped width is one too."""
    tp = config.tensor_model_parallel_size if config.sequence_parallel else 1
    return math.lcm(tp, FP8_ALIGNMENT if config.fp8 else 1)


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
        full = SFTDataset(paths[0], tokenizer, max_length=d.seq_length, block_size=block, on_bad=d.on_bad,
                          truncation=d.truncation, mask_history=d.mask_history)
        if full.bad.total or full.ar_only or full.truncated:
            print(full.summary(), flush=True)
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
    return StepData(
        datasets, collate, run.train.global_batch_size, run.train.micro_batch_size,
        parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
    )
