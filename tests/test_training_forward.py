"""Contracts of the training forward (docs/design.md §5–§7): no leakage, training decode = inference decode, the
cost cut is exact, pass 1 builds no graph, the router is frozen, gradients reach self-conditioning and the encoder K/V."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_bdgemma.config import tiny
from megatron_bdgemma.diffusion import NoisedCanvas, block_mask, build_sft_batch, noise_batch
from megatron_bdgemma.model import BDGemmaModel
from tests.hf_models import randomise_scales

BLOCK = 4
WINDOW = 5  # shorter than the prompts and responses below, so the block-anchored window matters


def _model(seed: int = 0) -> BDGemmaModel:
    torch.manual_seed(seed)
    model = BDGemmaModel(tiny(canvas_length=BLOCK, sliding_window=WINDOW))
    randomise_scales(model)  # no norm weight or scalar is the identity
    return model


def _batch():
    """Two SFT examples: prompts of 6 and 3 tokens, responses of 9 and 5 tokens (EOS-filled to 12 and 8)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 500, (2, 16), generator=generator)
    loss_mask = torch.zeros(2, 16, dtype=torch.bool)
    valid = torch.zeros(2, 16, dtype=torch.bool)
    loss_mask[0, 6:15], valid[0, :15] = True, True
    loss_mask[1, 3:8], valid[1, :8] = True, True
    return build_sft_batch(ids, loss_mask, valid, block_size=BLOCK, eos_id=1, pad_id=0)


def _all_blocks(batch, step: int = 0) -> NoisedCanvas:
    return noise_batch(batch, sample_indices=[0, 1], step=step, seed=1, vocab_size=512, score="all_blocks")


def _replace(batch, ids):
    return dataclasses.replace(batch, input_ids=ids)


@pytest.mark.parametrize("coins", [False, True])
def test_no_leakage_through_both_passes(model_parallel, coins):
    model, batch = _model(), _batch()
    noised = _all_blocks(batch)
    noised = NoisedCanvas(**{**noised.__dict__, "self_conditioning": torch.full((2,), coins)})
    p, block = int(batch.prefix_lens[0]), 1  # example 0, response block 1 = canvas slots 4..7
    rows = slice(block * BLOCK, (block + 1) * BLOCK)
    with torch.no_grad():
        base = model.training_forward(batch, noised).canvas_logits[0, rows]
        own = model.training_forward(_replace(batch, _edit(batch, 0, p + block * BLOCK + 2)), noised).canvas_logits[0, rows]
        earlier = model.training_forward(_replace(batch, _edit(batch, 0, p + 1)), noised).canvas_logits[0, rows]
    # Unchanged up to fp32 rounding of the other rows' matmuls (measured ≤ 3e-7); a visible token moves it by > 1e-2.
    assert (base - own).abs().max() <= 1e-6, "a block saw its own clean tokens"
    assert (base - earlier).abs().max() > 1e-2, "a block did not see an earlier block"


def _edit(batch, b: int, position: int) -> torch.Tensor:
    ids = batch.input_ids.clone()
    ids[b, position] = (ids[b, position] + 7) % 500 + 2
    return ids


@pytest.mark.parametrize("block", [0, 1, 2])
def test_training_decode_equals_inference(model_parallel, block):
    """Block b of the training decode = encode the clean prefix up to block b, then decode block b alone."""
    model, batch = _model(), _batch()
    noised = _all_blocks(batch)
    b, p = 0, int(batch.prefix_lens[0])
    rows = slice(block * BLOCK, (block + 1) * BLOCK)
    with torch.no_grad():
        for coin in (False, True):
            gated = NoisedCanvas(**{**noised.__dict__, "self_conditioning": torch.full((2,), coin)})
            training = model.training_forward(batch, gated).canvas_logits[b, rows]
            encoded = model.encode(batch.input_ids[b : b + 1, : p + block * BLOCK])
            canvas, positions = noised.canvas_ids[b : b + 1, rows], noised.position_ids[b : b + 1, rows]
            inference = model.decode(canvas, encoded, canvas_position_ids=positions)
            if coin:
                inference = model.decode(canvas, encoded, canvas_position_ids=positions, self_conditioning_logits=inference)
            assert (training - inference).abs().max() <= 1e-5, f"block {block}, self-conditioning {coin}"


