"""Contract: images in the encoder equal `DiffusionGemmaForBlockDiffusion`'s (fp32, ≤ 1e-4 relative).

Oracle: transformers' DiffusionGemma with a one-layer vision tower (`TINY_VISION`), every tensor random, image
placeholder id inside the tiny vocabulary and `use_bidirectional_attention="vision"`; images given as HF's
processor gives them (patches `[N, max_patches, 3·16²]`, (x, y) per patch, (-1, -1) on padding patches), built
here. Covered:
- the encoder's AR logits and the canvas logits with `pixel_values`: one image, two images (one of them with
  padding patches) in one prompt, a batch mixing rows with and without images (left-padded), images longer than
  the sliding window (4); eager and block-sparse attention (chunks of 3 queries that cut through the images);
- the vision-group mask rule equals transformers' masks (`create_masks_for_generate` with the block-sequence ids),
  brute force over every (row, query, key), sliding and full layers, with padding and several groups; its
  block-sparse key spans hold every key the rule allows; the group helper equals HF's; in a packed row each record
  keeps its own image groups;
- the tower and embedder are transformers' modules under the checkpoint names, frozen by default and trained with
  `train_vision`; at TP = 2 with sequence parallelism (2 gloo ranks) the logits and the trained tower's gradients
  equal one process's (text stack in float64); images without a tower or with the wrong number of placeholders are
  refused; at CP = 2 (2 gloo ranks) the training losses and every gradient equal one process's;
- the training passes with images: `training_forward`'s AR logits and every canvas block equal HF's (≤ 1e-4
  relative), two pipeline stages (2 gloo ranks) give one process's losses (≤ 1e-5 relative);
- generation with images (the KV-cached prefill takes them) gives HF `generate`'s tokens under the same seed, also
  re-encoding the prefix at every canvas; the AR baseline equals its recomputation.
Measured against HF (max-abs over the largest |HF| logit): 4e-7 to 3e-6, margins ≥ 35x, default and AVX2.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import megatron_bdgemma
from megatron_bdgemma import masks
from tests import hf_models
from tests.multiproc import run_in_processes
from tests.tolerances import record

TOL = 1e-4
IMAGE, BOI, EOI = 90, 91, 92  # inside the tiny vocabulary (96)
PATCH = 16  # TINY_VISION's patch size (the default); pooling 3×3 patches into one soft token


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    # 2 KV heads on full layers too, so TP = 2 splits whole groups; a sliding and a full layer per stage at PP = 2.
    text = dict(use_bidirectional_attention="vision", num_global_key_value_heads=2, num_hidden_layers=4,
                layer_types=[hf_models.SLIDING, hf_models.FULL] * 2)
    hf = hf_models.diffusion_gemma(text, canvas_length=4, image_token_id=IMAGE, boi_token_id=BOI, eoi_token_id=EOI)
    return hf, hf_models.save(hf, tmp_path_factory.mktemp("dg_vision") / "hf")


def _image(width: int, height: int, max_patches: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One image of `width × height` patches as HF's processor lays it out: patches row by row, then padding."""
    xy = torch.stack(torch.meshgrid(torch.arange(width), torch.arange(height), indexing="xy"), -1).reshape(-1, 2)
    pad = max_patches - len(xy)
    pixels = torch.cat([torch.rand(len(xy), 3 * PATCH**2, generator=generator), torch.zeros(pad, 3 * PATCH**2)])
    return pixels, torch.cat([xy, torch.full((pad, 2), -1)])


# Rows of the cases: text ids, and `I<n>` an image of n soft tokens between BOI and EOI. Images of 8 soft tokens
# (12 × 6 patches) are longer than the window; a 4-token image (6 × 6) is padded to the batch's 72 patches.
SIZES = {8: (12, 6), 4: (6, 6)}
CASES = {
    "one_image": [[5, 6, "I8", 7, 8, 9]],
    "two_images": [[5, "I8", 6, 7, "I4", 8, 9, 10]],
    "with_and_without": [[5, "I4", 6, 7, 8, "I8", 9], [11, 12, 13, 14, 15], [16, "I8", 17]],
}


