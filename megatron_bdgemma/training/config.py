"""The run configuration: a YAML file plus dotted command-line overrides, checked up front.

    run = load_run_config("examples/configs/tiny_pretrain.yaml", ["train.steps=20", "parallel.tp=2"])

Every section is a dataclass; an unknown key, a value of the wrong type or sizes that conflict stop the run before
anything is built, with one message that lists every problem. YAML is read strictly where PyYAML is lenient or
surprising: a key given twice in one mapping (a section included, which YAML would silently replace by the last one)
and a malformed file (a tab in the indentation) are refused naming the file and line, and scientific notation
without a dot (`1e-3`, a string to YAML 1.1) is a number wherever the key expects a float.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

SELECTIVE_RECOMPUTE_MODULES = ("core_attn", "moe", "shared_experts")
"""Megatron `recompute_modules` names this model honours with `train.recompute=selective`."""

FP8_ALIGNMENT = 16
"""FP8 GEMMs need every dimension, the token count included, to be a multiple of this."""


@dataclass
class ModelSection:
    """The model: a preset or a local HF directory, changed field by field."""

    preset: str = "tiny"
    """A `megatron_bdgemma.config.PRESETS` name; ignored when `hf` is set or the weights come from a checkpoint
    (`checkpoint.load`, `checkpoint.init_from`), which carries its architecture."""
    hf: str | None = None
    """Start from a local HF DiffusionGemma / Gemma 4 MoE directory (config and weights)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """`BDGemmaConfig` fields to change, e.g. {num_layers: 2} (one field on the command line:
    `model.overrides.num_layers=2`)."""
    backend: Literal["local", "te"] = "local"
    """Layer implementation: 'local' (PyTorch, CPU and GPU) or 'te' (Transformer Engine, GPU; needed for FP8)."""


@dataclass
class ParallelSection:
    """How the model and the batch are split over the ranks (the data-parallel size is what is left)."""

    tp: int = 1
    """Tensor-parallel size: each layer's weights split over this many ranks (with sequence parallelism)."""
    pp: int = 1
    """Pipeline-parallel size: the layers split into this many stages (1F1B schedule)."""
    ep: int = 1
    """Expert-parallel size: the routed experts of each MoE layer split over this many ranks."""
    vpp: int | None = None
    """Virtual pipeline stages per rank (Megatron's interleaved 1F1B schedule); needs pp > 1."""
    etp: int | None = None
    """Expert tensor-parallel size (default: tp)."""
    cp: int = 1
    """Context-parallel size: each sequence (encoder and canvas) is split over this many ranks with causal load
    balancing, K/V all-gathered per layer (docs/design.md §14); data parallelism takes world / (tp·pp·cp).
    data.seq_length must be a multiple of 2·cp (2·cp·tp under TP)."""
    sequence_parallel: bool | None = None
    """Default: on whenever tp > 1 (Megatron requires it for MoE training with TP)."""
    dispatcher: Literal["allgather", "alltoall"] | None = None
    """MoE token dispatcher; default alltoall on GPU, allgather on CPU, but alltoall with ep > 1 for SFT or packed
    rows at pp = 1: their micro-batches differ in shape from rank to rank, which allgather cannot take (refused)."""


