"""The training loop on Megatron-Core: DDP + Megatron optimizer + LR schedule + pipeline schedule + checkpoints.

One step reads like a list (torchtitan's `train_step`):
  1. this DP rank's micro-batches of the step (global sample indices → deterministic noise, any DP layout);
  2. global token counts (all micro-batches, all DP ranks), so each micro-batch loss is already globally normalised;
  3. forward/backward of every micro-batch through Megatron's schedule (encode → pass 1 → pass 2 → losses); under
     pipeline parallelism a forward-only schedule runs encode → pass 1 first, then 1F1B runs encode → pass 2
     (`_pipeline_first_pass`, docs/design.md §8);
  4. `finalize_model_grads`; the stop check (`training/stopping.py`: one all-reduce over every rank of its signal flag
     and its losses and gradient norm, before any parameter changes: a non-finite value skips the update or raises);
     clip, optimizer step, LR step;
  5. log; evaluate (3. forward only on the held-out split, `evaluate`); checkpoint; after a signal, save and exit.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_bdgemma.config import PRESETS, BDGemmaConfig
from megatron_bdgemma.conversion.hf_checkpoint import HFCheckpoint, hf_model_config, load_hf_weights
from megatron_bdgemma.conversion.megatron_checkpoint import (
    hf_source,
    model_config_from_dict,
    model_config_to_dict,
    read_extra,
)
from megatron_bdgemma.diffusion import DiffusionBatch, NoisedCanvas, noise_batch
from megatron_bdgemma.diffusion.packing import PackedBatch, PackedCanvas, pack_canvas
from megatron_bdgemma.model import BDGemmaModel, TrainingOutput
from megatron_bdgemma.runtime.distributed import init_distributed
from megatron_bdgemma.spec import Backend
from megatron_bdgemma.training.checkpointing import load_checkpoint, save_checkpoint
from megatron_bdgemma.training.config import ModelSection, RunConfig
from megatron_bdgemma.training.data import StepData, build_step_data
from megatron_bdgemma.training.metrics import MetricsLogger, records_flops, require_logging_backends
from megatron_bdgemma.training.resume import check_resume, read_checkpoint_extra, read_training_extra
from megatron_bdgemma.training.run_dir import RunDirectory, claim_run_directory
from megatron_bdgemma.training.stopping import RunFinished, RunStopped, StopCheck, Verdict


@dataclass
class MicroBatch:
    batch: DiffusionBatch | PackedBatch
    noised: NoisedCanvas | PackedCanvas
    """The corrupted canvas; of packed rows (`data.packing`), the records' canvases placed on the rows."""
    first_pass_hidden: torch.Tensor | None = None
    """Under pipeline parallelism, on the first stage: decode pass 1's final-normed canvas hidden (from the last)."""
    flops: float = 0.0
    """Model FLOPs of training its records (`records_flops`)."""

    @property
    def canvas(self) -> NoisedCanvas:
        return self.noised.noised if isinstance(self.noised, PackedCanvas) else self.noised


@dataclass
class TrainState:
    run: RunConfig
    config: BDGemmaConfig
    model: list[DistributedDataParallel]
    """This rank's model chunks: one, or one per virtual pipeline stage (`parallel.vpp`)."""
    optimizer: Any
    scheduler: OptimizerParamScheduler
    data: StepData
    step: int = 0
    skipped: list[int] = field(default_factory=list)
    """Steps of the run skipped for non-finite values (`train.skip_nonfinite_steps`), kept in its checkpoints."""
    run_dir: RunDirectory | None = None
    """`checkpoint.save`, held (locked) by rank 0 until `release_run_directory`."""
    consumed_tokens: int | None = 0
    """Data tokens read by the steps so far, all data-parallel ranks (None: resumed from a checkpoint that predates
    the count)."""
    hf_source: dict[str, Any] | None = None
    """The HF model the weights came from (`megatron_checkpoint.hf_source`): `model.hf`'s, or the one recorded in
    `checkpoint.load` / `init_from`; saved with every checkpoint so an export writes back its token ids."""

    def release_run_directory(self) -> None:
        if self.run_dir is not None:
            self.run_dir.release()


