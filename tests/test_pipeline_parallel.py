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


def _save_and_resume_in_rank(rank: int, tmp: str, start: list[str]) -> dict[str, list]:
    from megatron_bdgemma.training.trainer import train

    tmp = Path(tmp)
    pp = ["parallel.pp=2"]
    full = train(_run(tmp, "sft", *start, *pp, f"checkpoint.save={tmp / 'pp2'}", "checkpoint.interval=2"))
    resumed = train(_run(tmp, "sft", *start, *pp, f"checkpoint.load={tmp / 'pp2' / 'iter_0000002'}",
                         f"checkpoint.save={tmp / 'pp2_resumed'}"))
    return dict(full=_metrics(full), resumed=_metrics(resumed))


def test_pipeline_checkpoint_resumes_and_loads_at_pp1(tmp_path, model_parallel, hf_start):
    """A PP=2 trainer checkpoint (plain optimizer: the distributed one's PP save is refused, see RunConfig.validate)
    resumes at PP=2 bit-identically and continues in one process equal to the run that never changed layout."""
    from megatron_bdgemma.training.trainer import train

    start = [f"model.hf={hf_start}", "optim.distributed_optimizer=false"]
    reference = _metrics(train(_run(tmp_path, "sft", *start)))
    for rank, got in enumerate(run_in_processes(_save_and_resume_in_rank, 2, str(tmp_path), start, timeout_s=400)):
        _assert_close(got["full"], reference, f"PP=2 rank {rank} vs 1 process")
        assert got["resumed"] == got["full"][2:], f"rank {rank}: resume at PP=2 must be bit-identical"
    to_one = train(_run(tmp_path, "sft", *start, f"checkpoint.load={tmp_path / 'pp2' / 'iter_0000002'}",
                        f"checkpoint.save={tmp_path / 'pp1'}"))
    _assert_close(_metrics(to_one), reference[2:], "PP=2 step-2 checkpoint continued in 1 process")
