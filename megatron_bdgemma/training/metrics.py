"""Progress lines, TensorBoard scalars and the model-FLOP estimate of a block-diffusion training step."""

from __future__ import annotations

import time

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


def model_flops_per_step(config: BDGemmaConfig, run: RunConfig) -> float:
    """Model FLOPs of one global batch, counting all three passes.

    Per token, a forward costs 2·N and forward+backward 6·N (N = `active_params_per_token`). The encoder pass runs
    with gradient over S tokens, decode pass 1 forward-only and pass 2 with gradient over the decoded canvas (one
    block per example for SFT, the whole response for pretraining). Attention score FLOPs are left out (small next to
    the MoE at these lengths); the number is an estimate for MFU, not a measurement.
    """
    n = active_params_per_token(config)
    s = run.data.seq_length
    canvas = config.canvas_length if (run.objective.score or ("one_block" if run.data.mode == "sft" else "all_blocks")) == "one_block" else s
    passes = 6 * s + (2 + 6 if config.self_conditioning else 6) * canvas
    return float(n) * passes * run.train.global_batch_size


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
