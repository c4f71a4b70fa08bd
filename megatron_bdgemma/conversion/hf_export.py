"""Megatron checkpoint → Hugging Face `DiffusionGemmaForBlockDiffusion` directory, streamed.

    convert_megatron_to_hf("ckpt/dg", "hf/exported")

writes `model-0000i-of-0000n.safetensors` shards with `model.safetensors.index.json`, `config.json`,
`generation_config.json` and the tokenizer and processor files the model was trained with (`tokenizer_files_of`),
which `transformers` loads with `from_pretrained` and generates with.

Streaming: the names, shapes and dtypes of every HF tensor are known before any data is read (each key-map group's
`to_hf` run on meta tensors), so every shard's safetensors header is written up front and tensors are appended as
their group is read from the checkpoint, one layer at a time. Peak memory is about two copies of one layer, whatever
the shard size.

The text stack goes to `model.decoder.*`. `transformers` ties the encoder tree to it, except each layer's
`layer_scalar`, which is a buffer: it is written twice (`model.encoder.language_model.layers.N.layer_scalar` too),
because a missing encoder copy loads as uninitialised memory.

The vision tower and embedder the model carries (`megatron_bdgemma.vision`) go to `model.encoder.vision_tower.*` /
`model.encoder.embed_vision.*` byte for byte, in the dtype they were stored in (`--dtype` casts the text stack only),
with their vision config. A text-only model (trained from the tiny preset, or converted from a text-only Gemma 4) has
none, but `DiffusionGemmaForBlockDiffusion` always builds a tower: it gets `MINIMAL_VISION` with every tensor zero
(an image embeds to zero), so `transformers` loads it with no missing weights and nothing initialised at random, and
the default tower (16 layers, 768 wide, 167M parameters) does not swell a tiny model.
"""

from __future__ import annotations

import copy
import json
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from megatron_bdgemma.config import FULL, BDGemmaConfig
from megatron_bdgemma.conversion.hf_checkpoint import INDEX_FILE, SAFETENSORS_DTYPES, VISION_PREFIXES, hf_prefixes
from megatron_bdgemma.conversion.keymap import Mapping, model_mappings
from megatron_bdgemma.conversion.megatron_checkpoint import (
    CHAT_TEMPLATE_FILE,
    TOKENIZER_FILES,
    CheckpointLayout,
    ConversionError,
    Log,
    check_output_apart,
    checkpoint_model_config,
    checkpoint_tokenizer,
    read_extra,
    resolve_checkpoint_dir,
    staged_output,
    stream_group,
)
from megatron_bdgemma.vision import CARRIED_PREFIX, is_carried, is_vision_name, vision_dtype, vision_tensor_shapes

_DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
# Checkpoint keys of model tensors; anything else (optimizer state) is not exported.
_MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.", "self_conditioning.", CARRIED_PREFIX)
# DiffusionGemma's sampling defaults (docs/design.md §10; the released checkpoint's generation_config.json).
GENERATION_DEFAULTS = dict(max_new_tokens=256, max_denoising_steps=48, t_min=0.4, t_max=0.8, stability_threshold=1,
                           confidence_threshold=0.005)
ENTROPY_BOUND = 0.1
MINIMAL_VISION: dict[str, Any] = dict(
    model_type="gemma4_vision", hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
    num_key_value_heads=1, head_dim=8, patch_size=1, pooling_kernel_size=1, position_embedding_size=1,
)
"""A one-layer, 8-wide vision tower (about 1K parameters plus an `H × 8` projection), written as zeros for text-only
models."""

Entry = tuple[str, tuple[int, ...], torch.dtype]


# ---- safetensors, written as tensors arrive -------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count → bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


