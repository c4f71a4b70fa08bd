"""`BDGemmaConfig`: the Megatron `TransformerConfig` of a block-diffusion Gemma 4 MoE model.

One dataclass holds everything the layers need (docs/design.md §4) plus the block-diffusion fields (§5–§7).
Sliding and full ("global") attention layers differ in head geometry, RoPE and the K=V tying, so the block asks
`get_config_for_layer(n)` for a per-layer copy whose `kv_channels` / `num_query_groups` are that layer's; every
other module reads the shared values.

`config_from_hf()` translates a Hugging Face `Gemma4TextConfig`, `Gemma4Config`, `DiffusionGemmaConfig` or
`DiffusionGemmaTextConfig`, reading every value from the config and rejecting what the layers do not implement in
one error that lists all of it.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_bdgemma.layers.rope import default_rope_parameters, rope_problems

SLIDING = "sliding_attention"
FULL = "full_attention"
LayerType = Literal["sliding_attention", "full_attention"]
AttentionImpl = Literal["eager", "block_sparse", "flex"]

gelu_tanh = functools.partial(F.gelu, approximate="tanh")
"""HF `gelu_pytorch_tanh`. A `partial` (not a lambda) so the config pickles into checkpoints."""


def default_layer_types(num_layers: int) -> list[str]:
    """Gemma 4's pattern: 5 sliding then 1 full, repeated; the last layer is always full."""
    types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(num_layers)]
    types[-1] = FULL
    return types