def build_model_config(run: RunConfig) -> BDGemmaConfig:
    p, on_gpu = run.parallel, torch.cuda.is_available()
    megatron = dict(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.etp or p.tp,
        context_parallel_size=p.cp,
        sequence_parallel=p.tp > 1 if p.sequence_parallel is None else p.sequence_parallel,
        moe_token_dispatcher_type=p.dispatcher or (
            "alltoall" if on_gpu or (p.ep > 1 and run.batch_shapes_vary()) else "allgather"),
        bf16=run.train.bf16,
        params_dtype=torch.bfloat16 if run.train.bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if run.train.bf16 else torch.float32,
        use_cpu_initialization=not on_gpu,
        recompute_granularity=run.train.recompute,
        recompute_method="uniform" if run.train.recompute == "full" else None,
        recompute_num_layers=1 if run.train.recompute == "full" else None,
        recompute_modules=run.train.recompute_modules if run.train.recompute == "selective" else None,
    )
    if p.vpp:
        # Upstream NVIDIA/Megatron-LM#1450 (open; #750): with the default batched p2p, a PP = 2 stage's steady-state
        # forward and backward sends go to one peer in an order the peer does not post its receives in, so the
        # interleaved schedule swaps activations and gradients of the same shape silently (any step with more
        # micro-batches than pp). Overlapped unbatched p2p, Megatron-LM's default for interleaved runs, keeps the two
        # directions on different groups. tests/test_packed_pipeline.py runs VPP = 2 at 4 micro-batches against one
        # process, and checks that the batched default still differs.
        megatron |= dict(overlap_p2p_comm=True, batch_p2p_comm=False)
    if run.train.fp8:  # megatron-core rejects any fp8 field without Transformer Engine, so set them only when asked
        megatron |= dict(fp8=run.train.fp8, fp8_recipe=run.train.fp8_recipe, fp8_param=run.train.fp8_param)
    source = run.checkpoint.load or run.checkpoint.init_from
    if source:
        # A checkpoint (saved here or converted from HF) carries its architecture; preset and HF config are not read.
        extra = read_extra(source)
        if "model_config" not in extra:
            raise ValueError(f"{source}: the checkpoint does not record its model config (extra['model_config'])")
        return model_config_from_dict(extra["model_config"], **(megatron | run.model.overrides))
    if run.model.hf:  # the shape needs config.json only (tools/plan.py plans from it); weights load in `setup`
        hf = Path(run.model.hf)
        if not (hf / "config.json").is_file():
            # transformers would take a missing path for a hub repo id and fail on its form
            preset = run.model.preset if run.model.preset != ModelSection.preset else f"<one of {sorted(PRESETS)}>"
            raise ValueError(
                f"model.hf={hf} {'has no config.json' if hf.is_dir() else 'does not exist on this machine'} (model.hf "
                f"is a local Hugging Face model directory; nothing is downloaded); to plan or train from the "
                f"architecture alone, use model.hf=null model.preset={preset}"
            )
        return hf_model_config(hf, **(megatron | run.model.overrides))
    if run.model.preset not in PRESETS:
        raise ValueError(f"model.preset {run.model.preset!r} is unknown; choose from {sorted(PRESETS)}")
    return PRESETS[run.model.preset](**(megatron | run.model.overrides))


def build_model_chunks(config: BDGemmaConfig, backend: Backend, vpp: int | None) -> list[BDGemmaModel]:
    """This pipeline rank's model chunks: one, or one per virtual pipeline stage (`parallel.vpp`); the embedding
    lives on the first chunk of the first stage, the LM head (the tied copy) on the last chunk of the last."""
    return [
        BDGemmaModel(
            config, backend=backend, vp_stage=vp_stage,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        )
        for vp_stage in (range(vpp) if vpp else [None])
    ]


