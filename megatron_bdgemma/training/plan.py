"""Plan a run on paper: the configured model built on the meta device at its parallel layout, memory per rank.

    plan = plan_run(run, gpus=8)          # in a process of its own: it creates a fake world of `gpus` ranks
    print(format_plan(plan, gpu_gib=80))

`plan_run` starts, for each pipeline stage, a torch.distributed world of `gpus` ranks with the "fake" backend
(collectives do nothing, no other process exists), sets up megatron's TP / CP / PP / EP / DP groups as the stage's
first rank (megatron orders ranks tp-cp-ep-dp-pp, so stage i starts at rank i · gpus / pp), and builds that rank's
model chunks (`build_model_chunks`, as the trainer does) on the meta device: shapes and counts are exactly what that
rank would hold, and nothing is allocated. The ranks of one stage hold the same
shapes (EP ranks hold different experts of the same size); stages differ by their layers (Megatron's even split into
pp × vpp chunks, chunk c on stage c mod pp), the embedding and self-conditioning module (first stage) and the final
norm and the tied copy of the embedding, the LM head (last stage). The plan reports every stage and the peak is the
worst one.

Bytes per rank (Megatron DDP with `grad_reduce_in_fp32`, Adam):
- weights: 2 B/param with `train.bf16`, else 4; frozen parameters (the router) included; on the first stage, the
  vision tower and embedder (`megatron_bdgemma.vision`) in the dtype they are stored in, counted in the parameters
  (whole-model counts then equal transformers' whole model, but the folded `per_expert_scale`);
- gradients: 4 B per trainable param (the fp32 main-grad buffer; the vision tower only with `train_vision`);
- optimizer: exp_avg + exp_avg_sq (8 B) plus an fp32 master copy with bf16 weights (4 B), per trainable param;
  with the distributed optimizer divided by the size of the group megatron shards it over, read from megatron's own
  choice (`ProcessGroupCollection.setup_process_groups_for_optimizer`, which `get_megatron_optimizer` calls): dense
  state over DP × CP (`intra_dp_cp_group`, world / (TP × PP)), experts over expert-DP (world / (EP × ETP × PP),
  the CP ranks included).
Activations (an estimate, elements per token per layer times bytes, /TP under SP), per micro-batch in flight:
- encoder stream S = data.seq_length tokens (with grad), canvas stream R = canvas_length (SFT, one scored block;
  packed rows: one block per record, bounded by S and data.max_records_per_row, every row's under PP) or S
  (pretraining, all blocks) tokens (pass 2, with grad);
  pass 1 runs under no_grad and keeps only its signal;
- context parallelism (`parallel.cp` = N, docs/design.md §14) splits both streams: a rank holds S/N encoder and R/N
  canvas tokens, so every per-token term below (layers, logits, pipeline tensors) is /N, while its queries read all
  keys (eager probabilities (S/N)·S + (R/N)·(S + R) per head; a block-sparse chunk's are not divided). It adds
  the gathered K/V: per layer the whole sequence's K and V, (S + R)·2·g·d elements (g = the layer type's KV
  heads / TP, d its head dim; K=V layers gather V too), the encoder's and pass 2's canvas's, kept until backward
  (pass 1's are freed with its layer); CP does not divide it (`context_parallel_bytes`, which also gives the
  collectives' bytes per layer type: forward all-gathers receive (N − 1)/N · (S + R per canvas pass) · 2·g·d,
  backward reduce-scatters send (N − 1)/N · (S + R) · 2·g·d);
- pass 2's attention keys, `[encoder K ; canvas K]` and V's, concatenated per layer: (S + R)·2·g·d elements (at any
  N the whole sequence's, gathered), kept for backward as the core attention's input (eager, flex, and block-sparse
  when it recomputes its chunks; otherwise block-sparse keeps its calls' K/V copies, about as many);
- without recompute a layer keeps ≈ 4H + 2·q + 2·kv (attention: norm, qkv, core out, proj) + 3H + 3I (dense GeGLU)
  + 6H + k·(2H + 3I_e) (router, norms, k dispatched copies through the expert GeGLU) elements per token, plus the
  attention probabilities: heads × keys per query in fp32 for `eager`, one query chunk's only for `block_sparse` /
  `flex` (recomputed in backward);
- with `train.recompute=selective`, `core_attn` drops the probabilities, `moe` the experts' fc1/activation (the
  dispatched inputs and outputs stay), `shared_experts` the dense GeGLU's inner tensors;
- with `train.recompute=full` a layer keeps its input (H) and the encoder K/V the decoder reads (S·2·g·d for the
  layer's type; under CP the gathered ones, whole S), and one layer's working set (with its gathered and
  concatenated K/V) is live during its backward;
- logits: fp32 [tokens, V/TP] times 3 (logits, softmax, gradient) for the encoder and the canvas (the last stage),
  and for pass 1's soft embedding (the first stage), over all tokens, or over `objective.loss_chunk_size` tokens at
  a time when set; once, not per micro-batch in flight (the working set of the stage's head);
- micro-batches in flight under the training schedule (Megatron's warmup count + 1, `_in_flight`): 1 without PP;
  stage i of pp holds min(pp - i, m) of the step's m micro-batches under 1F1B; interleaved (VPP) 2·(pp - i - 1) +
  (vpp - 1)·pp + 1 model-chunk micro-batches of L / (pp·vpp) layers each (at most vpp·m). Full recompute keeps each
  in-flight layer's input and encoder K/V and one layer's working set;
- pipeline tensors: each micro-batch in flight keeps the `[(S + R)/N, B, H]` tensor it received (not on the first
  stage) and the one it sent (not on the last; with VPP both everywhere, an upper bound); with self-conditioning the
  first stage keeps pass 1's final hidden `[R/N, B, H]` of all m micro-batches for pass 2 (docs/design.md §8).
Peak = weights + gradients + optimizer + activations of the worst stage; it fits when peak <= 90% of the GPU memory
(the rest: CUDA context, NCCL buffers, allocator fragmentation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_bdgemma.config import FULL, BDGemmaConfig
from megatron_bdgemma.diffusion.packing import canvas_blocks_bound
from megatron_bdgemma.training.config import RunConfig
from megatron_bdgemma.vision import is_carried

GIB = 2**30
USABLE_FRACTION = 0.9


@dataclass
class ParamCounts:
    dense: int = 0
    """Non-expert parameters other than the embedding (attention, dense MLP, norms, router, self-conditioning)."""
    expert: int = 0
    embedding: int = 0
    frozen: int = 0
    """Of the dense ones, those without gradients (the router)."""
    vision: int = 0
    """The vision tower and embedder (first stage; replicated over TP)."""
    vision_frozen: int = 0
    """Of those, the ones without gradients (all of them unless `train_vision`)."""

    @property
    def total(self) -> int:
        return self.dense + self.expert + self.embedding + self.vision

    @property
    def trainable(self) -> int:
        return self.total - self.frozen - self.vision_frozen


@dataclass
class StagePlan:
    """What one rank of a pipeline stage holds (every stage at pp = 1)."""

    stage: int
    layers: list[list[int]]
    """Per model chunk (one, or one per virtual stage), the global layer numbers (1-based) it builds."""
    params: ParamCounts
    in_flight: int
    """Micro-batches whose activations the training schedule holds at once (model-chunk micro-batches under VPP)."""
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes_distributed: int
    optimizer_bytes_plain: int
    activation_bytes: dict[str, int]
    gathered_kv_bytes: int = 0
    """Of `activation_bytes["layers"]`: the K/V gathered over the context-parallel group and kept (0 at cp = 1)."""

    def peak_bytes(self, distributed_optimizer: bool) -> int:
        optimizer = self.optimizer_bytes_distributed if distributed_optimizer else self.optimizer_bytes_plain
        return self.weight_bytes + self.grad_bytes + optimizer + sum(self.activation_bytes.values())


@dataclass
class Plan:
    gpus: int
    tp: int
    pp: int
    vpp: int | None
    ep: int
    etp: int
    cp: int
    dp: int
    """Data-parallel size, world / (TP × PP × CP): the micro-batches of a step spread over it."""
    dp_cp: int
    """Ranks the distributed optimizer shards dense state over: megatron's DP × CP group (`intra_dp_cp_group`)."""
    expert_dp: int
    """Ranks it shards expert state over: megatron's expert-DP group, world / (EP × ETP × PP), CP ranks included."""
    bf16: bool
    recompute: str | None
    loss_chunk: int | None
    attention_impl: str
    micro_batch: int
    microbatches: int
    """Per step and data-parallel rank."""
    encoder_tokens: int
    canvas_tokens: int
    stages: list[StagePlan]
    params_total: int
    """The whole model's parameters, the vision tower included (transformers' count but the folded tensors)."""
    params_active_per_token: int
    """What a text token runs through: all but the routed experts it is not sent to and the vision tower (which runs
    once per image, not per token; Gemma 4's "A4B" counts it out too)."""
    distributed_optimizer: bool
    canvas_note: str = ""
    """Of packed rows (`canvas_note`): what `canvas_tokens` and `microbatches` are."""
    context_parallel: dict[str, dict[str, int]] | None = None
    """`context_parallel_bytes` of one micro-batch (all rows) per layer type, when cp > 1."""
    layer_counts: dict[str, int] | None = None
    """Layers of each type in the model."""

    def peak_stage(self, distributed_optimizer: bool | None = None) -> StagePlan:
        dist_opt = self.distributed_optimizer if distributed_optimizer is None else distributed_optimizer
        return max(self.stages, key=lambda s: s.peak_bytes(dist_opt))

    def peak_bytes(self, distributed_optimizer: bool | None = None) -> int:
        """The worst stage's peak per rank."""
        dist_opt = self.distributed_optimizer if distributed_optimizer is None else distributed_optimizer
        return self.peak_stage(dist_opt).peak_bytes(dist_opt)