@dataclass
class BDGemmaConfig(TransformerConfig):
    """Megatron config of a DiffusionGemma / Gemma 4 MoE text stack.

    Megatron fields keep their meaning: `kv_channels` / `num_query_groups` are the *sliding* layers' head dim and
    KV heads, `ffn_hidden_size` = `moe_shared_expert_intermediate_size` is the dense GeGLU branch, and
    `moe_ffn_hidden_size` the experts'.
    """

    vocab_size: int = 262_144
    """Vocabulary size (the tied embedding has this many rows)."""

    max_position_embeddings: int = 262_144
    """Largest position a sequence may reach (prompt + generated)."""

    layer_types: list[str] | None = None
    """`sliding_attention` / `full_attention` per layer; None = Gemma 4's 5:1 pattern with the last layer full."""

    sliding_window: int = 1024
    """HF `sliding_window` W: a sliding-layer query sees keys with `q - k < W`."""

    global_kv_channels: int = 512
    """Head dim of full-attention layers (HF `global_head_dim`)."""

    num_global_query_groups: int | None = None
    """KV heads of full-attention layers (HF `num_global_key_value_heads`); None = `num_query_groups`."""

    global_k_eq_v: bool = True
    """Full layers have no v_proj: V is the raw k_proj output (before k_norm/RoPE), then v_norm."""

    rope_parameters: dict[str, dict[str, Any]] | None = None
    """HF `rope_parameters`: per layer type, `rope_type`, `rope_theta` and that type's own keys (`factor`,
    `partial_rotary_factor`, `original_max_position_embeddings`, ...), computed as transformers' Gemma 4 does for
    every type it accepts (`layers/rope.py`). None = Gemma 4's: default θ=1e4 on sliding layers, "proportional"
    θ=1e6 over a quarter of the head on full ones (not Megatron's `rotary_percent`)."""

    final_logit_softcapping: float | None = 30.0
    """logits = cap * tanh(logits / cap), computed in fp32; None disables it (a plain Gemma 4 AR config)."""

    canvas_length: int = 256
    """Block size B of block diffusion: one canvas is denoised at a time."""

    self_conditioning: bool = True
    """Build the two-pass self-conditioning module (docs/design.md §6)."""

    freeze_router: bool = True
    """Router projection and scale get `requires_grad=False` (DiffusionGemma's SFT recipe; no aux loss)."""

    freeze_self_conditioning: bool = False
    """The self-conditioning module's parameters (its norm and GeGLU) get `requires_grad=False` and keep their values
    (Megatron-Bridge's `freeze_self_conditioning`). The signal's gradient still flows through the module to the tied
    embedding it is formed with."""

    pad_token_id: int = 0
    eos_token_ids: tuple[int, ...] = (1,)
    """End-of-sequence ids (DiffusionGemma's generation config uses (1, 106, 50))."""

    attention_impl: AttentionImpl = "eager"
    """Core attention (`layers.core_attention`): `eager` builds each mask's dense grid and the full score matrix
    (the reference; memory ∝ S·(S+R)); `block_sparse` runs one query chunk at a time over only the keys it can see
    and recomputes chunks in backward (memory ∝ S·chunk); `flex` runs FlexAttention with a block mask built from
    the mask rule (the GPU fast path: compiled kernels that skip fully blocked tiles; on CPU only a correctness
    reference). Same values and gradients."""

    attention_chunk_size: int = 256
    """Encoder queries per chunk of the `block_sparse` attention (canvas chunks are one block each)."""

    moe_grouped_gemm: bool = True
    """Megatron's flag, on by default here: the `local` backend runs all local experts in one grouped GEMM per
    projection (`layers.grouped_experts.GroupedGemmMLP`); False = Megatron's `SequentialMLP`, one MLP per expert.
    Same parameters, state dict and checkpoints. The `te` backend always uses TE's grouped experts."""

    vision_config: dict[str, Any] | None = None
    """The HF vision config (a `Gemma4VisionConfig` as a plain dict) of the vision tower and multimodal embedder
    (`vision.Vision`, first pipeline stage): transformers' own modules, whose features replace the image placeholders
    of the encoder input; their tensors are kept unchanged from import to export unless `train_vision`. None = a
    text-only model."""

    vision_dtype: str = "float32"
    """The torch dtype name the vision tower's and embedder's tensors are stored in and run in (the source's; they are
    never cast)."""

    image_token_id: int | None = None
    """The placeholder id whose encoder positions take the image features (HF `image_token_id`); None = a model that
    takes no images."""

    vision_bidirectional: bool = False
    """The tokens of one image attend to each other both ways inside the causal encoder (HF
    `use_bidirectional_attention="vision"`, docs/design.md §9)."""

    train_vision: bool = False
    """The vision tower and embedder are trained (`requires_grad`); False = frozen, in no optimizer, their values
    kept."""

    layer_attention_type: str | None = None
    """Set only on the per-layer copies from `get_config_for_layer`: that layer's attention type."""

    def __post_init__(self) -> None:
        # Gemma 4 defaults; a caller may still override each of them explicitly.
        self.normalization = "RMSNorm"
        self.gated_linear_unit = True
        self.add_bias_linear = False
        self.softmax_scale = 1.0  # q/k RMSNorms carry the scale
        if self.activation_func is F.gelu:
            self.activation_func = gelu_tanh
        self.heterogeneous_block_specs = True  # per-layer head geometry via get_config_for_layer
        # Our attention has q/k RMSNorms shared across heads; with this flag Megatron's finalize_model_grads sums
        # their head-partial gradients over TP ranks.
        self.qk_layernorm = True
        self.moe_router_load_balancing_type = "none"
        self.moe_aux_loss_coeff = 0.0
        if self.ffn_hidden_size is None and self.moe_shared_expert_intermediate_size is not None:
            self.ffn_hidden_size = self.moe_shared_expert_intermediate_size
        if self.moe_shared_expert_intermediate_size is None:
            self.moe_shared_expert_intermediate_size = self.ffn_hidden_size
        if self.layer_types is None:
            self.layer_types = default_layer_types(self.num_layers)
        self.layer_types = list(self.layer_types)
        if self.num_global_query_groups is None:
            self.num_global_query_groups = self.num_query_groups or self.num_attention_heads
        self.eos_token_ids = tuple(self.eos_token_ids)
        if self.rope_parameters is None:
            self.rope_parameters = default_rope_parameters()
        super().__post_init__()
        self._validate()

    def _validate(self) -> None:
        problems = []
        if len(self.layer_types) != self.num_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries but num_layers is {self.num_layers}")
        unknown = sorted(set(self.layer_types) - {SLIDING, FULL})
        if unknown:
            problems.append(f"layer_types holds unknown types {unknown} (expected {SLIDING!r} / {FULL!r})")
        if self.num_moe_experts is None or self.moe_router_topk is None or self.moe_ffn_hidden_size is None:
            problems.append("num_moe_experts, moe_router_topk and moe_ffn_hidden_size must all be set (MoE model)")
        if self.ffn_hidden_size != self.moe_shared_expert_intermediate_size:
            problems.append(
                f"ffn_hidden_size ({self.ffn_hidden_size}) must equal moe_shared_expert_intermediate_size "
                f"({self.moe_shared_expert_intermediate_size}): both are the dense GeGLU branch"
            )
        for name in ("num_query_groups", "num_global_query_groups"):
            groups = getattr(self, name)
            if self.num_attention_heads % groups:
                problems.append(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of {name} ({groups})")
            if groups % self.tensor_model_parallel_size:
                problems.append(
                    f"{name} ({groups}) must be a multiple of tensor_model_parallel_size "
                    f"({self.tensor_model_parallel_size}): KV heads are split across TP ranks"
                )
        if self.sliding_window < 1:
            problems.append(f"sliding_window ({self.sliding_window}) must be >= 1")
        if self.attention_impl not in get_args(AttentionImpl):
            problems.append(f"attention_impl {self.attention_impl!r} is unknown (expected one of {get_args(AttentionImpl)})")
        if self.fp8 and self.canvas_length % 16:
            problems.append(f"fp8 needs canvas_length to be a multiple of 16 (FP8 GEMM dimensions), got {self.canvas_length}")
        if self.attention_chunk_size < 1:
            problems.append(f"attention_chunk_size ({self.attention_chunk_size}) must be >= 1")
        if self.canvas_length < 1:
            problems.append(f"canvas_length ({self.canvas_length}) must be >= 1")
        for layer_type in sorted(set(self.layer_types) & {SLIDING, FULL}):
            if layer_type not in self.rope_parameters:
                problems.append(f"rope_parameters has no entry for {layer_type!r}")
            else:
                problems += rope_problems(self.rope_parameters[layer_type], self.head_dim_of(layer_type),
                                          f"rope_parameters[{layer_type!r}]")
        vision_dtype = getattr(torch, self.vision_dtype, None)
        if not (isinstance(vision_dtype, torch.dtype) and vision_dtype.is_floating_point):
            problems.append(f"vision_dtype {self.vision_dtype!r} is not a torch floating-point dtype name")
        if self.train_vision and self.vision_config is None:
            problems.append("train_vision is set but the model has no vision tower (vision_config is None)")
        if problems:
            raise ValueError("invalid BDGemmaConfig:\n  - " + "\n  - ".join(problems))

    # ---- per-layer geometry -------------------------------------------------------------------------------

    def layer_type(self, layer_number: int) -> str:
        """Attention type of 1-based global layer `layer_number`."""
        return self.layer_types[layer_number - 1]

    def get_config_for_layer(self, layer_number: int) -> BDGemmaConfig:
        """A shallow copy whose head geometry is that of 1-based global layer `layer_number`.

        Megatron's `TransformerBlock` calls this when `heterogeneous_block_specs` is set; attention modules then
        read `kv_channels` / `num_query_groups` as usual.
        """
        layer_config = copy.copy(self)
        layer_config.layer_attention_type = self.layer_type(layer_number)
        if layer_config.layer_attention_type == FULL:
            layer_config.kv_channels = self.global_kv_channels
            layer_config.num_query_groups = self.num_global_query_groups
        return layer_config

    def head_dim_of(self, layer_type: str) -> int:
        return self.global_kv_channels if layer_type == FULL else self.kv_channels

    def window_of(self, layer_type: str) -> int | None:
        """The sliding window of a layer type, None for full attention."""
        return self.sliding_window if layer_type == SLIDING else None

    def has_v_proj(self, layer_type: str) -> bool:
        return layer_type == SLIDING or not self.global_k_eq_v

    @property
    def embedding_scale(self) -> float:
        return self.hidden_size**0.5


# ---- presets ------------------------------------------------------------------------------------------------


def _common(**overrides: Any) -> dict[str, Any]:
    base = dict(
        layernorm_epsilon=1e-6,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="allgather",
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    base.update(overrides)
    return base


def tiny(**overrides: Any) -> BDGemmaConfig:
    """A few-hundred-thousand-parameter model for CPU tests and the demo (every feature of the real one)."""
    return BDGemmaConfig(
        **_common(
            num_layers=4,
            layer_types=[SLIDING, SLIDING, SLIDING, FULL],
            hidden_size=64,
            num_attention_heads=4,
            kv_channels=16,
            num_query_groups=2,
            global_kv_channels=32,
            num_global_query_groups=1,
            ffn_hidden_size=128,
            num_moe_experts=4,
            moe_router_topk=2,
            moe_ffn_hidden_size=32,
            vocab_size=512,
            max_position_embeddings=4096,
            sliding_window=16,
            canvas_length=16,
        )
        | overrides
    )


GEMMA4_26B_VISION: dict[str, Any] = dict(
    model_type="gemma4_vision", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
    num_key_value_heads=16, head_dim=72, patch_size=16, pooling_kernel_size=3, position_embedding_size=10240,
    standardize=True,
)
"""The vision tower of Gemma 4 26B-A4B, which DiffusionGemma-26B-A4B keeps (it uses Gemma 4's vision block), as a
`Gemma4VisionConfig` dict. Not transformers' defaults: `DiffusionGemmaConfig()` claims to be "similar to
google/diffusiongemma-26B-A4B-it", but its text config is not this model's (H 2304, 8 query / 4 KV heads, dense MLP
9216, no experts, window 512) and its vision default, `Gemma4VisionConfig()` (768 wide, 16 layers, 0.17B), is the
small Gemma 4 models' tower. These values are the ~550M tower Gemma 4's model cards give the 26B-A4B and 31B, from
third-party copies of the released files (DiffusionGemma-26B-A4B's own config.json is not at hand): the GGUF vision
projector of Ollama's `gemma4:26b-a4b` (27 blocks, width 1152, FFN 4304, 16 heads, patch 16, projection to 2816 = H)
and the config.json of the tower extracted from google/gemma-4-31B-it (head dim 72, 3 × 3 pooling, 10240 position
rows, `standardize`; 569,550,384 elements, which transformers' `Gemma4VisionModel` of these values holds). A
checkpoint's own config (`model.hf`, a converted checkpoint) replaces the preset entirely."""


def diffusiongemma_26b_a4b(**overrides: Any) -> BDGemmaConfig:
    """google/diffusiongemma-26B-A4B-it, as its checkpoint config gives it (docs/design.md §4), with the vision tower
    of `GEMMA4_26B_VISION` in bf16 (frozen; zero until a checkpoint's tower is loaded): image placeholder 258880 (HF's
    `DiffusionGemmaConfig.image_token_id`, Gemma 4's), and each image's tokens bidirectional in the encoder (the
    checkpoint's `use_bidirectional_attention="vision"`; transformers' `DiffusionGemmaTextConfig` default is None).
    `vision_config=None` gives the text model alone."""
    return BDGemmaConfig(
        **_common(
            num_layers=30,
            hidden_size=2816,
            num_attention_heads=16,
            kv_channels=256,
            num_query_groups=8,
            global_kv_channels=512,
            num_global_query_groups=2,
            ffn_hidden_size=2112,
            num_moe_experts=128,
            moe_router_topk=8,
            moe_ffn_hidden_size=704,
            vocab_size=262_144,
            max_position_embeddings=262_144,
            sliding_window=1024,
            canvas_length=256,
            eos_token_ids=(1, 106, 50),
            vision_config=copy.deepcopy(GEMMA4_26B_VISION),
            vision_dtype="bfloat16",
            image_token_id=258_880,
            vision_bidirectional=True,
            bf16=True,
            params_dtype=torch.bfloat16,
            moe_token_dispatcher_type="alltoall",
        )
        | overrides
    )


PRESETS = {"tiny": tiny, "diffusiongemma-26b-a4b": diffusiongemma_26b_a4b}


# ---- Hugging Face configs -------------------------------------------------------------------------------------


def _text_config(hf_config: Any) -> tuple[Any, int | None]:
    """(text config, canvas length) of any supported HF config object."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type in ("diffusion_gemma", "gemma4"):
        return hf_config.text_config, getattr(hf_config, "canvas_length", None)
    if model_type in ("diffusion_gemma_text", "gemma4_text"):
        return hf_config, None
    raise ValueError(
        f"unsupported HF model_type {model_type!r}: expected diffusion_gemma, diffusion_gemma_text, gemma4 or "
        "gemma4_text"
    )


def _per_layer_geometry(text: Any) -> dict[str, set[tuple[str, int]]]:
    """{layer type: {(head_dim, kv_heads)}} from HF's `per_layer_config` overrides (global head dim / KV heads)."""
    # Global attributes that a per-layer override shadows are only readable from the serialised form.
    values = text.to_dict()
    # Keys are layer indices as strings, zero-padded by transformers for 10+ layers ("05").
    overrides = {int(k): v for k, v in (values.get("per_layer_config") or {}).items()}
    geometry: dict[str, set[tuple[int, int]]] = {SLIDING: set(), FULL: set()}
    for index, layer_type in enumerate(values["layer_types"]):
        entry = overrides.get(index, {})
        geometry[layer_type].add(
            (int(entry.get("head_dim", values["head_dim"])), int(entry.get("num_key_value_heads", values["num_key_value_heads"])))
        )
    return geometry


def _rope(text: Any, layer_type: str, head_dim: int, problems: list[str]) -> dict[str, Any]:
    """One layer type's HF rope parameters as plain values; what `layers/rope.py` cannot compute goes to `problems`."""
    params = copy.deepcopy(dict((text.rope_parameters or {}).get(layer_type) or {"rope_type": "default"}))
    problems += rope_problems(params, head_dim, f"rope_parameters[{layer_type!r}]")
    return params


def _vision_config(hf_config: Any) -> dict[str, Any] | None:
    """The vision config of a multimodal HF config as the plain dict `config.json` records; None for text-only."""
    vision = getattr(hf_config, "vision_config", None)
    if vision is None:
        return None
    values = vision.to_diff_dict()
    values.pop("transformers_version", None)  # the writer's version, not the architecture
    return values


def _dtype_name(dtype: Any) -> str:
    """A config's `dtype` (torch dtype, its name, or None) as a floating-point torch dtype name; float32 otherwise."""
    name = str(dtype).removeprefix("torch.")
    return name if name in ("float32", "bfloat16", "float16", "float64") else "float32"


def config_from_hf(hf_config: Any, **overrides: Any) -> BDGemmaConfig:
    """Translate a Hugging Face Gemma 4 MoE / DiffusionGemma config into a `BDGemmaConfig`.

    Every value is read from the config. Features the layers do not implement (per-layer inputs, KV sharing,
    a dense-only model, bidirectional text attention, attention biases, other activations or RoPE types, an audio
    tower) are all reported in one ValueError. `overrides` set Megatron fields (parallel sizes, dtypes, dispatcher).
    A vision config is recorded: the model carries that tower's tensors, in the dtype of the config's `dtype` unless
    `vision_dtype` is given (`HFCheckpoint.model_config` gives the one they are stored in).
    """
    text, canvas_length = _text_config(hf_config)
    is_diffusion = text.model_type == "diffusion_gemma_text"
    problems: list[str] = []

    def unsupported(name: str, bad: bool, why: str) -> None:
        if bad:
            problems.append(f"{name}={getattr(text, name, None)!r}: {why}")

    if not is_diffusion:
        unsupported("hidden_size_per_layer_input", bool(getattr(text, "hidden_size_per_layer_input", 0)),
                    "per-layer inputs (PLE) are not supported; set it to 0")
        unsupported("num_kv_shared_layers", bool(getattr(text, "num_kv_shared_layers", 0)),
                    "KV sharing across layers is not supported; set it to 0")
        unsupported("enable_moe_block", not getattr(text, "enable_moe_block", False),
                    "only the MoE Gemma 4 variant is supported")
        unsupported("use_double_wide_mlp", bool(getattr(text, "use_double_wide_mlp", False)),
                    "the double-wide MLP is not supported")
    unsupported("use_bidirectional_attention", getattr(text, "use_bidirectional_attention", None) == "all",
                "the encoder must be causal over text")
    unsupported("attention_bias", bool(getattr(text, "attention_bias", False)), "attention biases are not supported")
    unsupported("hidden_activation", getattr(text, "hidden_activation", None) != "gelu_pytorch_tanh",
                "only gelu_pytorch_tanh is supported")
    for name in ("num_experts", "top_k_experts", "moe_intermediate_size"):
        unsupported(name, getattr(text, name, None) is None, "MoE sizes must be given")
    if getattr(hf_config, "audio_config", None) is not None:
        problems.append("audio_config is set: an audio tower is not supported (DiffusionGemma has none, so its weights "
                        "could not be carried to an export)")
    if any(getattr(c, "tie_word_embeddings", True) is False for c in (hf_config, text)):
        problems.append("tie_word_embeddings=False: an untied LM head (lm_head.weight) is not supported; the output "
                        "layer is the embedding")

    geometry = _per_layer_geometry(text)
    for layer_type, shapes in geometry.items():
        if len(shapes) > 1:
            problems.append(f"{layer_type} layers have differing (head_dim, kv_heads) {sorted(shapes)}")
    sliding_dims = next(iter(geometry[SLIDING]), None)
    full_dims = next(iter(geometry[FULL]), None)
    sliding_dims = sliding_dims or (full_dims[0] // 2, full_dims[1])  # unused when no layer slides
    full_dims = full_dims or (2 * sliding_dims[0], sliding_dims[1])

    rope = {SLIDING: _rope(text, SLIDING, sliding_dims[0], problems), FULL: _rope(text, FULL, full_dims[0], problems)}
    if problems:
        raise ValueError(f"unsupported HF {text.model_type} config:\n  - " + "\n  - ".join(problems))

    eos = text.eos_token_id if isinstance(text.eos_token_id, (list, tuple)) else [text.eos_token_id]
    values = _common(
        num_layers=text.num_hidden_layers,
        layer_types=list(text.layer_types),
        hidden_size=text.hidden_size,
        num_attention_heads=text.num_attention_heads,
        kv_channels=sliding_dims[0],
        num_query_groups=sliding_dims[1],
        global_kv_channels=full_dims[0],
        num_global_query_groups=full_dims[1],
        # DiffusionGemma ties K=V on every full layer; Gemma 4 only with attention_k_eq_v.
        global_k_eq_v=True if is_diffusion else bool(getattr(text, "attention_k_eq_v", False)),
        ffn_hidden_size=text.intermediate_size,
        num_moe_experts=text.num_experts,
        moe_router_topk=text.top_k_experts,
        moe_ffn_hidden_size=text.moe_intermediate_size,
        vocab_size=text.vocab_size,
        max_position_embeddings=text.max_position_embeddings,
        sliding_window=text.sliding_window,
        layernorm_epsilon=text.rms_norm_eps,
        rope_parameters=rope,
        # DiffusionGemma's softcap is a class attribute (30); Gemma 4's is a config field that may be None.
        final_logit_softcapping=text.final_logit_softcapping,
        canvas_length=canvas_length or 256,
        self_conditioning=is_diffusion,
        pad_token_id=text.pad_token_id if text.pad_token_id is not None else 0,
        eos_token_ids=tuple(e for e in eos if e is not None),
        vision_config=_vision_config(hf_config),
        vision_dtype=_dtype_name(getattr(hf_config, "dtype", None)),
        image_token_id=getattr(hf_config, "image_token_id", None) if _vision_config(hf_config) else None,
        vision_bidirectional=getattr(text, "use_bidirectional_attention", None) == "vision",
    )
    known = {f.name for f in fields(BDGemmaConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown BDGemmaConfig fields in overrides: {bad}")
    return BDGemmaConfig(**(values | overrides))
