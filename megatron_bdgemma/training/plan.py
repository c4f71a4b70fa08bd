"""Plan a run on paper: the configured model built on the meta device at its parallel layout, memory per rank.

    plan = plan_run(run, gpus=8)          # in a process of its own: it creates a fake world of `gpus` ranks
    print(format_plan(plan, gpu_gib=80))

`plan_run` starts a torch.distributed world of `gpus` ranks with the "fake" backend (collectives do nothing, no
other process exists), sets up megatron's TP / EP / DP groups as rank 0 of that world, and builds `BDGemmaModel` for
rank 0 on the meta device: shapes and counts are exactly what that rank would hold, and nothing is allocated.
Without pipeline parallelism every rank holds the same shapes (EP ranks hold different experts of the same size).

Bytes per rank (Megatron DDP with `grad_reduce_in_fp32`, Adam):
- weights: 2 B/param with `train.bf16`, else 4; frozen parameters (the router) included;
- gradients: 4 B per trainable param (the fp32 main-grad buffer);
- optimizer: exp_avg + exp_avg_sq (8 B) plus an fp32 master copy with bf16 weights (4 B), per trainable param;
  with the distributed optimizer divided by the data-parallel size that reduces the parameter (dense: DP, experts:
  expert-DP = world / (EP × ETP)).
Activations of one micro-batch (an estimate, elements per token per layer times bytes, /TP under SP):
- encoder stream S = data.seq_length tokens (with grad), canvas stream R = canvas_length (SFT, one scored block) or
  S (pretraining, all blocks) tokens (pass 2, with grad); pass 1 runs under no_grad and keeps only its signal;
- without recompute a layer keeps ≈ 4H + 2·q + 2·kv (attention: norm, qkv, core out, proj) + 3H + 3I (dense GeGLU)
  + 6H + k·(2H + 3I_e) (router, norms, k dispatched copies through the expert GeGLU) elements per token, plus the
  attention probabilities: heads × keys per query in fp32 for `eager`, one query chunk's only for `block_sparse` /
  `flex` (recomputed in backward);
- with `train.recompute=selective`, `core_attn` drops the probabilities, `moe` the experts' fc1/activation (the
  dispatched inputs and outputs stay), `shared_experts` the dense GeGLU's inner tensors;
- with `train.recompute=full` a layer keeps its input (H) and the encoder K/V the decoder reads, and one layer's
  working set is live during its backward;
- logits: fp32 [tokens, V/TP] times 3 (logits, softmax, gradient) for the encoder and the canvas, and for pass 1's
  soft embedding, over all tokens, or over `objective.loss_chunk_size` tokens at a time when set.
Peak = weights + gradients + optimizer + activations; it fits when peak <= 90% of the GPU memory (the rest: CUDA
context, NCCL buffers, allocator fragmentation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_bdgemma.training.config import RunConfig

GIB = 2**30
USABLE_FRACTION = 0.9


@dataclass
class ParamCounts:
    dense: int = 0
    """Non-expert parameters other than the embedding (attention, dense MLP, norms, router, self-conditioning)."""
    expert: int = 0
    embedding: int = 0
    frozen: int = 0
    """Of the above, those without gradients (the router)."""

    @property
    def total(self) -> int:
        return self.dense + self.expert + self.embedding


@dataclass
class Plan:
    gpus: int
    tp: int
    ep: int
    etp: int
    dp: int
    expert_dp: int
    bf16: bool
    recompute: str | None
    loss_chunk: int | None
    attention_impl: str
    micro_batch: int
    encoder_tokens: int
    canvas_tokens: int
    per_rank: ParamCounts
    params_total: int
    params_active_per_token: int
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes_distributed: int
    optimizer_bytes_plain: int
    activation_bytes: dict[str, int]
    distributed_optimizer: bool

    def peak_bytes(self, distributed_optimizer: bool | None = None) -> int:
        dist_opt = self.distributed_optimizer if distributed_optimizer is None else distributed_optimizer
        optimizer = self.optimizer_bytes_distributed if dist_opt else self.optimizer_bytes_plain
        return self.weight_bytes + self.grad_bytes + optimizer + sum(self.activation_bytes.values())


def _count(model: torch.nn.Module) -> ParamCounts:
    counts = ParamCounts()
    embedding = model.shared_embedding_or_output_weight()
    for param in model.parameters():
        n = param.numel()
        if param is embedding:
            counts.embedding += n
        elif not getattr(param, "allreduce", True):  # megatron marks expert-parallel parameters allreduce=False
            counts.expert += n
        else:
            counts.dense += n
        if not param.requires_grad:
            counts.frozen += n
    return counts


def _activation_bytes(run: RunConfig, config, tp: int, tokens_s: int, tokens_r: int) -> dict[str, int]:
    b, act = run.train.micro_batch_size, 2 if run.train.bf16 else 4
    h, layers, sp = config.hidden_size, config.num_layers, tp if config.sequence_parallel else 1
    heads = config.num_attention_heads
    q = heads * max(config.kv_channels, config.global_kv_channels)
    kv = max(config.num_query_groups * config.kv_channels, config.num_global_query_groups * config.global_kv_channels)
    k, ie, i = config.moe_router_topk, config.moe_ffn_hidden_size, config.ffn_hidden_size
    selective = run.train.recompute_modules if run.train.recompute == "selective" else []
    attention, dense, experts = 4 * h + 2 * q + 2 * kv, 3 * h + 3 * i, 6 * h + k * (2 * h + 3 * ie)
    if "shared_experts" in selective:  # keeps the dense branch's input and output only
        dense = 2 * h
    if "moe" in selective:  # keeps the dispatched inputs and the experts' outputs
        experts = 6 * h + k * 2 * h
    per_token_layer = attention + dense + experts
    tokens = (tokens_s + tokens_r) * b
    kv_cache = tokens_s * b * 2 * kv // tp * act * layers  # encoder K/V the canvas attends to (per TP shard)
    if "core_attn" in selective:
        probs_per_layer = 0
    elif config.attention_impl == "eager":
        probs_per_layer = b * heads // tp * (tokens_s * tokens_s + tokens_r * (tokens_s + tokens_r)) * 4 * 2
    else:
        chunk = config.attention_chunk_size
        probs_per_layer = b * heads // tp * chunk * (tokens_s + tokens_r) * 4 * 2
    one_layer = tokens * per_token_layer * act // sp + probs_per_layer
    if run.train.recompute == "full":
        layers_bytes = layers * tokens * h * act // sp + kv_cache + one_layer
    else:
        layers_bytes = layers * one_layer
    vocab_local = config.vocab_size // tp
    chunk = run.objective.loss_chunk_size
    # fp32 logits, softmax and gradient: one chunk at a time, or all of AR (S), canvas (R) and pass 1's signal (R).
    logit_rows = min(chunk, tokens) if chunk else (tokens_s + 2 * tokens_r) * b
    return dict(layers=layers_bytes, logits=3 * logit_rows * vocab_local * 4)


def plan_run(run: RunConfig, gpus: int) -> Plan:
    """Build rank 0's model on the meta device in a fake world of `gpus` ranks and count what it holds."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_bdgemma.model import BDGemmaModel
    from megatron_bdgemma.runtime.cpu_support import apply_cpu_support
    from megatron_bdgemma.training.trainer import build_model_config

    p = run.parallel
    if p.pp > 1:
        raise ValueError("parallel.pp > 1: the plan does not count per pipeline stage yet (stage layers, the 1F1B "
                         "micro-batches in flight); plan at pp=1")
    run.validate(gpus)
    apply_cpu_support()
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=gpus)
    etp = p.etp or p.tp
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tp, expert_model_parallel_size=p.ep, expert_tensor_parallel_size=etp,
        create_gloo_process_groups=False,
    )
    config = build_model_config(run)
    config.use_cpu_initialization, config.perform_initialization = True, False
    with torch.device("meta"):
        model = BDGemmaModel(config, backend="local")  # the TE spec holds the same parameters
    counts = _count(model)
    dp, expert_dp = gpus // p.tp, gpus // (p.ep * etp)
    dense_tp_split = sum(
        prm.numel() for prm in model.parameters()
        if getattr(prm, "allreduce", True) and getattr(prm, "tensor_model_parallel", False)
    )
    # Whole-model counts from this rank's shards: TP-split dense tensors (embedding included) times TP, replicated
    # ones once, experts times EP × ETP.
    params_total = dense_tp_split * p.tp + (counts.dense + counts.embedding - dense_tp_split) + counts.expert * p.ep * etp
    experts_total = counts.expert * p.ep * etp
    # Active per token: everything but the experts a token is not routed to (the tied embedding counts: the LM head
    # multiplies every token by all of it).
    active = params_total - experts_total + experts_total * config.moe_router_topk // config.num_moe_experts
    weight_b = 2 if run.train.bf16 else 4
    trainable_dense = counts.dense + counts.embedding - counts.frozen
    optimizer_b = 8 + (4 if run.train.bf16 else 0)
    tokens_s = run.data.seq_length
    score = run.objective.score or ("one_block" if run.data.mode == "sft" else "all_blocks")
    tokens_r = config.canvas_length if score == "one_block" else tokens_s
    parallel_state.destroy_model_parallel()
    return Plan(
        gpus=gpus, tp=p.tp, ep=p.ep, etp=etp, dp=dp, expert_dp=expert_dp, bf16=run.train.bf16,
        recompute=run.train.recompute, loss_chunk=run.objective.loss_chunk_size, attention_impl=config.attention_impl,
        micro_batch=run.train.micro_batch_size, encoder_tokens=tokens_s, canvas_tokens=tokens_r, per_rank=counts,
        params_total=params_total, params_active_per_token=active,
        weight_bytes=counts.total * weight_b, grad_bytes=(counts.total - counts.frozen) * 4,
        optimizer_bytes_distributed=trainable_dense * optimizer_b // dp + counts.expert * optimizer_b // expert_dp,
        optimizer_bytes_plain=(trainable_dense + counts.expert) * optimizer_b,
        activation_bytes=_activation_bytes(run, config, p.tp, tokens_s, tokens_r),
        distributed_optimizer=run.optim.distributed_optimizer,
    )


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def format_plan(plan: Plan, gpu_gib: float) -> str:
    """The per-rank table, the fit verdict and the RESULT line (last)."""
    c = plan.per_rank
    bytes_per = 2 if plan.bf16 else 4
    rows = [
        f"layout: {plan.gpus} GPUs = TP {plan.tp} x DP {plan.dp} (PP 1); experts: EP {plan.ep} x ETP {plan.etp}, "
        f"expert-DP {plan.expert_dp}; {'bf16' if plan.bf16 else 'fp32'} weights; recompute {plan.recompute or 'none'}; "
        f"loss chunk {plan.loss_chunk or 'off (full logits)'}; attention {plan.attention_impl}",
        f"micro-batch: {plan.micro_batch} x (encoder S={plan.encoder_tokens} + canvas R={plan.canvas_tokens}) tokens",
        "",
        "| per rank (all ranks alike) | parameters | weights GiB | grads GiB | optimizer GiB, distributed | optimizer GiB, plain |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    opt_b = 8 + (4 if plan.bf16 else 0)
    for name, n, frozen, dp in (("dense", c.dense, c.frozen, plan.dp), ("expert", c.expert, 0, plan.expert_dp),
                                ("embedding", c.embedding, 0, plan.dp)):
        trainable = n - frozen
        rows.append(f"| {name} | {n:,} | {_gib(n * bytes_per)} | {_gib(trainable * 4)} | "
                    f"{_gib(trainable * opt_b // dp)} | {_gib(trainable * opt_b)} |")
    rows.append(f"| **total** | {c.total:,} | {_gib(plan.weight_bytes)} | {_gib(plan.grad_bytes)} | "
                f"{_gib(plan.optimizer_bytes_distributed)} | {_gib(plan.optimizer_bytes_plain)} |")
    act = plan.activation_bytes
    rows += [
        "",
        f"activations, one micro-batch: layers {_gib(act['layers'])} GiB + logits/loss {_gib(act['logits'])} GiB",
    ]
    usable = gpu_gib * USABLE_FRACTION
    for label, dist_opt in (("distributed optimizer", True), ("plain optimizer", False)):
        peak = plan.peak_bytes(dist_opt) / GIB
        verdict = "fits" if peak <= usable else "does NOT fit"
        rows.append(f"peak per rank, {label}: {peak:.2f} GiB -> {verdict} in {gpu_gib:g} GiB "
                    f"(usable {usable:.1f} GiB = {USABLE_FRACTION:.0%})")
    rows.append(f"RESULT params_total={plan.params_total} params_active_per_token={plan.params_active_per_token} "
                f"peak_gib_per_rank={plan.peak_bytes() / GIB:.2f}")
    return "\n".join(rows)
