"""The block-diffusion generation loop (and the autoregressive baseline) over `encode` / `decode`.

Block diffusion, HF `DiffusionGemmaForBlockDiffusion.generate` semantics (docs/design.md §10):

1. encode the prompt once into the KV cache;
2. per canvas of R = `canvas_length` tokens at positions `L .. L+R-1`: draw a uniform random canvas, then for
   n = N..1 decode it against the cache (self-conditioning on the previous step's tempered logits, zero at the
   first step) and let the sampler produce the next canvas; a row that meets the adaptive stop keeps its canvas,
   argmax and self-conditioning logits while the others go on; stop early when every row has stopped;
3. commit the **argmax** canvas; a row whose committed canvas holds an EOS id has ended: tokens after its first
   EOS become pad, its later canvases are all pad; the padded canvas is what the next step encodes;
4. stop when every row has ended or after `ceil(max_new_tokens / R)` canvases (the output is not truncated).

With the same seed in torch's global generator (or the same `generator`) the random draws happen in HF's order,
so the tokens equal HF's. Rows that have ended are still denoised (their result is discarded) because HF's
early exit from a canvas waits for them, and that changes how many numbers later canvases draw.
Rows that met the adaptive stop are not decoded again in that canvas (HF decodes and discards them).

Tokens per forward is HF's: non-pad generated tokens over the decoder forwards counted while the row was
neither stopped in its canvas nor ended.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_bdgemma.generation.cache import EncoderKVCache, encode_into
from megatron_bdgemma.generation.compiled import compiled_decode, compiled_distribution, distribution
from megatron_bdgemma.generation.samplers import Autoregressive, CanvasSampler, EntropyBound, Sampler
from megatron_bdgemma.layers.grouped_experts import stacked_weights_held
from megatron_bdgemma.model import BDGemmaModel

__all__ = ["GenerationOutput", "generate", "left_pad"]

CanvasCallback = Callable[[int, Tensor, Tensor], None]
"""Streaming and progress hook `(index, tokens, forwards)`: called with each committed block `tokens [B, n]` (a
canvas, or one AR token), pad already substituted, `index` counting blocks from 0, and each row's forwards so far
`forwards [B]` (counted as `GenerationOutput.forwards`, so the non-pad tokens so far over them is the row's tokens
per forward up to this block). Not called at all when None: the loop pays nothing for it then."""


@dataclass
class GenerationOutput:
    """What `generate` returns.

    sequences: `[B, S + G]`, the (left-padded) prompt followed by the G generated tokens, pad after each row's EOS.
    prompt_length: S.
    forwards: `[B]` int, decoder forwards (diffusion) or encoder forwards (AR) counted while the row was live.
    tokens_per_forward: `[B]` fp32, non-pad generated tokens / `forwards` (HF's `tokens_per_forward`).
    """

    sequences: Tensor
    prompt_length: int
    forwards: Tensor
    tokens_per_forward: Tensor

    @property
    def generated(self) -> Tensor:
        """`[B, G]` the generated tokens."""
        return self.sequences[:, self.prompt_length :]


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Token lists of different lengths → left-padded `input_ids [B, S]` and `padding_mask [B, S]` (True = pad)."""
    if not prompts:
        raise ValueError("no prompts given")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    padding = torch.ones(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
            padding[row, width - len(prompt) :] = False
    return ids, padding


def generate(
    model: BDGemmaModel,
    input_ids: Tensor,
    *,
    padding_mask: Tensor | None = None,
    sampler: Sampler | None = None,
    max_new_tokens: int = 256,
    eos_token_ids: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    on_canvas: CanvasCallback | None = None,
    generator: torch.Generator | None = None,
    recompute_prefix: bool = False,
    compile: bool = False,
    pixel_values: Tensor | None = None,
    image_position_ids: Tensor | None = None,
    mm_token_type_ids: Tensor | None = None,
) -> GenerationOutput:
    """Generate continuations of a batch of prompts.

    Args:
        model: a `BDGemmaModel` with the whole stack on this rank (PP = 1; TP ranks run this in lock-step and
            must use identically seeded generators).
        input_ids: `[B, S]` prompts, left-padded to a common length S.
        padding_mask: `[B, S]` bool, True = padding; None = no padding. Padding must be on the left.
        sampler: a canvas sampler (block diffusion) or `Autoregressive` (the AR baseline from the encoder logits);
            default `EntropyBound()`, DiffusionGemma's default.
        max_new_tokens: diffusion generates `ceil(max_new_tokens / R)` canvases at most; AR this many tokens.
        eos_token_ids: ids that end a row; None = `model.config.eos_token_ids`.
        pad_token_id: what replaces tokens after a row's EOS; None = `model.config.pad_token_id`.
        on_canvas: streaming hook, see `CanvasCallback` (its tensors are inference tensors: copy them to update them
            in place outside `torch.inference_mode`).
        generator: random source; None = torch's global generator (what HF's `generate` uses).
        recompute_prefix: re-encode the whole sequence at every canvas instead of extending the cache (a reference
            path for tests: slower, same tokens).
        compile: run the canvas forward and the step's softmax / entropy / argmax under `torch.compile`
            (generation/compiled.py; CUDA graphs on GPU): the first two canvases pay the compilation. Block
            diffusion only.
        pixel_values, image_position_ids, mm_token_type_ids: the prompts' images, as `BDGemmaModel.encode` takes
            them (`mm_token_type_ids` `[B, S]` as `input_ids`); the prompt's encode consumes them, as HF's
            `generate` does. Canvases stay text.

    Returns:
        a `GenerationOutput`.
    """
    sampler = EntropyBound() if sampler is None else sampler
    if not isinstance(sampler, (CanvasSampler, Autoregressive)):
        raise TypeError(f"sampler must be a CanvasSampler or Autoregressive, got {type(sampler).__name__}")
    if compile and isinstance(sampler, Autoregressive):
        raise ValueError("compile=True compiles the block-diffusion canvas forward, which Autoregressive never runs")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    config = model.config
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    padding_mask = (
        torch.zeros_like(input_ids, dtype=torch.bool) if padding_mask is None else padding_mask.to(device).bool()
    )
    eos = torch.tensor(
        config.eos_token_ids if eos_token_ids is None else _as_list(eos_token_ids), dtype=torch.long, device=device
    )
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    images = {name: value.to(device) for name, value in dict(
        pixel_values=pixel_values, image_position_ids=image_position_ids, mm_token_type_ids=mm_token_type_ids
    ).items() if value is not None}
    if isinstance(sampler, Autoregressive):
        _check_inputs(model, input_ids, padding_mask, max_new_tokens)
    else:
        canvases = math.ceil(max_new_tokens / config.canvas_length)
        _check_inputs(model, input_ids, padding_mask, canvases * config.canvas_length)
    # Inference mode rather than no_grad: a decode is hundreds of small ops, and this skips their version-counter
    # and view bookkeeping too. The routed experts' weights are stacked once for the whole generation.
    with torch.inference_mode(), stacked_weights_held(model):
        if isinstance(sampler, Autoregressive):
            output = _generate_autoregressive(
                model, input_ids, padding_mask, sampler, max_new_tokens, eos, pad, on_canvas, generator, images
            )
        else:
            output = _generate_diffusion(
                model, input_ids, padding_mask, sampler, canvases, eos, pad, on_canvas, generator, recompute_prefix,
                *((compiled_decode(model), compiled_distribution()) if compile else (model.decode, distribution)),
                images,
            )
    # Returned as ordinary tensors: inference tensors refuse in-place updates outside inference mode.
    return GenerationOutput(
        output.sequences.clone(), output.prompt_length, output.forwards.clone(), output.tokens_per_forward.clone()
    )


# ---- block diffusion ---------------------------------------------------------------------------------------------


def _generate_diffusion(
    model: BDGemmaModel,
    input_ids: Tensor,
    padding_mask: Tensor,
    sampler: CanvasSampler,
    canvases: int,
    eos: Tensor,
    pad: int,
    on_canvas: CanvasCallback | None,
    generator: torch.Generator | None,
    recompute_prefix: bool,
    decode: Callable[..., Tensor],
    step_distribution: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]],
    images: dict[str, Tensor],
) -> GenerationOutput:
    batch, prompt_length = input_ids.shape
    sequences = input_ids
    ended = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    forwards = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
    cache = EncoderKVCache.for_model(model)
    for index in range(canvases):
        if recompute_prefix:
            cache = EncoderKVCache.for_model(model)
            encoded = model.encode(sequences, padding_mask=_extend(padding_mask, sequences.shape[1]),
                                   **_images_over(images, sequences.shape[1]))
            cache.append(encoded.kv, ~_extend(padding_mask, sequences.shape[1]))
        elif index == 0:
            encode_into(model, cache, input_ids, padding_mask=padding_mask, **images)
        else:
            encode_into(model, cache, sequences[:, -model.config.canvas_length :])
        committed, canvas_forwards = _denoise_canvas(
            model, decode, step_distribution, cache, sampler, ended, generator
        )
        forwards += canvas_forwards
        committed, ended = _finalize(committed, ended, eos, pad)
        sequences = torch.cat([sequences, committed], dim=1)
        if on_canvas is not None:
            on_canvas(index, committed, forwards.clone())
        if ended.all():
            break
    return _output(sequences, prompt_length, forwards, pad)