def setup(run: RunConfig) -> TrainState:
    """Distributed groups, the run directory (claimed: see `run_dir.py`), model (from a preset or HF weights), DDP,
    optimizer, schedule, data; resume if asked."""
    p = run.parallel
    init_distributed(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, vpp=p.vpp, cp=p.cp, seed=run.train.seed)
    run.validate(dist.get_world_size())
    require_logging_backends(run)
    if run.checkpoint.load:
        extra = read_training_extra(run.checkpoint.load, "checkpoint.load")
        step = int(extra["step"])
        changes = check_resume(run, extra["run"], step, extra.get("launch_dir"))  # refuses a train.steps before `step`
        if step == run.train.steps:
            if dist.get_rank() == 0:
                print(f"run already at step {step} of {step} ({run.checkpoint.load}): nothing to train; give "
                      f"train.steps > {step} to continue it", flush=True)
            raise RunFinished(step)
        if changes and dist.get_rank() == 0:
            print(f"resuming {run.checkpoint.load} with changes to its run config:\n  " + "\n  ".join(changes), flush=True)
    elif run.checkpoint.init_from:
        read_checkpoint_extra(run.checkpoint.init_from, "checkpoint.init_from")  # named before anything is built
    if run.train.fp8 and not torch.cuda.is_available():
        raise ValueError("train.fp8 needs a GPU with Transformer Engine; this machine has no CUDA device")
    run_dir = (claim_run_directory(run.checkpoint.save, run.checkpoint.load, run.to_dict()) if run.checkpoint.save
               else None)
    try:
        state = _build(run)
    except BaseException:
        if run_dir is not None:
            run_dir.release()
        raise
    state.run_dir = run_dir
    return state


def _build(run: RunConfig) -> TrainState:
    """What `setup` builds once the run directory is held."""
    p = run.parallel
    config = build_model_config(run)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=run.optim.distributed_optimizer
    )
    chunks, source = [], None
    for module in build_model_chunks(config, run.model.backend, p.vpp):
        if run.model.hf and not run.checkpoint.load:  # a resumed run's weights come from its checkpoint
            source = HFCheckpoint(run.model.hf)
            load_hf_weights(module, source, config)
        if torch.cuda.is_available():
            module.cuda()
        # Megatron buckets only the first chunk's gradients (the others reduce at the end of the schedule).
        chunks.append(DistributedDataParallel(config, ddp_config, module, disable_bucketing=bool(chunks)))
    o = run.optim
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.beta1,
            adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.clip_grad, bf16=run.train.bf16,
            use_distributed_optimizer=o.distributed_optimizer,
        ),
        chunks,
    )
    # A resumed run's schedule is this config's, positioned at the checkpoint's step: Megatron's
    # --override-opt_param-scheduler (check_resume prints each change to it as such).
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=run.train.steps, lr_decay_style=o.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=run.train.steps, wd_incr_style="constant",
        override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False,
    )
    # Megatron's schedule calls these around the micro-batch loop.
    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    state = TrainState(run, config, chunks, optimizer, scheduler, build_step_data(run, config))
    modules = [chunk.module for chunk in chunks]
    if run.checkpoint.load:  # a training run: resume exactly (with this config's schedule, from its step)
        extra = load_checkpoint(run.checkpoint.load, modules, optimizer)
        scheduler.load_state_dict(extra["scheduler"])
        state.step = int(extra["step"])
        state.skipped = list(extra.get("skipped_steps", []))
        state.consumed_tokens = extra.get("consumed_tokens")
        state.hf_source = extra.get("converted_from")
    elif run.checkpoint.init_from:  # weights only; optimizer, schedule and step start fresh
        state.hf_source = load_checkpoint(run.checkpoint.init_from, modules).get("converted_from")
    elif source is not None:
        state.hf_source = hf_source(source)
    return state


