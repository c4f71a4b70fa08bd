"""Pipeline parallelism of the two-pass training step equals one process, step by step (CPU, gloo, fp32).

Every layout starts from the same tiny 4-layer DiffusionGemma (random init differs per stage), self-conditioning on
(coins at p = 0.5, so both gated and zero signals occur), and compares each step's diffusion and AR loss, and the
global grad norm of the steps on the starting weights (steps 1-2: step 1's lr is 0), with the 1-process run (<= 1e-5
relative; tests/tolerances.py says why the grad norm is not compared after an update): a stage whose gradients were
lost, doubled or never reached the tied embedding changes the grad norm even where the clipped update hides it in
the losses. The same runs evaluate after the last step (held-out diffusion and AR losses through the forward-only
schedules), compared the same way. Worst measured over every case here, with the defaults (AVX-512) and under AVX2:
5.1e-7 (PP=2 x TP=2 + SP, chunked loss): margins >= 19x. The grad norm after an update, not compared, reached 1.1e-5
in that case under AVX2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_bdgemma.training.config import load_run_config
from tests.multiproc import run_in_processes
from tests.tolerances import assert_steps_close, record

CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "configs"
STEPS = 4
HIDDEN_TOL = 1e-5
"""Pass-1 hidden of the first stage vs one process, relative to its largest magnitude: measured 0 (the same layers
run in the same order) with the defaults and under AVX2; another micro-batch's hidden differs by O(1)."""


def _run(tmp: Path, objective: str, *overrides: str):
    config = CONFIGS / ("tiny_sft.yaml" if objective == "sft" else "tiny_pretrain.yaml")
    base = [
        f"data.cache_dir={tmp / 'data'}", *(["data.seq_length=64", "data.truncation=true"] if objective == "sft" else ["data.seq_length=32"]), f"train.steps={STEPS}", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.eval_interval=0", "optim.warmup_steps=1", "checkpoint.save=null",
        "model.overrides={}", "optim.distributed_optimizer=true",
    ]
    return load_run_config(config, base + list(overrides))


METRICS = ("diffusion", "ar", "grad_norm", "eval_diffusion", "eval_ar")
"""Per step; the eval losses only on steps that evaluate."""


def _metrics(history):
    return [tuple(h[name] for name in METRICS if name in h) for h in history]


@pytest.fixture(scope="module")
def hf_start(tmp_path_factory) -> str:
    """4 layers (2 per stage at PP=2, 1 per virtual stage at PP=2 × VPP=2), byte vocabulary, 2 KV heads everywhere so
    TP=2 splits whole groups."""
    from tests import hf_models

    layer_types = ["sliding_attention", "full_attention"] * 2
    model = hf_models.diffusion_gemma(
        dict(vocab_size=320, num_global_key_value_heads=2, num_hidden_layers=4, layer_types=layer_types), canvas_length=16
    )
    return str(hf_models.save(model, tmp_path_factory.mktemp("start") / "hf"))


@contextlib.contextmanager
def _pass1_hidden_recorded() -> Iterator[list[torch.Tensor]]:
    """Every pass-1 final-normed canvas hidden that a self-conditioning signal is formed from, in call order: one
    per micro-batch, in schedule order (`training_forward` in one process, the first stage under PP)."""
    from megatron_bdgemma.model import BDGemmaModel

    seen, original = [], BDGemmaModel.first_pass_signal

    def recording(self, first_pass_hidden: torch.Tensor, loss_chunk_size: int | None) -> torch.Tensor:
        seen.append(first_pass_hidden.detach().clone())
        return original(self, first_pass_hidden, loss_chunk_size)

    BDGemmaModel.first_pass_signal = recording
    try:
        yield seen
    finally:
        BDGemmaModel.first_pass_signal = original


FIRST_STEPS_CALLS = 2 * 2
"""Pass-1 hiddens of steps 1 and 2 (2 micro-batches each), which run on the starting weights (step 1's lr is 0)."""


