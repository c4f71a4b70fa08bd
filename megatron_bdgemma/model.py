"""`BDGemmaModel`: a Megatron `GPTModel` that runs one shared Gemma 4 MoE stack as a block-diffusion LM.

How it differs from an autoregressive Gemma 4:
- one stack, two phases: a causal **encode** of the clean sequence yields every layer's K/V (and the AR logits);
  a bidirectional **decode** of a noised canvas attends over `[encoder K/V ; canvas K/V]` under the block mask;
- RoPE from explicit positions (canvas tokens sit at their absolute positions), per layer type;
- embedding × √H, tied LM head, logits softcapped in fp32 (norms, softmaxes and logits run in
  `precision.compute_dtype`: fp32, or float64 in a float64 model);
- two-pass self-conditioning: the decoder input mixes in a soft embedding of the previous pass's logits.
A model converted from a multimodal checkpoint also holds its vision tower and embedder (`vision.Vision`, first
stage): `encode` merges image features into the encoder input, and the tokens of one image attend to each other both
ways (docs/design.md §9).

Public tensors are batch-first; inside the stack Megatron's `[s, b, h]` layout is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region, scatter_to_sequence_parallel_region
from megatron.core.fp8_utils import get_fp8_context
from megatron.core.utils import get_pg_rank

from megatron_bdgemma import masks
from megatron_bdgemma.config import BDGemmaConfig
from megatron_bdgemma.diffusion import DiffusionBatch, NoisedCanvas, ar_loss, diffusion_loss
from megatron_bdgemma.diffusion.loss import scored_weights
from megatron_bdgemma.diffusion.packing import PackedBatch, PackedCanvas
from megatron_bdgemma.layers.attention import KV, KVBuffer
from megatron_bdgemma.layers.context_parallel import shard_ranges, split_sequence
from megatron_bdgemma.layers.linear import plain_forward, runs_plain
from megatron_bdgemma.layers.norm import cast
from megatron_bdgemma.layers.rope import RotaryTables
from megatron_bdgemma.layers.self_conditioning import SelfConditioning, soft_embedding
from megatron_bdgemma.precision import compute_dtype
from megatron_bdgemma.spec import Backend, get_bdgemma_block_spec, get_glu_mlp_submodules
from megatron_bdgemma.vision import Images, Vision, placeholder_slots
from megatron_bdgemma.vocab_parallel import softcap, vocab_parallel_cross_entropy_sum, vocab_parallel_soft_embedding


@dataclass
class EncoderOutput:
    """What `encode` returns.

    kv: per layer of this stage, (K, V) each `[B, kv_heads_local, S, head_dim]` (HF cache layout): K after k_norm
        and RoPE, V after v_norm. `decode` reads them.
    logits: `[B, S, V]` fp32 softcapped next-token logits, when asked for.
    hidden: `[S, B, H]` final-normed hidden states, the LM head's input (`[S/tp, B, H]` under sequence
        parallelism); the vocab-parallel losses start from it.
    """

    kv: list[KV]
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


@dataclass
class TrainingOutput:
    """Loss sums and token counts (not means): the trainer all-reduces the counts over DP ranks and micro-batches
    and normalises globally. Logits (`[B, R', V]`, `[B, S, V]`) are kept for inspection and tests on the plain path;
    they are None on the vocab-parallel path, which never builds them."""

    diffusion_loss_sum: torch.Tensor
    diffusion_tokens: torch.Tensor
    ar_loss_sum: torch.Tensor
    ar_tokens: torch.Tensor
    canvas_logits: torch.Tensor | None
    encoder_logits: torch.Tensor | None


@dataclass
class StepInputs:
    """One training micro-batch as the passes read it (`BDGemmaModel.training_layout`): the encoder's ids, positions
    `[B, S]`, AR labels and loss mask, its masks per layer type; the corrupted canvas `[B, R]` and its masks.

    Under context parallelism (docs/design.md §14) every `[B, L]` tensor is this rank's shard (`shard`): the
    masks then cover the rank's queries of the whole row (`masks.QueryShardMask`), over the whole row's keys, which
    the attention gathers; the rope lengths are the whole row's largest position + 1, which length-dependent RoPE
    types read (`RotaryTables`)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    ar_labels: torch.Tensor
    ar_loss_mask: torch.Tensor
    encoder_mask: dict[str, masks.AttentionMask]
    canvas: NoisedCanvas
    canvas_mask: dict[str, masks.AttentionMask]
    encoder_rope_length: int | None = None
    canvas_rope_length: int | None = None
    image_slots: torch.Tensor | None = None
    """`[B, S]` where each image placeholder's soft token is in the batch's image features (`vision.
    placeholder_slots` of the whole rows), None without images."""

    def shard(self, rank: int, size: int) -> StepInputs:
        """Context-parallel rank `rank`'s share of the whole row: the load-balanced split of every sequence (encoder
        and canvas), and masks of the same queries over all keys."""
        if size == 1:
            return self

        def split(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else split_sequence(x, rank, size, dim=1)

        def queries(mask: dict[str, masks.AttentionMask], length: int) -> dict[str, masks.AttentionMask]:
            return {t: masks.QueryShardMask(m, shard_ranges(length, rank, size)) for t, m in mask.items()}

        canvas, (seq, canvas_len) = self.canvas, (self.input_ids.shape[1], self.canvas.canvas_ids.shape[1])
        coins = canvas.self_conditioning  # [B] per example stays whole; [B, R] per slot (packed rows) is split
        return StepInputs(
            split(self.input_ids), split(self.positions), split(self.ar_labels), split(self.ar_loss_mask),
            queries(self.encoder_mask, seq),
            replace(canvas, canvas_ids=split(canvas.canvas_ids), targets=split(canvas.targets),
                    position_ids=split(canvas.position_ids), scored=split(canvas.scored), weights=split(canvas.weights),
                    logit_shift=split(canvas.logit_shift), self_conditioning=coins if coins.dim() == 1 else split(coins)),
            queries(self.canvas_mask, canvas_len),
            encoder_rope_length=int(self.positions.max()) + 1, canvas_rope_length=int(canvas.position_ids.max()) + 1,
            image_slots=split(self.image_slots),
        )


def _pixels(images: Images | None, inputs: StepInputs) -> dict[str, torch.Tensor]:
    """The image keyword arguments of `embed_inputs` / `encode` for a training micro-batch (none without images)."""
    if images is None:
        return {}
    return dict(pixel_values=images.pixel_values, image_position_ids=images.image_position_ids,
                image_slots=inputs.image_slots)


def canvas_kv(kv: list[KV], stop_gradient: bool) -> list[KV]:
    """The encoder K/V the training canvas attends to: detached under `stop_gradient` (Google's
    `stop_gradient_from_denoiser_to_encoder`, `jax.lax.stop_gradient` on the encoder's KV cache), so the diffusion
    loss reaches the shared weights only through the canvas pass's own activations, not through the encoder pass's."""
    return [(key.detach(), value.detach()) for key, value in kv] if stop_gradient else kv


class BDGemmaModel(GPTModel):
    def __init__(
        self,
        config: BDGemmaConfig,
        backend: Backend = "local",
        pre_process: bool = True,
        post_process: bool = True,
        pg_collection: ProcessGroupCollection | None = None,
        vp_stage: int | None = None,
    ) -> None:
        pp_rank = get_pg_rank(pg_collection.pp) if pg_collection is not None else parallel_state.get_pipeline_model_parallel_rank()
        super().__init__(
            config=config,
            transformer_layer_spec=get_bdgemma_block_spec(config, backend, vp_stage, pp_rank),
            vocab_size=config.vocab_size,
            max_sequence_length=config.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=True,
            position_embedding_type="none",  # RoPE is applied per layer type from explicit positions
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        self.config: BDGemmaConfig = config
        self.rotary_tables = RotaryTables(config)
        if config.self_conditioning and pre_process:
            self.self_conditioning = SelfConditioning(config, get_glu_mlp_submodules(backend))
            if config.freeze_self_conditioning:
                self.self_conditioning.freeze()
        if config.vision_config is not None and pre_process:
            # Images enter the encoder beside the embedding (docs/design.md §9); frozen unless `train_vision`.
            self.vision = Vision(config)
        if config.freeze_router:
            self.freeze_router()

    # ---- shared pieces ------------------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """ids `[B, S]` → `[S, B, H]` scaled by √H (cast to the embedding dtype first, as HF does)."""
        embeddings = self.embedding(input_ids=input_ids, position_ids=None)
        weight = self.embedding.word_embeddings.weight
        return embeddings * torch.tensor(self.config.embedding_scale, dtype=weight.dtype)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_position_ids: torch.Tensor | None = None,
        image_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The encoder input: `embed(input_ids)` `[S, B, H]` (`[S/tp, B, H]` under sequence parallelism), the image
        features (`vision.Vision`) in place of the `config.image_token_id` placeholders, one soft token each, in
        order: `DiffusionGemmaEncoderModel`'s `masked_scatter` (the features cast to the embedding dtype, not scaled
        by √H). No images: `embed(input_ids)`.

        `image_slots`: a context-parallel shard's `vision.placeholder_slots` of the whole rows (every rank encodes
        all the batch's images and takes its placeholders' features); None = `input_ids` are whole rows."""
        hidden = self.embed(input_ids)
        if pixel_values is None:
            return hidden
        if getattr(self, "vision", None) is None or self.config.image_token_id is None:
            raise ValueError("pixel_values given, but the model has no vision tower (vision_config) or image_token_id")
        if image_position_ids is None:
            raise ValueError("pixel_values needs image_position_ids ([images, patches, 2], (-1, -1) on padding)")
        features = self.vision(pixel_values, image_position_ids).to(hidden.dtype)  # [T, H]
        slots = placeholder_slots(input_ids, self.config.image_token_id) if image_slots is None else image_slots
        # The soft tokens the placeholders read (slots count 0, 1, ... along the whole rows): whole rows must read
        # every feature, a shard up to its last placeholder's.
        count = int(slots.max()) + 1
        if count > features.shape[0] or (image_slots is None and count != features.shape[0]):
            raise ValueError(f"input_ids hold {count} image_token_id ({self.config.image_token_id}) "
                             f"placeholders, the images give {features.shape[0]} soft tokens")
        # [S, B] as the hidden states, contiguous: `where` lays its output out as its first input.
        slots = slots.transpose(0, 1).contiguous()
        images, placeholders = features[slots.clamp(min=0)], (slots >= 0)[..., None]
        if self.config.sequence_parallel:  # this rank's share of the sequence, split as the embedding split it
            images = scatter_to_sequence_parallel_region(images, group=self.tp_group)
            placeholders = scatter_to_sequence_parallel_region(placeholders, group=self.tp_group)
        return torch.where(placeholders, images, hidden)

    def rope(
        self, position_ids: torch.Tensor, dtype: torch.dtype, length: int | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin `[S, B, 1, D]` per layer type for positions `[B, S]`; `length`: the largest position + 1 of the
        whole sequence when the positions are a context-parallel shard of it (`RotaryTables`)."""
        return self.rotary_tables(position_ids, dtype, length)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden `[S, B, H]` → full-vocabulary `[B, S, V]` fp32 logits (float64 in a float64 model),
        softcapped."""
        # The head multiplies batch-first hidden states, so the logits come out contiguous `[B, S, V]`: transposed
        # ones would be copied to contiguous by each vocabulary-wide softmax after. Under sequence parallelism the
        # head first gathers dim 0, which must then be the sequence.
        batch_first = not self.config.sequence_parallel
        hidden = hidden.transpose(0, 1) if batch_first else hidden
        weight = self.shared_embedding_or_output_weight()
        if runs_plain(self.tp_group.size()):  # GPTModel's own head: Megatron's linear, not the spec's
            logits, _ = plain_forward(self.output_layer, hidden, weight)
        else:
            logits, _ = self.output_layer(hidden, weight=weight)
            logits = gather_from_tensor_model_parallel_region(logits, group=self.tp_group)
        logits = logits if batch_first else logits.transpose(0, 1)
        logits = cast(logits, compute_dtype(logits.dtype))
        # The head's fresh output: outside autograd it is capped in place.
        return softcap(logits, self.config.final_logit_softcapping, inplace=not logits.requires_grad)

    def run_layer(self, layer: torch.nn.Module, hidden: torch.Tensor, **kwargs) -> tuple[torch.Tensor, KV]:
        """One layer, in its FP8 context, under full activation recompute when the config asks for it (training
        with grad only).

        Our passes drive the layers themselves rather than through `TransformerBlock.forward`, so they enter
        Megatron's per-layer FP8 context here (a null context without `fp8`). Non-reentrant checkpointing keeps the
        autograd edge from a layer's K/V to its inputs, so the canvas loss still reaches the encoder through
        recomputed K/V; the recomputation runs in the same FP8 context.
        """
        if self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._layer_in_fp8_context, layer, hidden, use_reentrant=False, **kwargs)
        return self._layer_in_fp8_context(layer, hidden, **kwargs)

    def _layer_in_fp8_context(self, layer: torch.nn.Module, hidden: torch.Tensor, **kwargs) -> tuple[torch.Tensor, KV]:
        with get_fp8_context(self.config, layer.layer_number - 1):
            return layer(hidden, **kwargs)

    # ---- encode -------------------------------------------------------------------------------------------------

    def encode(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        return_logits: bool = False,
        kv_prefix: list[KV] | None = None,
        attention_mask: dict[str, masks.AttentionMask] | None = None,
        rope: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        pixel_values: torch.Tensor | None = None,
        image_position_ids: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        image_slots: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Causal pass over the clean sequence, images merged in (`DiffusionGemmaEncoderModel.forward`).

        Args:
            input_ids: `[B, S]`.
            position_ids: `[B, S]` absolute positions; default `0..S-1` (HF's default, also with padding).
            padding_mask: `[B, S]` bool, True = padding (Megatron's convention); padded keys are never attended.
            return_logits: also return the `[B, S, V]` fp32 softcapped logits (the AR head).
            kv_prefix: per layer, earlier positions' (K, V) `[B, g, P, d]` to attend to (a generation cache); the
                returned `.kv` holds only the new positions'. Needs `attention_mask`.
            attention_mask: per layer type, the mask rule over S queries × `P + S` keys; default the causal
                `masks.EncoderMask` of `padding_mask`.
            rope: `self.rope(position_ids, dtype)`, when the caller has it (a context-parallel shard's, whose
                length-dependent types read the whole row's length).
            pixel_values, image_position_ids: the images of the batch, `[N, patches, 3·patch²]` and
                `[N, patches, 2]` (HF's processor), whose soft tokens replace the `image_token_id` placeholders of
                `input_ids` in order (`embed_inputs`).
            mm_token_type_ids: `[B, S]` HF's token types (1 on image tokens): with `config.vision_bidirectional`
                the default mask lets the tokens of one image attend to each other both ways (`masks.
                vision_groups`); an `attention_mask` given is used as it is.
            image_slots: under context parallelism, where this shard's placeholders are among the whole rows'
                (`embed_inputs`).
        """
        batch, seq = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        valid = torch.ones_like(input_ids, dtype=torch.bool) if padding_mask is None else ~padding_mask.bool()
        hidden = self.embed_inputs(input_ids, pixel_values, image_position_ids, image_slots)
        if rope is None:
            rope = self.rope(position_ids, hidden.dtype)
        if attention_mask is None:
            if kv_prefix is not None:
                raise ValueError("encode(kv_prefix=...) needs the attention_mask over [prefix ; new] keys")
            groups = self.vision_groups(mm_token_type_ids)
            attention_mask = {t: masks.EncoderMask(valid, self.config.window_of(t), vision_groups=groups)
                              for t in set(self.config.layer_types)}
        hidden, kv = self.encoder_layers(hidden, rope, attention_mask, kv_prefix)
        hidden = self.decoder.final_layernorm(hidden)
        return EncoderOutput(kv=kv, logits=self.logits(hidden) if return_logits else None, hidden=hidden)

    def vision_groups(self, mm_token_type_ids: torch.Tensor | None) -> torch.Tensor | None:
        """The encoder mask's image groups (`masks.EncoderMask`) of HF's token types: each image's tokens one group
        when the model attends bidirectionally over images (`config.vision_bidirectional`), else None (causal)."""
        if mm_token_type_ids is None or not self.config.vision_bidirectional:
            return None
        return masks.vision_groups(mm_token_type_ids)

    def encoder_layers(
        self,
        hidden: torch.Tensor,
        rope: dict[str, tuple[torch.Tensor, torch.Tensor]],
        attention_mask: dict[str, masks.AttentionMask],
        kv_prefix: list[KV] | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """This stage's layers over the encoder stream `[S, B, H]` → its output and each layer's K/V `[B, g, S, d]`."""
        kv = []
        for index, layer in enumerate(self.decoder.layers):
            # The layers take K/V as [P, B, g, d]; the public layout is HF's [B, g, P, d].
            prefix = None if kv_prefix is None else tuple(t.permute(2, 0, 1, 3) for t in kv_prefix[index])
            hidden, (key, value) = self.run_layer(
                layer, hidden, rope=rope[layer.layer_type], attention_mask=attention_mask[layer.layer_type],
                kv_prefix=prefix,
            )
            kv.append((key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)))
        return hidden, kv

    # ---- decode -------------------------------------------------------------------------------------------------

    def decoder_input(
        self,
        canvas_ids: torch.Tensor,
        self_conditioning_signal: torch.Tensor | None,
        self_conditioning_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Canvas embeddings mixed with the self-conditioning signal → `[R, B, H]` (docs/design.md §6).

        Args:
            canvas_ids: `[B, R]`.
            self_conditioning_signal: `[R, B, H]` soft embedding (`[R/tp, B, H]` under sequence parallelism);
                None = the zero signal.
            self_conditioning_mask: `[B]` bool; False zeroes that example's signal exactly. Or `[B, R]`, per canvas
                slot (packed rows: each record's coin on its own blocks, `diffusion.packing.pack_canvas`), all `R`
                slots also under sequence parallelism (each rank applies those of its share of the signal).
        """
        embeddings = self.embed(canvas_ids)
        if not self.config.self_conditioning:
            return embeddings
        if self_conditioning_signal is None:
            signal = torch.zeros_like(embeddings)
        elif self_conditioning_mask is None:
            signal = self_conditioning_signal
        elif self_conditioning_mask.dim() == 1:
            signal = self_conditioning_signal * self_conditioning_mask.to(self_conditioning_signal.dtype)[None, :, None]
        else:
            gate = self_conditioning_mask.transpose(0, 1).to(self_conditioning_signal.dtype)[:, :, None]  # [R, B, 1]
            if self.config.sequence_parallel:
                # The signal comes split along R (`probs_signal`'s scatter, `vocab_parallel_soft_embedding`'s
                # reduce-scatter: rank r holds the r-th R/tp slots); the same split gives each rank exactly their gates.
                gate = scatter_to_sequence_parallel_region(gate, group=self.tp_group)
            signal = self_conditioning_signal * gate
        return self.self_conditioning(embeddings, signal)

    def logits_signal(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits `[B, R, V]` → self-conditioning signal `[R, B, H]` (`[R/tp, B, H]` under SP)."""
        return self.probs_signal(torch.softmax(logits, dim=-1, dtype=compute_dtype(logits.dtype)))

    def probs_signal(self, probs: torch.Tensor) -> torch.Tensor:
        """`logits_signal` from the logits' fp32 softmax `[B, R, V]`, for a caller that has it already."""
        signal = soft_embedding(probs, self.embedding.word_embeddings.weight, self.config.embedding_scale, self.tp_group)
        signal = signal.transpose(0, 1).contiguous()
        return scatter_to_sequence_parallel_region(signal, group=self.tp_group) if self.config.sequence_parallel else signal

    def decode(
        self,
        canvas_ids: torch.Tensor,
        encoder_kv: EncoderOutput | list[KV] | list[KVBuffer],
        *,
        canvas_position_ids: torch.Tensor,
        attention_mask: dict[str, masks.AttentionMask] | None = None,
        encoder_padding_mask: torch.Tensor | None = None,
        self_conditioning_logits: torch.Tensor | None = None,
        self_conditioning_probs: torch.Tensor | None = None,
        self_conditioning_mask: torch.Tensor | None = None,
        rope: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Bidirectional pass of a canvas over `[encoder K/V ; canvas K/V]` → `[B, R, V]` fp32 softcapped logits.

        Args:
            canvas_ids: `[B, R]` noised tokens.
            encoder_kv: `encode(...)` output (or its `.kv`), P encoder positions per layer; or per layer a
                `KVBuffer` holding them (inference: each decode writes its canvas K/V into it, no prefix copy).
            canvas_position_ids: `[B, R]` absolute positions (the clean copies' positions, so RoPE matches).
            attention_mask: per layer type, the mask rule over R queries × `P + R` keys, e.g.
                `masks.BlockDiffusionTrainingMask`. None = the inference contract of HF generation: full layers
                see every valid encoder key, sliding layers the last `window - 1` encoder positions, and the whole
                canvas is visible.
            encoder_padding_mask: `[B, P]` bool, True = padding (only used when `attention_mask` is None).
            self_conditioning_logits: `[B, R, V]` logits of the previous pass (detached by the caller); None = zero
                signal.
            self_conditioning_probs: instead of `self_conditioning_logits`, their fp32 softmax `[B, R, V]`, when the
                caller has it (generation's sampler does), saving a vocabulary-wide softmax.
            self_conditioning_mask: `[B]` bool; False gives that example an exactly-zero signal. Or `[B, R]` per slot
                (packed rows, see `decoder_input`).
            rope: `self.rope(canvas_position_ids, dtype)`, when the caller keeps it across decodes of one canvas.
        """
        if self_conditioning_logits is not None and self_conditioning_probs is not None:
            raise ValueError("pass self_conditioning_logits or self_conditioning_probs, not both")
        signal = None
        if self.config.self_conditioning:
            if self_conditioning_logits is not None:
                signal = self.logits_signal(self_conditioning_logits)
            elif self_conditioning_probs is not None:
                signal = self.probs_signal(self_conditioning_probs)
        hidden = self.decode_hidden(
            canvas_ids, encoder_kv, canvas_position_ids=canvas_position_ids, attention_mask=attention_mask,
            encoder_padding_mask=encoder_padding_mask, self_conditioning_signal=signal,
            self_conditioning_mask=self_conditioning_mask, rope=rope,
        )
        return self.logits(hidden)

    def decode_hidden(
        self,
        canvas_ids: torch.Tensor,
        encoder_kv: EncoderOutput | list[KV] | list[KVBuffer],
        *,
        canvas_position_ids: torch.Tensor,
        attention_mask: dict[str, masks.AttentionMask] | None = None,
        encoder_padding_mask: torch.Tensor | None = None,
        self_conditioning_signal: torch.Tensor | None = None,
        self_conditioning_mask: torch.Tensor | None = None,
        rope: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """`decode` up to the LM head: → final-normed hidden `[R, B, H]` (`[R/tp, B, H]` under sequence parallelism).

        Arguments as `decode`, except the self-conditioning input is the signal itself, `[R, B, H]` (`[R/tp, B, H]`
        under SP): `logits_signal(logits)`, or `vocab_parallel_soft_embedding` of the previous pass's hidden states.
        """
        kv = encoder_kv.kv if isinstance(encoder_kv, EncoderOutput) else encoder_kv
        hidden = self.decoder_input(canvas_ids, self_conditioning_signal, self_conditioning_mask)
        if rope is None:
            rope = self.rope(canvas_position_ids, hidden.dtype)
        if attention_mask is None:
            if isinstance(kv[0], KVBuffer):
                raise ValueError("decode with KVBuffers needs the attention_mask (the cache's decode_masks)")
            batch, prefix = kv[0][0].shape[0], kv[0][0].shape[2]
            valid = (
                torch.ones(batch, prefix, dtype=torch.bool, device=canvas_ids.device)
                if encoder_padding_mask is None
                else ~encoder_padding_mask.bool()
            )
            attention_mask = {
                t: masks.DecodeInferenceMask(valid, None, self.config.window_of(t), canvas_len=canvas_ids.shape[1])
                for t in set(self.config.layer_types)
            }
        return self.decoder.final_layernorm(self.canvas_layers(hidden, kv, rope, attention_mask))

    def canvas_layers(
        self,
        hidden: torch.Tensor,
        kv: list[KV] | list[KVBuffer],
        rope: dict[str, tuple[torch.Tensor, torch.Tensor]],
        attention_mask: dict[str, masks.AttentionMask],
    ) -> torch.Tensor:
        """This stage's layers over the canvas stream `[R, B, H]`, each attending to `[encoder K/V ; canvas]`."""
        for layer, layer_kv in zip(self.decoder.layers, kv):
            # Back to the layers' [P, B, g, d]; a KVBuffer keeps HF's layout and is written by the attention.
            prefix_kv = layer_kv if isinstance(layer_kv, KVBuffer) else tuple(t.permute(2, 0, 1, 3) for t in layer_kv)
            hidden, _ = self.run_layer(
                layer, hidden, rope=rope[layer.layer_type], attention_mask=attention_mask[layer.layer_type],
                kv_prefix=prefix_kv,
            )
        return hidden

    # ---- training ----------------------------------------------------------------------------------------------

    def training_masks(self, batch: DiffusionBatch, noised: NoisedCanvas) -> dict[str, masks.AttentionMask]:
        """Block-diffusion masks of the decoded blocks, per layer type (strict block rule, anchored window)."""
        return {
            t: masks.BlockDiffusionTrainingMask(
                batch.prefix_lens, batch.response_lens, batch.seq_len, noised.canvas_ids.shape[1],
                batch.block_size, self.config.window_of(t), canvas_block_ids=noised.block_ids,
            )
            for t in set(self.config.layer_types)
        }

    def packed_masks(
        self, batch: PackedBatch, canvas: PackedCanvas, vision_groups: torch.Tensor | None = None
    ) -> tuple[dict[str, masks.AttentionMask], dict[str, masks.AttentionMask]]:
        """Per layer type, the encoder and canvas masks of packed rows (docs/design.md §13): each record's causal
        encoder (its images' tokens bidirectional with `vision_groups`, `self.vision_groups`) and its decoded blocks'
        strict block rule and anchored window, never across records. `encode` takes the first with
        `position_ids=batch.position_ids`; `decode` the second with `canvas.noised`."""
        encoder, decoder = {}, {}
        for t in set(self.config.layer_types):
            window = self.config.window_of(t)
            encoder[t] = masks.EncoderMask(batch.encoder_valid, window, segment_ids=batch.segment_ids,
                                           vision_groups=vision_groups)
            decoder[t] = masks.BlockDiffusionTrainingMask(
                canvas.response_starts, canvas.response_lens, batch.seq_len, canvas.noised.canvas_ids.shape[1],
                batch.block_size, window, canvas_block_ids=canvas.noised.block_ids, segment_ids=batch.segment_ids,
            )
        return encoder, decoder

    def training_layout(
        self, batch: DiffusionBatch | PackedBatch, noised: NoisedCanvas | PackedCanvas, images: Images | None = None
    ) -> StepInputs:
        """What one training micro-batch gives the passes (`StepInputs`). Unpacked rows: positions `0..S-1`, the
        causal `EncoderMask` of the padding and `training_masks`; packed rows (docs/design.md §13): each record's own
        positions and `packed_masks`; with `images`, each image's tokens attend to each other both ways
        (`vision_groups`). Under context parallelism, this rank's shard of it (docs/design.md §14): the masks are
        built for the whole row, then restricted to the rank's queries."""
        if isinstance(batch, PackedBatch) != isinstance(noised, PackedCanvas):
            raise TypeError(f"a {type(batch).__name__} goes with a {'PackedCanvas' if isinstance(batch, PackedBatch) else 'NoisedCanvas'}, "
                            f"got a {type(noised).__name__}")
        groups = None if images is None else self.vision_groups(images.mm_token_type_ids)
        if isinstance(batch, PackedBatch):
            (encoder, canvas_mask), positions, canvas = self.packed_masks(batch, noised, groups), batch.position_ids, noised.noised
        else:
            positions = torch.arange(batch.seq_len, device=batch.input_ids.device).expand(batch.input_ids.shape)
            encoder = {t: masks.EncoderMask(batch.encoder_valid.bool(), self.config.window_of(t), vision_groups=groups)
                       for t in set(self.config.layer_types)}
            canvas, canvas_mask = noised, self.training_masks(batch, noised)
        # A shard's placeholders find their features by their place among the whole rows' (whole rows need not).
        sharded = images is not None and self.cp_group.size() > 1
        slots = placeholder_slots(batch.input_ids, self.config.image_token_id) if sharded else None
        whole = StepInputs(batch.input_ids, positions, batch.ar_labels, batch.ar_loss_mask, encoder, canvas, canvas_mask,
                           image_slots=slots)
        return whole.shard(self.cp_group.rank(), self.cp_group.size())

    def training_forward(
        self,
        batch: DiffusionBatch | PackedBatch,
        noised: NoisedCanvas | PackedCanvas,
        *,
        loss_chunk_size: int | None = None,
        stop_gradient_to_encoder: bool = False,
        images: Images | None = None,
    ) -> TrainingOutput:
        """encode (grad) → decode pass 1 (no grad, zero signal) → decode pass 2 (grad, gated pass-1 signal) → losses.

        Pass 1 runs every step, whatever the coins say, so every rank issues the same collectives. The canvas
        loss reaches the encoder through its K/V, which pass 2 attends to, unless `stop_gradient_to_encoder`.

        Args:
            batch, noised: the micro-batch and its corrupted canvas (`noise_batch`); or packed rows and their canvas
                (`diffusion.packing.pack_batch` / `pack_canvas`, docs/design.md §13), whose records each compute
                exactly as alone.
            loss_chunk_size: None computes full-vocabulary logits (kept in the output). A token count switches to
                the vocab-parallel path (`megatron_bdgemma.vocab_parallel`): both losses and the self-conditioning
                signal go from hidden states to sums in chunks of this many tokens, each TP rank holding only its
                vocabulary shard, and no logits are returned. Same values and gradients.
            stop_gradient_to_encoder: the canvas attends to detached encoder K/V (`canvas_kv`), so the diffusion
                loss does not reach the encoder pass; the encoder learns from the AR loss alone.
            images: the batch's images (`vision.Images`): their features replace the encoder rows' placeholders and
                their tokens attend to each other both ways, as in `encode`; the canvas stays text. Under context
                parallelism every rank encodes all of them and keeps its placeholders' features.
        """
        inputs = self.training_layout(batch, noised, images)
        canvas, dtype = inputs.canvas, self.embedding.word_embeddings.weight.dtype
        encoded = self.encode(inputs.input_ids, position_ids=inputs.positions, attention_mask=inputs.encoder_mask,
                              rope=self.rope(inputs.positions, dtype, inputs.encoder_rope_length),
                              **_pixels(images, inputs))
        kv = canvas_kv(encoded.kv, stop_gradient_to_encoder)
        rope = self.rope(canvas.position_ids, dtype, inputs.canvas_rope_length)

        def decode(signal: torch.Tensor | None = None) -> torch.Tensor:
            return self.decode_hidden(
                canvas.canvas_ids, kv, canvas_position_ids=canvas.position_ids, attention_mask=inputs.canvas_mask,
                self_conditioning_signal=signal, self_conditioning_mask=canvas.self_conditioning, rope=rope,
            )

        signal = None
        if self.config.self_conditioning:
            with torch.no_grad():
                first = decode()
            signal = self.first_pass_signal(first, loss_chunk_size)
        return self.losses(encoded.hidden, decode(signal), inputs, loss_chunk_size)

    def first_pass_signal(self, first_pass_hidden: torch.Tensor, loss_chunk_size: int | None) -> torch.Tensor:
        """Pass 1's final-normed canvas hidden (computed without grad) → pass 2's self-conditioning signal: the soft
        embedding of its detached softcapped logits, with grad through the tied embedding it multiplies.

        `loss_chunk_size` None builds the full-vocabulary logits; a token count goes one chunk at a time through each
        TP rank's vocabulary shard (`vocab_parallel_soft_embedding`). Same values and gradients.
        """
        if loss_chunk_size is None:
            with torch.no_grad():
                logits = self.logits(first_pass_hidden)
            return self.logits_signal(logits)
        return vocab_parallel_soft_embedding(
            first_pass_hidden, self.shared_embedding_or_output_weight(), scale=self.config.embedding_scale,
            **self._vocab_parallel_head(loss_chunk_size),
        )

    def losses(
        self,
        encoder_hidden: torch.Tensor,
        canvas_hidden: torch.Tensor,
        inputs: StepInputs,
        loss_chunk_size: int | None,
    ) -> TrainingOutput:
        """Final-normed encoder `[S, B, H]` and canvas `[R', B, H]` hidden states (sequence-sharded under SP) → the
        diffusion loss of the scored canvas slots and the AR loss of the encoder's next-token pairs, as sums and
        counts (of this rank's shard under context parallelism: the trainer sums them over the CP ranks).
        `loss_chunk_size` as in `training_forward`.

        The loo variants' shift (`noised.logit_shift`) enters only the diffusion CE: the returned canvas logits, the
        AR loss and the self-conditioning signal (`first_pass_signal`) all see the raw softcapped logits."""
        noised, labels, label_mask = inputs.canvas, inputs.ar_labels, inputs.ar_loss_mask
        shift = dict(shift_ids=noised.canvas_ids, shift=noised.logit_shift)
        if loss_chunk_size is None:
            canvas_logits, encoder_logits = self.logits(canvas_hidden), self.logits(encoder_hidden)
            diffusion_sum, diffusion_tokens = diffusion_loss(
                canvas_logits, noised.targets, noised.scored, noised.weights, **shift
            )
            ar_sum, ar_tokens = ar_loss(encoder_logits, labels, label_mask)
            return TrainingOutput(diffusion_sum, diffusion_tokens, ar_sum, ar_tokens, canvas_logits, encoder_logits)
        weight, head = self.shared_embedding_or_output_weight(), self._vocab_parallel_head(loss_chunk_size)
        diffusion_sum = vocab_parallel_cross_entropy_sum(
            canvas_hidden, weight, noised.targets, scored_weights(noised.scored, noised.weights), **head, **shift
        )
        ar_sum = vocab_parallel_cross_entropy_sum(encoder_hidden, weight, labels, label_mask, **head)
        return TrainingOutput(diffusion_sum, noised.scored.sum(), ar_sum, label_mask.sum(), None, None)

    def _vocab_parallel_head(self, chunk_size: int) -> dict:
        return dict(cap=self.config.final_logit_softcapping, chunk_size=chunk_size,
                    sequence_parallel=self.config.sequence_parallel, tp_group=self.tp_group)

    def pipeline_stage_forward(
        self,
        batch: DiffusionBatch | PackedBatch,
        noised: NoisedCanvas | PackedCanvas,
        *,
        first_pass: bool,
        first_pass_hidden: torch.Tensor | None = None,
        loss_chunk_size: int | None = None,
        stop_gradient_to_encoder: bool = False,
        images: Images | None = None,
    ) -> torch.Tensor | TrainingOutput:
        """One pipeline stage's share of a training micro-batch: its layers over the encoder stream, then over the
        canvas stream attending to this stage's encoder K/V (docs/design.md, "Pipeline parallelism").

        Stages exchange `[S + R, B, H]` (`[(S + R)/tp, B, H]` under SP): encoder hidden ; canvas hidden. The first
        stage embeds both streams, reading its input from `self.decoder.input_tensor` otherwise (Megatron's
        schedule sets it).

        Args:
            batch, noised: the micro-batch and its corrupted canvas, or packed rows and their canvas (as
                `training_forward`; under pipeline parallelism the data fixes the rows' width and canvas blocks for
                the run, `data.max_records_per_row`, docs/design.md §13).
            first_pass: decode pass 1 (zero self-conditioning signal, run without grad): the last stage returns the
                final-normed canvas hidden `[R, B, H]` (`[R/tp, B, H]` under SP), which the trainer hands to the first
                stage. Otherwise pass 2: the last stage returns the losses as `training_forward` does.
            first_pass_hidden: pass 2 on the first stage with self-conditioning: pass 1's final-normed canvas hidden;
                the signal is its soft embedding through this stage's copy of the tied embedding (its gradient
                joins the last stage's in Megatron's embedding-group all-reduce).
            loss_chunk_size: as `training_forward`; also the token chunk of the signal's soft embedding.
            stop_gradient_to_encoder: as `training_forward`, for this stage's encoder K/V: with every stage detaching
                its own, the encoder stream's gradient (sent back to the previous stage) is the AR loss's alone.
            images: as `training_forward`; every stage reads their token types (the mask), the first stage encodes
                the images.
        """
        inputs = self.training_layout(batch, noised, images)
        canvas_inputs = inputs.canvas
        encoder_len = inputs.input_ids.shape[1] // (self.tp_group.size() if self.config.sequence_parallel else 1)
        if self.pre_process:
            encoder = self.embed_inputs(inputs.input_ids, **_pixels(images, inputs))
            signal = None
            if self.config.self_conditioning and not first_pass:
                # A first stage without the LM head forms the logits chunk by chunk (all tokens in one by default).
                tokens = first_pass_hidden.shape[0] * first_pass_hidden.shape[1]
                signal = self.first_pass_signal(first_pass_hidden, loss_chunk_size or tokens)
            canvas = self.decoder_input(canvas_inputs.canvas_ids, signal, canvas_inputs.self_conditioning)
        else:
            encoder, canvas = self.decoder.input_tensor.split([encoder_len, self.decoder.input_tensor.shape[0] - encoder_len])
        rope = self.rope(inputs.positions, encoder.dtype, inputs.encoder_rope_length)
        encoder, kv = self.encoder_layers(encoder, rope, inputs.encoder_mask)
        kv = canvas_kv(kv, stop_gradient_to_encoder)
        rope = self.rope(canvas_inputs.position_ids, canvas.dtype, inputs.canvas_rope_length)
        canvas = self.canvas_layers(canvas, kv, rope, inputs.canvas_mask)
        if not self.post_process:
            return torch.cat([encoder, canvas])
        canvas = self.decoder.final_layernorm(canvas)
        if first_pass:
            return canvas.detach()
        return self.losses(self.decoder.final_layernorm(encoder), canvas, inputs, loss_chunk_size)

    def freeze_router(self) -> None:
        """Freeze every layer's router projection and scale (DiffusionGemma's recipe; no aux loss)."""
        for layer in self.decoder.layers:
            layer.mlp.router.freeze()