def _microbatches(state: TrainState, step: int, split: str = "train") -> list[MicroBatch]:
    o, vocab = state.run.objective, state.config.vocab_size
    score = state.run.score()
    out = []
    for batch, sample_indices in state.data.microbatches(step, split):
        # Packed rows: each record is noised alone, keyed by its own sample index, then placed (docs/design.md §13).
        packed = isinstance(batch, PackedBatch)
        records = batch.records if packed else batch
        noised = noise_batch(
            records, sample_indices=sample_indices, step=step, seed=state.run.train.seed,
            vocab_size=vocab, score=score, kind=o.kind, mask_id=o.mask_id, t_min=o.t_min, t_max=o.t_max,
            self_conditioning_p=o.self_conditioning_p, variant=o.variant, weight_clip=o.weight_clip,
        )
        canvas = pack_canvas(batch, noised, num_canvas_blocks=state.data.packing.canvas_blocks) if packed else noised
        out.append(MicroBatch(batch, canvas, flops=records_flops(state.config, records, noised.block_ids)))
    return out


def _global_counts(microbatches: list[MicroBatch], device: torch.device) -> torch.Tensor:
    """[scored canvas tokens, AR pairs, data tokens, row tokens, model FLOPs] over every micro-batch of every DP rank,
    then the most row tokens any one DP rank has (known before any forward): the counts `diffusion_loss` / `ar_loss`
    return, and for the metrics the non-pad positions read, all encoder positions computed (their ratio is the
    packing efficiency), the model FLOPs and the busiest rank's positions (over the mean: the DP balance). The CP
    ranks of a DP rank hold the same whole micro-batches (the model takes each rank's shard), so DP sums them."""
    counts = torch.zeros(5, dtype=torch.float64, device=device)
    for mb in microbatches:
        counts[0] += mb.canvas.scored.sum().item()
        counts[1] += mb.batch.ar_loss_mask.sum().item()
        counts[2] += mb.batch.encoder_valid.sum().item()
        counts[3] += mb.batch.input_ids.numel()
        counts[4] += mb.flops
    busiest = counts[3:4].clone()
    group = parallel_state.get_data_parallel_group()
    dist.all_reduce(counts, group=group)
    dist.all_reduce(busiest, op=dist.ReduceOp.MAX, group=group)
    return torch.cat([counts, busiest]).clamp(min=1.0)