class SafetensorsShardWriter:
    """Writes a planned list of tensors as safetensors shards, in plan order, holding none of them.

    Every shard's header (names, dtypes, shapes, byte offsets) follows from the plan, so it is written when the
    shard is opened and each tensor's bytes are appended as soon as it arrives.
    """

    def __init__(self, directory: Path, plan: list[Entry], max_shard_bytes: int, log: Log) -> None:
        self.directory, self.log = directory, log
        shards: list[list[Entry]] = [[]]
        size = 0
        for entry in plan:
            nbytes = _nbytes(entry)
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        self.shards = shards
        self.files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        self._pending: Iterator[tuple[int, int, Entry]] = (
            (shard, position, entry) for shard, entries in enumerate(shards) for position, entry in enumerate(entries)
        )
        self._stream: BinaryIO | None = None
        self._opened = 0.0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, position, (expected, shape, dtype) = next(self._pending)
        if (name, tuple(tensor.shape), tensor.dtype) != (expected, shape, dtype):
            raise ConversionError(f"internal error: got {name} {tuple(tensor.shape)} {tensor.dtype}, planned "
                                  f"{expected} {shape} {dtype}")
        if position == 0:
            self._open(shard)
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._stream.write(data.data)
        if position == len(self.shards[shard]) - 1:
            self._stream.close()
            self._stream = None
            size = sum(_nbytes(entry) for entry in self.shards[shard])
            self.log(f"  [{shard + 1}/{len(self.shards)}] {self.files[shard]}: {len(self.shards[shard])} tensors, "
                     f"{size / 2**20:.1f} MiB ({time.monotonic() - self._opened:.1f} s)")

    def _open(self, shard: int) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in self.shards[shard]:
            end = offset + _nbytes((name, shape, dtype))
            header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
        self._stream = open(self.directory / self.files[shard], "wb")
        self._stream.write(struct.pack("<Q", len(blob)) + blob)
        self._opened = time.monotonic()

    def finish(self) -> None:
        """Check that every planned tensor arrived and write the index."""
        left = next(self._pending, None)
        if left is not None:
            raise ConversionError(f"internal error: {left[2][0]} was planned but never written")
        weight_map = {name: self.files[i] for i, entries in enumerate(self.shards) for name, _, _ in entries}
        total = sum(_nbytes(entry) for entries in self.shards for entry in entries)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _nbytes(entry: Entry) -> int:
    return torch.Size(entry[1]).numel() * entry[2].itemsize


# ---- config.json and generation_config.json -------------------------------------------------------------------


def check_exportable(config: BDGemmaConfig) -> None:
    """Raise `ConversionError` listing every config feature `DiffusionGemmaForBlockDiffusion` cannot express."""
    problems = []
    if not config.self_conditioning:
        problems.append("self_conditioning=False: DiffusionGemmaForBlockDiffusion always self-conditions")
    if not config.global_k_eq_v:
        problems.append("global_k_eq_v=False: DiffusionGemma's full-attention layers always use K = V")
    if config.final_logit_softcapping is None:
        problems.append("final_logit_softcapping=None: DiffusionGemma always softcaps its logits")
    if config.layer_types[-1] != FULL:
        problems.append("the last layer slides: DiffusionGemma forces the last layer to full attention")
    if problems:
        raise ConversionError("the checkpoint's model cannot be exported as DiffusionGemma:\n  - "
                              + "\n  - ".join(problems))


def hf_configs(config: BDGemmaConfig, source: dict[str, Any] | None, dtype: torch.dtype) -> tuple[Any, Any]:
    """(`DiffusionGemmaConfig`, `DiffusionGemmaGenerationConfig`) of `config`.

    Every architecture value comes from `config`, the vision config, image token and bidirectional images too (the
    carried tower's, else `MINIMAL_VISION`). Token ids and initialiser settings that `BDGemmaConfig` does not hold
    come from the HF model the weights came from (`source`, the checkpoint's `extra["converted_from"]`, recorded by
    the import and carried by training runs) when there is one; generation EOS / pad / BOS ids from the source's
    `generation_config.json`, else the model config.
    """
    from transformers import DiffusionGemmaConfig
    from transformers.models.diffusion_gemma import DiffusionGemmaTextConfig
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    source = source or {}
    source_config = source.get("hf_config") or {}
    source_text = source_config.get("text_config", source_config) if source_config else {}
    eos = list(config.eos_token_ids)
    text = {key: source_text[key] for key in ("bos_token_id", "initializer_range", "attention_dropout")
            if source_text.get(key) is not None}
    text.update(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups, head_dim=config.kv_channels,
        global_head_dim=config.global_kv_channels, num_global_key_value_heads=config.num_global_query_groups,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.layernorm_epsilon, pad_token_id=config.pad_token_id,
        eos_token_id=source_text.get("eos_token_id", eos[0] if len(eos) == 1 else eos),
        sliding_window=config.sliding_window, layer_types=list(config.layer_types),
        rope_parameters=copy.deepcopy(config.rope_parameters),
        num_experts=config.num_moe_experts, top_k_experts=config.moe_router_topk,
        moe_intermediate_size=config.moe_ffn_hidden_size, attention_bias=False, tie_word_embeddings=True,
        final_logit_softcapping=config.final_logit_softcapping,
        use_bidirectional_attention="vision" if config.vision_bidirectional else None,
    )
    if any(params.get("rope_type") == "longrope" for params in config.rope_parameters.values()):
        # HF's longrope validation reads the global head_dim, which its per-layer configs guard behind this flag.
        text["allow_global_per_layer_attribute_access"] = True
    top = {key: source_config[key] for key in ("boi_token_id", "eoi_token_id", "initializer_range")
           if source_config.get(key) is not None}
    if config.image_token_id is not None:
        top["image_token_id"] = config.image_token_id
    hf_config = DiffusionGemmaConfig(
        text_config=DiffusionGemmaTextConfig(**text), vision_config=config.vision_config or MINIMAL_VISION,
        canvas_length=config.canvas_length, tie_word_embeddings=True, **top,
    )
    hf_config.architectures = ["DiffusionGemmaForBlockDiffusion"]
    hf_config.dtype = dtype
    ids = source.get("generation_config") or {}
    generation = DiffusionGemmaGenerationConfig(
        bos_token_id=ids.get("bos_token_id", hf_config.text_config.bos_token_id),
        pad_token_id=ids.get("pad_token_id", config.pad_token_id),
        eos_token_id=ids.get("eos_token_id", eos),
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=ENTROPY_BOUND),
        **GENERATION_DEFAULTS,
    )
    return hf_config, generation