def _train_in_rank(rank: int, tmp: str, objective: str, overrides: list[str]) -> tuple[list, list[torch.Tensor]]:
    """The run's metrics, and on the first stage the pass-1 hiddens of steps 1 and 2."""
    from megatron_bdgemma.training.trainer import train

    with _pass1_hidden_recorded() as hidden:
        metrics = _metrics(train(_run(Path(tmp), objective, *overrides)))
    return metrics, hidden[:FIRST_STEPS_CALLS]


def _layouts_in_rank(rank: int, tmp: str, cases: list[tuple[str, str, list[str]]]) -> dict[str, tuple]:
    """Every case of one world size in turn, in the same ranks (the trainer sets each layout's groups up), each with
    a data cache of its own: per case `_train_in_rank`'s result."""
    return {case: _train_in_rank(rank, str(Path(tmp) / case), objective, overrides)
            for case, objective, overrides in cases}


LAYOUTS = {
    "sft_pp2": ("sft", ["parallel.pp=2"], 2),
    "pretrain_pp2": ("pretrain", ["parallel.pp=2"], 2),
    "sft_pp2_chunked": ("sft", ["parallel.pp=2", "objective.loss_chunk_size=24"], 2),
    "pretrain_pp2_tp2_sp_chunked": ("pretrain", ["parallel.pp=2", "parallel.tp=2", "objective.loss_chunk_size=24"], 4),
    "sft_pp2_ep2_dp2": ("sft", ["parallel.pp=2", "parallel.ep=2", "train.micro_batch_size=1"], 4),
    "pretrain_vpp2": ("pretrain", ["parallel.pp=2", "parallel.vpp=2"], 2),
    "sft_vpp2_chunked": ("sft", ["parallel.pp=2", "parallel.vpp=2", "objective.loss_chunk_size=24"], 2),
    # The objective's options on the stages: w(t) and the shift δ on the noisy token's logit in the last stage's
    # loss, each stage detaching its own encoder K/V, the frozen self-conditioning module on the first stage.
    "sft_pp2_chunked_objective_options": ("sft", [
        "parallel.pp=2", "objective.loss_chunk_size=24", "objective.variant=reweighted-loo-ce",
        "objective.weight_clip=10", "objective.stop_gradient_to_encoder=true", "objective.diffusion_weight=0.5",
        "model.overrides.freeze_self_conditioning=true"], 2),
}
"""Per case: (objective, layout, processes)."""


def _start(hf: str) -> list[str]:
    return [f"model.hf={hf}", f"train.eval_interval={STEPS}", "train.eval_steps=2"]