def _forward_step(state: TrainState, counts: torch.Tensor, rescale: float, data: Iterator[MicroBatch], model) -> tuple:
    mb = next(data)
    device = next(model.parameters()).device
    batch, noised, o = mb.batch.to(device), mb.noised.to(device), state.run.objective
    # The images (SFT records with image parts, packed or not): the first stage encodes them, every stage's encoder
    # mask reads their groups.
    options = dict(loss_chunk_size=o.loss_chunk_size, stop_gradient_to_encoder=o.stop_gradient_to_encoder,
                   images=batch.images)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        out = model.module.pipeline_stage_forward(batch, noised, first_pass=False, first_pass_hidden=mb.first_pass_hidden,
                                                  **options)
    else:
        out = model.module.training_forward(batch, noised, **options)

    def loss_func(out: TrainingOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        diffusion = out.diffusion_loss_sum / counts[0].float()
        ar = out.ar_loss_sum / counts[1].float()
        loss = o.diffusion_weight * diffusion + o.ar_weight * ar
        # Already normalised by global counts; the schedule divides by the number of micro-batches and DDP averages
        # over DP ranks, so pre-multiply by both to keep the global token average exact. The reported (logged,
        # evaluated) losses are the unweighted terms, comparable across weightings.
        return loss * rescale, {"diffusion": diffusion.detach(), "ar": ar.detach()}

    return out, loss_func


def _first_pass_step(state: TrainState, hidden: list[torch.Tensor], data: Iterator[MicroBatch], model) -> tuple:
    mb = next(data)
    device = next(model.parameters()).device
    batch = mb.batch.to(device)
    out = model.module.pipeline_stage_forward(batch, mb.noised.to(device), first_pass=True, images=batch.images,
                                              loss_chunk_size=state.run.objective.loss_chunk_size)

    def keep(final_hidden: torch.Tensor) -> tuple[torch.Tensor, dict]:
        hidden.append(final_hidden)
        return torch.zeros((), device=device), {}

    return out, keep


def _pipeline_first_pass(state: TrainState, microbatches: list[MicroBatch], **schedule: Any) -> None:
    """Pipeline parallelism, self-conditioning: encode + decode pass 1 (zero signal, no grad) of every micro-batch
    through a forward-only schedule; the last stage sends the final-normed canvas hidden states to the first, which
    keeps them on the micro-batches for pass 2 (it forms the signal with its copy of the tied embedding)."""
    hidden: list[torch.Tensor] = []
    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=partial(_first_pass_step, state, hidden),
                                    data_iterator=_iterators(state, microbatches), model=state.model, forward_only=True,
                                    **schedule)
    group = parallel_state.get_pipeline_model_parallel_group()
    first, last = parallel_state.get_pipeline_model_parallel_first_rank(), parallel_state.get_pipeline_model_parallel_last_rank()
    if parallel_state.is_pipeline_last_stage():
        dist.send(torch.cat([h.flatten() for h in hidden]).to(state.config.pipeline_dtype), dst=first, group=group)
    elif parallel_state.is_pipeline_first_stage():
        # Every stage holds the same micro-batches, so the first knows each one's canvas length (its shard of it:
        # split over CP, then over TP under sequence parallelism).
        tp = parallel_state.get_tensor_model_parallel_world_size() if state.config.sequence_parallel else 1
        split = tp * parallel_state.get_context_parallel_world_size()
        shapes = [(mb.canvas.canvas_ids.shape[1] // split, mb.canvas.canvas_ids.shape[0], state.config.hidden_size)
                  for mb in microbatches]
        received = torch.empty(sum(math.prod(s) for s in shapes), dtype=state.config.pipeline_dtype,
                               device=next(state.model[0].parameters()).device)
        dist.recv(received, src=last, group=group)
        for mb, part, shape in zip(microbatches, received.split([math.prod(s) for s in shapes]), shapes):
            mb.first_pass_hidden = part.view(shape)


def _iterators(state: TrainState, microbatches: list[MicroBatch]) -> Iterator[MicroBatch] | list[Iterator[MicroBatch]]:
    """The schedule's data iterator; the interleaved schedule takes one per model chunk (each reads every micro-batch)."""
    return [iter(microbatches) for _ in state.model] if len(state.model) > 1 else iter(microbatches)


def _forward_backward(state: TrainState, microbatches: list[MicroBatch], counts: torch.Tensor, *, forward_only: bool,
                      what: str) -> torch.Tensor:
    """The step's forward (and backward unless `forward_only`) of `microbatches` through Megatron's schedule: under
    pipeline parallelism with self-conditioning the forward-only pass-1 schedule first. Returns this rank's [diffusion,
    ar] losses (each normalised by `counts`) summed over its micro-batches: zeros off the last pipeline stage
    (`_over_ranks` makes them the step's)."""
    run, device = state.run, counts.device
    dp = parallel_state.get_data_parallel_world_size()
    # Under pipeline parallelism stages pass [encoder hidden ; canvas hidden] of each micro-batch, at one shape.
    pipeline = parallel_state.get_pipeline_model_parallel_world_size() > 1
    lengths = {(mb.batch.seq_len, mb.canvas.canvas_ids.shape[1]) for mb in microbatches}
    if pipeline and len(lengths) > 1:
        raise ValueError(f"{what}: micro-batches of (encoder, canvas) lengths {sorted(lengths)}; pipeline stages "
                         "exchange one shape, so the data must pad every batch to data.seq_length")
    seq_length = microbatches[0].batch.seq_len + (microbatches[0].canvas.canvas_ids.shape[1] if pipeline else 0)
    schedule = dict(num_microbatches=len(microbatches), seq_length=seq_length, micro_batch_size=run.train.micro_batch_size)
    if pipeline and state.config.self_conditioning:
        _pipeline_first_pass(state, microbatches, **schedule)
    losses = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, state, counts, len(microbatches) * dp),
        data_iterator=_iterators(state, microbatches), model=state.model, forward_only=forward_only, **schedule,
    )
    # Only the last pipeline stage has losses.
    return (torch.stack([sum(l["diffusion"] for l in losses), sum(l["ar"] for l in losses)]).to(device) if losses
            else torch.zeros(2, device=device))