def test_decoding_only_the_scored_block_is_exact(model_parallel):
    """Loss and every gradient are equal whether the whole canvas or only the scored block is decoded."""
    batch = _batch()
    one = noise_batch(batch, sample_indices=[0, 1], step=3, seed=1, vocab_size=512)  # decodes the chosen block only
    full = _all_blocks(batch, step=3)
    chosen = one.block_ids[:, 0]
    scored = block_mask(chosen, batch.canvas_supervised, BLOCK)
    # The full canvas must hold the same noisy tokens in the chosen block as the one-block canvas.
    canvas = full.canvas_ids.clone()
    for b in range(2):
        canvas[b, chosen[b] * BLOCK : (chosen[b] + 1) * BLOCK] = one.canvas_ids[b]
    whole = NoisedCanvas(canvas, full.targets, full.position_ids, full.block_ids, scored, scored.float(), one.self_conditioning)

    results = []
    for noised in (one, whole):
        model = _model()
        out = model.training_forward(batch, noised)
        (out.diffusion_loss_sum + out.ar_loss_sum).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.diffusion_loss_sum.detach(), out.diffusion_tokens, grads))
    (loss_a, count_a, grads_a), (loss_b, count_b, grads_b) = results
    assert count_a == count_b and torch.allclose(loss_a, loss_b, atol=1e-5, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        diff = (grads_a[name] - grads_b[name]).abs().max().item()
        scale = grads_a[name].abs().max().item()
        assert diff <= 1e-5 * max(scale, 1.0), f"{name}: gradient differs by {diff:.2e} (max {scale:.2e})"


def test_gradient_flow_and_frozen_router(model_parallel):
    model, batch = _model(), _batch()
    noised = noise_batch(batch, sample_indices=[0, 1], step=0, seed=1, vocab_size=512)
    noised = NoisedCanvas(**{**noised.__dict__, "self_conditioning": torch.tensor([True, True])})
    out = model.training_forward(batch, noised)
    out.diffusion_loss_sum.backward()  # the canvas loss alone
    assert all(not layer.mlp.router.weight.requires_grad and layer.mlp.router.weight.grad is None for layer in model.decoder.layers)
    assert all(not layer.mlp.router.scale.requires_grad for layer in model.decoder.layers)
    assert model.self_conditioning.mlp.linear_fc1.weight.grad.abs().sum() > 0
    assert model.self_conditioning.pre_norm.weight.grad.abs().sum() > 0


def test_canvas_loss_reaches_encoder_kv(model_parallel):
    model, batch = _model(), _batch()
    noised = noise_batch(batch, sample_indices=[0, 1], step=0, seed=1, vocab_size=512)
    encoded = model.encode(batch.input_ids, padding_mask=~batch.encoder_valid)
    attention = model.training_masks(batch, noised)
    with torch.no_grad():
        pass_one = model.decode(noised.canvas_ids, encoded, canvas_position_ids=noised.position_ids, attention_mask=attention)
    logits = model.decode(noised.canvas_ids, encoded, canvas_position_ids=noised.position_ids, attention_mask=attention,
                          self_conditioning_logits=pass_one)
    key, value = encoded.kv[0]
    key.retain_grad(), value.retain_grad()
    logits.logsumexp(-1).sum().backward()
    assert key.grad.abs().sum() > 0 and value.grad.abs().sum() > 0


@pytest.mark.parametrize("loss_chunk_size", [None, 8])
def test_training_forward_pass_one_builds_no_graph(model_parallel, loss_chunk_size):
    """Inside `training_forward` itself: every layer call of decode pass 1 saves no tensor for backward and returns
    no graph, while the encode and pass-2 calls (which must) do: so the counter would see a pass 1 with grad."""
    model, batch = _model(), _batch()
    noised = noise_batch(batch, sample_indices=[0, 1], step=0, seed=1, vocab_size=512)
    noised = NoisedCanvas(**{**noised.__dict__, "self_conditioning": torch.tensor([True, True])})
    saved = [0]
    layer_calls: list[tuple[int, bool]] = []  # (tensors saved for backward, output has a grad_fn), in call order
    final_norm_graph: list[bool] = []

    def count_saved(tensor: torch.Tensor) -> torch.Tensor:
        saved[0] += 1
        return tensor

    def before_layer(module, args):
        saved[0] = 0

    def after_layer(module, args, output):
        layer_calls.append((saved[0], output[0].grad_fn is not None))

    hooks = [layer.register_forward_pre_hook(before_layer) for layer in model.decoder.layers]
    hooks += [layer.register_forward_hook(after_layer) for layer in model.decoder.layers]
    hooks.append(model.decoder.final_layernorm.register_forward_hook(
        lambda module, args, output: final_norm_graph.append(output.grad_fn is not None)))
    with torch.autograd.graph.saved_tensors_hooks(count_saved, lambda tensor: tensor):
        out = model.training_forward(batch, noised, loss_chunk_size=loss_chunk_size)
    for hook in hooks:
        hook.remove()

    layers = len(model.decoder.layers)
    assert len(layer_calls) == 3 * layers, f"expected encode, pass 1, pass 2 layer calls, got {len(layer_calls)}"
    encode, pass_one, pass_two = layer_calls[:layers], layer_calls[layers : 2 * layers], layer_calls[2 * layers :]
    assert all(count > 0 and graph for count, graph in encode + pass_two), (encode, pass_two)
    assert all(count == 0 and not graph for count, graph in pass_one), pass_one
    assert final_norm_graph == [True, False, True]
    (out.diffusion_loss_sum + out.ar_loss_sum).backward()  # the graph that was built is the one that trains
    assert model.self_conditioning.mlp.linear_fc1.weight.grad.abs().sum() > 0


def test_noise_is_independent_of_the_data_parallel_split():
    batch = _batch()
    whole = noise_batch(batch, sample_indices=[10, 11], step=4, seed=3, vocab_size=512)
    for b in range(2):
        half = batch.select([b])
        part = noise_batch(half, sample_indices=[10 + b], step=4, seed=3, vocab_size=512)
        width = part.canvas_ids.shape[1]
        assert torch.equal(part.canvas_ids[0], whole.canvas_ids[b, :width])
        assert torch.equal(part.self_conditioning[0], whole.self_conditioning[b])


def test_full_activation_recompute_gives_the_same_loss_and_gradients(model_parallel):
    batch = _batch()
    noised = noise_batch(batch, sample_indices=[0, 1], step=0, seed=1, vocab_size=512)
    noised = NoisedCanvas(**{**noised.__dict__, "self_conditioning": torch.tensor([True, False])})
    results, layer_calls = [], []
    for recompute in (None, "full"):
        model = _model()
        model.config.recompute_granularity = recompute
        calls = []
        model.decoder.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))  # recompute may stop early
        out = model.training_forward(batch, noised)
        (out.diffusion_loss_sum + out.ar_loss_sum).backward()
        results.append((out.diffusion_loss_sum.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        layer_calls.append(len(calls))
    # encode, pass 1, pass 2 = 3 calls; recompute reruns the two grad-enabled ones in backward.
    assert layer_calls == [3, 5], layer_calls
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == loss_b and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5), name
