"""Contracts of the training job: exact resume, crash-safe checkpoints, DP/TP/EP layouts, config validation."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron_bdgemma.training.config import load_run_config
from tests.multiproc import run_in_processes
from tests.tolerances import assert_steps_close

CONFIG = Path(__file__).resolve().parent.parent / "examples" / "configs" / "tiny_pretrain.yaml"


def _run(tmp: Path, *overrides: str):
    base = [
        f"data.cache_dir={tmp / 'data'}", "data.seq_length=32", "train.steps=6", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.eval_interval=0", "optim.warmup_steps=2", "checkpoint.save=null",
        "model.overrides={num_layers: 2, layer_types: [sliding_attention, full_attention]}",
    ]
    return load_run_config(CONFIG, base + list(overrides))


def _losses(history):
    return [(h["diffusion"], h["ar"]) for h in history]


def _metrics(history):
    """Per step: diffusion loss, AR loss and the global grad norm (so halved or unreduced gradients show)."""
    return [(h["diffusion"], h["ar"], h["grad_norm"]) for h in history]


@pytest.mark.parametrize(
    "optimizer",
    [["optim.distributed_optimizer=true"], ["optim.distributed_optimizer=true", "checkpoint.optimizer_format=dp_reshardable"],
     ["optim.distributed_optimizer=true", "train.bf16=true"], ["optim.distributed_optimizer=false"]],
    ids=["distributed", "distributed_dp_reshardable", "distributed_bf16", "plain"],
)
def test_exact_resume(tmp_path, model_parallel, optimizer):
    from megatron_bdgemma.training.trainer import train

    full = train(_run(tmp_path, f"checkpoint.save={tmp_path / 'a'}", "checkpoint.interval=3", *optimizer))
    (tmp_path / "a" / "latest").write_text("iter_0000003")  # pretend the run stopped after step 3
    resumed = train(_run(tmp_path, f"checkpoint.load={tmp_path / 'a'}", f"checkpoint.save={tmp_path / 'b'}", *optimizer))
    assert [h["step"] for h in resumed] == [4, 5, 6]
    assert _metrics(resumed) == _metrics(full)[3:], "resumed losses and grad norms must be bit-identical"


class _FusedAdamLike(torch.optim.Optimizer):
    """Transformer Engine's / Apex's FusedAdam as megatron-core sees it, on CPU: AdamW whose step count is an int in
    each param group, with only `exp_avg` and `exp_avg_sq` per parameter (torch's Adam keeps a `step` tensor per
    parameter instead). The constructor takes what megatron-core passes FusedAdam."""

    def __init__(self, params, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                 capturable: bool = False, adam_w_mode: bool = True) -> None:
        assert adam_w_mode and not capturable
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            (beta1, beta2), step = group["betas"], group["step"]
            for param in (p for p in group["params"] if p.grad is not None):
                state = self.state[param]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(param), torch.zeros_like(param)
                state["exp_avg"].lerp_(param.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                denominator = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.addcdiv_(state["exp_avg"], denominator, value=-group["lr"] / (1 - beta1**step))


@pytest.fixture
def fused_adam(monkeypatch) -> type[torch.optim.Optimizer]:
    """megatron-core builds its inner optimizer as it does with Transformer Engine installed (the GPU path)."""
    from megatron.core import optimizer
    from megatron.core.optimizer import distrib_optimizer

    monkeypatch.setattr(optimizer, "Adam", _FusedAdamLike)
    monkeypatch.setattr(optimizer, "USING_PYTORCH_OPTIMIZER", False)
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)
    monkeypatch.setattr(distrib_optimizer, "USING_TE_OPTIMIZER", True)
    return _FusedAdamLike


@pytest.mark.parametrize("optimizer_format", ["fully_reshardable", "dp_reshardable"])
def test_exact_resume_with_a_fused_adam_style_optimizer(tmp_path, model_parallel, fused_adam, optimizer_format):
    """With FusedAdam's layout (the step count in the param groups) resume restores the step count, which the next
    update's bias correction reads, and continues bit-identically."""
    from megatron_bdgemma.training.checkpointing import _inner_optimizers
    from megatron_bdgemma.training.trainer import setup, train

    options = ["optim.distributed_optimizer=true", f"checkpoint.optimizer_format={optimizer_format}", "train.steps=5"]
    full = train(_run(tmp_path, f"checkpoint.save={tmp_path / 'a'}", "checkpoint.interval=3", *options))
    (tmp_path / "a" / "latest").write_text("iter_0000003")
    resume = _run(tmp_path, f"checkpoint.load={tmp_path / 'a'}", f"checkpoint.save={tmp_path / 'b'}", *options)
    # The resumed optimizer as built (without a save directory: `train(resume)` below claims it).
    inspected = _run(tmp_path, f"checkpoint.load={tmp_path / 'a'}", "checkpoint.save=null", *options)
    inners = [inner.optimizer for inner in _inner_optimizers(setup(inspected).optimizer)]
    assert inners and all(isinstance(inner, fused_adam) for inner in inners)
    assert [group["step"] for inner in inners for group in inner.param_groups] == [3] * sum(
        len(inner.param_groups) for inner in inners)
    assert not any("step" in state for inner in inners for state in inner.state.values())
    resumed = train(resume)
    assert [h["step"] for h in resumed] == [4, 5]
    assert _metrics(resumed) == _metrics(full)[3:], "resumed losses and grad norms must be bit-identical"