def _over_ranks(losses: torch.Tensor) -> torch.Tensor:
    """The step's [diffusion, ar] losses on every rank from each rank's own (`_forward_backward`): summed over the DP
    ranks and the CP ranks (each holds its shard's part), and sent from the last pipeline stage, where the losses
    live."""
    totals = losses.clone()
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(totals, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return totals


def _local_grad_norm(state: TrainState) -> torch.Tensor:
    """The L2 norm of this rank's gradient buffers after `finalize_model_grads`, for the stop check: non-finite when a
    gradient this rank computed, or one it holds reduced, is (megatron's global grad norm, which the log reports, is
    then too). One pass over the buffers, as megatron's own `check_for_nan_in_grad` makes."""
    norms = [buffer.grad_data.norm() for chunk in state.model
             for buffer in chunk.buffers + chunk.expert_parallel_buffers]
    device = next(state.model[0].parameters()).device
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=device)


def train_step(state: TrainState, stop: StopCheck | None = None) -> tuple[dict[str, float], Verdict]:
    """One step: its metrics (`skipped` for a step skipped for non-finite values; `seconds` it took, `tokens` it
    read) and the stop check's verdict (`stop`: the run's; by default one without signal handling). Raises
    `NonFiniteError` before any update."""
    started = time.perf_counter()
    step = state.step
    stop = stop or StopCheck(state.run.train.skip_nonfinite_steps, state.skipped, state.run.checkpoint.save)
    microbatches = _microbatches(state, step)
    device = next(state.model[0].parameters()).device
    counts = _global_counts(microbatches, device)
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    losses = _forward_backward(state, microbatches, counts, forward_only=False, what=f"step {step}")
    verdict = stop.agree(step + 1, losses, _local_grad_norm(state))  # steps count from 1 in logs and checkpoints
    totals = _over_ranks(losses)
    if verdict.skipped:  # no update, no LR step: the parameters and optimizer state stay the previous step's
        grad_norm = float("nan")
    else:  # megatron's fp32 / bf16 optimizers (no grad scaler) always report success: the check above is the guard
        _, grad_norm, _ = state.optimizer.step()
        state.scheduler.step(increment=1)
    state.step += 1
    tokens, row_tokens, busiest_rank_rows = (int(counts[i].item()) for i in (2, 3, 5))
    if state.consumed_tokens is not None:
        state.consumed_tokens += tokens
    # The losses' .item() waits for the device, so the time is the step's own (Megatron-LM's interval timer).
    metrics = dict(diffusion=totals[0].item(), ar=totals[1].item(), grad_norm=float(grad_norm),
                   lr=state.optimizer.param_groups[0]["lr"], tokens=tokens, row_tokens=row_tokens,
                   busiest_rank_rows=busiest_rank_rows, flops=counts[4].item(),
                   consumed_tokens=state.consumed_tokens,
                   seconds=time.perf_counter() - started)
    return metrics | ({"skipped": True} if verdict.skipped else {}), verdict


