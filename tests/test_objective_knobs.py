"""Contracts of the objective knobs Megatron-Bridge's DiffusionGemma provider exposes (issue 23 §3): the diffusion loss
weight, the encoder-gradient stop and the frozen self-conditioning module.

The oracles are built by hand from the model's public passes, not from `training_forward`: the stop-gradient's is
the two-pass step with the encoder run under `torch.no_grad()` (its K/V then are constants to the canvas), the loss
weights' the diffusion and AR gradients taken one at a time. Compared in float64 (`precision.compute_dtype`), where
what is left is float64 rounding, so a bound of 1e-12 relative to each gradient's largest entry holds on every CPU.
The PP=2 case of the stop-gradient is in tests/test_pipeline_parallel.py (`sft_pp2_knobs`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_bdgemma.config import tiny
from megatron_bdgemma.diffusion import NoisedCanvas, ar_loss, build_sft_batch, diffusion_loss, noise_batch
from megatron_bdgemma.model import BDGemmaModel
from megatron_bdgemma.training.config import load_run_config
from tests.hf_models import randomise_scales
from tests.tolerances import record

CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "configs"
BLOCK = 4
TOL = 1e-12
"""Float64 gradients (and loss sums), relative to each tensor's largest magnitude (tests/tolerances.py). Worst
measured: 0 on the plain path (the same products in the same order), 6.0e-15 with the chunked loss, 3.7e-15 through
the trainer's schedule with the defaults (AVX-512); 4.6e-15 and 3.6e-15 under AVX2: margins >= 160x. The difference
the stop makes to a gradient, asserted above 1e-3, measured 1.4 (k_layernorm's, relative)."""


def _model(**config) -> BDGemmaModel:
    torch.manual_seed(0)
    model = BDGemmaModel(tiny(num_layers=2, layer_types=["sliding_attention", "full_attention"], canvas_length=BLOCK,
                              sliding_window=5, **config)).double()
    randomise_scales(model)  # no norm weight or scalar is the identity
    return model.train()


def _inputs():
    """Two SFT examples (prompts of 6 and 3 tokens, responses of 9 and 5), one scored block each, both coins on."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 500, (2, 16), generator=generator)
    loss_mask, valid = torch.zeros(2, 16, dtype=torch.bool), torch.zeros(2, 16, dtype=torch.bool)
    loss_mask[0, 6:15], valid[0, :15] = True, True
    loss_mask[1, 3:8], valid[1, :8] = True, True
    batch = build_sft_batch(ids, loss_mask, valid, block_size=BLOCK, eos_id=1, pad_id=0)
    noised = noise_batch(batch, sample_indices=[0, 1], step=0, seed=1, vocab_size=512)
    return batch, NoisedCanvas(**{**noised.__dict__, "self_conditioning": torch.tensor([True, True])})


def _grads(loss: torch.Tensor, model: BDGemmaModel) -> dict[str, torch.Tensor]:
    """d loss / d every trainable parameter (zeros where the loss does not depend on it)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)}