def _denoise_canvas(
    model: BDGemmaModel,
    decode: Callable[..., Tensor],
    step_distribution: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]],
    cache: EncoderKVCache,
    sampler: CanvasSampler,
    ended: Tensor,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Denoise one canvas at positions `cache.length ..` → (argmax canvas `[B, R]`, live decoder forwards `[B]`),
    each step's forward by `decode` (`model.decode` or its compiled form) and the softmax, entropy and argmax of its
    tempered logits by `step_distribution` (`compiled.distribution` or its compiled form)."""
    config = model.config
    batch, length, vocab = ended.shape[0], config.canvas_length, config.vocab_size
    device = ended.device
    embedding_dtype = model.embedding.word_embeddings.weight.dtype
    positions = (cache.length + torch.arange(length, device=device)).expand(batch, length)
    # Built once per canvas, not per step: masks, RoPE tables and the [encoder ; canvas] K/V buffers each decode
    # writes its canvas K/V into.
    attention = cache.decode_masks(length)
    rope = model.rope(positions, embedding_dtype)
    buffers = cache.decode_buffers(length)

    canvas = torch.randint(0, vocab, (batch, length), generator=generator, device=device)
    argmax = canvas
    # The previous step's tempered logits in the embedding dtype (HF's self-conditioning input) and their softmax;
    # None = the zero signal of every canvas's first step. The samplers take fp32 logits, as HF's (a float64 model's
    # decode gives float64 ones: `precision.compute_dtype`).
    self_conditioning: Tensor | None = None
    self_conditioning_probs: Tensor | None = None
    stop_rule = sampler.stop_rule()
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)
    forwards = torch.zeros(batch, dtype=torch.long, device=device)
    live_rows: Tensor | None = None  # the rows decoded, when some have stopped
    live_buffers, live_attention, live_rope = buffers, attention, rope
    for steps_remaining in range(sampler.max_denoising_steps, 0, -1):
        forwards += ~(stopped | ended)
        any_stopped = bool(stopped.any())  # one host sync per step for both uses below
        if any_stopped:
            # Decode only the rows still denoising; the stopped rows' frozen logits stand in for theirs, so the
            # sampler still sees (and draws for) the whole batch as HF's does.
            live = ~stopped
            if live_rows is None or not torch.equal(live_rows, live):
                live_rows = live
                live_buffers = [buffer.select(live) for buffer in buffers]
                live_attention = {t: mask.select(live) for t, mask in attention.items()}
                live_rope = {t: (cos[:, live], sin[:, live]) for t, (cos, sin) in rope.items()}
            logits = decode(
                canvas[live], live_buffers, canvas_position_ids=positions[live], attention_mask=live_attention,
                self_conditioning_probs=self_conditioning_probs[live], rope=live_rope,
            ).float()
            processed = self_conditioning.float().index_put((live,), sampler.process(logits, steps_remaining))
        else:
            logits = decode(
                canvas, buffers, canvas_position_ids=positions, attention_mask=attention,
                self_conditioning_probs=self_conditioning_probs, rope=rope,
            ).float()
            processed = sampler.process(logits, steps_remaining)
        probs, token_entropy, new_argmax = step_distribution(processed)
        new_canvas = sampler.step(canvas, processed, probs, token_entropy, generator)
        if stop_rule is not None:
            if any_stopped:
                new_canvas = torch.where(stopped[:, None], canvas, new_canvas)
                new_argmax = torch.where(stopped[:, None], argmax, new_argmax)
            stopped = stopped | stop_rule(new_argmax, token_entropy)
        canvas, argmax = new_canvas, new_argmax
        # The next step conditions on the tempered logits, rounded to the embedding dtype as HF feeds them back;
        # in fp32 the rounding is none and their softmax is the sampler's.
        self_conditioning = processed.to(embedding_dtype)
        self_conditioning_probs = (
            probs if embedding_dtype == torch.float32 else torch.softmax(self_conditioning, dim=-1, dtype=torch.float32)
        )
        if stopped.all():
            break
    return argmax, forwards


def _finalize(committed: Tensor, ended: Tensor, eos: Tensor, pad: int) -> tuple[Tensor, Tensor]:
    """HF's end-of-row rule on a committed canvas `[B, R]` → (padded canvas, rows ended so far `[B]`)."""
    committed = committed.clone()
    has_eos = torch.isin(committed, eos).any(dim=-1)  # on the raw canvas, as HF's EosTokenCriteria
    committed[ended] = pad
    is_eos = torch.isin(committed, eos)
    seen = is_eos.cumsum(dim=-1)
    # Everything after the first EOS is pad; the EOS itself stays.
    committed[(seen > 0) & ~((seen == 1) & is_eos)] = pad
    return committed, ended | has_eos