@torch.no_grad()
def evaluate(state: TrainState) -> dict[str, float]:
    """Held-out losses of the training step's forward (encode, pass 1, self-conditioned pass 2; the same schedule,
    pipeline included, forward only) over `train.eval_steps` steps of the valid split, each loss normalised by its
    token count over all of them."""
    steps = [_microbatches(state, i, split="valid") for i in range(state.run.train.eval_steps)]
    counts = _global_counts([mb for microbatches in steps for mb in microbatches],
                            next(state.model[0].parameters()).device)
    for chunk in state.model:
        chunk.eval()
    totals = sum(_over_ranks(_forward_backward(state, microbatches, counts, forward_only=True, what=f"eval step {i}"))
                 for i, microbatches in enumerate(steps))
    for chunk in state.model:
        chunk.train()
    return dict(eval_diffusion=totals[0].item(), eval_ar=totals[1].item())


def train(run: RunConfig) -> list[dict[str, float]]:
    """Run (or resume) training; returns the per-step metrics of this process (for tests and scripts), with the
    held-out losses on the steps that evaluate.

    A resumed run already at its `train.steps` says so and ends the process with status 0 (`RunFinished`). Stops
    early (`training/stopping.py`): on SIGTERM, SIGINT or SIGUSR1 after finishing the current step, saving it
    and printing one line on rank 0, by raising `RunStopped` (a `SystemExit` with status `EXIT_STOPPED`); on a
    non-finite loss or gradient by raising `NonFiniteError` before the update (after `train.skip_nonfinite_steps`
    skipped steps)."""
    state = setup(run)
    try:
        return _train(state)
    finally:
        state.release_run_directory()


def _train(state: TrainState) -> list[dict[str, float]]:
    run = state.run
    logger = MetricsLogger(run, state.step, state.run_dir.run_id if state.run_dir else None)
    history = []
    for chunk in state.model:
        chunk.train()
    try:
        with StopCheck(run.train.skip_nonfinite_steps, state.skipped, run.checkpoint.save) as stop:
            while state.step < run.train.steps:
                metrics, verdict = train_step(state, stop)
                history.append(metrics | {"step": state.step})
                if verdict.skipped:
                    logger.info(f"step {state.step}: skipped, non-finite {verdict.skipped}; no update applied "
                                f"({len(state.skipped)} of train.skip_nonfinite_steps={run.train.skip_nonfinite_steps})")
                logger.log_step(state.step, metrics)  # a skipped step gets a row (`skipped: 1`), not a progress line
                if verdict.signal:
                    _stop(state, logger, verdict.signal)
                if run.train.eval_interval and state.step % run.train.eval_interval == 0:
                    held_out = evaluate(state)
                    history[-1] |= held_out
                    logger.log_eval(state.step, held_out)
                last = state.step == run.train.steps
                if run.checkpoint.save and (last or (run.checkpoint.interval and state.step % run.checkpoint.interval == 0)):
                    logger.info(f"saved checkpoint {_save(state)}")
    finally:
        logger.close()
    return history


def _save(state: TrainState) -> Path:
    """Checkpoint the state after `state.step` into `checkpoint.save`; returns its directory."""
    run = state.run
    return save_checkpoint(run.checkpoint.save, state.step, [chunk.module for chunk in state.model], state.optimizer,
                           extra=dict(step=state.step, scheduler=state.scheduler.state_dict(), run=run.to_dict(),
                                      launch_dir=os.getcwd(),  # what the run's relative paths are relative to
                                      model_config=model_config_to_dict(state.config),
                                      skipped_steps=list(state.skipped), consumed_tokens=state.consumed_tokens,
                                      **({"converted_from": state.hf_source} if state.hf_source else {})),
                           keep_last=run.checkpoint.keep_last, optimizer_format=run.checkpoint.optimizer_format)


def _stop(state: TrainState, logger: MetricsLogger, signal_name: str) -> None:
    """Every rank agreed to stop after this step for `signal_name`: save, say so in one line, end the process."""
    save = state.run.checkpoint.save
    if save:
        logger.info(f"stopped by {signal_name} at step {state.step}; saved {_save(state).name}; resume with --load {save}")
    else:
        logger.info(f"stopped by {signal_name} at step {state.step}; not saved: checkpoint.save is not set")
    raise RunStopped(signal_name, state.step)