@dataclass
class DataSection:
    """What is trained on and how it is read."""

    mode: Literal["pretrain", "sft"] = "pretrain"
    """'pretrain': indexed token datasets, every block scored; 'sft': chat JSONL, the answers supervised."""
    paths: list[str | float] = field(default_factory=list)
    """pretrain: indexed-dataset prefixes, optionally with weights ([w1, prefix1, w2, prefix2]); sft: chat JSONL
    files. Empty = the embedded default (text that ships with Python, byte tokenizer)."""
    tokenizer: str = "byte"
    """'byte' (offline) or a local HF tokenizer directory."""
    chat_template: str | None = None
    """sft: a Jinja chat template file replacing the HF tokenizer's own; it must mark the supervised tokens with
    {% generation %} tags (DiffusionGemma's released template has none: use NeMo Automodel's)."""
    seq_length: int = 128
    """Tokens per training sample (the encoder sequence; pretraining's canvas is as long)."""
    split: str = "98,1,1"
    """pretrain: train, valid and test weights of each dataset's documents (Megatron's `--split`)."""
    on_bad: Literal["error", "skip"] = "error"
    """sft: a bad record (invalid JSON, no messages, longer than seq_length): 'error' stops the run naming its file
    and line, 'skip' drops it and counts it."""
    truncation: bool = False
    """sft: cut a record longer than seq_length there (NeMo Automodel's rule; a partial last block is possible)
    instead of refusing or skipping it (on_bad)."""
    mask_history: bool = False
    """sft: supervise only the final assistant turn (the last run of supervised tokens left after truncation); the
    earlier turns become clean prompt context (NeMo Automodel's ChatDataset `mask_history`, which its DiffusionGemma
    recipe sets). False: every assistant turn is supervised. Either way the AR loss covers every token pair."""
    packing: bool = False
    """Several records per row of seq_length tokens, each computed exactly as alone (its own attention scope,
    positions, noise and canvas blocks; docs/design.md §13). sft: chat records packed first-fit decreasing;
    train.global_batch_size still counts records and train.micro_batch_size counts rows, so the number of
    micro-batches varies from step to step. pretrain (needs reset_document_masks): each window holds its own
    documents, as Megatron's --reset-attention-mask. Under pipeline parallelism it needs max_records_per_row."""
    reset_document_masks: bool = False
    """pretrain: split each window after every EOD into documents, each computed as alone: attention never crosses
    an EOD, positions restart at 0 and every block of each document is scored (Megatron's --reset-attention-mask
    --reset-position-ids). With packing=true the documents stay in their window (one row per window); with
    packing=false each document gets a row of its own (the unpacked layout: as many micro-batches of
    train.micro_batch_size documents as needed, padding included)."""
    max_records_per_row: int | None = None
    """With packing: at most this many records per packed row (null = as many as fit; a pretraining window with more
    documents is split into rows of this many). Required when parallel.pp > 1: pipeline stages exchange one shape, so
    every row's canvas is fixed at the blocks this many records can need and every row is seq_length wide; each row
    pays for them full or not (docs/design.md §13: 8 is a good start for chats far shorter than seq_length)."""
    cache_dir: str = "runs/data_cache"
    """Where the embedded default data and megatron-core's index caches of pretraining data are written."""


@dataclass
class ObjectiveSection:
    """The training loss: corruption of the canvas, the scored blocks, self-conditioning and the AR term."""

    score: Literal["one_block", "all_blocks"] | None = None
    """Default: one_block for sft (the DiffusionGemma recipe), all_blocks for pretrain."""
    kind: Literal["uniform", "absorbing"] = "uniform"
    """Corruption: 'uniform' replaces a token by a random vocabulary id; 'absorbing' by mask_id (MDLM / BD3-LM,
    noised positions weighted by 1/t)."""
    mask_id: int | None = None
    """The mask token id of kind=absorbing (required there)."""
    t_min: float = 1e-3
    """Lower end of the noise level t ~ U(t_min, t_max): the probability that a supervised token is corrupted."""
    t_max: float = 1.0
    """Upper end of the noise level t ~ U(t_min, t_max)."""
    self_conditioning_p: float = 0.5
    """Probability, per example, that the second decode pass gets the first pass's prediction (else a zero signal)."""
    variant: Literal["base-sft", "reweighted-ce", "loo-ce", "reweighted-loo-ce"] = "base-sft"
    """SFT objective of Google's reference (kind=uniform only): base-sft is the flat CE; reweighted-ce weights it by
    w(t) = 1/(1 − t); loo-ce scores softmax(f + δ·onehot(x_t)) with δ = log(1 + K(1 − t)/t) on the noisy token x_t;
    reweighted-loo-ce does both (docs/design.md §7)."""
    weight_clip: float | None = None
    """Upper bound of the variant's time weight w(t) (1/(1 − t) explodes as t → 1); None = no bound."""
    ar_weight: float = 1.0
    """Weight of the AR (next-token) loss on the encoder's logits, added to the diffusion loss."""
    diffusion_weight: float = 1.0
    """Weight of the diffusion (canvas) loss: the optimised loss is diffusion_weight · diffusion + ar_weight · ar
    (Megatron-Bridge's decoder / encoder loss weights); the logged losses are the unweighted terms."""
    stop_gradient_to_encoder: bool = False
    """The diffusion loss does not reach the encoder pass: the canvas attends to detached encoder K/V (Google's
    `stop_gradient_from_denoiser_to_encoder`); the shared weights still learn from both losses, the encoder pass's
    activations from the AR loss alone."""
    loss_chunk_size: int | None = None
    """Tokens per chunk of the vocab-parallel loss and self-conditioning path (None = full logits; set it for
    large vocabularies: 262K fp32 logits are 1 MiB per token)."""