def test_loss_falls(tmp_path, model_parallel):
    from megatron_bdgemma.training.trainer import train

    history = train(_run(tmp_path, "train.steps=12"))
    first, last = history[0], history[-1]
    assert last["diffusion"] < first["diffusion"] - 0.3 and last["ar"] < first["ar"] - 0.3, (first, last)


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, model_parallel):
    """A process killed in the middle of writing step 4 leaves `latest` on step 2, which still loads."""
    from megatron_bdgemma.training.run_dir import latest_checkpoint
    from megatron_bdgemma.training.trainer import train

    root = tmp_path / "ckpt"
    train(_run(tmp_path, "train.steps=2", "optim.warmup_steps=1", f"checkpoint.save={root}"))
    script = tmp_path / "dying_save.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from megatron.core import dist_checkpointing
        from megatron_bdgemma.training import checkpointing
        from megatron_bdgemma.training.config import load_run_config
        from megatron_bdgemma.training.trainer import train

        def dying_save(state, path, *args, **kwargs):
            real_save(state, path, *args, **kwargs)   # the shards are written ...
            os._exit(9)                               # ... and the process dies before the rename / marker

        if __name__ == "__main__":
            real_save = dist_checkpointing.save
            checkpointing.dist_checkpointing.save = dying_save
            train(load_run_config({str(CONFIG)!r}, {json.dumps(_overrides(tmp_path, root))}))
    """))
    # Its own session, so anything it started can be cleaned up with it.
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL,
                               stderr=open(tmp_path / "stderr.txt", "w"), start_new_session=True)
    try:
        returncode = process.wait(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert returncode == 9, (tmp_path / "stderr.txt").read_text()[-2000:]
    assert latest_checkpoint(root).name == "iter_0000002"
    assert (root / "iter_0000004.tmp").exists()  # the torn save is left aside, never named by `latest`
    resumed = train(_run(tmp_path, "train.steps=3", "optim.warmup_steps=1", f"checkpoint.load={root}"))
    assert [h["step"] for h in resumed] == [3]


def _overrides(tmp_path: Path, root: Path) -> list[str]:
    return [
        f"data.cache_dir={tmp_path / 'data'}", "data.seq_length=32", "train.steps=4", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.eval_interval=0", "optim.warmup_steps=1", f"checkpoint.save={root}",
        f"checkpoint.load={root}", "model.overrides={num_layers: 2, layer_types: [sliding_attention, full_attention]}",
    ]


@pytest.fixture(scope="module")
def hf_start(tmp_path_factory) -> str:
    """A tiny DiffusionGemma to start from, so every layout begins with the same weights (random init differs per
    EP rank). Byte-tokenizer vocabulary; 2 KV heads on every layer so TP=2 splits whole groups."""
    from tests import hf_models

    model = hf_models.diffusion_gemma(dict(vocab_size=320, num_global_key_value_heads=2), canvas_length=16)
    return str(hf_models.save(model, tmp_path_factory.mktemp("start") / "hf"))


def _iter2(root: Path) -> str:
    return str(root / "iter_0000002")


LAYOUT_STEPS = 4
"""Steps of the layout runs, saving at step 2. Step 1 runs at learning rate 0 (warmup), so steps 1 and 2 run on the
starting weights; step 3 is the first after a checkpoint both continuations load."""


def _layout_runs_in_rank(rank: int, tmp: str, start: list[str], layout: list[str], one: str) -> dict[str, list]:
    """At `layout` (2 ranks): 4 steps saving at step 2; resumed from that step 2; resumed from the 1-process step 2
    (saved under `one`)."""
    import torch.distributed as dist

    from megatron_bdgemma.training.trainer import train

    tmp = Path(tmp)
    steps = f"train.steps={LAYOUT_STEPS}"
    full = train(_run(tmp, *start, *layout, steps, f"checkpoint.save={tmp / 'layout'}", "checkpoint.interval=2"))
    dist.barrier()
    resumed = train(_run(tmp, *start, *layout, steps, f"checkpoint.load={_iter2(tmp / 'layout')}",
                         f"checkpoint.save={tmp / 'layout_resumed'}"))
    from_one = train(_run(tmp, *start, *layout, steps, f"checkpoint.load={_iter2(Path(one))}",
                          f"checkpoint.save={tmp / 'from_one'}"))
    return dict(full=_metrics(full), resumed=_metrics(resumed), from_one=_metrics(from_one))


LAYOUTS = {"dp2": [], "tp2_sp": ["parallel.tp=2"], "ep2": ["parallel.ep=2"]}
START = ["model.overrides={}", "optim.distributed_optimizer=true"]


def _layouts_in_rank(rank: int, tmp: str, start: list[str], one: str) -> dict[str, dict[str, list]]:
    """Every layout in turn in the same 2 ranks (one spawn: process start and imports once), each in a directory of
    its own."""
    return {name: _layout_runs_in_rank(rank, str(Path(tmp) / name), start, layout, one)
            for name, layout in LAYOUTS.items()}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, distributed_world, hf_start) -> tuple[list, Path]:
    """The 1-process run every layout is compared with (the same for all: one run), and its save root (a checkpoint
    at step 2). From a reseeded RNG tracker, like a test's `model_parallel`."""
    from megatron_bdgemma.runtime.distributed import DEFAULT_SEED, init_distributed
    from megatron_bdgemma.training.trainer import train

    tmp = tmp_path_factory.mktemp("one_process")
    init_distributed(seed=DEFAULT_SEED)
    history = train(_run(tmp, f"model.hf={hf_start}", *START, f"train.steps={LAYOUT_STEPS}",
                         f"checkpoint.save={tmp / 'one'}", "checkpoint.interval=2"))
    return _metrics(history), tmp / "one"


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory, hf_start, one_process) -> tuple[Path, dict[str, list[dict]]]:
    """Every layout's ranks' results (`_layout_runs_in_rank`) and their root, a directory per layout."""
    tmp = tmp_path_factory.mktemp("layouts")
    ranks = run_in_processes(_layouts_in_rank, 2, str(tmp), [f"model.hf={hf_start}", *START], str(one_process[1]),
                             timeout_s=400 * len(LAYOUTS))
    return tmp, {name: [rank[name] for rank in ranks] for name in LAYOUTS}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts_match_one_process_and_reshard(model_parallel, hf_start, one_process, layout_runs, name):
    """DP=2 (same global batch), TP=2+SP and EP=2 against one process, fp32, distributed optimizer:

    - every step's losses, and the global grad norm of steps 1-2 (the starting weights), equal the 1-process run's:
      a layout whose gradients were halved or never reduced changes the grad norm even where the clipped update
      hides it in the losses;
    - the layout resumes its own step-2 checkpoint bit-identically;
    - a step-2 checkpoint saved at the layout continues in one process as at the layout, and one saved in one process
      continues at the layout as in one process (steps 3-4: losses, and step 3's grad norm, on the loaded weights;
      the restored Adam moments and step count drive step 3's update, which step 4's losses see).

    1e-5 relative (tests/tolerances.py says why the grad norm is compared on shared weights only). Worst measured,
    all three layouts: 4.6e-7 with the defaults (AVX-512; tp2_sp, step 2's grad norm) and 7.7e-7 under AVX2
    (tp2_sp): margins >= 13x. The grad norm after an update, not compared: up to 4.6e-6 (AVX-512) and 2.6e-6 (AVX2).
    """
    from megatron_bdgemma.training.trainer import train

    reference, _ = one_process
    root, all_runs = layout_runs
    tmp, runs, layout = root / name, all_runs[name], LAYOUTS[name]
    to_one = _metrics(train(_run(tmp, f"model.hf={hf_start}", *START, f"train.steps={LAYOUT_STEPS}",
                                 f"checkpoint.load={_iter2(tmp / 'layout')}", f"checkpoint.save={tmp / 'to_one'}")))
    for rank, got in enumerate(runs):
        assert_steps_close(got["full"], reference, f"{layout} rank {rank} vs 1 process", shared_weight_steps=2)
        assert got["resumed"] == got["full"][2:], f"{layout} rank {rank}: resume at the same layout must be bit-identical"
        assert_steps_close(got["from_one"], reference[2:], f"1-process step 2 continued at {layout}, rank {rank}",
                           shared_weight_steps=1, first_step=3)
        assert_steps_close(to_one, got["full"][2:], f"{layout} step 2 continued in 1 process vs at the layout, rank {rank}",
                           shared_weight_steps=1, first_step=3)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.global_batch_size=3"], "global_batch_size"),
        (["parallel.vpp=2"], "parallel.vpp=2 needs parallel.pp > 1"),
        (["parallel.tp=2", "parallel.sequence_parallel=false"], "sequence_parallel"),
        (["optim.warmup_steps=10"], "warmup_steps"),
        (["objective.kind=absorbing"], "mask_id"),
        (["train.recompute=selective", "train.recompute_modules=[core_attn, mlp]"], "recompute_modules"),
        (["train.skip_nonfinite_steps=-1"], "train.skip_nonfinite_steps must be >= 0, got -1"),
    ],
)
def test_conflicting_sizes_are_named(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _run(tmp_path, *overrides).validate(world_size=2 if any("tp=2" in o or "pp=2" in o for o in overrides) else 1)


@pytest.mark.parametrize(
    "override,message",
    [("train.stepz=3", "stepz"), ("train.steps=many", "train.steps"), ("data.mode=chat", "data.mode")],
)
def test_bad_config_keys_and_types_are_named(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        _run(tmp_path, override)


def test_preprocessed_jsonl_trains(tmp_path, model_parallel):
    """JSONL → tools/preprocess_data.py (int32 .bin/.idx) → GPTDataset → two training steps on it."""
    import importlib.util

    from megatron_bdgemma.training.trainer import train

    lines = [json.dumps({"text": f"document {i}: " + "the quick brown fox jumps over the lazy dog " * (i % 5 + 3)})
             for i in range(300)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    spec = importlib.util.spec_from_file_location("preprocess_data", CONFIG.parent.parent.parent / "tools" / "preprocess_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    prefix = tmp_path / "corpus"
    assert tool.main(["--input", str(tmp_path / "docs.jsonl"), "--output-prefix", str(prefix), "--tokenizer", "byte"]) == 0
    history = train(_run(tmp_path, f"data.paths=[{prefix}]", "train.steps=3", "optim.warmup_steps=1"))
    assert [h["step"] for h in history] == [1, 2, 3] and all(h["diffusion"] > 0 for h in history)


def test_a_new_run_never_writes_into_another_runs_checkpoints(tmp_path, model_parallel):
    """Starting afresh (here with another lr) into a save directory that holds a run is refused, nothing touched;
    resuming it is not."""
    from megatron_bdgemma.training.trainer import train

    root = tmp_path / "ckpt"
    train(_run(tmp_path, "train.steps=4", f"checkpoint.save={root}", "checkpoint.interval=2"))
    before = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
    with pytest.raises(ValueError, match=rf"^checkpoint\.save={root} already holds a run \(checkpoints iter_0000002, "
                                         rf"iter_0000004; latest: iter_0000004; run \w+ started on .*\); resume it with "
                                         rf"--load {root}, or choose another checkpoint\.save$"):
        train(_run(tmp_path, "train.steps=4", "optim.lr=0.001", f"checkpoint.save={root}"))
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == before
    resumed = train(_run(tmp_path, "train.steps=6", f"checkpoint.save={root}", f"checkpoint.load={root}"))
    assert [h["step"] for h in resumed] == [5, 6]


def test_pruning_keeps_the_checkpoint_just_written(tmp_path, model_parallel):
    """Later-numbered checkpoints of an abandoned run neither count against `keep_last` nor push out the new one."""
    from megatron_bdgemma.config import tiny
    from megatron_bdgemma.model import BDGemmaModel
    from megatron_bdgemma.training.checkpointing import save_checkpoint
    from megatron_bdgemma.training.run_dir import latest_checkpoint

    model = BDGemmaModel(tiny(num_layers=1, layer_types=["full_attention"]))
    for step in (7, 8):  # the abandoned run's
        save_checkpoint(tmp_path, step, model, keep_last=2)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, keep_last=2)
    assert latest_checkpoint(tmp_path).name == "iter_0000003"
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000002", "iter_0000003", "iter_0000007", "iter_0000008"]
