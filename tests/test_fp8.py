"""FP8 training (issue: Transformer Engine FP8): what runs on CPU is the contract around it -- the run config names
every FP8 conflict, the model enters Megatron's per-layer FP8 context in every pass (our passes drive the layers
themselves, so `TransformerBlock.forward`'s context is never entered) -- and, with Transformer Engine on a GPU,
FP8 losses follow BF16 over a few steps."""

from __future__ import annotations

import contextlib

import pytest
import torch

import megatron_bdgemma.model as model_module
from megatron_bdgemma.config import tiny
from megatron_bdgemma.diffusion import noise_batch
from tests.test_training import _losses, _run
from tests.test_training_forward import _batch, _model

try:
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except ImportError:
    HAVE_TE = False


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.fp8=hybrid", "train.bf16=true"], "model.backend=te"),
        (["train.fp8=hybrid", "model.backend=te"], "train.bf16=true"),
        (["train.fp8=hybrid", "model.backend=te", "train.bf16=true", "data.seq_length=40"], "multiple of 16"),
        (["train.fp8_param=true"], "fp8_param needs train.fp8"),
        (["train.fp8=e4m3", "model.backend=te", "train.bf16=true", "train.fp8_param=true", "optim.distributed_optimizer=false"],
         "distributed_optimizer"),
        (["train.fp8_recipe=delayed"], "train.fp8_recipe"),
    ],
)
def test_fp8_conflicts_are_named(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _run(tmp_path, *overrides).validate(world_size=1)


def test_fp8_canvas_must_fit_fp8_gemms():
    config = tiny(canvas_length=24)
    config.fp8 = "hybrid"  # set after construction: megatron-core refuses fp8 configs without Transformer Engine
    with pytest.raises(ValueError, match="canvas_length to be a multiple of 16"):
        config._validate()


@pytest.mark.parametrize("recompute", [None, "full"])
def test_every_layer_call_enters_the_fp8_context(model_parallel, monkeypatch, recompute):
    entered = []

    @contextlib.contextmanager
    def recording_context(config, layer_no=-1, is_init=False):
        entered.append(layer_no)
        yield

    monkeypatch.setattr(model_module, "get_fp8_context", recording_context)
    model, batch = _model(), _batch()
    model.config.recompute_granularity = recompute
    noised = noise_batch(batch, sample_indices=[0, 1], step=0, seed=1, vocab_size=512)
    out = model.training_forward(batch, noised)
    (out.diffusion_loss_sum + out.ar_loss_sum).backward()
    layers = list(range(model.config.num_layers))
    # encode, decode pass 1, decode pass 2; recompute reruns the two passes with grad (in reverse layer order).
    expected = layers * 3 + (2 * layers[::-1] if recompute else [])
    assert sorted(entered) == sorted(expected), entered


GPU_WITH_TE = HAVE_TE and torch.cuda.is_available()
GPU_WITH_TE_REASON = f"FP8 needs a CUDA GPU and Transformer Engine (GPU: {torch.cuda.is_available()}, TE: {HAVE_TE})"


FP8_COMMON = ["model.backend=te", "train.bf16=true", "data.seq_length=64", "optim.distributed_optimizer=true",
              "train.steps=50"]


@pytest.fixture(scope="module")
def bf16_losses(tmp_path_factory):
    from megatron_bdgemma.training.trainer import train

    return _losses(train(_run(tmp_path_factory.mktemp("bf16"), *FP8_COMMON)))


@pytest.mark.skipif(not GPU_WITH_TE, reason=GPU_WITH_TE_REASON)  # missing hardware: a CUDA GPU with transformer_engine
@pytest.mark.parametrize("recipe,fp8_param", [("tensorwise", False), ("blockwise", False), ("mxfp8", False),
                                              ("tensorwise", True)])
def test_fp8_losses_follow_bf16(tmp_path, bf16_losses, recipe, fp8_param):
    """50 steps of the small model: FP8 diffusion and AR losses within 2% of BF16's at every step."""
    import transformer_engine.pytorch as te
    from megatron_bdgemma.training.trainer import train

    available = {"tensorwise": te.is_fp8_available, "blockwise": te.is_fp8_block_scaling_available,
                 "mxfp8": te.is_mxfp8_available}[recipe]()
    if not (available[0] if isinstance(available, tuple) else available):  # missing hardware: this card lacks it
        pytest.skip(f"the {recipe} FP8 recipe is not supported on {torch.cuda.get_device_name()}: {available}")
    fp8 = _losses(train(_run(tmp_path, *FP8_COMMON, "train.fp8=hybrid", f"train.fp8_recipe={recipe}",
                             f"train.fp8_param={str(fp8_param).lower()}")))
    for step, (a, b) in enumerate(zip(bf16_losses, fp8, strict=True), 1):
        assert abs(a[0] - b[0]) <= 0.02 * abs(a[0]) and abs(a[1] - b[1]) <= 0.02 * abs(a[1]), (step, a, b)


def test_te_backend_without_transformer_engine_says_how_to_install(model_parallel, monkeypatch):
    """megatron-core's mock TE classes used to fail with a bare StopIteration inside layer construction. Runs with or
    without Transformer Engine installed: the package lookup is made to miss it."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformer_engine" else find_spec(name, *a))
    from megatron_bdgemma.model import BDGemmaModel

    with pytest.raises(ImportError, match=r"Transformer Engine, which is not installed: pip install -e \.\[te\]"):
        BDGemmaModel(tiny(), backend="te")