@dataclass
class OptimSection:
    """Adam (Megatron's optimizer) and its learning-rate schedule."""

    lr: float = 1.5e-4
    """Peak learning rate, reached at the end of the warmup."""
    min_lr: float = 1.5e-5
    """Learning rate at the end of the decay (train.steps)."""
    warmup_steps: int = 25
    """Steps of linear warmup from 0 to lr; must be < train.steps."""
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay from lr to min_lr over the steps after the warmup."""
    beta1: float = 0.95
    """Adam's first-moment decay."""
    beta2: float = 0.99
    """Adam's second-moment decay."""
    eps: float = 1e-8
    """Adam's epsilon."""
    weight_decay: float = 1e-4
    """Decoupled weight decay (AdamW), constant over the run."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    distributed_optimizer: bool = True
    """Shard the optimizer state and fp32 master weights over data-parallel ranks (Megatron's distributed optimizer)."""


@dataclass
class TrainSection:
    """The step loop: length, batch, precision, recompute, logging and evaluation."""

    steps: int = 100
    """Optimizer steps of the run (also the LR decay horizon)."""
    micro_batch_size: int = 4
    """Samples per forward/backward on each data-parallel rank."""
    global_batch_size: int = 4
    """Samples per optimizer step over all ranks; a multiple of micro_batch_size x data-parallel size (the rest is
    gradient accumulation)."""
    seed: int = 1234
    """Seed of the initial weights and of every random draw of a step (keyed by sample and step, so any layout and
    a resumed run draw the same)."""
    bf16: bool = False
    """bf16 weights and compute with fp32 master weights in the optimizer (off: fp32 throughout)."""
    fp8: Literal["hybrid", "e4m3"] | None = None
    """FP8 GEMMs through Transformer Engine (needs `model.backend: te`, `train.bf16` and a GPU); None = off."""
    fp8_recipe: Literal["tensorwise", "blockwise", "mxfp8"] = "tensorwise"
    """Scaling recipe. Delayed scaling is not offered: the encode and decode passes enter the FP8 context once per
    layer call, and delayed scaling's amax history needs one context around the whole pass."""
    fp8_param: bool = False
    """Keep the weights in FP8 (TE's fp8_model_init); needs `train.fp8` and `optim.distributed_optimizer`."""
    recompute: Literal["full", "selective"] | None = None
    """'full': recompute every layer in backward (activation checkpointing); 'selective': recompute only the parts of
    each layer named in `recompute_modules`."""
    recompute_modules: list[str] = field(default_factory=lambda: list(SELECTIVE_RECOMPUTE_MODULES))
    """With recompute=selective, any of: core_attn (attention scores and probabilities), moe (the routed experts'
    fc1, activation and fc2; dispatch and combine are not repeated), shared_experts (the dense GeGLU branch)."""
    log_interval: int = 10
    """Print a progress line every N steps."""
    eval_interval: int = 0
    """Evaluate on the held-out split every N steps (0 = never)."""
    eval_steps: int = 2
    """Global batches of the held-out split each evaluation averages over."""
    skip_nonfinite_steps: int = 0
    """Steps of the run (resumes included) whose non-finite loss or gradient skips the update instead of stopping the
    run; the next one stops it (`megatron_bdgemma/training/stopping.py`)."""


@dataclass
class CheckpointSection:
    """Where the run saves, and what it starts from."""

    save: str | None = None
    """The run directory: checkpoints (`iter_N/`), `latest`, the owner record and run_config.yaml (None = no saves)."""
    load: str | None = None
    """Resume this training run exactly (its save root or an `iter_N` directory); see
    `megatron_bdgemma/training/resume.py`."""
    init_from: str | None = None
    """Start a new run from this checkpoint's model (architecture and weights: converted from HF, or another run's);
    optimizer, schedule and step start fresh."""
    interval: int = 0
    """Save every N steps (0 = only at the end, when `save` is set)."""
    keep_last: int = 2
    """Keep the newest N >= 1 complete checkpoints of this run (the one just written included); older ones of
    this run are deleted after each save. There is no "keep all": use a large N."""
    optimizer_format: Literal["fully_reshardable", "dp_reshardable"] = "fully_reshardable"
    """How the distributed optimizer's state is saved: fully_reshardable loads at any TP/EP/PP/DP layout (saving
    gathers the state over DP); dp_reshardable saves each rank's shard without a gather but loads only at the same
    TP/EP/PP sizes (DP may change). Loading reads the format from the checkpoint."""


@dataclass
class LoggingSection:
    """Where metrics go besides the progress line."""

    tensorboard_dir: str | None = None
    """Write TensorBoard scalars here (needs the `tensorboard` package; None = off)."""
    wandb_project: str | None = None
    """Log the metrics rows' scalars to this Weights & Biases project too (needs the wandb package; WANDB_ENTITY
    and WANDB_MODE=offline as wandb reads them); a resumed run continues the W&B run of its run directory."""


@dataclass
class RunConfig:
    """A whole run: one section per concern."""

    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.parallel.tp * self.parallel.pp * self.parallel.cp)

    def score(self) -> Literal["one_block", "all_blocks"]:
        """`objective.score`, or its default for `data.mode`."""
        return self.objective.score or ("one_block" if self.data.mode == "sft" else "all_blocks")

    def num_microbatches(self, world_size: int) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.data_parallel_size(world_size))

    def batch_shapes_vary(self) -> bool:
        """Whether a micro-batch's shape depends on its records, so differs from rank to rank: an SFT batch is as wide
        as its longest record, a packed row's canvas (or a window's documents') as long as its records need. Under pipeline parallelism stages
        exchange one shape, so each batch is padded to it. Megatron's allgather MoE dispatcher gathers the tokens of
        the expert-parallel ranks as equal shares, so it cannot take varying shapes; the alltoall dispatcher can."""
        return self.parallel.pp == 1 and (self.data.mode == "sft" or self.data.packing or self.data.reset_document_masks)

    def validate(self, world_size: int) -> None:
        """Raise one ValueError naming every conflict between sizes (one line for one, a list for several)."""
        p, t, problems = self.parallel, self.train, []
        if p.cp < 1:
            problems.append(f"parallel.cp must be >= 1, got {p.cp}")
        elif world_size % (p.tp * p.pp * p.cp):
            problems.append(f"world size {world_size} is not divisible by parallel.tp × parallel.pp × parallel.cp = "
                            f"{p.tp} × {p.pp} × {p.cp}")
        else:
            dp = self.data_parallel_size(world_size)
            per_step = t.micro_batch_size * dp
            if t.global_batch_size % per_step:
                problems.append(
                    f"train.global_batch_size ({t.global_batch_size}) must be a multiple of train.micro_batch_size × "
                    f"data-parallel size = {t.micro_batch_size} × {dp}"
                )
        etp = p.etp or p.tp
        if world_size % (etp * p.ep * p.pp):
            problems.append(f"world size {world_size} is not divisible by etp × ep × pp = {etp} × {p.ep} × {p.pp}")
        if self.data.packing and self.data.mode == "pretrain" and not self.data.reset_document_masks:
            problems.append("data.packing with data.mode=pretrain needs data.reset_document_masks=true: a window is "
                            "one full row already; packing keeps its documents apart")
        if self.data.reset_document_masks and self.data.mode != "pretrain":
            problems.append("data.reset_document_masks is a pretrain option: sft records are separate rows (or, "
                            "with data.packing, separate segments) already")
        if self.data.reset_document_masks and not self.data.packing and p.pp > 1:
            problems.append("data.reset_document_masks with parallel.pp > 1 needs data.packing=true: pipeline stages "
                            "exchange one shape, which rows of one document each would pad to a whole window")
        if self.data.packing and p.pp > 1 and self.data.max_records_per_row is None:
            problems.append("data.packing with parallel.pp > 1 needs data.max_records_per_row (e.g. 8): pipeline "
                            "stages exchange one shape, so a packed row's canvas is fixed at the blocks that many "
                            "records can need")
        if self.data.max_records_per_row is not None and (not self.data.packing or self.data.max_records_per_row < 1):
            problems.append(f"data.max_records_per_row={self.data.max_records_per_row} needs data.packing=true and a "
                            "value >= 1 (or null)")
        if p.ep > 1 and p.dispatcher == "allgather" and self.batch_shapes_vary():
            rows = ("packed rows" if self.data.packing else
                    "document rows" if self.data.reset_document_masks else "SFT batches")
            problems.append(f"parallel.dispatcher=allgather with parallel.ep={p.ep} needs micro-batches of one shape "
                            f"on every expert-parallel rank, but at parallel.pp=1 {rows} take their records' shapes: "
                            "use parallel.dispatcher=alltoall")
        if p.vpp is not None and (p.pp == 1 or p.vpp < 1):
            problems.append(f"parallel.vpp={p.vpp} needs parallel.pp > 1 and vpp >= 1 (or vpp: null)")
        if p.tp > 1 and p.sequence_parallel is False:
            problems.append("parallel.sequence_parallel=false with tp > 1: Megatron's MoE layers need SP when training with TP")
        # Under CP each sequence is cut into 2·cp equal chunks (causal load balancing, docs/design.md §14), each
        # scattered over the TP ranks by sequence parallelism (on whenever tp > 1).
        cp_multiple = 2 * p.cp * p.tp
        if p.cp > 1 and self.data.seq_length % cp_multiple:
            tp = f" × parallel.tp ({p.tp})" if p.tp > 1 else ""
            problems.append(f"data.seq_length ({self.data.seq_length}) must be a multiple of 2 × parallel.cp ({p.cp})"
                            f"{tp} = {cp_multiple}: context parallelism splits each sequence into 2·cp equal chunks"
                            + (", each split over the TP ranks by sequence parallelism" if tp else ""))
        elif p.tp > 1 and (self.data.mode == "sft" or self.data.reset_document_masks) and self.data.seq_length % p.tp:
            problems.append(f"data.seq_length ({self.data.seq_length}) must be a multiple of parallel.tp ({p.tp}) for "
                            f"{'sft' if self.data.mode == 'sft' else 'data.reset_document_masks'}: sequence parallelism "
                            "splits each batch's width, at most data.seq_length, over the TP ranks")
        if self.objective.kind == "absorbing" and self.objective.mask_id is None:
            problems.append("objective.kind=absorbing needs objective.mask_id")
        if self.objective.kind == "absorbing" and (self.objective.variant != "base-sft" or self.objective.weight_clip is not None):
            problems.append(f"objective.variant={self.objective.variant} and objective.weight_clip="
                            f"{self.objective.weight_clip} are uniform-state options: objective.kind=absorbing takes "
                            "objective.variant=base-sft and no objective.weight_clip")
        if self.objective.weight_clip is not None and not self.objective.weight_clip > 0:
            problems.append(f"objective.weight_clip must be > 0 (or null), got {self.objective.weight_clip}")
        if not 0 < self.objective.t_min <= self.objective.t_max <= 1:
            problems.append(f"need 0 < objective.t_min <= objective.t_max <= 1, got {self.objective.t_min}, {self.objective.t_max}")
        o = self.objective
        if o.diffusion_weight < 0 or o.ar_weight < 0 or o.diffusion_weight == o.ar_weight == 0:
            problems.append(f"need objective.diffusion_weight >= 0 and objective.ar_weight >= 0, not both 0, got "
                            f"{o.diffusion_weight}, {o.ar_weight}")
        if self.optim.warmup_steps >= t.steps >= 1:
            fewer = " or fewer" if t.steps > 1 else ""
            problems.append(f"optim.warmup_steps ({self.optim.warmup_steps}) must be < train.steps ({t.steps}): set "
                            f"optim.warmup_steps={t.steps - 1}{fewer}, or more train.steps")
        if t.steps < 1 or t.micro_batch_size < 1 or t.global_batch_size < 1:
            problems.append("train.steps, train.micro_batch_size and train.global_batch_size must be >= 1")
        if t.log_interval < 1 or t.eval_interval < 0 or t.eval_steps < 1:
            problems.append(f"need train.log_interval >= 1, train.eval_interval >= 0 and train.eval_steps >= 1, got "
                            f"{t.log_interval}, {t.eval_interval}, {t.eval_steps}")
        if t.skip_nonfinite_steps < 0:
            problems.append(f"train.skip_nonfinite_steps must be >= 0, got {t.skip_nonfinite_steps}")
        if self.data.seq_length < 1:
            problems.append(f"data.seq_length must be >= 1, got {self.data.seq_length}")
        if self.checkpoint.keep_last < 1:
            problems.append(f"checkpoint.keep_last must be >= 1 (the newest N checkpoints are kept), got "
                            f"{self.checkpoint.keep_last}")
        if self.checkpoint.interval < 0:
            problems.append(f"checkpoint.interval must be >= 0 (0 = save only at the end), got {self.checkpoint.interval}")
        problems += _model_override_problems(self.model.overrides)
        starts = [name for name, value in [("model.hf", self.model.hf), ("checkpoint.load", self.checkpoint.load),
                                           ("checkpoint.init_from", self.checkpoint.init_from)] if value]
        if len(starts) > 1 and starts != ["model.hf", "checkpoint.load"]:  # a resumed run may have begun from HF
            problems.append(f"{' and '.join(starts)} each choose the starting weights; give one")
        if t.fp8:
            if self.model.backend != "te":
                problems.append("train.fp8 needs model.backend=te (FP8 GEMMs are Transformer Engine's)")
            if not t.bf16:
                problems.append("train.fp8 needs train.bf16=true (FP8 GEMMs inside a bf16 model)")
            if self.data.seq_length % FP8_ALIGNMENT:
                problems.append(
                    f"train.fp8 needs data.seq_length to be a multiple of {FP8_ALIGNMENT} (FP8 GEMM dimensions), got "
                    f"{self.data.seq_length}"
                )
        unknown = sorted(set(t.recompute_modules) - set(SELECTIVE_RECOMPUTE_MODULES))
        if t.recompute == "selective" and (unknown or not t.recompute_modules):
            problems.append(f"train.recompute_modules {t.recompute_modules}: choose one or more of {list(SELECTIVE_RECOMPUTE_MODULES)}")
        if t.fp8_param and not (t.fp8 and self.optim.distributed_optimizer):
            problems.append("train.fp8_param needs train.fp8 and optim.distributed_optimizer=true")
        if len(problems) == 1:
            raise ValueError(f"invalid run configuration: {problems[0]}")
        if problems:
            raise ValueError("invalid run configuration:\n  - " + "\n  - ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+")
