"""Reading HF checkpoints tensor by tensor and loading them into a (possibly sharded) `BDGemmaModel`.

`HFCheckpoint` resolves key-map names (text stack: `layers.0.self_attn.q_proj.weight`; carried vision tower:
`vision_tower.…`) to keys in the safetensors files for every supported layout and reads one tensor at a time, so peak
memory stays near one mapping group. `load_hf_weights` pushes each key-map group through `Mapping.to_megatron` and
copies this rank's shard of every tensor into the model; anything missing, unexpected or mis-shaped stops it with the
key named. Nothing is dropped: the vision tower and embedder are carried (`megatron_bdgemma.vision`), and an audio
tower is refused by `config_from_hf`.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state
from safetensors import safe_open

from megatron_bdgemma.config import BDGemmaConfig, config_from_hf
from megatron_bdgemma.conversion.keymap import model_mappings
from megatron_bdgemma.vision import is_carried, is_vision_name

# Where each HF model type keeps its text stack; DiffusionGemma's decoder tree holds the tied weights and its
# encoder tree a second copy (at least `layer_scalar`, which is not tied).
TEXT_PREFIXES = {
    "diffusion_gemma": ("model.decoder.", "model.encoder.language_model."),
    "gemma4": ("model.language_model.",),
    "gemma4_text": ("model.",),
}
# Where each multimodal HF model type keeps its vision tower and embedder (carried, `megatron_bdgemma.vision`).
VISION_PREFIXES = {"diffusion_gemma": "model.encoder.", "gemma4": "model."}
# The LM head: our output layer is the embedding (untied heads are refused by `config_from_hf`), so a tied checkpoint
# that stores it anyway must store the embedding (`HFCheckpoint.check_tied_head`).
LM_HEAD = "lm_head.weight"
_COMPARE_ROWS = 8192  # rows per chunk when comparing the head with the embedding (bounded memory)
INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
"""The floating-point safetensors dtypes a checkpoint may store model tensors in."""


def hf_prefixes(model_type: str, name: str) -> tuple[str, ...]:
    """Where the key-map HF name `name` is stored in a checkpoint of `model_type`: its canonical key prefix first,
    then those of untied copies (DiffusionGemma's encoder tree)."""
    return (VISION_PREFIXES[model_type],) if is_vision_name(name) else TEXT_PREFIXES[model_type]


class HFCheckpoint:
    """A local HF model directory: `config.json` plus one or more safetensors files (with an index when sharded)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: expected a Hugging Face model directory")
        self.config_dict = json.loads(config_file.read_text())
        self.model_type = self.config_dict.get("model_type")
        if self.model_type not in TEXT_PREFIXES:
            raise ValueError(
                f"{config_file}: unsupported model_type {self.model_type!r} (expected one of {sorted(TEXT_PREFIXES)})"
            )
        self.key_files = self._index()
        self._consumed: set[str] = set()

    def _index(self) -> dict[str, Path]:
        index_file = self.path / INDEX_FILE
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            for file in sorted({self.path / name for name in weight_map.values()}):
                if not file.is_file():
                    raise FileNotFoundError(f"{index_file} names {file.name}, which does not exist")
                check_safetensors_file(file)
            return {key: self.path / name for key, name in weight_map.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.path}: no *.safetensors files")
        for file in files:
            check_safetensors_file(file)
        key_files = {}
        for file in files:
            with safe_open(file, "pt") as handle:
                key_files.update({key: file for key in handle.keys()})
        return key_files

    def hf_config(self):
        """The transformers config object (read locally, never from a hub)."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path, local_files_only=True)

    def model_config(self, **overrides: Any) -> BDGemmaConfig:
        """`config_from_hf` of this checkpoint, `overrides` applied; the carried vision tensors keep the dtype they
        are stored in (`vision_dtype`).

        Raises:
            ValueError: the config or the vision tensors' dtypes cannot be used; the message starts with the path.
        """
        dtype = self.vision_dtype()
        try:
            return config_from_hf(self.hf_config(), **({"vision_dtype": dtype} if dtype else {}) | overrides)
        except ValueError as error:
            raise ValueError(f"{self.path}: {error}") from error

    def read(self, key: str) -> torch.Tensor:
        with safe_open(self.key_files[key], "pt") as handle:
            return handle.get_tensor(key)

    @functools.cached_property
    def headers(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """{key: (shape, safetensors dtype)} from the files' headers, without reading tensor data."""
        info: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in sorted(set(self.key_files.values())):
            with safe_open(file, "pt") as handle:
                for key in handle.keys():
                    if self.key_files.get(key) == file:
                        piece = handle.get_slice(key)
                        info[key] = (tuple(piece.get_shape()), piece.get_dtype())
        return info

    def vision_dtype(self) -> str | None:
        """The torch dtype name the vision tower and embedder are stored in; None when the checkpoint holds neither.

        Raises:
            ValueError: they are stored in several dtypes, or not in a floating-point one (named).
        """
        prefix = VISION_PREFIXES.get(self.model_type)
        if prefix is None:
            return None
        # One key per stored dtype, to name in an error.
        kinds = {dtype: key for key, (_, dtype) in sorted(self.headers.items())
                 if key.startswith(prefix) and is_vision_name(key.removeprefix(prefix))}
        if not kinds:
            return None
        if len(kinds) > 1:
            examples = ", ".join(f"{key} is {dtype}" for dtype, key in sorted(kinds.items()))
            raise ValueError(f"{self.path}: the vision tensors are stored in several dtypes ({examples}); they are "
                             "carried unchanged, in one dtype")
        [(dtype, key)] = kinds.items()
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{self.key_files[key]}: {key} is stored as {dtype}; a floating-point tensor "
                             f"({'/'.join(SAFETENSORS_DTYPES)}) is expected")
        return str(SAFETENSORS_DTYPES[dtype]).removeprefix("torch.")

    def tensor(self, name: str) -> torch.Tensor:
        """The key-map tensor `name`; when both DiffusionGemma copies of a text tensor are stored they must agree."""
        prefixes = hf_prefixes(self.model_type, name)
        keys = [prefix + name for prefix in prefixes if prefix + name in self.key_files]
        if not keys:
            raise KeyError(f"{self.path}: missing tensor {prefixes[0] + name}")
        self._consumed.update(keys)
        tensor = self.read(keys[0])
        if not tensor.is_floating_point():  # casting integers to the model's float dtype would train on garbage
            raise ValueError(f"{self.key_files[keys[0]]}: {keys[0]} is stored as {tensor.dtype}; a floating-point "
                             "tensor is expected")
        for other in keys[1:]:
            if not torch.equal(tensor, self.read(other)):
                raise ValueError(f"{self.path}: {keys[0]} and its untied copy {other} differ")
        return tensor

    def check_tied_head(self) -> None:
        """A stored `lm_head.weight` must equal the embedding (compared in row chunks); it then counts as read.

        Raises:
            ValueError: it differs, naming both tensors.
        """
        if LM_HEAD not in self.key_files:
            return
        prefixes = TEXT_PREFIXES[self.model_type]
        embed = next((p + "embed_tokens.weight" for p in prefixes if p + "embed_tokens.weight" in self.key_files), None)
        if embed is None:
            raise KeyError(f"{self.path}: missing tensor {prefixes[0]}embed_tokens.weight")
        with safe_open(self.key_files[LM_HEAD], "pt") as a, safe_open(self.key_files[embed], "pt") as b:
            head, table = a.get_slice(LM_HEAD), b.get_slice(embed)
            same = head.get_shape() == table.get_shape() and all(
                torch.equal(head[start : start + _COMPARE_ROWS], table[start : start + _COMPARE_ROWS])
                for start in range(0, head.get_shape()[0], _COMPARE_ROWS)
            )
        if not same:
            raise ValueError(
                f"{self.path}: {LM_HEAD} differs from {embed}, but the config ties them (tie_word_embeddings) and the "
                "model's output layer is the embedding; an untied head cannot be loaded"
            )
        self._consumed.add(LM_HEAD)

    def unconsumed(self) -> list[str]:
        """Keys that no mapping read."""
        return sorted(k for k in self.key_files if k not in self._consumed)


def hf_model_config(path: str | Path, **overrides: Any) -> BDGemmaConfig:
    """`HFCheckpoint(path).model_config(**overrides)`; a directory that holds `config.json` alone (enough to plan a
    run) gets `config_from_hf` of it, the carried vision tensors' dtype taken from the config's `dtype`."""
    from transformers import AutoConfig

    path = Path(path)
    if (path / INDEX_FILE).is_file() or any(path.glob("*.safetensors")):
        return HFCheckpoint(path).model_config(**overrides)
    return config_from_hf(AutoConfig.from_pretrained(path, local_files_only=True), **overrides)


def check_safetensors_file(file: Path) -> None:
    """Raise ValueError naming `file` when it is not a whole safetensors file (truncated, empty, not one at all).

    Reads only the header: 8 bytes of little-endian header length, the JSON header, then the tensor data, whose
    extent the header's `data_offsets` give.
    """
    size = file.stat().st_size
    with file.open("rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            raise ValueError(f"{file}: not a safetensors file, or truncated ({size} bytes, no complete header)")
        try:
            header = json.loads(handle.read(length))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError) as error:
            raise ValueError(f"{file}: not a safetensors file (unreadable header: {error})") from None
    if 8 + length + end > size:
        raise ValueError(f"{file}: truncated safetensors file: its header describes {8 + length + end} bytes, the "
                         f"file holds {size}")


def _local_name(model: torch.nn.Module, name: str, layer_index: dict[int, int], expert_offset: int, local_experts: int) -> str | None:
    """Our global Megatron name → this rank's parameter name; None when another PP stage / EP rank owns it."""
    match = re.match(r"decoder\.layers\.(\d+)\.(.*)$", name)
    if match:
        layer = int(match.group(1))
        if layer not in layer_index:
            return None
        rest = match.group(2)
        expert = re.match(r"mlp\.experts\.local_experts\.(\d+)\.(.*)$", rest)
        if expert:
            local = int(expert.group(1)) - expert_offset
            if not 0 <= local < local_experts:
                return None
            rest = f"mlp.experts.local_experts.{local}.{expert.group(2)}"
        return f"decoder.layers.{layer_index[layer]}.{rest}"
    return name


def _grouped_expert_name(name: str) -> str:
    """`...mlp.experts.local_experts.{e}.linear_fc{n}.weight` (the local spec's `SequentialMLP`) → the same weight in
    the `te` spec's `TEGroupedMLP`, whose Transformer Engine `GroupedLinear`s hold one `weight{e}` per local expert."""
    return re.sub(r"mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$", r"mlp.experts.\2.weight\1", name)


def shard_for_rank(name: str, full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """This rank's slice of the unsharded tensor `full`, read off the target parameter's Megatron attributes."""
    if not getattr(target, "tensor_model_parallel", False):
        return full
    is_expert = not getattr(target, "allreduce", True)
    if is_expert:
        rank, size = parallel_state.get_expert_tensor_parallel_rank(), parallel_state.get_expert_tensor_parallel_world_size()
    else:
        rank, size = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    dim = target.partition_dim
    if name.endswith("linear_fc1.weight"):
        # A GLU fc1 shard holds [gate_r ; up_r] so the local chunk(2) still yields gate then up.
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim)[rank], up.chunk(size, dim)[rank]], dim=0)
    return full.chunk(size, dim)[rank]


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, checkpoint: HFCheckpoint, config: BDGemmaConfig) -> None:
    """Copy every key-map tensor of `checkpoint` (text stack and carried vision tower) into this rank's part of
    `model`."""
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    layer_index = {layer.layer_number - 1: i for i, layer in enumerate(model.decoder.layers)}
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    local_experts = config.num_moe_experts // parallel_state.get_expert_model_parallel_world_size()
    loaded: set[str] = set()
    for mapping in model_mappings(config):
        hf = {key: checkpoint.tensor(key) for key in mapping.hf_keys}
        try:
            converted = mapping.to_megatron(hf)
        except RuntimeError as error:  # a view/cat that does not fit the config's geometry
            shapes = {key: tuple(t.shape) for key, t in hf.items()}
            raise ValueError(f"{checkpoint.path}: tensors {shapes} do not fit the config ({error})") from error
        for name, full in converted.items():
            targets = [_local_name(model, name, layer_index, ep_rank * local_experts, local_experts)]
            if name == "embedding.word_embeddings.weight":
                targets.append("output_layer.weight")  # the tied copy on the last PP stage
            for local in targets:
                if local is not None and local not in params:
                    local = _grouped_expert_name(local)
                if local is None or local not in params:
                    continue  # the tied output copy on a stage without the LM head
                target = params[local]
                shard = shard_for_rank(name, full, target)
                if shard.shape != target.shape:
                    raise ValueError(
                        f"{checkpoint.path}: tensor for {mapping.hf_keys} has shape {tuple(full.shape)}, which does not "
                        f"fit {name} (this rank's shard {tuple(target.shape)})"
                    )
                if is_carried(name) and shard.dtype != target.dtype:  # carried tensors are never cast
                    raise ValueError(f"{checkpoint.path}: {mapping.hf_keys[0]} is stored as {shard.dtype}, but the "
                                     f"model carries its vision tensors as {target.dtype} (vision_dtype)")
                target.copy_(shard)
                loaded.add(local)
    # The vision tower's persistent buffers too (its RoPE tables are not stored: transformers computes them).
    expected = dict.fromkeys([*dict(model.named_parameters()), *(name for name in model.state_dict() if is_carried(name))])
    missing = [name for name in expected if name not in loaded]
    if missing:
        raise ValueError(
            f"{checkpoint.path}: no checkpoint tensor maps to the model parameters {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} (names the key map does not know for this backend?)"
        )
    checkpoint.check_tied_head()
    unexpected = checkpoint.unconsumed()
    if unexpected:
        raise ValueError(f"{checkpoint.path}: unexpected tensors {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
