"""What a run reports: the progress line, `metrics.jsonl` in its run directory, TensorBoard and Weights & Biases
scalars, and the model-FLOP count of a block-diffusion training step behind its TFLOP/s and MFU.

`metrics.jsonl` (rank 0, in `checkpoint.save`; none without it) holds one JSON object per line: a training row at
step 1, every `train.log_interval` steps, the last step and every skipped step, and an evaluation row after each
evaluation. Every field is a number, or absent (a non-finite loss or gradient norm of a skipped step, the MFU on a
CPU or an unknown card), never null; `device`, the GPU's name, is the one string.

    training row:   step, diffusion, ar, lr, grad_norm, tokens_per_s, packing_efficiency, ms_per_step,
                    consumed_samples, consumed_tokens, peak_memory_gib, model_tflops_per_rank, mfu, device,
                    skipped (1 when skipped)
    evaluation row: step, eval_diffusion, eval_ar, consumed_samples, consumed_tokens

Rates (`tokens_per_s`, `ms_per_step`, TFLOP/s, MFU) are over the steps since the previous row or progress line,
timed around the training step alone (evaluation and checkpoint saves excluded, as Megatron-LM's interval timer
does). Tokens are the data tokens read (every non-pad position of the samples, all data-parallel ranks); the canvas
is made from them, and its compute is in the model TFLOP/s: the model FLOPs of the step's records each at its own
length, padding excluded (`records_flops`), so packed and unpacked runs of the same records count the same work.
`packing_efficiency` is those tokens over the encoder
positions computed (rows × row length, padding included): what packing (`data.packing`) raises. Peak memory is `torch.cuda.max_memory_allocated` on a
GPU and the process's peak resident set size on a CPU, both since the process started.

A resumed run continues the file of the run it resumes: rows after the checkpoint's step, which a run that crashed
or stopped wrote before its next checkpoint, are dropped as the run starts, so the file holds the step sequence of
one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from megatron_bdgemma.config import FULL, BDGemmaConfig
from megatron_bdgemma.diffusion import DiffusionBatch
from megatron_bdgemma.training.config import RunConfig
from megatron_bdgemma.training.run_dir import METRICS, STAGING, save_root

BF16_PEAK_TFLOPS = [
    ("H200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.1),
]
"""Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' datasheets, matched in this order as a
substring of the CUDA device name (`NVIDIA H100 80GB HBM3` is the SXM card)."""

STEP_TIMES_KEPT = 100
"""The ETA is the median of the last this many step times (the process's first step, which pays start-up, excluded)."""


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
    none: a frozen router, a frozen self-conditioning GeGLU (`freeze_self_conditioning`; its input, the signal, still
    has a gradient) and the soft embedding (its probabilities carry no gradient) cost once.
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
    soft = frozen = 0.0
    if config.self_conditioning:
        canvas += 6.0 * canvas_tokens * h * config.ffn_hidden_size
        soft = canvas_tokens * head
        frozen = 6.0 * canvas_tokens * h * config.ffn_hidden_size if config.freeze_self_conditioning else 0.0
    pass1 = canvas + canvas_router if config.self_conditioning else 0.0
    backward = 2 * (encoder + canvas) - frozen + router_backward * (encoder_router + canvas_router) + soft
    return StepFlops(encoder + encoder_router, pass1, canvas + canvas_router + soft, backward)


def records_flops(config: BDGemmaConfig, records: DiffusionBatch, block_ids: Tensor) -> float:
    """Model FLOPs of training `records`, each at its own length: `training_step_flops` of their tokens and decoded
    canvas blocks with the pairs each one's masks allow it alone. Padding is no model work, so a step's count is the
    same packed or unpacked (and `packing_efficiency` says how much more the rows computed).

    Args:
        records: the records laid out alone, one per row (`PackedBatch.records`, or an unpacked micro-batch).
        block_ids: `[N, nb]` each record's decoded blocks (`NoisedCanvas.block_ids` of `records`; -1 = none).

    Encoder: causal pairs, windowed on sliding layers. A decoded block at record position `a` (its first response
    token `p + i·B`) sees the clean keys before it (at most `window − 1` of them on sliding layers) and its own valid
    slots (`w`, fewer than the block in a pretraining record's partial last block).
    """
    B = config.canvas_length
    lengths = records.encoder_valid.sum(dim=1).tolist()
    blocks = [(int(p) + b * B, min(B, int(L) - b * B))
              for p, L, row in zip(records.prefix_lens.tolist(), records.response_lens.tolist(), block_ids.tolist())
              for b in row if 0 <= b and b * B < L]
    encoder_pairs, canvas_pairs = {}, {}
    for layer_type in set(config.layer_types):
        window = config.window_of(layer_type)
        # Σ_{q < n} min(q + 1, W): n(n + 1)/2 up to the window, then W per further query.
        encoder_pairs[layer_type] = sum(
            n * (n + 1) // 2 if window is None or n <= window else window * (window + 1) // 2 + (n - window) * window
            for n in lengths)
        canvas_pairs[layer_type] = sum(w * ((a if window is None else min(a, window - 1)) + w) for a, w in blocks)
    return training_step_flops(config, tokens=sum(lengths), canvas_tokens=sum(w for _, w in blocks),
                               encoder_pairs=encoder_pairs, canvas_pairs=canvas_pairs).total


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of the card named `device_name` (`torch.cuda.get_device_name`), None when unknown."""
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in device_name), None)


def peak_memory_gib() -> float:
    """This process's peak memory since it started: CUDA's max allocated on a GPU, peak resident set size on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak * (1 if sys.platform == "darwin" else 1024) / 2**30


def require_logging_backends(run: RunConfig) -> None:
    """Raise a named ValueError when a configured logging backend is not installed. Every rank calls it before
    anything is built, so a missing package ends the run at once instead of after set-up."""
    wanted = [
        ("logging.tensorboard_dir", run.logging.tensorboard_dir, "TensorBoard", "'megatron_bdgemma[tensorboard]'"),
        ("logging.wandb_project", run.logging.wandb_project, "the wandb package", "'megatron_bdgemma[wandb]'"),
    ]
    for key, value, package, install in wanted:
        if not value:
            continue
        try:
            _import_backend(key)
        except ImportError as error:
            raise ValueError(f"{key}={value} is set but {package} is not installed ({error}): pip install {install}, "
                             f"or set {key}=null") from None


def _import_backend(key: str) -> Any:
    """The module a logging key writes through: `wandb`, or TensorBoard's `SummaryWriter` by way of torch."""
    if key == "logging.wandb_project":
        import wandb

        return wandb
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter


class MetricsLogger:
    """Rank 0's report of a run (see the module docstring): progress lines, `metrics.jsonl`, TensorBoard and W&B.

    Args:
        run: the run config.
        start_step: the step the run starts after (0, or the resumed checkpoint's).
        run_id: the run directory's id (`training/run_dir.py`): a resumed run continues the same W&B run.
    """

    def __init__(self, run: RunConfig, start_step: int = 0, run_id: str | None = None) -> None:
        self.run, self.start_step = run, start_step
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        # Above 1 data-parallel rank, rows and the progress line add the DP balance: the busiest rank's encoder
        # positions over the mean (a step waits for that rank).
        self.dp = parallel_state.get_data_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
        self.device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        self.peak_tflops = bf16_peak_tflops(self.device) if self.device else None
        self.step_times: deque[float] = deque(maxlen=STEP_TIMES_KEPT)
        self.interval_steps, self.interval_seconds, self.interval_tokens, self.interval_rows = 0, 0.0, 0, 0
        self.interval_flops, self.interval_busiest = 0.0, 0
        self.consumed_tokens: int | None = None
        self.file = self.tensorboard = self.wandb = None
        if not self.rank0:
            return
        save = run.checkpoint.save
        if save:
            self.file = _continue_file(Path(save) / METRICS, run.checkpoint.load, start_step)
            self.info(f"metrics: {self.file.name}")
        else:
            self.info("metrics: no metrics.jsonl (it is written into checkpoint.save, which is not set)")
        if self.device:
            self.info(f"MFU against {self.device}'s dense bf16 peak of {self.peak_tflops} TFLOP/s" if self.peak_tflops
                      else f"MFU not reported: {self.device} is not in the table of bf16 peaks (training/metrics.py)")
        if run.logging.tensorboard_dir:
            self.tensorboard = _import_backend("logging.tensorboard_dir")(run.logging.tensorboard_dir)
            self.info(f"tensorboard: writing to {run.logging.tensorboard_dir} (view with: tensorboard --logdir "
                      f"{run.logging.tensorboard_dir})")
        if run.logging.wandb_project:
            self.wandb = _import_backend("logging.wandb_project").init(
                project=run.logging.wandb_project, name=Path(save).name if save else None, id=run_id,
                resume="allow" if run_id else None, dir=save, config=run.to_dict(),
            )
            self.info(f"wandb: logging to project {run.logging.wandb_project}"
                      + (f", run id {run_id} (a resumed run continues it)" if run_id else ""))

    def info(self, message: str) -> None:
        if self.rank0:
            print(message, flush=True)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Account for `step` (`train_step`'s metrics: losses, lr, grad_norm, tokens, row_tokens, busiest_rank_rows,
        flops (model FLOPs of the global batch, `records_flops`), seconds, consumed_tokens, skipped); print the
        progress line and write the row when it is due."""
        self.interval_steps += 1
        self.interval_flops += metrics["flops"]
        self.interval_seconds += metrics["seconds"]
        self.interval_tokens += metrics["tokens"]
        self.interval_rows += metrics["row_tokens"]
        self.interval_busiest += metrics["busiest_rank_rows"]
        first = step == self.start_step + 1
        if not first:
            self.step_times.append(metrics["seconds"])
        self.consumed_tokens = metrics.get("consumed_tokens")
        skipped = bool(metrics.get("skipped"))
        steps = self.run.train.steps
        due = step == 1 or step % self.run.train.log_interval == 0 or step == steps
        if not (due or skipped or first):
            return
        seconds = self.interval_seconds / self.interval_steps
        tflops = self.interval_flops / self.interval_seconds / self.world / 1e12
        row = _numbers(
            step=step, diffusion=metrics["diffusion"], ar=metrics["ar"], lr=metrics["lr"],
            grad_norm=metrics["grad_norm"],
            tokens_per_s=self.interval_tokens / self.interval_seconds,
            packing_efficiency=self.interval_tokens / max(self.interval_rows, 1),
            dp_balance=self.interval_busiest * self.dp / max(self.interval_rows, 1) if self.dp > 1 else None,
            ms_per_step=1000 * seconds,
            consumed_samples=step * self.run.train.global_batch_size, consumed_tokens=self.consumed_tokens,
            peak_memory_gib=peak_memory_gib(), model_tflops_per_rank=tflops,
            mfu=tflops / self.peak_tflops if self.peak_tflops else None, skipped=1 if skipped else None,
        )
        if self.device:
            row["device"] = self.device
        self.interval_steps, self.interval_seconds, self.interval_tokens, self.interval_rows = 0, 0.0, 0, 0
        self.interval_flops, self.interval_busiest = 0.0, 0
        if due or skipped:  # not the first step of a resumed process: an uninterrupted run has no row there
            self._write(row)
        if skipped:
            return  # the trainer prints the skip in its own line
        eta = f" | ETA {_duration(statistics.median(self.step_times) * (steps - step))}" if self.step_times else ""
        mfu = f" ({row['mfu']:.1%} MFU)" if "mfu" in row else ""
        balance = f", DP balance {row['dp_balance']:.2f}" if "dp_balance" in row else ""
        self.info(
            f"step {step:5d}/{steps} | diffusion {metrics['diffusion']:.4f} | ar {metrics['ar']:.4f} | "
            f"lr {metrics['lr']:.2e} | grad norm {metrics['grad_norm']:.3f} | {row['tokens_per_s']:,.0f} tok/s, packing "
            f"{row['packing_efficiency']:.1%}{balance} | {row['ms_per_step']:,.0f} ms/step | {tflops:.3f} model TFLOP/s/rank{mfu} | "
            f"peak mem {row['peak_memory_gib']:.2f} GiB{eta}"
        )

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.info(f"eval  {step:5d} | diffusion {metrics['eval_diffusion']:.4f} | ar {metrics['eval_ar']:.4f}")
        self._write(_numbers(step=step, eval_diffusion=metrics["eval_diffusion"], eval_ar=metrics["eval_ar"],
                             consumed_samples=step * self.run.train.global_batch_size,
                             consumed_tokens=self.consumed_tokens))

    def _write(self, row: dict[str, Any]) -> None:
        """Append `row` to the metrics file and send its numbers to TensorBoard and W&B (rank 0)."""
        if not self.rank0:
            return
        if self.file:
            self.file.write(json.dumps(row) + "\n")
        scalars = scalar_tags(row)
        if self.tensorboard:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, row["step"])
        if self.wandb:
            self.wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        for sink in (self.file, self.tensorboard):
            if sink:
                sink.close()
        if self.wandb:
            self.wandb.finish()


def scalar_tags(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row as TensorBoard / W&B scalars: `train/<field>` for a training row, `eval/<loss>` for an
    evaluation row (whose consumed counts the training rows already carry)."""
    if "eval_diffusion" in row:
        return {f"eval/{key.removeprefix('eval_')}": value for key, value in row.items() if key.startswith("eval_")}
    return {f"train/{key}": value for key, value in row.items() if key not in ("step", "device")}


def _numbers(**fields: float | None) -> dict[str, float]:
    """The fields that are finite numbers: a metrics row never holds null, NaN or infinity."""
    return {key: value for key, value in fields.items() if value is not None and math.isfinite(value)}


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def _continue_file(path: Path, resumed_from: str | None, start_step: int):
    """Open `path` for appending with the rows of steps up to `start_step` of the run this one continues (the file in
    the resumed checkpoint's run directory, or `path` itself) and nothing after: a row of a later step was written by
    a run that crashed or stopped before its next checkpoint, and this run writes that step again."""
    source = save_root(resumed_from) / METRICS if resumed_from else path
    kept = []
    if source.is_file():
        for number, line in enumerate(source.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # only a line a killed run was writing; its step is written again
                print(f"warning: {source}:{number} is not a JSON row (cut short?); dropped", file=sys.stderr,
                      flush=True)
                continue
            if row["step"] <= start_step:
                kept.append(line + "\n")
    staging = path.with_name(path.name + STAGING)
    staging.write_text("".join(kept))
    os.replace(staging, path)
    return path.open("a", buffering=1)  # line-buffered: each row is on disk when written