def _oracle(model: BDGemmaModel, batch, noised, *, encoder_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(diffusion loss sum, AR loss sum) of the two-pass step composed by hand; `encoder_grad=False` runs the
    encoder under `torch.no_grad()`, so the canvas attends to constant K/V, and takes the AR loss from a second
    encode with grad."""
    with torch.set_grad_enabled(encoder_grad):
        encoded = model.encode(batch.input_ids, padding_mask=~batch.encoder_valid, return_logits=True)
    if not encoder_grad:
        assert not encoded.kv[0][0].requires_grad
    attention = model.training_masks(batch, noised)
    decode = dict(canvas_position_ids=noised.position_ids, attention_mask=attention)
    with torch.no_grad():
        first = model.decode(noised.canvas_ids, encoded, **decode)
    logits = model.decode(noised.canvas_ids, encoded, **decode, self_conditioning_logits=first,
                          self_conditioning_mask=noised.self_conditioning)
    diffusion, _ = diffusion_loss(logits, noised.targets, noised.scored, noised.weights)
    with_grad = encoded if encoder_grad else model.encode(batch.input_ids, padding_mask=~batch.encoder_valid,
                                                         return_logits=True)
    ar, _ = ar_loss(with_grad.logits, batch.ar_labels, batch.ar_loss_mask)
    return diffusion, ar


def _worst(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert got.keys() == expected.keys()
    return max((((got[n] - e).abs().max() / e.abs().max().clamp(min=1e-300)).item(), n) for n, e in expected.items())


@pytest.mark.parametrize("loss_chunk_size", [None, 8])
def test_stop_gradient_equals_an_encoder_without_grad(model_parallel, loss_chunk_size):
    """With `stop_gradient_to_encoder` the diffusion loss's parameter gradients are those of the step whose encoder
    ran under no_grad, and the AR loss's are unchanged; without it they are the full step's (the oracle composition
    is faithful), which differ from the stopped ones by far more than the bound (the check can fail)."""
    model, (batch, noised) = _model(), _inputs()
    stopped_diffusion, stopped_ar = _oracle(model, batch, noised, encoder_grad=False)
    full_diffusion, full_ar = _oracle(model, batch, noised, encoder_grad=True)
    expected = {"stopped": (_grads(stopped_diffusion, model), _grads(stopped_ar, model)),
                "full": (_grads(full_diffusion, model), _grads(full_ar, model))}
    for case, stop in (("stopped", True), ("full", False)):
        out = model.training_forward(batch, noised, loss_chunk_size=loss_chunk_size, stop_gradient_to_encoder=stop)
        torch.testing.assert_close(out.diffusion_loss_sum, stopped_diffusion, rtol=TOL, atol=0)  # same forward
        for term, loss, oracle in (("diffusion", out.diffusion_loss_sum, expected[case][0]),
                                   ("ar", out.ar_loss_sum, expected[case][1])):
            worst, name = _worst(_grads(loss, model), oracle)
            record(f"{case} {term} grads (chunk {loss_chunk_size})", worst, TOL)
            assert worst <= TOL, f"{case} {term}: {name} differs by {worst:.2e}"
    # The stop matters: the encoder's K/V projections get a diffusion gradient only without it.
    gap, name = _worst(expected["stopped"][0], expected["full"][0])
    assert gap > 1e-3, f"the encoder K/V carry no diffusion gradient here ({name}: {gap:.1e}); the test cannot tell"


def _float64_trainer(tmp: Path, *overrides: str):
    """A 1-process trainer state on a float64 model: the run's model config and data, megatron DDP reducing in
    float64 (megatron's optimizer is not needed: the step's gradients are compared before it)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_bdgemma.training.data import build_step_data
    from megatron_bdgemma.training.trainer import TrainState, build_model_chunks, build_model_config

    run = load_run_config(CONFIGS / "tiny_sft.yaml", [
        f"data.cache_dir={tmp / 'data'}", "data.seq_length=64", "data.truncation=true", "train.micro_batch_size=2", "train.global_batch_size=4",
        "checkpoint.save=null", "model.overrides={num_layers: 2, layer_types: [sliding_attention, full_attention], "
        "canvas_length: 8}", *overrides])
    run.model.overrides |= dict(params_dtype=torch.float64, pipeline_dtype=torch.float64)
    config = build_model_config(run)
    torch.manual_seed(0)
    module = build_model_chunks(config, "local", None)[0]
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=False), module)
    config.no_sync_func, config.finalize_model_grads_func = ddp.no_sync, finalize_model_grads
    return TrainState(run, config, [ddp], None, None, build_step_data(run, config))


@pytest.mark.parametrize("stop", [False, True], ids=["encoder_grad", "stop_gradient"])
def test_trainer_weights_the_loss_terms(tmp_path, model_parallel, stop):
    """Through the trainer's schedule: the step's gradients are diffusion_weight · g_diffusion + ar_weight · g_ar, each
    term's gradient taken alone (by hand, `_oracle`) and summed over the micro-batches, and the losses it reports
    are the unweighted terms. 0.3 and 2.5: a dropped, swapped or doubled weight shows."""
    from megatron_bdgemma.training.trainer import _forward_backward, _global_counts, _microbatches

    state = _float64_trainer(tmp_path, "objective.diffusion_weight=0.3", "objective.ar_weight=2.5",
                             f"objective.stop_gradient_to_encoder={str(stop).lower()}")
    model = state.model[0].module
    microbatches = _microbatches(state, 0)
    assert len(microbatches) == 2
    counts = _global_counts(microbatches, torch.device("cpu"))
    assert counts[0] > 1 and counts[1] > 1  # both terms present: 64-token records keep a supervised answer
    expected, reported = {}, torch.zeros(2, dtype=torch.float64)
    for mb in microbatches:
        diffusion, ar = _oracle(model, mb.batch, mb.noised, encoder_grad=not stop)
        diffusion, ar = diffusion / counts[0], ar / counts[1]
        reported += torch.stack([diffusion, ar]).detach()
        g_diffusion, g_ar = _grads(diffusion, model), _grads(ar, model)
        for name in g_diffusion:
            expected[name] = expected.get(name, 0) + 0.3 * g_diffusion[name] + 2.5 * g_ar[name]
    state.model[0].zero_grad_buffer()
    losses = _forward_backward(state, microbatches, counts, forward_only=False, what="step 0")
    got = {name: p.main_grad for name, p in model.named_parameters() if p.requires_grad}
    worst, name = _worst(got, expected)
    record(f"weighted step grads (stop={stop})", worst, TOL)
    assert worst <= TOL, f"{name} differs by {worst:.2e}"
    worst_loss = ((losses.double() - reported).abs() / reported.abs()).max().item()
    record("reported unweighted losses", worst_loss, TOL)
    assert worst_loss <= TOL, (losses, reported)