def _batch(case: str, multiple: int = 1):
    """(ids, padding mask, mm_token_type_ids, pixel_values, image_position_ids) of a case, rows left-padded to a
    multiple of `multiple` positions."""
    generator = torch.Generator().manual_seed(len(case))
    rows, types, images = [], [], []
    for spec in CASES[case]:
        ids, kinds = [], []
        for item in spec:
            if isinstance(item, str):
                tokens = int(item[1:])
                ids += [BOI] + [IMAGE] * tokens + [EOI]
                kinds += [0] + [1] * tokens + [0]
                images.append(_image(*SIZES[tokens], 72, generator))
            else:
                ids.append(item)
                kinds.append(0)
        rows.append(ids)
        types.append(kinds)
    length = -(-max(map(len, rows)) // multiple) * multiple
    pad = [length - len(r) for r in rows]
    ids = torch.tensor([[0] * p + r for p, r in zip(pad, rows)])
    types = torch.tensor([[0] * p + t for p, t in zip(pad, types)])
    padding = torch.tensor([[True] * p + [False] * len(r) for p, r in zip(pad, rows)])
    pixels, positions = (torch.stack(t) for t in zip(*images))
    return ids, padding, types, pixels, positions


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("attention_impl", ["eager", "block_sparse"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_encoder_and_canvas_logits_with_images_match_hf(models, model_parallel, case, attention_impl):
    hf, path = models
    ours = megatron_bdgemma.from_hf(path, attention_impl=attention_impl, attention_chunk_size=3)
    ids, padding, types, pixels, positions = _batch(case)
    batch, seq = ids.shape
    canvas = torch.randint(0, 96, (batch, 4), generator=torch.Generator().manual_seed(1))
    canvas_positions = seq + torch.arange(4).expand(batch, 4)
    images = dict(pixel_values=pixels, image_position_ids=positions, mm_token_type_ids=types)
    valid = ~padding
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=valid.long(), decoder_input_ids=canvas,
                 decoder_position_ids=canvas_positions,
                 decoder_attention_mask=torch.cat([valid, torch.ones(batch, 4, dtype=torch.bool)], 1).long(), **images)
        hf_encoder = hf.lm_head(out.encoder_last_hidden_state)
        cap = hf.config.text_config.final_logit_softcapping
        hf_encoder = cap * torch.tanh(hf_encoder / cap)
        encoded = ours.encode(ids, padding_mask=padding, return_logits=True, **images)
        canvas_logits = ours.decode(canvas, encoded, canvas_position_ids=canvas_positions, encoder_padding_mask=padding)
        text_only = ours.encode(ids, padding_mask=padding, return_logits=True)  # the placeholders' embeddings
    encoder_rel = _relative(encoded.logits[valid], hf_encoder[valid])
    canvas_rel = _relative(canvas_logits, out.logits)
    print(f"{case} {attention_impl}: encoder {encoder_rel:.1e}, canvas {canvas_rel:.1e} (max-abs relative to max |HF|)")
    assert encoder_rel <= TOL and canvas_rel <= TOL
    # The images matter: without them the logits are far from HF's.
    assert _relative(text_only.logits[valid], hf_encoder[valid]) > 1e-2


def _encode_and_grads(model, case: str) -> dict[str, torch.Tensor]:
    """Encoder logits with images and, for a fixed random weighting of them, the vision parameters' gradients."""
    ids, padding, types, pixels, positions = _batch(case, multiple=2)
    logits = model.encode(ids, padding_mask=padding, return_logits=True, pixel_values=pixels,
                          image_position_ids=positions, mm_token_type_ids=types).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5), dtype=logits.dtype)
    (logits * weights)[~padding].sum().backward()
    return dict(logits=logits.detach()[~padding],
                **{name: p.grad for name, p in model.named_parameters() if name.startswith("vision.")})


def _tp2_sequence_parallel(rank: int, path: str, reference: dict[str, torch.Tensor]) -> dict[str, float]:
    from megatron_bdgemma.runtime.distributed import init_distributed

    init_distributed(tp=2)
    model = megatron_bdgemma.from_hf(path, dtype=torch.float64, sequence_parallel=True, train_vision=True)
    ours = _encode_and_grads(model, "with_and_without")
    assert sorted(ours) == sorted(reference)
    return {name: _relative(ours[name], reference[name]) for name in reference}


