"""Megatron `torch_dist` checkpoints of DiffusionGemma: streaming HF import, model loading and logit verification.

    convert_hf_to_megatron("hf/diffusiongemma", "ckpt/dg")   # HF directory → Megatron checkpoint directory
    model = load_model("ckpt/dg")                              # at the current TP / EP / PP layout
    verify_against_hf("ckpt/dg", "hf/diffusiongemma")          # max-abs logit difference

A Megatron distributed checkpoint is independent of the parallel layout: every tensor is stored once as its
global (unsharded) tensor, and `dist_checkpointing.load` cuts out each rank's shard on load. One process therefore
writes it from the TP=1 / EP=1 / PP=1 view of the model, and the result loads at any layout (`--tp/--ep/--pp` only
check that the target layout fits the model).

Streaming: the model is built on the meta device only to learn the checkpoint's keys, shapes and chunks; Megatron's
own `dist_checkpointing.save` then writes it through a strategy whose planner produces each chunk on demand from
its key-map group (HF tensors read one at a time) and drops the group once its last chunk is written. Each layer
(text or vision tower, `stream_group`) goes to its own file, because torch's writer keeps every tensor of an open file
alive until the file is closed. Peak memory is therefore about two copies of the largest group (one layer's
experts), not the model.

The checkpoint's `extra` holds the model config (`model_config_to_dict`, the carried vision tower's config and dtype
included) so the model can be rebuilt from the checkpoint alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType

from megatron_bdgemma.config import BDGemmaConfig
from megatron_bdgemma.conversion.hf_checkpoint import (
    LM_HEAD,
    SAFETENSORS_DTYPES,
    VISION_PREFIXES,
    HFCheckpoint,
    hf_prefixes,
)
from megatron_bdgemma.conversion.keymap import Mapping, Tensors, model_mappings
from megatron_bdgemma.vision import is_carried, vision_dtype

if TYPE_CHECKING:
    from megatron_bdgemma.model import BDGemmaModel

Log = Callable[[str], None]

# TransformerConfig fields that shape the model's weights or numerics. Together with the fields BDGemmaConfig
# declares itself they rebuild the model; parallel sizes, dispatcher, recompute and init settings are chosen by
# the run that loads the checkpoint.
_ARCHITECTURE_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "kv_channels", "num_query_groups", "ffn_hidden_size",
    "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
    "layernorm_epsilon", "init_method_std", "hidden_dropout", "attention_dropout", "moe_router_dtype",
    "params_dtype", "bf16", "fp16",
)
_PLAIN = (bool, int, float, str, type(None))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""`--dtype` choices of the tools."""
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_VISION_LAYER = re.compile(r"^vision\.vision_tower\.encoder\.layers\.(\d+)\.")


class ConversionError(ValueError):
    """The input cannot be converted; the message names the tensor, field or path at fault."""


# ---- model config in the checkpoint ---------------------------------------------------------------------------


def _config_field_names() -> tuple[str, ...]:
    from megatron.core.transformer.transformer_config import TransformerConfig

    inherited = {f.name for f in dataclasses.fields(TransformerConfig)}
    own = tuple(f.name for f in dataclasses.fields(BDGemmaConfig) if f.name not in inherited)
    return _ARCHITECTURE_FIELDS + tuple(name for name in own if name != "layer_attention_type")


def _is_plain(value: Any) -> bool:
    """JSON data: plain scalars, lists of them, dicts of them with string keys (`rope_parameters`)."""
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return isinstance(value, _PLAIN)