def _output(sequences: Tensor, prompt_length: int, forwards: Tensor, pad: int) -> GenerationOutput:
    tokens = (sequences[:, prompt_length:] != pad).sum(dim=-1)
    return GenerationOutput(sequences, prompt_length, forwards, tokens / forwards)


# ---- autoregressive baseline ------------------------------------------------------------------------------------


def _generate_autoregressive(
    model: BDGemmaModel,
    input_ids: Tensor,
    padding_mask: Tensor,
    sampler: Autoregressive,
    max_new_tokens: int,
    eos: Tensor,
    pad: int,
    on_token: CanvasCallback | None,
    generator: torch.Generator | None,
    images: dict[str, Tensor],
) -> GenerationOutput:
    """Next-token decoding from the encoder logits, one cached encoder forward per token."""
    batch, prompt_length = input_ids.shape
    cache = EncoderKVCache.for_model(model)
    ended = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    forwards = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
    tokens = []
    logits = encode_into(model, cache, input_ids, padding_mask=padding_mask, last_logits=True, **images)
    for index in range(max_new_tokens):
        forwards += ~ended
        token = sampler.next_token(logits, generator).masked_fill(ended, pad)
        ended = ended | torch.isin(token, eos)
        tokens.append(token)
        if on_token is not None:
            on_token(index, token[:, None], forwards.clone())
        if ended.all() or index + 1 == max_new_tokens:
            break
        logits = encode_into(model, cache, token[:, None], last_logits=True)
    return _output(torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1), prompt_length, forwards, pad)