def _same_loss_path(layout: list[str]) -> tuple[str, ...]:
    """The options of a layout that the 1-process reference runs with too (they change the loss, not the layout)."""
    return tuple(o for o in layout if o.startswith(("objective.", "model.overrides.")))


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory, hf_start) -> dict[str, list[tuple]]:
    """Every case's ranks' results: the cases of one world size share one spawn of their ranks (process start and
    imports once, not per case)."""
    tmp = tmp_path_factory.mktemp("layouts")
    runs = {}
    for nprocs in sorted({case[2] for case in LAYOUTS.values()}, reverse=True):
        cases = [(name, objective, _start(hf_start) + layout) for name, (objective, layout, n) in LAYOUTS.items()
                 if n == nprocs]
        ranks = run_in_processes(_layouts_in_rank, nprocs, str(tmp), cases, timeout_s=400 * len(cases))
        runs |= {name: [rank[name] for rank in ranks] for name, _, _ in cases}
    return runs


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory, distributed_world, hf_start):
    """The 1-process run (metrics, pass-1 hiddens) of an objective with a layout's loss options, each run once:
    layouts that differ only in parallelism share it. From a reseeded RNG tracker, like a test's `model_parallel`."""
    from megatron_bdgemma.runtime.distributed import DEFAULT_SEED, init_distributed
    from megatron_bdgemma.training.trainer import train

    tmp, done = tmp_path_factory.mktemp("one_process"), {}

    def run(objective: str, same_loss_path: tuple[str, ...]) -> tuple[list, list[torch.Tensor]]:
        if (objective, same_loss_path) not in done:
            init_distributed(seed=DEFAULT_SEED)
            with _pass1_hidden_recorded() as hidden:
                metrics = _metrics(train(_run(tmp / str(len(done)), objective, *_start(hf_start), *same_loss_path)))
            done[objective, same_loss_path] = metrics, hidden
        return done[objective, same_loss_path]

    return run


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_pipeline_matches_one_process(pipeline_runs, one_process_runs, case):
    objective, layout, nprocs = LAYOUTS[case]
    reference, hidden = one_process_runs(objective, _same_loss_path(layout))
    assert len(reference[-1]) == len(METRICS), reference[-1]  # the last step evaluated
    runs = pipeline_runs[case]
    assert len(runs) == nprocs
    if nprocs == 2:  # PP only: the first stage runs the same micro-batches as one process, whole (no TP shards)
        # Each micro-batch's pass 2 is self-conditioned on ITS OWN pass 1, handed back by the last stage: checked
        # directly, since in this fixture another micro-batch's hidden moves the losses and grad norm by as little as
        # 2e-5 relative (a weak self-conditioning signal at random init).
        first_stage = runs[0][1]
        assert len(first_stage) == FIRST_STEPS_CALLS <= len(hidden), (len(first_stage), len(hidden))
        worst = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(first_stage, hidden))
        record(f"{objective} {layout} pass-1 hidden per micro-batch", worst, HIDDEN_TOL)
        assert worst <= HIDDEN_TOL, f"{objective} {layout}: the first stage's pass-1 hidden differs by {worst:.2e}"
    for rank, (got, _) in enumerate(runs):
        assert_steps_close(got, reference, f"{objective} {layout} rank {rank} vs 1 process", names=METRICS,
                           shared_weight_steps=2)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, distributed_world, hf_start) -> tuple[list, Path]:
    """The uninterrupted 1-process SFT run (distributed optimizer) and its save root (a checkpoint at step 2)."""
    from megatron_bdgemma.runtime.distributed import DEFAULT_SEED, init_distributed
    from megatron_bdgemma.training.trainer import train

    tmp = tmp_path_factory.mktemp("one_process")
    init_distributed(seed=DEFAULT_SEED)
    history = train(_run(tmp, "sft", f"model.hf={hf_start}", f"checkpoint.save={tmp / 'one'}", "checkpoint.interval=2"))
    return _metrics(history), tmp / "one"


def _iter2(root: Path) -> str:
    return str(root / "iter_0000002")


def _checkpoint_runs_in_rank(rank: int, tmp: str, start: list[str], layout: list[str], one: str | None) -> dict[str, list]:
    """At `layout`: 4 steps saving at step 2; resumed from that step 2; resumed from the 1-process step 2 (at `one`)."""
    from megatron_bdgemma.training.trainer import train

    tmp = Path(tmp)
    runs = dict(full=train(_run(tmp, "sft", *start, *layout, f"checkpoint.save={tmp / 'layout'}", "checkpoint.interval=2")),
                resumed=train(_run(tmp, "sft", *start, *layout, f"checkpoint.load={_iter2(tmp / 'layout')}",
                                   f"checkpoint.save={tmp / 'layout_resumed'}")))
    if one is not None:
        runs["from_one"] = train(_run(tmp, "sft", *start, *layout, f"checkpoint.load={_iter2(Path(one))}",
                                      f"checkpoint.save={tmp / 'from_one'}"))
    return {name: _metrics(history) for name, history in runs.items()}