"""Scientific notation, which YAML 1.1 (PyYAML) reads as a float only with a dot: `1.0e-3` is a float, `1e-3` a
string. Only what a float field (or a float option of a union) is given is read this way; a string field stays."""


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    """A light type check of YAML values against the dataclass annotations (names the key on mismatch); returns the
    value, with scientific notation read as a float where a float is expected."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _coerce(path, value, option)
            except ValueError:
                continue
        raise ValueError(f"{path}={value!r} does not fit {annotation}")
    if origin is Literal:
        if value not in typing.get_args(annotation):
            raise ValueError(f"{path}={value!r}: expected one of {list(typing.get_args(annotation))}")
        return value
    if annotation is type(None):
        if value is not None:
            raise ValueError(f"{path}={value!r}: expected null")
        return value
    expected = origin or annotation
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return value
    if expected is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)
    if expected is tuple and isinstance(value, list):  # YAML has no tuples
        return value
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ValueError(f"{path}={value!r}: expected {getattr(expected, '__name__', expected)}")
    return value


def _model_override_problems(overrides: dict[str, Any]) -> list[str]:
    """Unknown `BDGemmaConfig` fields and values of the wrong type in `model.overrides`, each named (scientific
    notation given to a float field becomes the float)."""
    from megatron_bdgemma.config import BDGemmaConfig

    hints = typing.get_type_hints(BDGemmaConfig)
    problems = []
    for key, value in overrides.items():
        if key not in hints:
            close = difflib.get_close_matches(key, hints, n=3)
            problems.append(f"model.overrides.{key} is not a BDGemmaConfig field{f' (did you mean {close}?)' if close else ''}")
            continue
        try:
            overrides[key] = _coerce(f"model.overrides.{key}", value, hints[key])
        except ValueError as error:
            problems.append(str(error))
        except TypeError:  # an annotation isinstance cannot check (e.g. a protocol); the config's own checks apply
            pass
    return problems


def _build(cls: type, values: dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {[f'{path}{k}' for k in unknown]} (known: {sorted(known)})")
    kwargs = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise ValueError(f"{path}{name} must be a mapping")
            kwargs[name] = _build(hints[name], value, f"{path}{name}.")
        else:
            kwargs[name] = _coerce(f"{path}{name}", value, hints[name])
    return cls(**kwargs)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping (PyYAML keeps the last one silently: a
    section given twice loses every key of the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # the base class names an unhashable key
            if key in first_line:
                lost = "every key of the first" if isinstance(value_node, yaml.MappingNode) else "the first value"
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice (first at line {first_line[key]}); YAML would keep only the "
                    f"last, dropping {lost}: give it once", key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, source: str, file: bool = True) -> Any:
    """`text` parsed by `_StrictLoader`; a ValueError naming `source` (a `file`: with line and column) when it is
    malformed or gives a key twice."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as error:
        mark, problem = error.problem_mark, error.problem or str(error)
        if "'\\t'" in problem:  # PyYAML's scanner: "found character '\\t' that cannot start any token"
            problem = "a tab character; YAML indents with spaces only"
        where = source if mark is None else f"{source}:{mark.line + 1}:{mark.column + 1}" if file else source
        raise ValueError(f"{where}: {problem}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{source}: not valid YAML ({error})") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The sections of a YAML run config file (empty file: none); ValueError naming the file and line when it is
    malformed or gives a key twice."""
    values = _parse_yaml(Path(path).read_text(), str(path)) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of sections at the top level")
    return values


def apply_override(values: dict[str, Any], override: str) -> None:
    """`a.b.c=value` (value parsed as YAML) into the nested dict `values`."""
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like section.key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = _parse_yaml(raw, f"override {override!r}", file=False)


def load_run_config(path: str | Path | None, overrides: Sequence[str] = (), notes: list[str] | None = None,
                    sources: dict[str, str] | None = None) -> RunConfig:
    """Read a YAML run config (None = all defaults) and apply dotted overrides.

    `notes`: when given (the command line), a value the overrides did not set is adapted where it conflicts with
    the rest, and a line saying so is appended: `optim.warmup_steps` (the YAML's or the default) becomes
    `train.steps - 1` in a run shorter than it (`train.steps=5` for a smoke test). A value the overrides set is
    never adapted. Without `notes` nothing is, and `RunConfig.validate` names the conflict and its fix.

    `sources`: when given, filled with where each dotted key's value came from, `yaml` or `override` (a key it
    does not name has its default), an adapted value saying so (`format_config` prints them).
    """
    values = read_config_file(path) if path is not None else {}
    layers = [("yaml", copy.deepcopy(values))]
    for override in overrides:
        apply_override(values, override)
        layers.append(("override", {}))
        apply_override(layers[-1][1], override)
    run = _build(RunConfig, values, "")
    origins = key_origins(layers)
    given = {override.split("=", 1)[0].strip() for override in overrides}
    if notes is not None and "optim.warmup_steps" not in given and run.optim.warmup_steps >= run.train.steps >= 1:
        origin = origins.get("optim.warmup_steps", "default")
        source = f"from {Path(path).name}" if origin == "yaml" else "the default"
        notes.append(f"optim.warmup_steps: {run.optim.warmup_steps} ({source}) → {run.train.steps - 1}, to fit "
                     f"train.steps={run.train.steps}; give optim.warmup_steps to choose")
        origins["optim.warmup_steps"] = f"{origin} ({run.optim.warmup_steps}), shortened to train.steps - 1"
        run.optim.warmup_steps = run.train.steps - 1
    if sources is not None:
        sources.update(origins)
    return run


# ---- the resolved config, shown and saved ------------------------------------------------------------------------


def flatten(values: dict[str, Any], prefix: str = "", keep_empty: bool = False) -> dict[str, Any]:
    """Nested sections as the dotted keys overrides name: {"train": {"steps": 3}} → {"train.steps": 3}. A mapping's
    entries are keys of their own (`model.overrides.num_layers`); an empty mapping has none, or is kept as one `{}`
    value with `keep_empty` (to show it)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and (value or not keep_empty):
            flat |= flatten(value, f"{prefix}{key}.", keep_empty)
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def key_origins(layers: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, str]:
    """Dotted key → the label of the last of `layers` (label, nested values; applied in order) that gives it."""
    origins: dict[str, str] = {}
    for label, values in layers:
        origins |= dict.fromkeys(flatten(values, keep_empty=True), label)
    return origins


