"""Progress lines, TensorBoard scalars and the model-FLOP count of a block-diffusion training step."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch.distributed as dist

from megatron_bdgemma.config import FULL, BDGemmaConfig
from megatron_bdgemma.training.config import RunConfig


def active_params_per_token(config: BDGemmaConfig) -> int:
    """Matmul parameters a token passes through: attention, dense GeGLU, top-k experts, router, LM head."""
    h, total = config.hidden_size, 0
    for layer_type in config.layer_types:
        d, g = (config.global_kv_channels, config.num_global_query_groups) if layer_type == FULL else (config.kv_channels, config.num_query_groups)
        kv = g * d * (1 if layer_type == FULL and config.global_k_eq_v else 2)
        total += h * (config.num_attention_heads * d + kv) + config.num_attention_heads * d * h
        total += 3 * h * config.ffn_hidden_size
        total += config.moe_router_topk * 3 * h * config.moe_ffn_hidden_size + h * config.num_moe_experts
    return total + h * config.vocab_size


@dataclass(frozen=True)
class StepFlops:
    """Matmul FLOPs of one training step: each pass's forward, and the backward of the passes with gradient."""

    encode: float
    pass1: float
    pass2: float
    backward: float

    @property
    def total(self) -> float:
        return self.encode + self.pass1 + self.pass2 + self.backward


def training_step_flops(
    config: BDGemmaConfig,
    *,
    tokens: int,
    canvas_tokens: int,
    encoder_pairs: dict[str, int],
    canvas_pairs: dict[str, int],
    ar_only: bool = False,
) -> StepFlops:
    """Every matrix product of one `training_forward` + backward (or of an AR-only step), attention included.

    `tokens` = B·S encoder positions, `canvas_tokens` = B·R decoded canvas positions; `*_pairs[t]` = query-key pairs
    one layer of type t scores over the batch (B·S·S and B·R·(S+R) for a dense grid; the mask's allowed entries
    for the work that counts). A forward product of m×k by k×n costs 2mkn. Per position and layer: the Q/K(/V)
    and output projections, the dense GeGLU, the router, top-k GeGLU experts; per pair and head 4d (scores and
    P·V); the tied LM head per position of the encoder (AR logits) and of each canvas pass; with self-conditioning
    the signal GeGLU in both passes and the soft embedding `softmax(pass-1 logits) @ E` in pass 2. Pass 1 runs
    without gradient. Backward costs twice the forward (input and weight gradients) except where one side has
    none: a frozen router and the soft embedding (its probabilities carry no gradient) cost once.
    """
    h, heads = config.hidden_size, config.num_attention_heads

    def stack(positions: int, pairs: dict[str, int]) -> tuple[float, float]:
        """(forward FLOPs of the layers without the router, router forward FLOPs)."""
        dense = router = 0
        for layer_type in config.layer_types:
            d, g = ((config.global_kv_channels, config.num_global_query_groups) if layer_type == FULL
                    else (config.kv_channels, config.num_query_groups))
            kv = g * d * (2 if config.has_v_proj(layer_type) else 1)
            per_position = h * (heads * d + kv) + heads * d * h + 3 * h * config.ffn_hidden_size
            per_position += config.moe_router_topk * 3 * h * config.moe_ffn_hidden_size
            dense += 2 * positions * per_position + 4 * pairs[layer_type] * heads * d
            router += 2 * positions * h * config.num_moe_experts
        return float(dense), float(router)

    router_backward = 1 if config.freeze_router else 2
    head = 2.0 * h * config.vocab_size
    encoder, encoder_router = stack(tokens, encoder_pairs)
    encoder += tokens * head
    if ar_only:
        return StepFlops(encoder + encoder_router, 0.0, 0.0, 2 * encoder + router_backward * encoder_router)
    canvas, canvas_router = stack(canvas_tokens, canvas_pairs)
    canvas += canvas_tokens * head
    soft = 0.0
    if config.self_conditioning:
        canvas += 6.0 * canvas_tokens * h * config.ffn_hidden_size
        soft = canvas_tokens * head
    pass1 = canvas + canvas_router if config.self_conditioning else 0.0
    backward = 2 * (encoder + canvas) + router_backward * (encoder_router + canvas_router) + soft
    return StepFlops(encoder + encoder_router, pass1, canvas + canvas_router + soft, backward)