CHECKPOINT_LAYOUTS = {
    "pp2_plain_optimizer": ("plain", ["parallel.pp=2"], 2),
    "pp2_dp2": ("distributed", ["parallel.pp=2"], 4),
    "pp2_vpp2": ("distributed", ["parallel.pp=2", "parallel.vpp=2"], 2),
    "pp2_dp_reshardable": ("distributed", ["parallel.pp=2", "checkpoint.optimizer_format=dp_reshardable"], 2),
}
"""Per case: (optimizer, layout, processes)."""


def _checkpoint_start(hf: str, optimizer: str) -> list[str]:
    return [f"model.hf={hf}", f"optim.distributed_optimizer={str(optimizer == 'distributed').lower()}"]


def _reshards(layout: list[str]) -> bool:
    """The `dp_reshardable` format stores the optimizer's buckets as they are, so it resumes at the same PP only."""
    return "checkpoint.optimizer_format=dp_reshardable" not in layout


def _checkpoint_cases_in_rank(rank: int, tmp: str, cases: list[tuple]) -> dict[str, dict[str, list]]:
    """Every case of one world size in turn in the same ranks, each in a directory of its own."""
    return {case: _checkpoint_runs_in_rank(rank, str(Path(tmp) / case), *args) for case, *args in cases}


@pytest.fixture(scope="module")
def checkpoint_runs(tmp_path_factory, hf_start, one_process) -> tuple[Path, dict[str, list[dict]]]:
    """Every checkpoint case's ranks' results and their root (a directory per case): the cases of one world size
    share one spawn of their ranks."""
    _, one = one_process
    tmp, runs = tmp_path_factory.mktemp("checkpoint_layouts"), {}
    for nprocs in sorted({case[2] for case in CHECKPOINT_LAYOUTS.values()}, reverse=True):
        # The 1-process checkpoint holds the distributed optimizer's state: the plain optimizer loads none but its own.
        cases = [(name, _checkpoint_start(hf_start, optimizer), layout,
                  str(one) if optimizer == "distributed" and _reshards(layout) else None)
                 for name, (optimizer, layout, n) in CHECKPOINT_LAYOUTS.items() if n == nprocs]
        ranks = run_in_processes(_checkpoint_cases_in_rank, nprocs, str(tmp), cases, timeout_s=400 * len(cases))
        runs |= {case[0]: [rank[case[0]] for rank in ranks] for case in cases}
    return tmp, runs


@pytest.mark.parametrize("case", list(CHECKPOINT_LAYOUTS))
def test_pipeline_checkpoint_resumes_and_reshards(model_parallel, hf_start, one_process, checkpoint_runs, case):
    """A pipeline-parallel trainer checkpoint, fp32:

    - the layout's run equals the uninterrupted 1-process run, and resumes its own step-2 checkpoint bit-identically
      (losses and grad norms: the distributed optimizer's state of the tied embedding, which megatron-core keeps in a
      gradient bucket of its own under PP, must come back exactly);
    - its step-2 checkpoint continues in one process as at the layout, and (distributed optimizer) the 1-process
      step-2 checkpoint continues at the layout as in one process; the `dp_reshardable` format stores the optimizer's
      buckets as they are and so resumes at the same PP size only.

    1e-5 relative, the grad norm on shared weights only (tests/tolerances.py): worst measured 3.7e-7 with the
    defaults (AVX-512) and under AVX2 (pp2_dp2): margins >= 27x.
    """
    from megatron_bdgemma.training.trainer import train

    reference, _ = one_process
    optimizer, layout, nprocs = CHECKPOINT_LAYOUTS[case]
    root, all_runs = checkpoint_runs
    tmp, runs = root / case, all_runs[case]
    assert len(runs) == nprocs
    from_one = optimizer == "distributed" and _reshards(layout)
    for rank, got in enumerate(runs):
        assert_steps_close(got["full"], reference, f"{layout} rank {rank} vs 1 process", shared_weight_steps=2)
        assert got["resumed"] == got["full"][2:], f"{layout} rank {rank}: resume at the same layout must be bit-identical"
        assert ("from_one" in got) == from_one, (rank, sorted(got))
        if from_one:
            assert_steps_close(got["from_one"], reference[2:], f"1 process -> {layout}, rank {rank}",
                               shared_weight_steps=1, first_step=3)
    if not _reshards(layout):
        return
    to_one = train(_run(tmp, "sft", *_checkpoint_start(hf_start, optimizer),
                        f"checkpoint.load={_iter2(tmp / 'layout')}", f"checkpoint.save={tmp / 'to_one'}"))
    assert_steps_close(_metrics(to_one), runs[0]["full"][2:], f"{layout} step-2 checkpoint continued in 1 process",
                       shared_weight_steps=1, first_step=3)