def format_value(value: Any) -> str:
    """`value` as an override writes it (YAML flow style: `null`, `[a, 0.5]`, `{num_layers: 2}`)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), sort_keys=False).strip()
    return text.removesuffix("...").strip()  # a plain scalar's document end marker


def format_config(run: RunConfig, sources: dict[str, str]) -> str:
    """One line per key of `run`, `train.steps: 300  # yaml`: the dotted key and value as an override gives them,
    and where the value came from (`sources`, filled by `load_run_config` or `resume_run_config`; `default` for a
    key they do not name)."""
    rows = [(f"{key}: {format_value(value)}", sources.get(key, "default"))
            for key, value in flatten(run.to_dict(), keep_empty=True).items()]
    width = max((len(text) for text, _ in rows if len(text) <= 56), default=0)
    return "\n".join(f"{text.ljust(width)}  # {source}" for text, source in rows)


RUN_CONFIG_HEADER = """\
# The resolved run config: every key (docs/config.md says what each means), written by megatron_bdgemma's trainer.
# `examples/pretrain_bdgemma.py --config FILE` reads it back; give another checkpoint.save to run it again elsewhere.
"""


def config_yaml(values: dict[str, Any]) -> str:
    """`values` (`RunConfig.to_dict`) as a YAML run config file that `load_run_config` reads back to the same run."""
    return RUN_CONFIG_HEADER + yaml.safe_dump(values, sort_keys=False, width=120)