# ---- input checks -----------------------------------------------------------------------------------------------


def _check_inputs(model: BDGemmaModel, input_ids: Tensor, padding_mask: Tensor, generated_length: int) -> None:
    """Clear errors for inputs and models the loop cannot serve."""
    config = model.config
    if config.sequence_parallel and config.tensor_model_parallel_size > 1:
        raise ValueError(
            "generation needs sequence_parallel=False: sequence parallelism splits every encoder step across the "
            "TP ranks, and a prompt or a single AR token need not divide; load the model without it "
            "(megatron_bdgemma.from_hf(..., sequence_parallel=False), the default)"
        )
    if input_ids.dim() != 2 or input_ids.shape[0] == 0:
        raise ValueError(
            f"input_ids must be [batch, prompt_length] with batch >= 1, got shape {tuple(input_ids.shape)}"
        )
    if input_ids.is_floating_point():
        raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if padding_mask.shape != input_ids.shape:
        raise ValueError(f"padding_mask shape {tuple(padding_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    valid = ~padding_mask
    empty = (~valid.any(dim=1)).nonzero().flatten().tolist()
    if input_ids.shape[1] == 0 or empty:
        raise ValueError(f"empty prompt (rows {empty or list(range(input_ids.shape[0]))}): give at least one token")
    # Left padding: once a row's tokens start, no padding may follow.
    if (valid[:, :-1] & ~valid[:, 1:]).any():
        raise ValueError("prompts must be left-padded (padding after a prompt token); see generation.left_pad")
    out_of_vocab = (input_ids[valid] < 0) | (input_ids[valid] >= config.vocab_size)
    if out_of_vocab.any():
        bad = input_ids[valid][out_of_vocab][:5].tolist()
        raise ValueError(f"prompt token ids must be in [0, {config.vocab_size}), got {bad}")
    prompt_length = input_ids.shape[1]
    if prompt_length > config.max_position_embeddings:
        raise ValueError(
            f"prompt of {prompt_length} positions is longer than the model's maximum "
            f"(max_position_embeddings = {config.max_position_embeddings})"
        )
    if prompt_length + generated_length > config.max_position_embeddings:
        raise ValueError(
            f"prompt ({prompt_length} positions) + up to {generated_length} generated tokens exceeds the model's "
            f"maximum (max_position_embeddings = {config.max_position_embeddings}); lower max_new_tokens"
        )


def _extend(padding_mask: Tensor, length: int) -> Tensor:
    """The prompt's padding mask `[B, S]` extended with generated (never padding) positions to `[B, length]`."""
    batch, prompt = padding_mask.shape
    generated = torch.zeros(batch, length - prompt, dtype=torch.bool, device=padding_mask.device)
    return torch.cat([padding_mask, generated], dim=1)


def _images_over(images: dict[str, Tensor], length: int) -> dict[str, Tensor]:
    """The prompts' image arguments for an encode of the whole sequence so far: the token types extended with text
    (0) over the generated positions."""
    if "mm_token_type_ids" not in images:
        return images
    types = images["mm_token_type_ids"]
    return images | dict(mm_token_type_ids=torch.nn.functional.pad(types, (0, length - types.shape[1])))


def _as_list(ids: int | Sequence[int]) -> list[int]:
    return [ids] if isinstance(ids, int) else list(ids)