def test_causal_over_images_when_the_config_says_so(models, model_parallel):
    """With `vision_bidirectional` off (HF `use_bidirectional_attention=None`) the encoder stays causal over images:
    the token types change nothing; with it on they do (the image tokens see each other both ways)."""
    _, path = models
    ours = megatron_bdgemma.from_hf(path)
    assert ours.config.vision_bidirectional
    ids, padding, types, pixels, positions = _batch("two_images")
    images = dict(pixel_values=pixels, image_position_ids=positions)
    with torch.no_grad():
        causal = ours.encode(ids, return_logits=True, **images).logits
        for bidirectional in (False, True):
            ours.config.vision_bidirectional = bidirectional
            logits = ours.encode(ids, return_logits=True, mm_token_type_ids=types, **images).logits
            assert torch.equal(logits, causal) != bidirectional


def _hf_masks(config, types: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaEncoderModel

    config = config.get_text_config()
    config._attn_implementation = "sdpa"  # boolean masks, True = attend
    embeds = torch.zeros(*types.shape, 1)
    return DiffusionGemmaEncoderModel.create_masks_for_generate(
        config, embeds, valid.long(), None, torch.arange(types.shape[1])[None], mm_token_type_ids=types)


@pytest.mark.parametrize("seed", range(4))
def test_vision_group_mask_equals_hf_brute_force(models, seed):
    """Every (row, query, key) of the encoder mask with image groups, sliding (window 4) and full layers, equals
    transformers' mask on valid queries (a padded query sees only itself here, nothing in HF); the group ids equal
    HF's; every key a chunk's query may see lies in the chunk's key spans (what block-sparse attention reads)."""
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import get_block_sequence_ids_for_mask

    hf, _ = models
    generator = torch.Generator().manual_seed(seed)
    batch, seq = 3, 40
    # Random runs of text / image / video tokens, and left padding of 0..9 positions.
    types = torch.zeros(batch, seq, dtype=torch.long)
    for row in range(batch):
        k = 0
        while k < seq:
            run = int(torch.randint(1, 10, (1,), generator=generator))
            types[row, k:k + run] = int(torch.randint(0, 3, (1,), generator=generator))
            k += run
    valid = torch.arange(seq)[None] >= torch.randint(0, 10, (batch, 1), generator=generator)
    types[~valid] = 0
    groups = masks.vision_groups(types)
    assert torch.equal(groups, get_block_sequence_ids_for_mask(types, types.device))
    expected = _hf_masks(hf.config, types, valid)
    for layer_type, window in (("sliding_attention", 4), ("full_attention", None)):
        mask = masks.EncoderMask(valid, window, vision_groups=groups)
        got, want = mask.dense()[:, 0], expected[layer_type][:, 0]
        assert torch.equal(got[valid], want[valid]), layer_type
        assert torch.equal(got[~valid], torch.eye(seq, dtype=torch.bool).expand(batch, -1, -1)[~valid]), layer_type
        assert want[valid].any(-1).all() and (want & ~torch.tril(torch.ones(seq, seq, dtype=torch.bool))).any()
        for start in range(0, seq, 3):
            spans = torch.zeros(seq, dtype=torch.bool)
            for a, b in mask.key_spans(start, min(start + 3, seq)):
                spans[a:b] = True
            assert not (got[:, start:start + 3] & ~spans).any(), (layer_type, start)
    # Rows selected keep their groups.
    assert torch.equal(mask.select(torch.tensor([2, 0])).dense(), mask.dense()[[2, 0]])


@pytest.mark.parametrize("window", [3, None])
def test_packed_rows_keep_each_records_image_groups(window):
    """Two records packed into one row, the first ending and the second starting with image tokens (one run of
    image tokens for HF's block-sequence ids): each record's rows of the packed mask are its own mask, shifted, and
    nothing crosses the records, its images included; the key spans still hold every allowed key."""
    records = [torch.tensor([0, 1, 1, 0, 0, 1, 1, 1, 1]), torch.tensor([1, 1, 1, 0, 0, 1, 0])]
    types = torch.cat(records)[None]
    segments = torch.cat([torch.full((len(r),), i) for i, r in enumerate(records)])[None]
    valid = torch.ones_like(types, dtype=torch.bool)
    packed = masks.EncoderMask(valid, window, segment_ids=segments, vision_groups=masks.vision_groups(types))
    grid, offset = packed.dense()[0, 0], 0
    for kinds in records:
        n = len(kinds)
        alone = masks.EncoderMask(torch.ones(1, n, dtype=torch.bool), window, vision_groups=masks.vision_groups(kinds[None]))
        rows = grid[offset:offset + n]
        assert torch.equal(rows[:, offset:offset + n], alone.dense()[0, 0]) and rows.sum() == alone.dense().sum()
        offset += n
    for start in range(0, grid.shape[0], 2):
        (a, b), = packed.key_spans(start, min(start + 2, grid.shape[0]))
        assert not grid[start:start + 2, :a].any() and not grid[start:start + 2, b:].any()


def test_vision_modules_are_transformers_frozen_unless_trained(models, model_parallel):
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaMultimodalEmbedder
    from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionModel

    hf, path = models
    ids, padding, types, pixels, positions = _batch("one_image")
    images = dict(pixel_values=pixels, image_position_ids=positions, mm_token_type_ids=types)
    for train in (False, True):
        ours = megatron_bdgemma.from_hf(path, train_vision=train)
        assert isinstance(ours.vision.vision_tower, Gemma4VisionModel)
        assert isinstance(ours.vision.embed_vision, DiffusionGemmaMultimodalEmbedder)
        hf_vision = {k.removeprefix("model.encoder."): v for k, v in hf.state_dict().items()
                     if k.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision."))}
        held = {k.removeprefix("vision."): v for k, v in ours.state_dict().items() if k.startswith("vision.")}
        assert sorted(held) == sorted(hf_vision) and all(torch.equal(held[k], hf_vision[k]) for k in held)
        vision_params = list(ours.vision.parameters())
        assert all(p.requires_grad == train for p in vision_params)
        ours.encode(ids, padding_mask=padding, return_logits=True, **images).logits.sum().backward()
        grads = [p.grad for p in vision_params]
        assert all(g is not None and g.abs().sum() > 0 for g in grads) if train else all(g is None for g in grads)
        assert ours.embedding.word_embeddings.weight.grad.abs().sum() > 0


def test_bad_image_inputs_are_named(models, model_parallel):
    _, path = models
    ours = megatron_bdgemma.from_hf(path)
    ids, _, _, pixels, positions = _batch("one_image")
    with pytest.raises(ValueError, match=r"input_ids hold 8 image_token_id \(90\) placeholders, the images give 16"):
        ours.encode(ids, pixel_values=torch.cat([pixels, pixels]), image_position_ids=torch.cat([positions, positions]))
    with pytest.raises(ValueError, match="pixel_values needs image_position_ids"):
        ours.encode(ids, pixel_values=pixels)
    del ours.vision  # a text-only model
    with pytest.raises(ValueError, match="no vision tower"):
        ours.encode(ids, pixel_values=pixels, image_position_ids=positions)


def _sft_with_images():
    """Two SFT examples whose prompts hold an image (8 soft tokens, longer than the window; 4 tokens, its patches
    padded), responses of 9 and 5 tokens (EOS-filled to 12 and 8), block 4; and their images."""
    from megatron_bdgemma.diffusion import build_sft_batch
    from megatron_bdgemma.vision import Images

    generator = torch.Generator().manual_seed(4)
    prompts = [[5, BOI, *[IMAGE] * 8, EOI, 6], [7, BOI, *[IMAGE] * 4, EOI]]
    responses = [torch.randint(2, 89, (9,), generator=generator).tolist(), torch.randint(2, 89, (5,), generator=generator).tolist()]
    ids = torch.zeros(2, 24, dtype=torch.long)
    loss_mask, valid = torch.zeros(2, 24, dtype=torch.bool), torch.zeros(2, 24, dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        p, n = len(prompt), len(response)
        ids[row, :p + n] = torch.tensor(prompt + response)
        loss_mask[row, p:p + n], valid[row, :p + n] = True, True
    batch = build_sft_batch(ids, loss_mask, valid, block_size=4, eos_id=1, pad_id=0)
    pixels, positions = (torch.stack(t) for t in zip(_image(12, 6, 72, generator), _image(6, 6, 72, generator)))
    return batch, Images(pixels, positions, (batch.input_ids == IMAGE).long(), torch.tensor([0, 1]))


def test_training_forward_with_images_matches_hf(models, model_parallel):
    """`training_forward(images=...)`: the AR logits equal HF's encoder over each row with its image, and every
    decoded canvas block (self-conditioning off) equals HF's decode of that block after its clean prefix (the prompt
    with its image and the earlier response blocks), ≤ 1e-4 relative."""
    from megatron_bdgemma.diffusion import noise_batch

    hf, path = models
    ours = megatron_bdgemma.from_hf(path)
    batch, images = _sft_with_images()
    noised = noise_batch(batch, sample_indices=[0, 1], step=0, seed=1, vocab_size=96, score="all_blocks")
    noised = replace(noised, self_conditioning=torch.zeros(2, dtype=torch.bool))
    with torch.no_grad():
        out = ours.training_forward(batch, noised, images=images)
    cap, bs, image_of_row = hf.config.text_config.final_logit_softcapping, 4, [slice(0, 1), slice(1, 2)]
    worst, blocks = {"encoder": 0.0, "canvas": 0.0}, 0
    for row in range(2):
        length, prompt = int(batch.encoder_valid[row].sum()), int(batch.prefix_lens[row])
        pixels = dict(pixel_values=images.pixel_values[image_of_row[row]],
                      image_position_ids=images.image_position_ids[image_of_row[row]])
        types = images.mm_token_type_ids[row:row + 1]
        with torch.no_grad():
            hidden = hf.model.encoder(input_ids=batch.input_ids[row:row + 1, :length], mm_token_type_ids=types[:, :length],
                                      **pixels).last_hidden_state
            expected = cap * torch.tanh(hf.lm_head(hidden) / cap)
        worst["encoder"] = max(worst["encoder"], _relative(out.encoder_logits[row, :length], expected[0]))
        for slot, block in enumerate(noised.block_ids[row].tolist()):
            if block < 0:
                continue
            start = prompt + block * bs  # the block's clean prefix ends here
            canvas = slice(slot * bs, (slot + 1) * bs)
            with torch.no_grad():
                expected = hf(input_ids=batch.input_ids[row:row + 1, :start], mm_token_type_ids=types[:, :start],
                              decoder_input_ids=noised.canvas_ids[row:row + 1, canvas],
                              decoder_position_ids=noised.position_ids[row:row + 1, canvas], **pixels).logits
            worst["canvas"] = max(worst["canvas"], _relative(out.canvas_logits[row, canvas], expected[0]))
            blocks += 1
    print(f"training forward with images, {blocks} canvas blocks: {worst}")
    assert blocks == 5 and max(worst.values()) <= TOL


def _cp_case():
    """The images' SFT batch with every response block decoded (canvas 12 = 3 slots per CP chunk), coins True, False:
    both self-conditioning paths run."""
    from megatron_bdgemma.diffusion import noise_batch

    batch, images = _sft_with_images()
    noised = noise_batch(batch, sample_indices=[0, 1], step=0, seed=1, vocab_size=96, score="all_blocks")
    return batch, images, replace(noised, self_conditioning=torch.tensor([True, False]))


def _losses_and_grads(path: str, attention: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss sums and every gradient (trained tower included) of `training_forward` with images, the text stack in
    float64, the tower as stored (fp32)."""
    model = megatron_bdgemma.from_hf(path, dtype=torch.float64, train_vision=True, attention_impl=attention,
                                     attention_chunk_size=3)
    batch, images, noised = _cp_case()
    out = model.training_forward(batch, noised, images=images)
    (out.diffusion_loss_sum + out.ar_loss_sum).backward()
    sums = torch.stack([out.diffusion_loss_sum.detach(), out.ar_loss_sum.detach()])
    return sums, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _cp2_with_images(rank: int, path: str, references: dict) -> dict[str, dict[str, float]]:
    """Both attention implementations on rank `rank` of a CP group of 2: loss sums and gradients summed over the
    ranks (what DDP reduces over DP × CP), relative to one process's."""
    from megatron.core import parallel_state

    from megatron_bdgemma.runtime.distributed import init_distributed
    from tests.test_context_parallel_model import summed_over_cp

    init_distributed(cp=2)
    group, diffs = parallel_state.get_context_parallel_group(), {}
    for attention, reference in references.items():
        sums, errors = summed_over_cp(*_losses_and_grads(path, attention), reference, group)
        diffs[attention] = dict(losses=_relative(sums, reference[0]),
                                text=max(e for name, e in errors.items() if not name.startswith("vision.")),
                                vision=max(e for name, e in errors.items() if name.startswith("vision.")))
    return diffs


def test_cp2_training_forward_with_images_equals_one_process(models, model_parallel):
    """Context parallelism with images (docs/design.md §14), 2 gloo ranks: every rank encodes all the batch's images
    and takes the features of the placeholders in its load-balanced shard (`vision.placeholder_slots` of the whole
    rows); the masks keep each image's tokens bidirectional across the shard boundaries (the images are longer than
    a chunk of 6). Loss sums and every gradient, summed over the ranks, equal one process's, eager and block-sparse
    (query chunks of 3). The text stack in float64, where only the grouping of sums changes: loss sums and text
    gradients ≤ 1e-12 relative to the largest entry (measured 1.8e-16, 3.9e-14). The tower computes in float32
    whatever its dtype (transformers casts inside it), and each rank backpropagates only its own placeholders'
    rows through it, summed after: its gradients ≤ 1e-5, the issue's bound for layouts (measured 4.5e-7)."""
    _, path = models
    references = {attention: _losses_and_grads(str(path), attention) for attention in ("eager", "block_sparse")}
    for rank, diffs in enumerate(run_in_processes(_cp2_with_images, 2, str(path), references)):
        for attention, diff in diffs.items():
            print(f"CP=2 rank {rank} {attention}: {diff}")
            for name, bound in (("losses", 1e-12), ("text", 1e-12), ("vision", 1e-5)):
                record(f"cp2 images {attention} rank {rank} {name}", diff[name], bound)
                assert diff[name] <= bound, (rank, attention, diff)


def _training_losses(model, batch, images, noised) -> torch.Tensor:
    with torch.no_grad():
        out = model.training_forward(batch, noised, images=images)
    return torch.stack([out.diffusion_loss_sum, out.ar_loss_sum])


def _pp2_stage(rank: int, path: str) -> torch.Tensor | None:
    """Both passes of one micro-batch over two pipeline stages, the stream handed on by hand (what Megatron's
    schedule sends): the first stage encodes the images."""
    import torch.distributed as dist

    from megatron_bdgemma.runtime.distributed import init_distributed

    init_distributed(pp=2)
    model = megatron_bdgemma.from_hf(path, pipeline_dtype=torch.float32)
    batch, images, noised = _pp_batch()
    batch_size, hidden = batch.input_ids.shape[0], model.config.hidden_size
    stream = torch.empty(batch.seq_len + noised.canvas_ids.shape[1], batch_size, hidden)
    canvas = torch.empty(noised.canvas_ids.shape[1], batch_size, hidden)
    with torch.no_grad():
        if rank == 0:
            dist.send(model.pipeline_stage_forward(batch, noised, first_pass=True, images=images).contiguous(), 1)
            dist.recv(canvas, 1)
            dist.send(model.pipeline_stage_forward(batch, noised, first_pass=False, first_pass_hidden=canvas,
                                                   images=images).contiguous(), 1)
            return None
        for first_pass in (True, False):
            dist.recv(stream, 0)
            model.set_input_tensor(stream)
            out = model.pipeline_stage_forward(batch, noised, first_pass=first_pass, images=images)
            if first_pass:
                dist.send(out.contiguous(), 0)
    return torch.stack([out.diffusion_loss_sum, out.ar_loss_sum])


def _pp_batch():
    from megatron_bdgemma.diffusion import noise_batch

    batch, images = _sft_with_images()
    # Self-conditioning coins 0.5: the first stage forms the signal from the last stage's pass-1 hidden states.
    return batch, images, noise_batch(batch, sample_indices=[0, 1], step=3, seed=2, vocab_size=96, score="all_blocks")


def _two_layouts(rank: int, path: str, reference: dict[str, torch.Tensor]) -> tuple[dict[str, float], torch.Tensor | None]:
    """One spawn of two ranks for both layouts (each start imports torch and megatron)."""
    return _tp2_sequence_parallel(rank, path, reference), _pp2_stage(rank, path)


def test_tp2_and_pp2_with_images_equal_one_process(models, model_parallel):
    """Two gloo ranks, two layouts.

    TP = 2 with sequence parallelism: every rank runs the whole tower and keeps its share of the merged embeddings;
    the encoder logits and a trained tower's gradients, without any TP reduction, equal one process's. The text
    stack runs in float64 here (as tests/test_parallel_equivalence.py compares layouts: fp32 rounding noise of the
    tiny random model differs between CPUs), the tower in its stored fp32 on the same images everywhere: logits
    relative to the largest ≤ 1e-12 (measured 2e-15); each gradient relative to its largest entry ≤ 1e-6, room for
    the fp32 tower to round float64 incoming gradients differently (measured: bit-identical).

    PP = 2: the first stage encodes the images, every stage applies their groups; the diffusion and AR loss sums
    (fp32) equal one process's `training_forward` to 1e-5 relative (measured: equal)."""
    _, path = models
    reference = _encode_and_grads(megatron_bdgemma.from_hf(path, dtype=torch.float64, train_vision=True),
                                  "with_and_without")
    reference_losses = _training_losses(megatron_bdgemma.from_hf(path), *_pp_batch())
    results = run_in_processes(_two_layouts, 2, str(path), reference)
    for rank, (diffs, _) in enumerate(results):
        grads = {name: value for name, value in diffs.items() if name != "logits"}
        worst = max(grads, key=grads.get)
        print(f"TP=2 rank {rank}: logits {diffs['logits']:.1e}, worst of {len(grads)} gradients {worst} {grads[worst]:.1e}")
        record(f"tp2 rank {rank} logits", diffs["logits"], 1e-12)
        record(f"tp2 rank {rank} vision gradients", grads[worst], 1e-6)
        assert diffs["logits"] <= 1e-12 and grads[worst] <= 1e-6, (rank, diffs)
    losses = results[1][1]
    diff = ((losses - reference_losses).abs() / reference_losses.abs()).max().item()
    print(f"PP=2 losses {losses.tolist()} vs {reference_losses.tolist()}: {diff:.1e}")
    record("pp2 losses", diff, 1e-5)
    assert diff <= 1e-5


def test_generation_with_images_gives_hf_generate_tokens(models, model_parallel):
    """`generate(..., pixel_values, image_position_ids, mm_token_type_ids)`: the prompts' encode (KV-cached prefill)
    takes the images and their groups; the tokens equal HF `generate`'s under the same seed (a batch with and
    without images, left-padded), and re-encoding the whole prefix at every canvas gives the same ones."""
    from megatron_bdgemma.generation import EntropyBound, generate

    hf, path = models
    hf.set_attn_implementation("sdpa")  # what our generation's decode runs, as tests/test_generation.py does
    ours = megatron_bdgemma.from_hf(path)
    ids, padding, types, pixels, positions = _batch("with_and_without")
    images = dict(pixel_values=pixels, image_position_ids=positions, mm_token_type_ids=types)
    try:
        torch.manual_seed(7)
        expected = hf.generate(ids, attention_mask=(~padding).long(), max_new_tokens=8, pad_token_id=0,
                               max_denoising_steps=6, **images).sequences
    finally:
        hf.set_attn_implementation("eager")
    got = {}
    for recompute in (False, True):
        torch.manual_seed(7)
        got[recompute] = generate(ours, ids, padding_mask=padding, sampler=EntropyBound(max_denoising_steps=6),
                                  max_new_tokens=8, eos_token_ids=[], pad_token_id=0, recompute_prefix=recompute,
                                  **images).sequences
    assert torch.equal(got[False], expected) and torch.equal(got[True], expected)
    torch.manual_seed(7)
    text_only = generate(ours, ids, padding_mask=padding, sampler=EntropyBound(max_denoising_steps=6),
                         max_new_tokens=8, eos_token_ids=[], pad_token_id=0).sequences
    assert not torch.equal(text_only, expected)  # the images matter


def test_autoregressive_generation_with_images_matches_recomputation(models, model_parallel):
    from megatron_bdgemma.generation import Autoregressive, generate

    _, path = models
    ours = megatron_bdgemma.from_hf(path)
    ids, padding, types, pixels, positions = _batch("with_and_without")
    images = dict(pixel_values=pixels, image_position_ids=positions)
    got = generate(ours, ids, padding_mask=padding, sampler=Autoregressive(), max_new_tokens=4, eos_token_ids=[],
                   mm_token_type_ids=types, **images)
    sequence = ids
    with torch.no_grad():
        for _ in range(4):
            grown = sequence.shape[1] - ids.shape[1]
            logits = ours.encode(sequence, padding_mask=torch.nn.functional.pad(padding, (0, grown)), return_logits=True,
                                 mm_token_type_ids=torch.nn.functional.pad(types, (0, grown)), **images).logits
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got.sequences, sequence)