# ---- Megatron → HF --------------------------------------------------------------------------------------------


@dataclass
class ExportReport:
    """What `convert_megatron_to_hf` did."""

    output: Path
    dtype: torch.dtype
    tensors: int
    bytes: int
    shards: int
    seconds: float


def _preflight(path: Path, layout: CheckpointLayout) -> None:
    """Every tensor the model needs is in the checkpoint with its global shape, and no other model tensor is."""
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(path))
    stored = {key: tuple(meta.global_shape) for key, meta in metadata.items()}
    missing = sorted(key for key in layout.global_shapes if key not in stored)
    if missing:
        raise ConversionError(f"{path}: missing tensors {missing[:10]}{' ...' if len(missing) > 10 else ''} "
                              "(does the recorded model config match the checkpoint?)")
    # Optimizer state and anything else outside the model's key space is not exported.
    unexpected = sorted(key for key in stored
                        if key.startswith(_MODEL_KEY_PREFIXES) and key not in layout.global_shapes)
    if unexpected:
        raise ConversionError(f"{path}: unexpected tensors {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    for key, shape in layout.global_shapes.items():
        if stored[key] != shape:
            raise ConversionError(f"{path}: tensor {key} has shape {stored[key]}, but the model config needs {shape}")
        # Reading would cast a carried tensor to the recorded dtype: its bytes would not be the source's.
        if is_carried(key) and metadata[key].dtype != vision_dtype(layout.config):
            raise ConversionError(f"{path}: tensor {key} is stored as {metadata[key].dtype}, but the model config "
                                  f"records the vision tower as {layout.config.vision_dtype}")


def _groups(mappings: list[Mapping]) -> list[list[Mapping]]:
    """Key-map groups read together (`stream_group`): one layer each, then the rest."""
    groups: dict[str, list[Mapping]] = {}
    for mapping in mappings:
        groups.setdefault(stream_group(mapping.megatron_keys[0]), []).append(mapping)
    return list(groups.values())


def _hf_names(name: str) -> list[str]:
    """Where one key-map tensor goes in the HF checkpoint (the encoder's untied `layer_scalar` copy too)."""
    prefixes = hf_prefixes("diffusion_gemma", name)
    return [prefix + name for prefix in (prefixes if name.endswith("layer_scalar") else prefixes[:1])]


def _plan(groups: list[list[Mapping]], layout: CheckpointLayout, dtype: torch.dtype) -> list[Entry]:
    """Every HF tensor in write order, from the key map run on meta tensors; the carried vision tensors in their own
    dtype."""
    plan = []
    for group in groups:
        for mapping in group:
            meta = {name: torch.empty(layout.shapes[name], dtype=_dtype_of(name, layout, dtype), device="meta")
                    for name in mapping.megatron_keys}
            for name, tensor in mapping.to_hf(meta).items():
                plan += [(hf_name, tuple(tensor.shape), tensor.dtype) for hf_name in _hf_names(name)]
    return plan


def _dtype_of(megatron_name: str, layout: CheckpointLayout, dtype: torch.dtype) -> torch.dtype:
    """The exported dtype of a checkpoint tensor: `dtype`, but a carried vision tensor keeps its own."""
    return vision_dtype(layout.config) if is_carried(megatron_name) else dtype


def _stand_in_vision(config: BDGemmaConfig, dtype: torch.dtype) -> list[Entry]:
    """The zero `MINIMAL_VISION` tower and embedder of a text-only model (module docstring)."""
    prefix = VISION_PREFIXES["diffusion_gemma"]
    shapes = vision_tensor_shapes(MINIMAL_VISION, config.hidden_size)
    return [(prefix + name, shape, dtype) for name, shape in shapes.items()]


def convert_megatron_to_hf(
    megatron_dir: str | Path, out: str | Path, *, dtype: torch.dtype | None = None, max_shard_size: int = 5 * 10**9,
    overwrite: bool = False, log: Log = print,
) -> ExportReport:
    """Export a Megatron checkpoint (saved at any layout, with its model config in `extra`) to an HF directory.

    Args:
        megatron_dir: a checkpoint directory, or a save root with a `latest` marker.
        out: the HF directory to create.
        dtype: dtype of the written tensors; default the checkpoint's.
        max_shard_size: bytes per safetensors shard (memory use does not depend on it).
        overwrite: replace a non-empty `out`.

    Raises `ConversionError` (missing / unexpected / mis-shaped tensors, a config DiffusionGemma cannot express, no
    recorded model config) or `FileExistsError`; nothing is left at `out` unless the export completes.
    """
    from megatron.core import dist_checkpointing

    from megatron_bdgemma.runtime.distributed import ensure_model_parallel

    started = time.monotonic()
    ensure_model_parallel()
    path = resolve_checkpoint_dir(megatron_dir)
    check_output_apart(out, megatron_dir, path)
    stored = dist_checkpointing.load_tensors_metadata(str(path))
    embedding = stored.get("embedding.word_embeddings.weight")
    stored_dtype = embedding.dtype if embedding is not None else None
    config = checkpoint_model_config(path, **({"params_dtype": stored_dtype} if stored_dtype else {}))
    check_exportable(config)
    dtype = dtype or config.params_dtype
    extra = read_extra(path)
    source = extra.get("converted_from")
    hf_config, generation_config = hf_configs(config, source, dtype)
    tokenizer_files, tokenizer_note = tokenizer_files_of(extra)

    with staged_output(out, overwrite) as staging:
        log(f"exporting {path} → {out} [{str(dtype).removeprefix('torch.')}]")
        layout = CheckpointLayout(config)
        _preflight(path, layout)
        groups = _groups(model_mappings(config))
        plan = _plan(groups, layout, dtype)
        stand_in = [] if config.vision_config is not None else _stand_in_vision(config, dtype)
        if stand_in and ((source or {}).get("hf_config") or {}).get("vision_config"):
            log(f"warning: {path} was converted from a model with a vision tower but holds none of its tensors "
                "(converted before they were carried); it is exported with the zero stand-in tower: convert the "
                "source again to keep its vision half")
        writer = SafetensorsShardWriter(staging, plan + stand_in, max_shard_size, log)
        for group in groups:
            megatron = layout.read(path, [name for mapping in group for name in mapping.megatron_keys])
            for mapping in group:
                for name, tensor in mapping.to_hf({key: megatron[key] for key in mapping.megatron_keys}).items():
                    for hf_name in _hf_names(name):
                        writer.write(hf_name, tensor if is_vision_name(name) else tensor.to(dtype))
            del megatron
        for name, shape, stand_in_dtype in stand_in:
            writer.write(name, torch.zeros(shape, dtype=stand_in_dtype))
        writer.finish()
        hf_config.save_pretrained(staging)
        generation_config.save_pretrained(staging)
        for name, file in tokenizer_files.items():
            (staging / name).write_bytes(file.read_bytes())
    entries = plan + stand_in
    report = ExportReport(output=Path(out), dtype=dtype, tensors=len(entries), bytes=sum(_nbytes(e) for e in entries),
                          shards=len(writer.files), seconds=time.monotonic() - started)
    carried = sum(is_carried(mapping.megatron_keys[0]) for group in groups for mapping in group)
    vision = (f"vision: {carried} tensors carried unchanged ({config.vision_dtype})" if carried
              else f"vision: none in the checkpoint (a text-only model); wrote the zero stand-in tower "
                   f"({len(stand_in)} tensors)")
    log(f"wrote {out}: {report.tensors} tensors in {report.shards} shard(s), {report.bytes / 2**20:.1f} MiB in "
        f"{report.seconds:.1f} s; {vision}; tokenizer: {tokenizer_note}")
    return report


def tokenizer_files_of(extra: dict[str, Any]) -> tuple[dict[str, Path], str]:
    """The tokenizer and processor files the export writes beside the model (`TOKENIZER_FILES`, by output name), and
    a note saying where they came from or why there are none: those of the tokenizer the model was trained with
    (`checkpoint_tokenizer`), the run's `data.chat_template` written as `chat_template.jinja` (which transformers
    prefers to a template in `tokenizer_config.json`). The byte tokenizer has no Hugging Face files."""
    tokenizer = checkpoint_tokenizer(extra)
    if tokenizer.spec is None or tokenizer.spec == "byte":
        return {}, f"none written ({tokenizer.note}" + (", which has no Hugging Face files)" if tokenizer.spec else ")")
    directory = Path(tokenizer.spec)
    files = {name: directory / name for name in TOKENIZER_FILES if (directory / name).is_file()}
    if tokenizer.chat_template is not None:
        files[CHAT_TEMPLATE_FILE] = Path(tokenizer.chat_template)
    return files, f"{len(files)} file{'s' * (len(files) != 1)} from {tokenizer.note}"