def _rope_from_scalar_fields(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`rope_parameters` of a checkpoint written before it existed, when the RoPE was five scalar fields (a sliding
    default/linear RoPE and a full proportional one, each divided by its factor)."""
    sliding_factor = values.pop("rope_scaling_factor", 1.0)
    full_factor = values.pop("global_rope_scaling_factor", 1.0)
    sliding = {"rope_type": "default"} if sliding_factor == 1.0 else {"rope_type": "linear", "factor": sliding_factor}
    full = {"rope_type": "proportional", "partial_rotary_factor": values.pop("global_partial_rotary_factor", 0.25)}
    if full_factor != 1.0:
        full["factor"] = full_factor
    return {"sliding_attention": sliding | {"rope_theta": values.pop("rope_theta", 10_000.0)},
            "full_attention": full | {"rope_theta": values.pop("global_rope_theta", 1_000_000.0)}}


def model_config_to_dict(config: BDGemmaConfig) -> dict[str, Any]:
    """The architecture fields of `config` as plain values (dtypes by name), for a checkpoint's `extra`."""
    values: dict[str, Any] = {}
    for name in _config_field_names():
        value = getattr(config, name)
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        elif isinstance(value, (list, tuple)):
            value = list(value)
        if not _is_plain(value):
            raise TypeError(f"BDGemmaConfig.{name} = {value!r} is not a plain value")
        values[name] = value
    return values


def model_config_from_dict(values: dict[str, Any], **overrides: Any) -> BDGemmaConfig:
    """Rebuild a `BDGemmaConfig` from `model_config_to_dict` output; `overrides` set any field (parallel sizes...)."""
    values = dict(values)
    if "rope_parameters" not in values and "rope_theta" in values:
        values["rope_parameters"] = _rope_from_scalar_fields(values)
    if isinstance(values.get("params_dtype"), str):
        values["params_dtype"] = getattr(torch, values["params_dtype"])
    values |= overrides
    dtype = values.get("params_dtype", torch.float32)
    if "params_dtype" in overrides:  # the precision flags follow a new dtype unless given too
        flags = dict(bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)
        values.update({key: flag for key, flag in flags.items() if key not in overrides})
    values.setdefault("pipeline_dtype", dtype)  # activations between pipeline stages
    values.setdefault("use_cpu_initialization", not torch.cuda.is_available())
    return BDGemmaConfig(**values)


# ---- checkpoint directories -----------------------------------------------------------------------------------


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory itself, or the one a save root's `latest` marker names."""
    from megatron_bdgemma.training.run_dir import locate_checkpoint

    try:
        return locate_checkpoint(path)
    except (ValueError, FileNotFoundError) as error:
        raise ConversionError(str(error)) from error


def read_extra(path: str | Path) -> dict[str, Any]:
    """The `extra` dict saved with a checkpoint, read without building a model."""
    from megatron.core import dist_checkpointing

    from megatron_bdgemma.training.checkpointing import naming_damaged_files

    path = resolve_checkpoint_dir(path)
    with naming_damaged_files(path):
        return dist_checkpointing.load_common_state_dict(str(path)).get("extra", {})


def checkpoint_model_config(path: str | Path, **overrides: Any) -> BDGemmaConfig:
    """The model config a checkpoint was saved with (its `extra["model_config"]`), with `overrides` applied."""
    extra = read_extra(path)
    if "model_config" not in extra:
        raise ConversionError(
            f"{path}: the checkpoint does not record its model config (extra['model_config']); it was saved "
            "without megatron_bdgemma.conversion.megatron_checkpoint.model_config_to_dict"
        )
    return model_config_from_dict(extra["model_config"], **overrides)


def load_model(checkpoint_dir: str | Path, dtype: torch.dtype | None = None, backend: str = "local",
               **config_overrides: Any) -> BDGemmaModel:
    """Build a `BDGemmaModel` from a Megatron checkpoint alone, at the current model-parallel layout.

    Creates a 1-process model-parallel world when none exists; under an existing TP/EP/PP layout each rank loads its
    own shard (Megatron reshards on load). `dtype` defaults to the checkpoint's; `config_overrides` set config
    fields (sequence parallelism defaults to on when TP > 1, which Megatron's MoE requires).
    """
    from megatron.core import parallel_state

    from megatron_bdgemma.model import BDGemmaModel
    from megatron_bdgemma.runtime.distributed import ensure_model_parallel
    from megatron_bdgemma.training.checkpointing import load_checkpoint

    ensure_model_parallel()
    path = resolve_checkpoint_dir(checkpoint_dir)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    layout = dict(
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        sequence_parallel=tp > 1,
    )
    if dtype is not None:
        layout["params_dtype"] = dtype
    config = checkpoint_model_config(path, **(layout | config_overrides))
    model = BDGemmaModel(
        config, backend=backend, pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    load_checkpoint(path, model)
    return model.eval()


def check_output_apart(out: str | Path, *sources: str | Path) -> None:
    """Refuse an `out` that is, contains or lies inside a source: replacing it (`--overwrite`) would delete the input."""
    target = Path(out).resolve()
    for source in sources:
        src = Path(source).resolve()
        if target == src or target in src.parents or src in target.parents:
            relation = "is" if target == src else "contains" if target in src.parents else "is inside"
            raise ConversionError(f"--out {out} {relation} the source {source}; write the output somewhere else")


@contextmanager
def staged_output(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty staging directory beside `out`; move it to `out` only when the block completes.

    `out` must not exist or be an empty directory unless `overwrite`. On any error (Ctrl-C included) the staging
    directory is removed, so no partial output is left behind and an existing `out` is untouched.
    """
    out = Path(out)
    blocking = next((p for p in [out.parent, *out.parent.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise NotADirectoryError(f"--out {out}: {blocking} is a file, not a directory")
    if out.exists() and not out.is_dir() and not overwrite:
        raise FileExistsError(f"--out {out} is a file; the output is a directory: give a new path, or pass "
                              "--overwrite to replace the file")
    if out.exists() and not overwrite and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        # Renames only until the new output is in place: an interruption leaves the old one beside it, whole.
        previous = out.with_name(f".{out.name}.previous-{os.getpid()}")
        out.rename(previous)
        staging.rename(out)
        shutil.rmtree(previous) if previous.is_dir() else previous.unlink()
    else:
        staging.rename(out)


# ---- the checkpoint's layout ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One stored chunk of a checkpoint tensor and where it sits in the key map's unsharded tensor."""

    key: str
    """The checkpoint key (experts of a layer share one key, with the expert index as a leading axis)."""
    offset: tuple[int, ...]
    sizes: tuple[int, ...]
    region: tuple[slice, ...]
    """The chunk's part of the unsharded tensor `model_mappings` names."""


def meta_model(config: BDGemmaConfig) -> BDGemmaModel:
    """A `BDGemmaModel` on the meta device at TP = EP = PP = 1: its keys and shapes, no memory."""
    from megatron_bdgemma.model import BDGemmaModel

    single = dict(tensor_model_parallel_size=1, expert_model_parallel_size=1, expert_tensor_parallel_size=1,
                  pipeline_model_parallel_size=1, sequence_parallel=False, perform_initialization=False)
    with torch.device("meta"):
        return BDGemmaModel(dataclasses.replace(config, **single))


class CheckpointLayout:
    """Where every key-map tensor lives in a `torch_dist` checkpoint, read off Megatron's own sharded state dict.

    Built in a model-parallel state of sizes 1, where each parameter is its whole unsharded tensor, so a chunk's
    place in it is its global offset without the leading (expert) axes.
    """

    def __init__(self, config: BDGemmaConfig) -> None:
        from megatron.core import parallel_state
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        # Megatron's layers take their shard sizes from the parallel state, not from the config.
        sizes = (parallel_state.get_tensor_model_parallel_world_size(),
                 parallel_state.get_expert_model_parallel_world_size(),
                 parallel_state.get_pipeline_model_parallel_world_size())
        if sizes != (1, 1, 1):
            raise ConversionError(f"conversion runs in a model-parallel state of sizes 1, not TP/EP/PP={sizes}")
        self.config = config
        self.model = meta_model(config)
        self.shapes: dict[str, torch.Size] = {
            name: tensor.shape for name, tensor in [*self.model.named_parameters(), *self.model.named_buffers()]
        }
        self.entries = {name: entry for name, entry in self.sharded_state_dict().items()
                        if isinstance(entry, (ShardedTensor, ShardedTensorFactory))}
        """Megatron's sharded-state-dict entry of every tensor (`_extra_state` objects of the linear layers are
        left out: they are empty, and Megatron's save writes them)."""
        self.chunks: dict[str, list[Chunk]] = {}
        self.global_shapes: dict[str, tuple[int, ...]] = {}
        """Checkpoint key → its global shape."""
        for name, entry in self.entries.items():
            pieces = entry.build() if isinstance(entry, ShardedTensorFactory) else [entry]
            self.chunks[name] = [_chunk(piece) for piece in pieces]
            self.global_shapes.update({piece.key: tuple(piece.global_shape) for piece in pieces})
        uncovered = sorted(set(self.chunks) - {key for m in model_mappings(config) for key in m.megatron_keys})
        if uncovered:
            raise ConversionError(f"the key map has no entry for checkpoint tensors {uncovered}")

    def sharded_state_dict(self) -> dict[str, Any]:
        """A fresh sharded state dict of the meta model (saving mutates the one it is given)."""
        return self.model.sharded_state_dict()

    def read(self, checkpoint_dir: Path, names: list[str]) -> Tensors:
        """The unsharded key-map tensors `names` from a checkpoint saved at any layout (Megatron reshards)."""
        from megatron.core import dist_checkpointing

        state = {name: dataclasses.replace(entry, data=torch.empty_like(entry.data, device="cpu"))
                 for name, entry in ((name, self.entries[name]) for name in names)}
        from megatron_bdgemma.training.checkpointing import naming_damaged_files

        with naming_damaged_files(checkpoint_dir):
            loaded = dist_checkpointing.load(state, str(checkpoint_dir))
        return {name: loaded[name] for name in names}


def _chunk(piece: Any) -> Chunk:
    lead = piece.prepend_axis_num
    inner = tuple(piece.global_offset[lead:])
    return Chunk(
        key=piece.key,
        offset=tuple(piece.global_offset),
        sizes=(1,) * lead + tuple(piece.local_shape),
        region=tuple(slice(start, start + size) for start, size in zip(inner, piece.local_shape)),
    )


def stream_group(megatron_key: str) -> str:
    """The group a checkpoint tensor is streamed with (read together on export, written to one file on import): a
    text layer, a vision-tower layer, the rest of the vision tower with its embedder, or the rest of the text model.
    Groups bound the converters' memory: torch's writer keeps every tensor of a file alive until the file is closed."""
    if match := _LAYER.match(megatron_key):
        return f"layer {match.group(1)}"
    if match := _VISION_LAYER.match(megatron_key):
        return f"vision layer {match.group(1)}"
    if is_carried(megatron_key):
        return "vision tower outside its layers, vision embedder"
    return "embedding, final norm, self-conditioning"


# ---- streaming save -------------------------------------------------------------------------------------------


class _ChunkSource:
    """Produces checkpoint chunks on demand, one key-map group at a time.

    A group is produced when its first chunk is asked for and dropped when its last chunk has been handed out, so
    only the groups of the file being written are alive.
    """

    def __init__(self, mappings: list[Mapping], layout: CheckpointLayout,
                 produce: Callable[[Mapping], Tensors]) -> None:
        self.mappings, self.produce = mappings, produce
        self.where: dict[tuple[str, tuple[int, ...]], tuple[int, str, Chunk]] = {}
        self.left: Counter[int] = Counter()
        for index, mapping in enumerate(mappings):
            for name in mapping.megatron_keys:
                for chunk in layout.chunks[name]:
                    self.where[(chunk.key, chunk.offset)] = (index, name, chunk)
                    self.left[index] += 1
        self.cache: dict[int, Tensors] = {}
        self.error: BaseException | None = None
        """The first error producing a group: torch's checkpoint writer re-raises it wrapped, without its message."""

    def chunk(self, key: str, offset: tuple[int, ...]) -> torch.Tensor:
        index, name, chunk = self.where[(key, tuple(offset))]
        if index not in self.cache:
            try:
                self.cache[index] = self.produce(self.mappings[index])
            except Exception as error:
                self.error = self.error or error
                raise
        tensor = self.cache[index][name][chunk.region].reshape(chunk.sizes)
        self.left[index] -= 1
        if not self.left[index]:
            del self.cache[index]
        return tensor


def _planner(source: _ChunkSource) -> SavePlanner:
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner

    class StreamingPlanner(MCoreSavePlanner):
        """Megatron's planner, but tensor data comes from `source` when the writer asks for it."""

        def resolve_data(self, write_item: WriteItem) -> Any:
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            return source.chunk(write_item.index.fqn, tuple(write_item.index.offset))

    return StreamingPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)


class _FilePerLayerWriter(FileSystemWriter):
    """torch's file writer, one `.distcp` file per `stream_group` (a layer, or the rest), in plan order.

    torch holds every tensor of a file until the file is closed; a file per layer bounds that to one layer.
    """

    def __init__(self, path: Path, log: Log) -> None:
        super().__init__(path, single_file_per_rank=True, thread_count=1)
        self.log = log

    def write_data(self, plan: SavePlan, planner: SavePlanner):
        groups: dict[str, list[WriteItem]] = {}
        for item in plan.items:
            groups.setdefault(stream_group(item.index.fqn), []).append(item)
        results = []
        for number, (what, items) in enumerate(groups.items()):
            started = time.monotonic()
            prefix = dataclasses.replace(plan.storage_data, prefix=f"{plan.storage_data.prefix}{number}_")
            results += super().write_data(dataclasses.replace(plan, items=items, storage_data=prefix), planner).wait()
            size = sum(_item_bytes(item) for item in items)
            self.log(f"  [{number + 1}/{len(groups)}] {what}: {len(items)} chunks, {size / 2**20:.1f} MiB "
                     f"({time.monotonic() - started:.1f} s)")
        future = torch.futures.Future()
        future.set_result(results)
        return future


def _item_bytes(item: WriteItem) -> int:
    if item.tensor_data is None:
        return 0
    return item.tensor_data.chunk.sizes.numel() * item.tensor_data.properties.dtype.itemsize


def _streaming_strategy(source: _ChunkSource, log: Log):
    from megatron.core.dist_checkpointing.strategies.torch import (
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    class StreamingSaveStrategy(TorchDistSaveShardedStrategy):
        """Megatron's `torch_dist` format, written synchronously by a streaming planner and a file-per-layer writer."""

        def save(self, sharded_state_dict: dict[str, Any], checkpoint_dir: Path) -> None:
            # The same translation to torch's format as the parent's `async_save` (megatron-core 0.19).
            grouped, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
            dcp_save(mcore_to_pyt_state_dict(grouped, False),
                     storage_writer=_FilePerLayerWriter(Path(checkpoint_dir), log), planner=_planner(source))

    return StreamingSaveStrategy()


def save_streaming(out_dir: Path, layout: CheckpointLayout, mappings: list[Mapping],
                   produce: Callable[[Mapping], Tensors], extra: dict[str, Any], log: Log) -> None:
    """Write a `torch_dist` checkpoint of `layout`'s model into the empty `out_dir`, producing groups on demand."""
    from megatron.core import dist_checkpointing

    from megatron_bdgemma.training.checkpointing import write_results_in_this_process

    source = _ChunkSource(mappings, layout, produce)
    state = {"model": layout.sharded_state_dict(), "extra": extra}
    try:
        with write_results_in_this_process():
            dist_checkpointing.save(state, str(out_dir), sharded_strategy=_streaming_strategy(source, log))
    except BaseException:  # torch's CheckpointException is a BaseException
        if source.error is not None:
            raise source.error from None
        raise
    if source.cache:
        raise ConversionError(f"internal error: groups {sorted(source.cache)} were not fully written")


# ---- HF → Megatron --------------------------------------------------------------------------------------------


@dataclass
class ImportReport:
    """What `convert_hf_to_megatron` did."""

    output: Path
    source_model_type: str
    dtype: torch.dtype
    tensors: int
    bytes: int
    carried: list[str] = field(default_factory=list)
    """The source's vision-tower and embedder keys, stored unchanged (`megatron_bdgemma.vision`)."""
    merged_copies: list[str] = field(default_factory=list)
    self_conditioning_initialised: bool = False
    seconds: float = 0.0


def check_layout(config: BDGemmaConfig, tp: int, ep: int, pp: int) -> None:
    """Raise `ConversionError` when the model cannot be split at TP=`tp`, EP=`ep`, PP=`pp`."""
    problems = []
    if config.num_moe_experts % ep:
        problems.append(f"{config.num_moe_experts} experts cannot be split over EP={ep}")
    if config.num_layers % pp:
        problems.append(f"{config.num_layers} layers cannot be split evenly over PP={pp}")
    try:
        dataclasses.replace(config, tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                            expert_tensor_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=tp > 1,
                            pipeline_dtype=config.params_dtype)
    except (ValueError, AssertionError) as error:
        problems.append(str(error).removeprefix("invalid BDGemmaConfig:\n  - "))
    if problems:
        raise ConversionError(f"the model does not fit TP={tp} EP={ep} PP={pp}:\n  - " + "\n  - ".join(problems))


def _preflight(checkpoint: HFCheckpoint, mappings: list[Mapping], layout: CheckpointLayout) -> list[str]:
    """Check names and shapes of every tensor from the safetensors headers alone; return the duplicate (encoder) keys
    merged.

    Missing, mis-shaped or unexpected tensors stop the conversion here, before anything is read or written.
    """
    headers = checkpoint.headers
    read, merged = set(), []
    for mapping in mappings:
        meta = {}
        for name in mapping.hf_keys:
            prefixes = hf_prefixes(checkpoint.model_type, name)
            keys = [prefix + name for prefix in prefixes if prefix + name in headers]
            if not keys:
                raise ConversionError(f"{checkpoint.path}: missing tensor {prefixes[0] + name}")
            shapes = {headers[key][0] for key in keys}
            if len(shapes) > 1:
                raise ConversionError(f"{checkpoint.path}: copies {keys} of one tensor have different shapes {shapes}")
            read.update(keys)
            merged += keys[1:]
            shape, dtype = headers[keys[0]]
            if dtype not in SAFETENSORS_DTYPES:  # a cast from integers would silently load garbage weights
                raise ConversionError(f"{checkpoint.path}: {keys[0]} is stored as {dtype}; a floating-point tensor "
                                      f"({'/'.join(SAFETENSORS_DTYPES)}) is expected")
            meta[name] = torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype], device="meta")
        shapes = {hf_prefixes(checkpoint.model_type, name)[0] + name: tuple(t.shape) for name, t in meta.items()}
        try:
            converted = mapping.to_megatron(meta)
        except RuntimeError as error:
            raise ConversionError(f"{checkpoint.path}: tensors {shapes} do not fit the config ({error})") from error
        for name, tensor in converted.items():
            if tensor.shape != layout.shapes[name]:
                raise ConversionError(
                    f"{checkpoint.path}: tensors {shapes} give {name} the shape {tuple(tensor.shape)}, but the config "
                    f"needs {tuple(layout.shapes[name])}"
                )
    if LM_HEAD in headers:
        try:
            checkpoint.check_tied_head()
        except ValueError as error:
            raise ConversionError(str(error)) from error
        read.add(LM_HEAD)
    unexpected = sorted(key for key in headers if key not in read)
    if unexpected:
        more = f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""
        raise ConversionError(f"{checkpoint.path}: unexpected tensors {unexpected[:10]}{more}")
    return merged


def _fresh_self_conditioning(config: BDGemmaConfig, seed: int) -> Tensors:
    """A newly initialised self-conditioning module (Megatron's init, seeded), for sources that have none."""
    from megatron_bdgemma.layers.self_conditioning import SelfConditioning
    from megatron_bdgemma.spec import get_glu_mlp_submodules

    single = dataclasses.replace(config, tensor_model_parallel_size=1, expert_model_parallel_size=1,
                                 expert_tensor_parallel_size=1, pipeline_model_parallel_size=1, sequence_parallel=False,
                                 perform_initialization=True, use_cpu_initialization=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = SelfConditioning(single, get_glu_mlp_submodules("local"))
    return {f"self_conditioning.{name}": tensor.detach() for name, tensor in module.state_dict().items()
            if isinstance(tensor, torch.Tensor)}


def _source_summary(checkpoint: HFCheckpoint, carried: list[str], config: BDGemmaConfig, merged: list[str]) -> str:
    """One line on what the source holds besides the text stack: the vision tensors carried, the copies merged."""
    if carried:
        prefix = VISION_PREFIXES[checkpoint.model_type]
        groups = Counter(prefix + key.removeprefix(prefix).split(".")[0] for key in carried)
        vision = (", ".join(f"{count} × {name}.*" for name, count in sorted(groups.items(), reverse=True))
                  + f" carried unchanged ({config.vision_dtype})")
    else:
        vision = "none (a text-only model)"
    parts = [f"vision: {vision}"]
    if merged:
        parts.append(f"merged: {len(merged)} duplicate encoder copies (model.encoder.language_model.*, checked equal)")
    return "; ".join(parts)


def convert_hf_to_megatron(
    hf_path: str | Path, out: str | Path, *, dtype: torch.dtype | None = None, tp: int = 1, ep: int = 1, pp: int = 1,
    overwrite: bool = False, seed: int = 1234, log: Log = print, **config_overrides: Any,
) -> ImportReport:
    """Convert a local HF DiffusionGemma / Gemma 4 MoE directory into a Megatron `torch_dist` checkpoint at `out`.

    Args:
        hf_path: `DiffusionGemmaForBlockDiffusion`, `Gemma4ForCausalLM` or `Gemma4ForConditionalGeneration` (MoE)
            directory. Gemma 4 (AR) sources have no self-conditioning module: it is freshly initialised (seeded
            with `seed`) and the log says so.
        out: the checkpoint directory to create (`load_model`, `examples/pretrain_bdgemma.py --load`).
        dtype: stored dtype; default the source's.
        tp, ep, pp: the layout the checkpoint is meant for. The checkpoint loads at any layout; this only checks
            that the model fits it.
        overwrite: replace a non-empty `out`.
        config_overrides: `BDGemmaConfig` fields to change (e.g. `canvas_length` for an AR source).

    Raises `ConversionError` (missing / unexpected / mis-shaped tensors, unsupported config), `FileExistsError`.
    Nothing is left at `out` (or beside it) unless the conversion completes.
    """
    from megatron_bdgemma.runtime.distributed import ensure_model_parallel

    started = time.monotonic()
    ensure_model_parallel()
    try:
        checkpoint = HFCheckpoint(hf_path)
    except (ValueError, FileNotFoundError) as error:
        raise ConversionError(str(error)) from error
    is_diffusion = checkpoint.model_type == "diffusion_gemma"
    headers = checkpoint.headers
    if dtype is None:  # the source's own dtype, read off its embedding
        embedding = next((key for key in headers if key.endswith("embed_tokens.weight")), None)
        dtype = SAFETENSORS_DTYPES.get(headers[embedding][1], torch.float32) if embedding else torch.float32
    try:
        config = checkpoint.model_config(params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                                         self_conditioning=True, **config_overrides)
    except ValueError as error:
        raise ConversionError(str(error)) from error
    check_layout(config, tp, ep, pp)
    check_output_apart(out, checkpoint.path)
    mappings = model_mappings(config)
    # An AR source has no self-conditioning tensors: those groups come from a fresh module instead.
    fresh = [] if is_diffusion else [m for m in mappings if m.hf_keys[0].startswith("self_conditioning.")]
    from_source = [m for m in mappings if m not in fresh]

    with staged_output(out, overwrite) as staging:
        log(f"converting {checkpoint.path} ({checkpoint.model_type}) → {out} [{str(dtype).removeprefix('torch.')}]")
        layout = CheckpointLayout(config)
        merged = _preflight(checkpoint, from_source, layout)
        carried = [hf_prefixes(checkpoint.model_type, m.hf_keys[0])[0] + m.hf_keys[0]
                   for m in mappings if is_carried(m.megatron_keys[0])]
        log(_source_summary(checkpoint, carried, config, merged))
        fresh_tensors = _fresh_self_conditioning(config, seed) if fresh else {}
        if fresh:
            log(f"self-conditioning: {checkpoint.model_type} has no self-conditioning module; it is freshly "
                f"initialised (seed {seed})")

        def produce(mapping: Mapping) -> Tensors:
            if mapping in fresh:
                tensors = {name: fresh_tensors[name] for name in mapping.megatron_keys}
            else:
                try:
                    tensors = mapping.to_megatron({name: checkpoint.tensor(name) for name in mapping.hf_keys})
                except ValueError as error:  # untied encoder copies that differ
                    raise ConversionError(str(error)) from error
            # The carried vision tensors keep the source's bytes, whatever `dtype` the text stack is stored in.
            return {name: tensor if is_carried(name) else tensor.to(dtype) for name, tensor in tensors.items()}

        extra = {
            "model_config": model_config_to_dict(config),
            "converted_from": hf_source(checkpoint),
            "self_conditioning_initialised": bool(fresh),
        }
        save_streaming(staging, layout, mappings, produce, extra, log)
    chunks = [chunk for chunks in layout.chunks.values() for chunk in chunks]
    itemsize = {False: dtype.itemsize, True: vision_dtype(config).itemsize}
    report = ImportReport(
        output=Path(out), source_model_type=checkpoint.model_type, dtype=dtype, tensors=len(layout.chunks),
        bytes=sum(torch.Size(c.sizes).numel() * itemsize[is_carried(c.key)] for c in chunks), carried=carried,
        merged_copies=merged, self_conditioning_initialised=bool(fresh), seconds=time.monotonic() - started,
    )
    log(f"wrote {out}: {report.tensors} tensors, {report.bytes / 2**20:.1f} MiB in {report.seconds:.1f} s "
        f"(loads at any TP/EP/PP; checked for TP={tp} EP={ep} PP={pp})")
    return report


def hf_source(checkpoint: HFCheckpoint) -> dict[str, Any]:
    """What a checkpoint records of the HF model its weights came from (`extra["converted_from"]`): the values of its
    config and generation config that `BDGemmaConfig` does not hold (image-boundary tokens, BOS, initialiser range,
    generation EOS / pad), which the HF export writes back (`hf_export.hf_configs`). Training runs carry it on from
    `model.hf` or their `checkpoint.load` / `init_from` into each checkpoint they save. The path is absolute: an
    export or generation may run from another directory."""
    return {
        "path": str(checkpoint.path.resolve()),
        "model_type": checkpoint.model_type,
        "hf_config": checkpoint.config_dict,
        "generation_config": _generation_config_dict(checkpoint.path),
    }


@dataclass(frozen=True)
class CheckpointTokenizer:
    """The tokenizer a checkpoint's model was trained with, as far as this machine has it (`checkpoint_tokenizer`)."""

    spec: str | None
    """`"byte"`, a tokenizer directory on this machine, or None (none recorded, or not here: `note` says which)."""
    chat_template: str | None
    """The run's `data.chat_template` file, when it is on this machine."""
    note: str
    """Where it comes from, and what is missing."""
    incomplete: bool = False
    """The run recorded a tokenizer or chat template this machine does not have (`note` names it)."""


CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""Where transformers reads a chat template first (before `tokenizer_config.json`'s)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", CHAT_TEMPLATE_FILE, "chat_template.json",
                   "preprocessor_config.json", "processor_config.json")
"""A tokenizer / processor directory's files (never weights or config.json: the tokenizer may be a model directory)."""


def checkpoint_tokenizer(extra: dict[str, Any]) -> CheckpointTokenizer:
    """The tokenizer of the checkpoint whose `extra` this is: a training run's `data.tokenizer` with its
    `data.chat_template`; for a checkpoint converted from HF, the source directory's (`hf_source`). Nothing else
    stands in: a run's directory that is not on this machine (it trained elsewhere) gives None, and the note says so.
    A run's relative paths are its launch directory's (`resume.absolute_inputs`), wherever this is called from.
    The HF export writes its files (`hf_export.tokenizer_files_of`); `tools/generate.py --load` tokenizes with it."""
    if "run" in extra:
        from megatron_bdgemma.training.resume import absolute_inputs

        data = absolute_inputs(extra["run"], extra.get("launch_dir")).get("data") or {}
        origin, directory, template = "data.tokenizer", data.get("tokenizer"), data.get("chat_template")
        if directory == "byte":
            return CheckpointTokenizer("byte", None, "the run's byte tokenizer")
    else:
        origin, directory, template = "the HF source", (extra.get("converted_from") or {}).get("path"), None
    if directory is None:
        return CheckpointTokenizer(None, None, "the checkpoint records no tokenizer")
    if not any((Path(directory) / name).is_file() for name in TOKENIZER_FILES):
        return CheckpointTokenizer(None, None, f"{origin} {directory} has no tokenizer files on this machine", True)
    if template is not None and not Path(template).is_file():
        return CheckpointTokenizer(directory, None, f"{origin} {directory} (data.chat_template {template} is not on "
                                                    "this machine: the tokenizer's own template is used)", True)
    note = f"{origin} {directory}" + (f", chat template from data.chat_template {template}" if template else "")
    return CheckpointTokenizer(directory, template, note)


def _generation_config_dict(path: Path) -> dict[str, Any] | None:
    """The token ids of the source's `generation_config.json` (EOS / pad / BOS), carried to the HF export."""
    file = path / "generation_config.json"
    if not file.is_file():
        return None
    values = json.loads(file.read_text())
    return {key: values[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if values.get(key) is not None}


# ---- verification ---------------------------------------------------------------------------------------------


def _hf_model(hf_dir: Path) -> torch.nn.Module:
    import transformers

    classes = {"diffusion_gemma": "DiffusionGemmaForBlockDiffusion", "gemma4": "Gemma4ForConditionalGeneration",
               "gemma4_text": "Gemma4ForCausalLM"}
    cls = getattr(transformers, classes[HFCheckpoint(hf_dir).model_type])
    return cls.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager", local_files_only=True).eval()


@torch.no_grad()
def as_converted(hf_model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Give an HF model (in place) the weights a conversion stores: `per_expert_scale` folded into `down_proj`, and
    every saved tensor rounded to `dtype`.

    Folding is exact in real arithmetic but rounds once in the stored dtype, so this is the reference that a
    converted model must match to fp32 rounding. A model that already holds such weights is unchanged.
    """
    folded = set()
    for module in hf_model.modules():
        experts, router = getattr(module, "experts", None), getattr(module, "router", None)
        if experts is not None and router is not None and experts.down_proj.data_ptr() not in folded:
            folded.add(experts.down_proj.data_ptr())  # the encoder's tied copy is the same tensor
            experts.down_proj.mul_(router.per_expert_scale[:, None, None])
            router.per_expert_scale.fill_(1.0)
    for tensor in hf_model.state_dict().values():
        tensor.copy_(tensor.to(dtype))
    return hf_model


@torch.no_grad()
def max_logit_difference(model: BDGemmaModel, hf_model: torch.nn.Module, num_sequences: int = 3, prompt_len: int = 11,
                         seed: int = 0) -> float:
    """Max-abs difference between our logits and an HF model's on `num_sequences` random token sequences.

    DiffusionGemma: canvas logits (encode a prompt, decode a canvas at its absolute positions; every sequence but
    the first also feeds random self-conditioning logits, so that module's weights are compared too). Gemma 4 (AR):
    the next-token logits of the encoder.
    """
    generator = torch.Generator().manual_seed(seed)
    vocab, worst = model.config.vocab_size, 0.0
    diffusion = hf_model.config.model_type == "diffusion_gemma"
    for index in range(num_sequences):
        prompt = torch.randint(2, vocab, (1, prompt_len), generator=generator)
        if diffusion:
            canvas_len = min(model.config.canvas_length, 16)
            canvas = torch.randint(0, vocab, (1, canvas_len), generator=generator)
            positions = prompt_len + torch.arange(canvas_len)[None]
            signal = None if index == 0 else 5 * torch.randn(1, canvas_len, vocab, generator=generator)
            expected = hf_model(input_ids=prompt, decoder_input_ids=canvas, decoder_position_ids=positions,
                                self_conditioning_logits=signal).logits
            got = model.decode(canvas, model.encode(prompt), canvas_position_ids=positions,
                               self_conditioning_logits=signal)
        else:
            expected = hf_model(input_ids=prompt).logits
            got = model.encode(prompt, return_logits=True).logits
        worst = max(worst, (got.float() - expected.float()).abs().max().item())
    return worst


def verify_against_hf(checkpoint_dir: str | Path, hf_dir: str | Path, num_sequences: int = 3) -> float:
    """Max-abs logit difference between a Megatron checkpoint and an HF directory (either the source or the export
    of the other) over `num_sequences` sequences (see `max_logit_difference`).

    Both run in fp32, the HF model with the checkpoint's stored weights (`as_converted`), so any difference beyond
    fp32 rounding is a conversion error. Both models are held in memory at once.
    """
    stored = checkpoint_model_config(checkpoint_dir).params_dtype
    model = load_model(checkpoint_dir, dtype=torch.float32)
    return max_logit_difference(model, as_converted(_hf_model(Path(hf_dir)), stored), num_sequences)


def report_verification(megatron_dir: str | Path, hf_dir: str | Path, tolerance: float, log: Callable[[str], None]) -> int:
    """`verify_against_hf` for the CLIs: logs the difference; exit status 0 within `tolerance`, else 1."""
    difference = verify_against_hf(megatron_dir, hf_dir)
    log(f"verify: max-abs logit difference {difference:.3e} (tolerance {tolerance:.0e})")
    if difference > tolerance:
        print("error: --verify: logits differ beyond the tolerance", file=sys.stderr)
        return 1
    return 0
