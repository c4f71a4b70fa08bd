"""Pipeline parallelism of the two-pass training step equals one process, step by step (CPU, gloo, fp32).

Every layout starts from the same tiny 4-layer DiffusionGemma (random init differs per stage), self-conditioning on
(coins at p = 0.5, so both gated and zero signals occur), and compares each step's diffusion loss, AR loss and global
grad norm with the 1-process run (<= 1e-5 relative): a stage whose gradients were lost, doubled or never reached the
tied embedding changes the grad norm even where the clipped update hides it in the losses. The same runs evaluate
after the last step (held-out diffusion and AR losses through the forward-only schedules), compared the same way.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_bdgemma.training.config import load_run_config
from tests.multiproc import run_in_processes

CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "configs"
STEPS = 4


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


def _assert_close(ours: list, reference: list, what: str, rel: float = 1e-5) -> None:
    assert len(ours) == len(reference), (what, ours, reference)
    for step, (a, b) in enumerate(zip(ours, reference)):
        assert len(a) == len(b), f"{what}, step {step + 1}: metrics {a} vs {b}"
        for name, x, y in zip(METRICS, a, b):
            assert abs(x - y) <= rel * abs(y), f"{what}, step {step + 1}, {name}: {x} vs {y} (rel {abs(x - y) / abs(y):.2e})"


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


def _train_in_rank(rank: int, tmp: str, objective: str, overrides: list[str]) -> list:
    from megatron_bdgemma.training.trainer import train

    return _metrics(train(_run(Path(tmp), objective, *overrides)))


@pytest.mark.parametrize(
    "objective,layout,nprocs",
    [
        ("sft", ["parallel.pp=2"], 2),
        ("pretrain", ["parallel.pp=2"], 2),
        ("sft", ["parallel.pp=2", "objective.loss_chunk_size=24"], 2),
        ("pretrain", ["parallel.pp=2", "parallel.tp=2", "objective.loss_chunk_size=24"], 4),
        ("sft", ["parallel.pp=2", "parallel.ep=2", "train.micro_batch_size=1"], 4),
        ("pretrain", ["parallel.pp=2", "parallel.vpp=2"], 2),
        ("sft", ["parallel.pp=2", "parallel.vpp=2", "objective.loss_chunk_size=24"], 2),
    ],
    ids=["sft_pp2", "pretrain_pp2", "sft_pp2_chunked", "pretrain_pp2_tp2_sp_chunked", "sft_pp2_ep2_dp2", "pretrain_vpp2",
         "sft_vpp2_chunked"],
)
def test_pipeline_matches_one_process(tmp_path, model_parallel, hf_start, objective, layout, nprocs):
    from megatron_bdgemma.training.trainer import train

    start = [f"model.hf={hf_start}", f"train.eval_interval={STEPS}", "train.eval_steps=2"]
    same_loss_path = [o for o in layout if o.startswith("objective.")]
    reference = _metrics(train(_run(tmp_path, objective, *start, *same_loss_path)))
    assert len(reference[-1]) == len(METRICS), reference[-1]  # the last step evaluated
    runs = run_in_processes(_train_in_rank, nprocs, str(tmp_path), objective, start + layout, timeout_s=400)
    for rank, got in enumerate(runs):
        _assert_close(got, reference, f"{objective} {layout} rank {rank} vs 1 process")


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


@pytest.mark.parametrize(
    "optimizer,layout,nprocs",
    [
        ("plain", ["parallel.pp=2"], 2),
        ("distributed", ["parallel.pp=2"], 4),
        ("distributed", ["parallel.pp=2", "parallel.vpp=2"], 2),
        ("distributed", ["parallel.pp=2", "checkpoint.optimizer_format=dp_reshardable"], 2),
    ],
    ids=["pp2_plain_optimizer", "pp2_dp2", "pp2_vpp2", "pp2_dp_reshardable"],
)
def test_pipeline_checkpoint_resumes_and_reshards(tmp_path, model_parallel, hf_start, one_process, optimizer, layout, nprocs):
    """A pipeline-parallel trainer checkpoint, fp32:

    - the layout's run equals the uninterrupted 1-process run, and resumes its own step-2 checkpoint bit-identically
      (losses and grad norms: the distributed optimizer's state of the tied embedding, which megatron-core keeps in a
      gradient bucket of its own under PP, must come back exactly);
    - its step-2 checkpoint continues in one process, and (distributed optimizer) the 1-process step-2 checkpoint
      continues at the layout, both equal to the uninterrupted run (<= 1e-5 relative); the `dp_reshardable` format
      stores the optimizer's buckets as they are and so resumes at the same PP size only.
    """
    from megatron_bdgemma.training.trainer import train

    reference, one = one_process
    start = [f"model.hf={hf_start}", f"optim.distributed_optimizer={str(optimizer == 'distributed').lower()}"]
    reshards = "checkpoint.optimizer_format=dp_reshardable" not in layout
    # The 1-process checkpoint holds the distributed optimizer's state: the plain optimizer loads none but its own.
    from_one = str(one) if optimizer == "distributed" and reshards else None
    for rank, got in enumerate(run_in_processes(_checkpoint_runs_in_rank, nprocs, str(tmp_path), start, layout, from_one,
                                                timeout_s=400)):
        _assert_close(got["full"], reference, f"{layout} rank {rank} vs 1 process")
        assert got["resumed"] == got["full"][2:], f"{layout} rank {rank}: resume at the same layout must be bit-identical"
        if from_one:
            _assert_close(got["from_one"], reference[2:], f"1 process -> {layout}, rank {rank}")
    if not reshards:
        return
    to_one = train(_run(tmp_path, "sft", *start, f"checkpoint.load={_iter2(tmp_path / 'layout')}",
                        f"checkpoint.save={tmp_path / 'to_one'}"))
    _assert_close(_metrics(to_one), reference[2:], f"{layout} step-2 checkpoint continued in 1 process")