def model_flops_per_step(config: BDGemmaConfig, run: RunConfig) -> float:
    """Model FLOPs of one global batch for the progress line: `training_step_flops` of full-length rows.

    The attention pairs are those of a row without padding: causal (windowed on sliding layers) over the encoder;
    each decoded canvas block sees the clean keys before it (the window anchored at its start) and its own block.
    SFT decodes one block, counted at the end of the row (the most keys it can see); pretraining decodes every block.
    """
    s, block = run.data.seq_length, config.canvas_length
    one_block = (run.objective.score or ("one_block" if run.data.mode == "sft" else "all_blocks")) == "one_block"
    blocks = [(max(s - block, 0), min(block, s))] if one_block else [(a, min(block, s - a)) for a in range(0, s, block)]
    encoder_pairs, canvas_pairs = {}, {}
    for layer_type in set(config.layer_types):
        window = config.window_of(layer_type) or s + 1
        encoder_pairs[layer_type] = sum(min(q + 1, window) for q in range(s))
        canvas_pairs[layer_type] = sum(width * (min(start, window - 1) + width) for start, width in blocks)
    per_row = training_step_flops(config, tokens=s, canvas_tokens=sum(width for _, width in blocks),
                                  encoder_pairs=encoder_pairs, canvas_pairs=canvas_pairs)
    return per_row.total * run.train.global_batch_size


class MetricsLogger:
    """Rank 0 prints a progress line per `log_interval` and writes TensorBoard scalars when configured."""

    def __init__(self, run: RunConfig, flops_per_step: float) -> None:
        self.run, self.flops_per_step = run, flops_per_step
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.start = self.last = time.perf_counter()
        self.start_step: int | None = None
        self.tokens = 0
        self.writer = None
        if self.rank0 and run.logging.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError(
                    "logging.tensorboard_dir is set but TensorBoard is not installed: pip install 'megatron_bdgemma[tensorboard]'"
                ) from error

            self.writer = SummaryWriter(run.logging.tensorboard_dir)

    def info(self, message: str) -> None:
        if self.rank0:
            print(message, flush=True)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        if self.start_step is None:
            self.start_step = step - 1
        self.tokens += metrics["tokens"]
        if self.writer:
            for key in ("diffusion", "ar", "grad_norm", "lr"):
                self.writer.add_scalar(f"train/{key}", metrics[key], step)
        interval = self.run.train.log_interval
        if not (step % interval == 0 or step == self.run.train.steps or step == self.start_step + 1):
            return
        now = time.perf_counter()
        done = step - self.start_step
        per_step = (now - self.start) / done
        tflops = self.flops_per_step / per_step / self.world / 1e12
        eta = per_step * (self.run.train.steps - step)
        self.info(
            f"step {step:5d}/{self.run.train.steps} | diffusion {metrics['diffusion']:.4f} | ar {metrics['ar']:.4f} | "
            f"lr {metrics['lr']:.2e} | grad norm {metrics['grad_norm']:.3f} | "
            f"{self.tokens / (now - self.start):,.0f} tok/s | {tflops:.3f} model TFLOP/s/rank | ETA {eta:.0f}s"
        )

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.info(f"eval  {step:5d} | diffusion {metrics['eval_diffusion']:.4f} | ar {metrics['eval_ar']:.4f}")
        if self.writer:
            for key, value in metrics.items():
                self.writer.add_scalar(f"eval/{key}", value, step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