@pytest.mark.parametrize("weights,message", [
    (["objective.diffusion_weight=-0.1"], "got -0.1, 1.0"),
    (["objective.ar_weight=-1.0"], "got 1.0, -1.0"),
    (["objective.diffusion_weight=0", "objective.ar_weight=0"], "got 0, 0"),
])
def test_loss_weights_are_refused_negative_or_both_zero(weights, message):
    run = load_run_config(CONFIGS / "tiny_sft.yaml", weights)
    with pytest.raises(ValueError, match=r"^invalid run configuration: need objective\.diffusion_weight >= 0 and "
                                         rf"objective\.ar_weight >= 0, not both 0, {message}$"):
        run.validate(1)
    for allowed in (["objective.ar_weight=0"], ["objective.diffusion_weight=0"]):  # one term alone trains
        load_run_config(CONFIGS / "tiny_sft.yaml", allowed).validate(1)


def test_frozen_self_conditioning_gets_no_gradient(model_parallel):
    """`freeze_self_conditioning`: the module's parameters get none, while the signal's gradient still reaches the
    tied embedding through it (the embedding's gradient equals the unfrozen model's)."""
    batch, noised = _inputs()
    grads = {}
    for frozen in (False, True):
        model = _model(freeze_self_conditioning=frozen)
        module = [p for p in model.self_conditioning.parameters()]
        assert module and all(p.requires_grad != frozen for p in module)
        out = model.training_forward(batch, noised)
        (out.diffusion_loss_sum + out.ar_loss_sum).backward()
        assert all((p.grad is None) == frozen for p in module)
        grads[frozen] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads[False].keys() - grads[True].keys() == {f"self_conditioning.{n}" for n, _ in
                                                          model.self_conditioning.named_parameters()}
    worst, name = _worst(grads[True], {n: grads[False][n] for n in grads[True]})
    assert worst <= TOL, f"freezing changed {name}'s gradient by {worst:.2e}"


def test_frozen_self_conditioning_through_training_and_resume(tmp_path, model_parallel):
    """With the distributed optimizer: 3 steps from HF weights leave the self-conditioning module (and the frozen
    router) bit for bit the HF ones while every other parameter moves; the checkpoint saves them (a resume does not
    read model.hf, so unsaved ones would be the random init), and resuming step 3 from step 2 gives the uninterrupted
    run's losses and parameters bit for bit."""
    from tests import hf_models

    from megatron_bdgemma.training.resume import resume_run_config
    from megatron_bdgemma.training.trainer import _train, setup, train_step

    hf = hf_models.save(hf_models.diffusion_gemma(dict(vocab_size=320), canvas_length=16), tmp_path / "hf")
    run = load_run_config(CONFIGS / "tiny_sft.yaml", [
        f"data.cache_dir={tmp_path / 'data'}", "data.seq_length=64", "data.truncation=true", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.steps=3", "optim.warmup_steps=1", f"model.hf={hf}",
        "model.overrides={freeze_self_conditioning: true}", "optim.distributed_optimizer=true",
        f"checkpoint.save={tmp_path / 'run'}", "checkpoint.interval=2"])
    state = setup(run)
    start = {n: p.detach().clone() for n, p in state.model[0].module.named_parameters()}
    try:
        history = _train(state)
    finally:
        state.release_run_directory()
    final = {n: p.detach().clone() for n, p in state.model[0].module.named_parameters()}
    frozen = {n for n, p in state.model[0].module.named_parameters() if not p.requires_grad}
    assert {n for n in start if n.startswith("self_conditioning.")} <= frozen
    assert all(torch.equal(final[n], start[n]) for n in frozen)
    moved = [n for n in start if n not in frozen and not torch.equal(final[n], start[n])]
    assert moved == [n for n in start if n not in frozen]

    resumed = setup(resume_run_config(tmp_path / "run" / "iter_0000002", None, [f"checkpoint.save={tmp_path / 'r'}"]))
    try:
        model = resumed.model[0].module
        assert all(torch.equal(p, start[n]) for n, p in model.named_parameters() if n in frozen)
        metrics, _ = train_step(resumed)
    finally:
        resumed.release_run_directory()
    assert (metrics["diffusion"], metrics["ar"]) == (history[-1]["diffusion"], history[-1]["ar"])
    assert all(torch.equal(p, final[n]) for n, p in model.named_parameters())


def test_cli_names_bad_loss_weights():
    """Through the public CLI: one line naming both keys and the values given, exit code 1, nothing trained."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(repo / "examples" / "pretrain_bdgemma.py"), "--config", str(CONFIGS / "tiny_sft.yaml"),
         "objective.diffusion_weight=-0.5", "checkpoint.save=null"],
        cwd=repo, env=os.environ | {"PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1] == ("error: invalid run configuration: need objective.diffusion_weight >= 0 "
                                            "and objective.ar_weight >= 0, not both 0, got -0.5, 1.0")
    assert "step" not in done.stdout