def _adam_state(optimizer) -> list[torch.Tensor]:
    """Every tensor of a (chained) distributed optimizer's Adam state, in its own order: each main-param shard, its
    moments and its step count."""
    from megatron_bdgemma.training.checkpointing import _distributed_optimizers

    out = []
    for inner in _distributed_optimizers(optimizer):
        for group in inner.optimizer.param_groups:
            for param in group["params"]:
                state = inner.optimizer.state[param]
                out += [param.detach().clone(), *(state[key].clone() for key in ("exp_avg", "exp_avg_sq", "step"))]
    return out


def _optimizer_round_trip_in_rank(rank: int, tmp: str, start: list[str]) -> dict[str, Any]:
    """PP = 2 over 2 ranks (DP = 1): one step, save the distributed optimizer, load it into a fresh one; per format,
    whether every state tensor came back bit-identical; and the gradient buckets, (unpadded, padded) sizes."""
    from megatron_bdgemma.training.checkpointing import _distributed_optimizers, load_checkpoint, save_checkpoint
    from megatron_bdgemma.training.trainer import setup, train_step

    same: dict[str, Any] = {}
    for optimizer_format in ("fully_reshardable", "dp_reshardable"):
        run = _run(Path(tmp), "sft", *start, "parallel.pp=2")
        state = setup(run)
        same["buckets"] = [[(bucket.numel_unpadded, bucket.grad_data.numel()) for bucket in buffer.buckets]
                           for inner in _distributed_optimizers(state.optimizer) for buffer in inner.buffers]
        train_step(state)
        before = _adam_state(state.optimizer)
        root = Path(tmp) / optimizer_format
        save_checkpoint(root, 1, [c.module for c in state.model], state.optimizer, optimizer_format=optimizer_format)
        fresh = setup(run)
        load_checkpoint(root, [c.module for c in fresh.model], fresh.optimizer)
        after = _adam_state(fresh.optimizer)
        same[optimizer_format] = len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
    return same


def test_distributed_optimizer_state_round_trips_with_padding_between_buckets(tmp_path, model_parallel, hf_start):
    """The fast case of megatron-core 0.19.2's two bucket-padding bugs (training/checkpointing.py): at PP = 2 the
    first stage's gradient buffer holds a bucket of 35520 elements padded to 35584 (the distributed optimizer's
    128-element bucket alignment) before the tied embedding's own bucket. Its optimizer state saved in either format
    and loaded at the same layout is bit-identical: `fully_reshardable` needs `_stripped_bucket_offsets` (else the
    embedding's state is read 64 elements off), `dp_reshardable` needs `_clip_padding_to_unpadded_buckets` (else the
    save is refused)."""
    start = [f"model.hf={hf_start}", "optim.distributed_optimizer=true"]
    runs = run_in_processes(_optimizer_round_trip_in_rank, 2, str(tmp_path), start, timeout_s=300)
    assert runs[0]["buckets"] == [[(35520, 35584), (10240, 10240)]], runs[0]["buckets"]  # padding between buckets
    for rank, same in enumerate(runs):
        assert (same["fully_reshardable"], same["dp_reshardable"]) == (True, True), (rank, same)