def _is_expert(name: str) -> bool:
    """A routed expert's parameter (by name: megatron marks them `allreduce=False` only under EP or ETP != TP)."""
    return ".mlp.experts." in name


def _count(chunks: list[torch.nn.Module]) -> ParamCounts:
    counts = ParamCounts()
    for model in chunks:
        # The word embedding on the first stage, its tied copy (the LM head) on the last, None in between.
        embedding = model.shared_embedding_or_output_weight()
        for name, param in model.named_parameters():
            n = param.numel()
            if is_carried(name):
                counts.vision += n
                counts.vision_frozen += 0 if param.requires_grad else n
                continue
            if param is embedding:
                counts.embedding += n
            elif _is_expert(name):
                counts.expert += n
            else:
                counts.dense += n
            if not param.requires_grad:
                counts.frozen += n
    return counts


def _vision_bytes(chunks: list[torch.nn.Module]) -> int:
    """Bytes of the vision tensors the chunks hold, in their stored dtype: parameters and persistent buffers (the
    first stage's; none without a vision tower)."""
    return sum(tensor.numel() * tensor.element_size()
               for chunk in chunks for name, tensor in chunk.state_dict().items() if is_carried(name))


def _kv_width(config: BDGemmaConfig, layer_type: str, tp: int) -> int:
    """K and V elements per position of one layer of `layer_type` on one TP rank: 2·g·d, g its KV heads / TP (TP
    splits whole groups), d its head dim. A K=V layer (`global_k_eq_v`) counts its V too: the attention's V is a
    tensor of its own (the normalised raw key; K is also weighted and rotated), gathered and kept apart from K."""
    groups = config.num_global_query_groups if layer_type == FULL else config.num_query_groups
    return 2 * (groups // tp) * config.head_dim_of(layer_type)


def context_parallel_bytes(
    config: BDGemmaConfig, seq_len: int, canvas_len: int, cp: int, tp: int, dtype_bytes: int
) -> dict[str, dict[str, int]]:
    """Per layer type of `config.layer_types`: the bytes one rank's context-parallel collectives move for one layer
    and one sequence (one micro-batch row) in a training step, and the gathered K/V it keeps until backward
    (docs/design.md §14).

    With N = `cp`, w = 2·g·d the layer's K and V elements per position on one TP rank (g its KV heads / `tp`, d its
    head dim; K=V layers gather V too) and a stream of L positions split over the N ranks:

    - `all_gather` (forward, received): (N − 1)/N · L · w · `dtype_bytes` per gather, for the encoder (L =
      `seq_len`, once: both canvas passes reuse the gathered encoder K/V) and for each canvas pass (L =
      `canvas_len`: pass 1 when `config.self_conditioning`, and pass 2);
    - `reduce_scatter` (backward, sent): as many for each gather with gradient, the encoder's (once: the canvas
      passes' dK/dV for the gathered encoder K/V add into its gradient before its one reduce-scatter) and pass 2's
      canvas K/V; pass 1 runs without gradient;
    - `gathered` (kept from forward to backward): the whole sequence's K/V, (`seq_len` + `canvas_len`) · w ·
      `dtype_bytes`, the encoder's and pass 2's (pass 1's are freed when its layer ends).

    All zero at `cp` = 1: there is no gather, and the layer's own K/V are the activation estimate's per-token terms.
    """
    if cp == 1:
        return {t: dict(gathered=0, all_gather=0, reduce_scatter=0) for t in dict.fromkeys(config.layer_types)}
    passes = 2 if config.self_conditioning else 1
    out = {}
    for layer_type in dict.fromkeys(config.layer_types):
        per_position = _kv_width(config, layer_type, tp) * dtype_bytes
        received = (cp - 1) * per_position // cp  # of one position of a stream split over the cp ranks
        out[layer_type] = dict(
            gathered=(seq_len + canvas_len) * per_position,
            all_gather=(seq_len + passes * canvas_len) * received,
            reduce_scatter=(seq_len + canvas_len) * received,
        )
    return out


def _activation_bytes(run: RunConfig, config: BDGemmaConfig, tokens_s: int, tokens_r: int, *,
                      layers: list[list[int]], in_flight: int, first: bool, last: bool,
                      microbatches: int) -> tuple[dict[str, int], int]:
    """One stage's activations under the training schedule: `in_flight` micro-batches of one model chunk's layers
    each (`layers`: the global layer numbers per chunk; the worst chunk counts), the LM head's working set where the
    stage has one (`first`: pass 1's signal, `last`: the losses), and the tensors pipeline parallelism adds; and, of
    the layers' bytes, those of the K/V gathered over the context-parallel group."""
    p = run.parallel
    tp, cp = p.tp, p.cp
    b, act = run.train.micro_batch_size, 2 if run.train.bf16 else 4
    h, sp = config.hidden_size, tp if config.sequence_parallel else 1
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
    # Under CP the rank holds S/N encoder and R/N canvas positions; its queries read every key.
    s, r = tokens_s // cp, tokens_r // cp
    tokens = (s + r) * b
    if "core_attn" in selective:
        probs_per_layer = 0
    elif config.attention_impl == "eager":
        probs_per_layer = b * heads // tp * (s * tokens_s + r * (tokens_s + tokens_r)) * 4 * 2
    else:
        chunk = config.attention_chunk_size
        probs_per_layer = b * heads // tp * chunk * (tokens_s + tokens_r) * 4 * 2
    one_layer = tokens * per_token_layer * act // sp + probs_per_layer
    cp_bytes = context_parallel_bytes(config, tokens_s, tokens_r, cp, tp, act)
    gathered = [[b * cp_bytes[config.layer_type(n)]["gathered"] for n in chunk] for chunk in layers]
    # Pass 2's [encoder K ; canvas K] and V's, per layer: the core attention's input, whole S + R at any CP.
    concatenated = [[b * (tokens_s + tokens_r) * _kv_width(config, config.layer_type(n), tp) * act for n in chunk]
                    for chunk in layers]
    # The encoder K/V the canvas attends to (per TP shard; under CP the gathered whole sequence, so CP does not
    # divide it): a full-recompute layer's output besides its hidden states.
    encoder_kv = [sum(tokens_s * b * _kv_width(config, config.layer_type(n), tp) * act for n in chunk)
                  for chunk in layers]
    chunk_layers = max(len(chunk) for chunk in layers)
    if run.train.recompute == "full":
        # The widest layer's working set, with its gathered and concatenated K/V (both ∝ its K/V width).
        one_layer_gathered = max(max(chunk, default=0) for chunk in gathered)
        one_layer_concatenated = max(max(chunk, default=0) for chunk in concatenated)
        layers_bytes = (in_flight * (chunk_layers * (tokens * h * act // sp) + max(encoder_kv))
                        + one_layer + one_layer_gathered + one_layer_concatenated)
        gathered_bytes = (in_flight * max(encoder_kv) if cp > 1 else 0) + one_layer_gathered
    else:
        gathered_bytes = in_flight * max(sum(chunk) for chunk in gathered)
        layers_bytes = (in_flight * (chunk_layers * one_layer + max(sum(chunk) for chunk in concatenated))
                        + gathered_bytes)
    # fp32 logits, softmax and gradient: one chunk at a time, or all rows of the heads this stage runs: AR (S) and
    # canvas (R) losses on the last stage, pass 1's signal (R) on the first; under CP the rank's shard of each.
    logit_rows = (s + r) * b * last + r * b * (first and config.self_conditioning)
    chunk = run.objective.loss_chunk_size
    logit_rows = min(chunk, logit_rows) if chunk else logit_rows
    # Between stages each micro-batch in flight keeps the [(S + R)/N, B, H] tensor it received (but on the first
    # stage) and the one it sent (but on the last); every chunk of an interleaved schedule may do both (an upper bound).
    ends = 0 if p.vpp else first + last
    pipeline = in_flight * (2 - ends) * (s + r) * b * h * act // sp
    if p.pp > 1 and first and config.self_conditioning:  # pass 1's final hidden [R/N, B, H] of every micro-batch
        pipeline += microbatches * r * b * h * act // sp
    activations = dict(layers=layers_bytes, logits=3 * logit_rows * config.vocab_size // tp * 4, pipeline=pipeline)
    return activations, gathered_bytes


def canvas_tokens(run: RunConfig, block: int, tokens_s: int, score: str) -> int:
    """The canvas rows R of one micro-batch row: one block for SFT, the whole sequence for pretraining. A packed SFT
    row (`data.packing`) decodes one block per record with a response (every block under `all_blocks`), each such
    record laying out at least one block of the row's S tokens, and at most `data.max_records_per_row` records: R is
    `canvas_blocks_bound` blocks, the most a row can need at PP = 1 and every row's fixed canvas under pipeline
    parallelism. A row of pretraining documents (`data.reset_document_masks`) needs up to one block more per document
    after its first (partial last blocks): bounded by the documents per row (1 unpacked, else
    `data.max_records_per_row`); without that cap the plan takes R = S, as without document masks (`canvas_note`)."""
    d = run.data
    if d.reset_document_masks:
        cap = d.max_records_per_row if d.packing else 1
        if cap is None:
            return tokens_s
        return block * canvas_blocks_bound(tokens_s, block, all_blocks=True, max_records_per_row=cap, documents=True)
    if d.packing:
        return block * canvas_blocks_bound(tokens_s, block, all_blocks=score == "all_blocks",
                                           max_records_per_row=d.max_records_per_row)
    return block if score == "one_block" else tokens_s


def canvas_note(run: RunConfig) -> str:
    """What the micro-batch line says about R and the micro-batch count of packed rows (empty when unpacked)."""
    d, fixed = run.data, run.parallel.pp > 1
    bound = "every row's fixed canvas" if fixed else "the most canvas a row can need"
    if d.reset_document_masks and d.packing and d.max_records_per_row is None:
        return (" (document rows: planned as whole windows, R = S; each document after a window's first may add a "
                "block, data.max_records_per_row bounds it)")
    if d.reset_document_masks:
        return (f" (document rows: R is {bound}, with at most {d.max_records_per_row or 1} document(s) per row; a "
                "window of more takes more rows, so the micro-batch count varies)")
    if d.packing:
        return (f" (packed rows: R is {bound}; a step's rows, and so its micro-batches, are at most its records)")
    return ""


def _in_flight(microbatches: int, config) -> int:
    """Micro-batches (model-chunk micro-batches under VPP) the 1F1B schedule of this rank holds at once: its warmup
    forwards plus the one before the first backward (all of them when the warmup covers every micro-batch).
    Megatron's own count: stage i of pp holds min(pp - i, m); the interleaved schedule 2·(pp - i - 1) + (vpp - 1)·
    group + 1 (tests/test_plan.py runs the schedules and counts)."""
    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    total, all_in_warmup, warmup, _ = get_pp_rank_microbatches(
        microbatches, config.virtual_pipeline_model_parallel_size or 1, config.microbatch_group_size_per_vp_stage
    )
    return total if all_in_warmup else warmup + 1


def plan_run(run: RunConfig, gpus: int) -> Plan:
    """For each pipeline stage, build the model of that stage's first rank on the meta device in a fake world of
    `gpus` ranks and count what it holds. Needs a process without a torch.distributed world."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_bdgemma.runtime.cpu_support import apply_cpu_support
    from megatron_bdgemma.training.trainer import build_model_chunks, build_model_config

    p = run.parallel
    run.validate(gpus)
    if dist.is_initialized():
        raise RuntimeError("plan_run starts a fake world of its own; call it in a process without torch.distributed")
    apply_cpu_support()
    etp = p.etp or p.tp
    dp = run.data_parallel_size(gpus)
    microbatches = run.num_microbatches(gpus)
    tokens_s = run.data.seq_length
    score = run.score()
    weight_b, optimizer_b = 2 if run.train.bf16 else 4, 8 + (4 if run.train.bf16 else 0)
    stages, params_total, experts_total, vision_total = [], 0, 0, 0
    for stage in range(p.pp):
        # Megatron orders ranks tp-cp-ep-dp-pp: pipeline stage i starts at rank i · gpus / pp.
        dist.init_process_group("fake", store=FakeStore(), rank=stage * gpus // p.pp, world_size=gpus)
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
            virtual_pipeline_model_parallel_size=p.vpp, expert_model_parallel_size=p.ep,
            expert_tensor_parallel_size=etp, context_parallel_size=p.cp, create_gloo_process_groups=False,
        )
        assert parallel_state.get_pipeline_model_parallel_rank() == stage
        config = build_model_config(run)
        config.use_cpu_initialization, config.perform_initialization = True, False
        with torch.device("meta"):
            chunks = build_model_chunks(config, "local", p.vpp)  # the TE spec holds the same parameters
        counts = _count(chunks)
        # The groups megatron's distributed optimizer shards over (`get_megatron_optimizer` asks this helper):
        # dense state over DP × CP, expert state over expert-DP.
        groups = ProcessGroupCollection.setup_process_groups_for_optimizer(None, chunks, use_gloo_process_groups=False)
        dp_cp, expert_dp = groups["intra_dp_cp_group"].size(), groups["intra_expt_dp_group"].size()
        first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
        dense_tp_split = sum(
            prm.numel() for chunk in chunks for name, prm in chunk.named_parameters()
            if not _is_expert(name) and getattr(prm, "tensor_model_parallel", False)
        )
        # Whole-model counts from this rank's shards: TP-split dense tensors (embedding included) times TP,
        # replicated ones once, experts times EP × ETP; the last stage's tied copy of the embedding not again.
        params_total += (dense_tp_split * p.tp + (counts.dense + counts.embedding + counts.vision - dense_tp_split)
                         + counts.expert * p.ep * etp - (counts.embedding * p.tp if last and not first else 0))
        experts_total += counts.expert * p.ep * etp
        vision_total += counts.vision  # first stage, replicated over TP
        trainable_dense = counts.trainable - counts.expert
        tokens_r = canvas_tokens(run, config.canvas_length, tokens_s, score)
        in_flight = _in_flight(microbatches, config)
        layers = [[layer.layer_number for layer in chunk.decoder.layers] for chunk in chunks]
        activations, gathered_kv = _activation_bytes(
            run, config, tokens_s, tokens_r, layers=layers, in_flight=in_flight, first=first, last=last,
            microbatches=microbatches,
        )
        stages.append(StagePlan(
            stage=stage, layers=layers, params=counts, in_flight=in_flight,
            weight_bytes=(counts.total - counts.vision) * weight_b + _vision_bytes(chunks),
            grad_bytes=counts.trainable * 4,
            optimizer_bytes_distributed=(trainable_dense * optimizer_b // dp_cp
                                         + counts.expert * optimizer_b // expert_dp),
            optimizer_bytes_plain=(trainable_dense + counts.expert) * optimizer_b,
            activation_bytes=activations, gathered_kv_bytes=gathered_kv,
        ))
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    # Active per token: everything but the experts a token is not routed to (the tied embedding counts: the LM head
    # multiplies every token by all of it) and the vision tower (it encodes images, not tokens).
    active = (params_total - vision_total - experts_total
              + experts_total * config.moe_router_topk // config.num_moe_experts)
    b, act = run.train.micro_batch_size, 2 if run.train.bf16 else 4
    context_parallel = None if p.cp == 1 else {
        layer_type: {name: b * n for name, n in per_row.items()}
        for layer_type, per_row in context_parallel_bytes(config, tokens_s, tokens_r, p.cp, p.tp, act).items()
    }
    return Plan(
        gpus=gpus, tp=p.tp, pp=p.pp, vpp=p.vpp, ep=p.ep, etp=etp, cp=p.cp, dp=dp, dp_cp=dp_cp, expert_dp=expert_dp,
        bf16=run.train.bf16, recompute=run.train.recompute, loss_chunk=run.objective.loss_chunk_size,
        attention_impl=config.attention_impl, micro_batch=run.train.micro_batch_size, microbatches=microbatches,
        encoder_tokens=tokens_s, canvas_tokens=tokens_r, stages=stages, params_total=params_total,
        params_active_per_token=active, distributed_optimizer=run.optim.distributed_optimizer,
        canvas_note=canvas_note(run), context_parallel=context_parallel,
        layer_counts={t: config.layer_types.count(t) for t in dict.fromkeys(config.layer_types)},
    )


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _layer_ranges(stage: StagePlan) -> str:
    return ", ".join(f"{chunk[0]}-{chunk[-1]}" if len(chunk) > 1 else f"{chunk[0]}" for chunk in stage.layers if chunk)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f}"


def _context_parallel_rows(plan: Plan) -> list[str]:
    """The CP collectives and the gathered K/V per layer type, per layer and over the model's layers, for one
    micro-batch of a step (`context_parallel_bytes`; under PP each stage moves its own layers' share)."""
    rows = [
        "",
        f"context parallelism, MiB per rank and micro-batch ({plan.micro_batch} x (S + R)) of a step: forward "
        "all-gathers of K and V (the encoder's once, each canvas pass's), backward reduce-scatters of dK/dV (the "
        "encoder's, pass 2's), and the whole sequence's K/V a layer keeps until backward (the encoder's and pass 2's; "
        "full recompute keeps the encoder's only)",
        "",
        "| layer type | layers | all-gather received, per layer | reduce-scatter sent, per layer | "
        "gathered K/V, per layer |",
        "|---|---:|---:|---:|---:|",
    ]
    totals = dict(all_gather=0, reduce_scatter=0, gathered=0)
    for layer_type, per_layer in plan.context_parallel.items():
        layers = plan.layer_counts[layer_type]
        rows.append(f"| {layer_type} | {layers} | {_mib(per_layer['all_gather'])} | "
                    f"{_mib(per_layer['reduce_scatter'])} | {_mib(per_layer['gathered'])} |")
        for name in totals:
            totals[name] += layers * per_layer[name]
    rows.append(f"| **all layers** | {sum(plan.layer_counts.values())} | {_mib(totals['all_gather'])} | "
                f"{_mib(totals['reduce_scatter'])} | {_mib(totals['gathered'])} |")
    return rows


def format_plan(plan: Plan, gpu_gib: float) -> str:
    """The per-rank table (per stage under pipeline parallelism), the fit verdict and the RESULT line (last)."""
    bytes_per = 2 if plan.bf16 else 4
    opt_b = 8 + (4 if plan.bf16 else 0)
    cp = f"CP {plan.cp} x " if plan.cp > 1 else ""
    layout = (f"TP {plan.tp} x {cp}DP {plan.dp} (PP 1)" if plan.pp == 1 else
              f"TP {plan.tp} x {cp}PP {plan.pp} x DP {plan.dp}" + (f" (VPP {plan.vpp})" if plan.vpp else ""))
    rows = [
        f"layout: {plan.gpus} GPUs = {layout}; experts: EP {plan.ep} x ETP {plan.etp}, "
        f"expert-DP {plan.expert_dp}; {'bf16' if plan.bf16 else 'fp32'} weights; recompute {plan.recompute or 'none'}; "
        f"loss chunk {plan.loss_chunk or 'off (full logits)'}; attention {plan.attention_impl}",
        f"micro-batch: {plan.micro_batch} x (encoder S={plan.encoder_tokens} + canvas R={plan.canvas_tokens}) tokens"
        + plan.canvas_note,
        "",
    ]
    if plan.context_parallel:
        rows[1:2] = [
            rows[1] + f"; CP {plan.cp}: each rank holds S/{plan.cp} = {plan.encoder_tokens // plan.cp} + "
            f"R/{plan.cp} = {plan.canvas_tokens // plan.cp} of them; the distributed optimizer shards dense state "
            f"over DP x CP = {plan.dp_cp}",
            *_context_parallel_rows(plan),
        ]
    peak = plan.peak_stage()
    if plan.pp > 1:
        rows += [
            f"{plan.microbatches} micro-batches per step; 1F1B{' interleaved' if plan.vpp else ''} holds the "
            "activations of the micro-batches in flight" + (" (model-chunk micro-batches)" if plan.vpp else ""),
            "",
            "| stage | layers | parameters | in flight | activations GiB: layers + logits/loss + pipeline | "
            "peak GiB, distributed | peak GiB, plain |",
            "|---|---|---:|---:|---|---:|---:|",
        ]
        for st in plan.stages:
            act = st.activation_bytes
            rows.append(f"| {st.stage} | {_layer_ranges(st)} | {st.params.total:,} | {st.in_flight} | "
                        f"{_gib(act['layers'])} + {_gib(act['logits'])} + {_gib(act['pipeline'])} | "
                        f"{_gib(st.peak_bytes(True))} | {_gib(st.peak_bytes(False))} |")
        rows.append("")
    c = peak.params
    heading = "per rank (all ranks alike)" if plan.pp == 1 else f"per rank of stage {peak.stage} (the peak)"
    rows += [
        f"| {heading} | parameters | weights GiB | grads GiB | optimizer GiB, distributed | optimizer GiB, plain |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, n, frozen, dp in (("dense", c.dense, c.frozen, plan.dp_cp), ("expert", c.expert, 0, plan.expert_dp),
                                ("embedding", c.embedding, 0, plan.dp_cp)):
        trainable = n - frozen
        rows.append(f"| {name} | {n:,} | {_gib(n * bytes_per)} | {_gib(trainable * 4)} | "
                    f"{_gib(trainable * opt_b // dp)} | {_gib(trainable * opt_b)} |")
    if c.vision:  # in its stored dtype
        trainable = c.vision - c.vision_frozen
        rows.append(f"| vision | {c.vision:,} | {_gib(peak.weight_bytes - (c.total - c.vision) * bytes_per)} | "
                    f"{_gib(trainable * 4)} | {_gib(trainable * opt_b // plan.dp_cp)} | {_gib(trainable * opt_b)} |")
    rows.append(f"| **total** | {c.total:,} | {_gib(peak.weight_bytes)} | {_gib(peak.grad_bytes)} | "
                f"{_gib(peak.optimizer_bytes_distributed)} | {_gib(peak.optimizer_bytes_plain)} |")
    act = peak.activation_bytes
    rows.append("")
    gathered = f" (of which gathered K/V {_gib(peak.gathered_kv_bytes)} GiB)" if plan.cp > 1 else ""
    if plan.pp == 1:
        rows.append(f"activations, one micro-batch: layers {_gib(act['layers'])} GiB{gathered} + "
                    f"logits/loss {_gib(act['logits'])} GiB")
    elif gathered:
        rows.append(f"activations of stage {peak.stage}: layers {_gib(act['layers'])} GiB{gathered}")
    usable = gpu_gib * USABLE_FRACTION
    for label, dist_opt in (("distributed optimizer", True), ("plain optimizer", False)):
        worst = plan.peak_stage(dist_opt)
        where = "" if plan.pp == 1 else f" (stage {worst.stage})"
        peak_gib = worst.peak_bytes(dist_opt) / GIB
        verdict = "fits" if peak_gib <= usable else "does NOT fit"
        rows.append(f"peak per rank{where}, {label}: {peak_gib:.2f} GiB -> {verdict} in {gpu_gib:g} GiB "
                    f"(usable {usable:.1f} GiB = {USABLE_FRACTION:.0%})")
    rows.append(f"RESULT params_total={plan.params_total} params_active_per_token={plan.params_active_per_token} "
                f"peak_gib_per_rank={plan.peak_bytes() / GIB:.2f}")
    return "\n".join(rows)
