"""The vision half survives: HF → Megatron → (training at any layout) → HF keeps every vision tensor bit-identical.

- Conversion carries the vision tower and embedder byte for byte, in their own dtype whatever `--dtype` makes of the
  text stack, and `transformers` loads the export with no missing key (nothing initialised at random) holding
  exactly the source's vision tensors.
- Training from that source (`model.hf=`) at TP=2, EP=2 (bf16) and PP=2 (2 gloo ranks) and in one process changes
  the text stack but saves the vision tensors unchanged, and each checkpoint exports them bit-identical.
- A text-only model stays text-only: its export holds the zero `MINIMAL_VISION` stand-in (no missing keys, about
  our size), and a vision config recorded by a source is used only when its tensors are carried.
- A Gemma 4 multimodal source carries its tower too; an audio tower, missing, unexpected, mis-shaped or mixed-dtype
  vision tensors, and a checkpoint whose carried tensor changed dtype are refused by name.
- The planner counts the vision tower in the first stage's parameters and its stored bytes in the weights; the
  trainer's DDP buffers and optimizer hold it only with `model.overrides.train_vision=true`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_bdgemma.hf_reference import FULL, SLIDING, TINY_VISION
from tests import hf_models
from tests.multiproc import run_in_processes

CONFIG = Path(__file__).resolve().parent.parent / "examples" / "configs" / "tiny_pretrain.yaml"
# 4 layers (2 per stage at PP=2), 2 KV heads on both layer types (TP=2 splits whole groups), byte vocabulary.
TEXT = dict(vocab_size=320, num_global_key_value_heads=2, num_hidden_layers=4, layer_types=[SLIDING, FULL] * 2)
LAYOUTS = {"tp2": ["parallel.tp=2"], "ep2_bf16": ["parallel.ep=2", "train.bf16=true"], "pp2": ["parallel.pp=2"]}


def _quiet(_: str) -> None:
    """Progress lines are not under test here (tests/test_conversion.py reads them through the CLI)."""


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _load_in_transformers(path: Path) -> tuple[torch.nn.Module, dict]:
    from transformers import DiffusionGemmaForBlockDiffusion

    return DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32, output_loading_info=True)


def _assert_vision_kept(source: dict[str, torch.Tensor], exported_dir: Path) -> dict[str, torch.Tensor]:
    """The export holds exactly the source's vision tensors, bit-identical; returns its tensors."""
    expected, exported = hf_models.vision_tensors(source), _tensors(exported_dir)
    got = hf_models.vision_tensors(exported)
    assert len(expected) == 16 and sorted(got) == sorted(expected)
    different = [name for name, tensor in expected.items() if not hf_models.same_bytes(got[name], tensor)]
    assert not different, f"{exported_dir}: vision tensors changed: {different}"
    return exported


@pytest.fixture(scope="module")
def vision_source(tmp_path_factory) -> Path:
    """A tiny DiffusionGemma whose vision tower and embedder hold random values (HF leaves the position table ones)."""
    return hf_models.save(hf_models.diffusion_gemma(TEXT, canvas_length=16), tmp_path_factory.mktemp("vision") / "hf")


def test_conversion_round_trip_keeps_vision_bit_identical(vision_source, tmp_path, model_parallel):
    """bf16 import of an fp32 source: the text stack is rounded, the vision tensors stay fp32 and unchanged, in the
    Megatron checkpoint and in the (bf16) export, which transformers loads without a missing key."""
    from megatron.core import dist_checkpointing

    from megatron_bdgemma.conversion.hf_export import convert_megatron_to_hf
    from megatron_bdgemma.conversion.megatron_checkpoint import convert_hf_to_megatron

    source = load_file(vision_source / "model.safetensors")
    report = convert_hf_to_megatron(vision_source, tmp_path / "mg", dtype=torch.bfloat16, log=_quiet)
    assert sorted(report.carried) == sorted("model.encoder." + name for name in hf_models.vision_tensors(source))
    stored = dist_checkpointing.load_tensors_metadata(str(tmp_path / "mg"))
    assert stored["vision.embed_vision.embedding_projection.weight"].dtype == torch.float32
    assert stored["embedding.word_embeddings.weight"].dtype == torch.bfloat16
    convert_megatron_to_hf(tmp_path / "mg", tmp_path / "hf", log=_quiet)
    exported = _assert_vision_kept(source, tmp_path / "hf")
    assert exported["model.decoder.embed_tokens.weight"].dtype == torch.bfloat16
    model, info = _load_in_transformers(tmp_path / "hf")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    # What transformers holds is the source's tower, not a fresh initialisation.
    loaded = hf_models.vision_tensors(model.state_dict())
    assert all(hf_models.same_bytes(loaded[name], t) for name, t in hf_models.vision_tensors(source).items())


def _run(tmp: Path, *overrides: str):
    from megatron_bdgemma.training.config import load_run_config

    base = [f"data.cache_dir={tmp / 'data'}", "data.seq_length=32", "train.steps=2", "train.micro_batch_size=2",
            "train.global_batch_size=4", "train.eval_interval=0", "optim.warmup_steps=1", "checkpoint.interval=2",
            "model.overrides={}", "optim.distributed_optimizer=true"]
    return load_run_config(CONFIG, base + list(overrides))


def _train_layouts(rank: int, tmp: str, source: str) -> None:
    import torch.distributed as dist

    from megatron_bdgemma.training.trainer import train

    for name, layout in LAYOUTS.items():
        train(_run(Path(tmp), f"model.hf={source}", f"checkpoint.save={Path(tmp) / name}", *layout))
        dist.barrier()


def test_training_at_any_layout_keeps_vision_bit_identical(vision_source, tmp_path, model_parallel):
    from megatron_bdgemma.conversion.hf_export import convert_megatron_to_hf
    from megatron_bdgemma.training.trainer import train

    # The 1-process run first also builds the data cache the ranks then read.
    train(_run(tmp_path, f"model.hf={vision_source}", f"checkpoint.save={tmp_path / 'one'}"))
    run_in_processes(_train_layouts, 2, str(tmp_path), str(vision_source), timeout_s=400)
    source = load_file(vision_source / "model.safetensors")
    for name in ("one", *LAYOUTS):
        convert_megatron_to_hf(tmp_path / name, tmp_path / f"{name}_hf", dtype=torch.float32, log=_quiet)
        exported = _assert_vision_kept(source, tmp_path / f"{name}_hf")
        # Training happened: the text stack moved (2 Adam steps at lr 3e-3).
        assert not torch.equal(exported["model.decoder.layers.0.self_attn.q_proj.weight"],
                               source["model.decoder.layers.0.self_attn.q_proj.weight"]), name
    _, info = _load_in_transformers(tmp_path / "pp2_hf")
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_train_vision_puts_the_tower_in_the_optimizer(vision_source, tmp_path, model_parallel):
    """The trainer's DDP buffers and optimizer hold the vision tower and embedder only with
    `model.overrides.train_vision=true`: frozen, nothing trains them."""
    from megatron_bdgemma.training.trainer import setup

    sizes = {}
    for train in ("false", "true"):
        state = setup(_run(tmp_path, f"model.hf={vision_source}", f"model.overrides.train_vision={train}",
                           "checkpoint.save=null"))
        (ddp,) = state.model
        in_buffers = {id(p) for buffer in ddp.buffers for p in buffer.params}
        vision = [p for name, p in ddp.module.named_parameters() if name.startswith("vision.")]
        assert len(vision) == 16 and all((id(p) in in_buffers) == (train == "true") for p in vision), train
        sizes[train] = sum(len(group["params"]) for group in state.optimizer.param_groups)
    assert sizes["true"] == sizes["false"] + 16, sizes


def test_text_only_export_is_text_only_and_loads_without_missing_keys(tmp_path, model_parallel):
    """A model without a vision tower (a preset) exports the zero stand-in: transformers initialises nothing at
    random, and the model is about our size (the default tower alone would be 167M parameters)."""
    from megatron_bdgemma.config import tiny
    from megatron_bdgemma.conversion.hf_export import MINIMAL_VISION, convert_megatron_to_hf
    from megatron_bdgemma.conversion.megatron_checkpoint import model_config_to_dict
    from megatron_bdgemma.model import BDGemmaModel
    from megatron_bdgemma.training.checkpointing import save_checkpoint

    model = BDGemmaModel(tiny())
    save_checkpoint(tmp_path / "mg", 1, model, extra={"model_config": model_config_to_dict(model.config)})
    lines: list[str] = []
    convert_megatron_to_hf(tmp_path / "mg", tmp_path / "hf", log=lines.append)
    assert "vision: none in the checkpoint (a text-only model); wrote the zero stand-in tower (16 tensors)" in lines[-1]
    stand_in = hf_models.vision_tensors(_tensors(tmp_path / "hf"))
    assert len(stand_in) == 16 and not any(t.any() for t in stand_in.values())
    loaded, info = _load_in_transformers(tmp_path / "hf")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert loaded.config.vision_config.hidden_size == MINIMAL_VISION["hidden_size"]
    ours, theirs = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in loaded.parameters())
    # The stand-in adds ~1K parameters and its projection H × 8; encoder and decoder share one text stack.
    assert ours < theirs <= ours + 2_000 + 8 * model.config.hidden_size, (theirs, ours)

    # A checkpoint converted before the tower was carried records a source vision config but holds no tower: said.
    legacy = {"model_config": model_config_to_dict(model.config),
              "converted_from": {"hf_config": {"vision_config": TINY_VISION}}}
    save_checkpoint(tmp_path / "legacy", 1, model, extra=legacy)
    lines.clear()
    convert_megatron_to_hf(tmp_path / "legacy", tmp_path / "legacy_hf", log=lines.append)
    assert any(line.startswith("warning: ") and "holds none of its tensors" in line for line in lines), lines
    assert len(hf_models.vision_tensors(_tensors(tmp_path / "legacy_hf"))) == 16


def test_export_takes_the_vision_config_of_the_carried_tower(model_parallel):
    """The vision config comes from the model's own record, not from the source: a checkpoint converted before the
    tower was carried records the source's vision config but holds no tensors for it, so it gets the stand-in."""
    from megatron_bdgemma.config import tiny
    from megatron_bdgemma.conversion.hf_export import MINIMAL_VISION, hf_configs

    source = {"hf_config": {"vision_config": TINY_VISION | {"hidden_size": 24}}}
    carried, _ = hf_configs(tiny(vision_config=TINY_VISION | {"hidden_size": 24}), source, torch.float32)
    assert carried.vision_config.hidden_size == 24 and carried.vision_config.num_hidden_layers == 1
    legacy, _ = hf_configs(tiny(), source, torch.float32)
    assert legacy.vision_config.hidden_size == MINIMAL_VISION["hidden_size"]


def test_gemma4_multimodal_source_carries_its_vision_and_audio_is_refused(tmp_path, model_parallel):
    """A Gemma 4 multimodal source keeps its tower (under `model.`) into the DiffusionGemma export; an audio tower,
    which DiffusionGemma cannot hold, is refused by name before anything is written."""
    from megatron_bdgemma.conversion.hf_export import convert_megatron_to_hf
    from megatron_bdgemma.conversion.megatron_checkpoint import ConversionError, convert_hf_to_megatron

    source = hf_models.save(hf_models.gemma4_multimodal(), tmp_path / "hf")
    convert_hf_to_megatron(source, tmp_path / "mg", canvas_length=4, log=_quiet)
    convert_megatron_to_hf(tmp_path / "mg", tmp_path / "out", log=_quiet)
    expected = hf_models.vision_tensors(load_file(source / "model.safetensors"), prefix="model.")
    got = hf_models.vision_tensors(_tensors(tmp_path / "out"))
    assert len(expected) == 16 and sorted(got) == sorted(expected)
    assert all(hf_models.same_bytes(got[name], t) for name, t in expected.items())
    _, info = _load_in_transformers(tmp_path / "out")
    assert not info["missing_keys"] and not info["unexpected_keys"], info

    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(config | {"audio_config": {"model_type": "gemma4_audio"}}))
    with pytest.raises(ConversionError, match=r"audio_config is set: an audio tower is not supported"):
        convert_hf_to_megatron(source, tmp_path / "refused", canvas_length=4, log=_quiet)
    assert not (tmp_path / "refused").exists()


_UP = "model.encoder.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight"
_PROJECTION = "model.encoder.embed_vision.embedding_projection.weight"


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t: t.pop(_UP), rf"missing tensor {re.escape(_UP)}"),
        (lambda t: t.__setitem__("model.encoder.vision_tower.mystery", torch.zeros(2)),
         r"unexpected tensors \['model\.encoder\.vision_tower\.mystery'\]"),
        (lambda t: t.__setitem__(_PROJECTION, t[_PROJECTION][:, :-1].clone()),
         rf"{re.escape(_PROJECTION)}.*the config needs \(32, 16\)"),
        (lambda t: t.__setitem__(_PROJECTION, t[_PROJECTION].bfloat16()),
         rf"vision tensors are stored in several dtypes \({re.escape(_PROJECTION)} is BF16, .* is F32\)"),
    ],
    ids=["missing", "unexpected", "misshaped", "mixed_dtypes"],
)
def test_bad_vision_tensors_are_named(vision_source, tmp_path, capsys, model_parallel, edit, message):
    """Nothing of the vision half is dropped or cast silently: the import stops with the key named, exit 2, and
    writes nothing."""
    import shutil
    import sys

    from safetensors.torch import save_file

    sys.path.insert(0, str(CONFIG.parents[2] / "tools"))
    import convert_hf_to_megatron as import_tool

    source = Path(shutil.copytree(vision_source, tmp_path / "hf"))
    tensors = load_file(source / "model.safetensors")
    edit(tensors)
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    assert import_tool.main(["--hf", str(source), "--out", str(tmp_path / "mg")]) == 2
    error = capsys.readouterr().err
    assert re.search(message, error), error
    assert not (tmp_path / "mg").exists()


def test_planner_counts_the_vision_tower_in_its_stored_bytes(vision_source, model_parallel):
    """tools/plan.py counts the vision tower and embedder in the first stage's parameters (frozen unless
    `train_vision`) and weights in the bytes the source stores them in."""
    from dataclasses import replace

    from megatron_bdgemma.conversion.hf_checkpoint import hf_model_config
    from megatron_bdgemma.model import BDGemmaModel
    from megatron_bdgemma.training.plan import _vision_bytes, _count

    config = hf_model_config(vision_source, use_cpu_initialization=True, perform_initialization=False)
    with torch.device("meta"):
        model = BDGemmaModel(config)
        trained = BDGemmaModel(replace(config, train_vision=True))
        text_only = BDGemmaModel(hf_model_config(vision_source, vision_config=None, perform_initialization=False))
    source = hf_models.vision_tensors(load_file(vision_source / "model.safetensors"))
    stored = sum(t.numel() * t.element_size() for t in source.values())
    assert _vision_bytes([model]) == stored > 1_000_000 and _vision_bytes([text_only]) == 0
    counts, text = _count([model]), _count([text_only])
    assert counts.vision == counts.vision_frozen == sum(t.numel() for t in source.values())
    assert replace(counts, vision=0, vision_frozen=0) == text
    assert _count([trained]).vision_frozen == 0 and _count([trained]).trainable == counts.trainable + counts.vision


def test_export_refuses_a_carried_tensor_of_another_dtype(vision_source, tmp_path, model_parallel):
    """Reading would cast it to the recorded dtype, so the export would no longer hold the source's bytes."""
    from megatron_bdgemma.conversion.hf_export import convert_megatron_to_hf
    from megatron_bdgemma.conversion.megatron_checkpoint import (
        ConversionError,
        convert_hf_to_megatron,
        load_model,
        model_config_to_dict,
    )
    from megatron_bdgemma.training.checkpointing import save_checkpoint

    convert_hf_to_megatron(vision_source, tmp_path / "mg", log=_quiet)
    model = load_model(tmp_path / "mg")
    recorded = model_config_to_dict(model.config)
    projection = model.vision.embed_vision.embedding_projection
    projection.weight = torch.nn.Parameter(projection.weight.bfloat16(), requires_grad=False)
    save_checkpoint(tmp_path / "cast", 0, model, extra={"model_config": recorded})
    with pytest.raises(ConversionError, match=r"vision\.embed_vision\.embedding_projection\.weight is stored as "
                                              r"torch\.bfloat16, but the model config records the vision tower as float32"):
        convert_megatron_to_hf(tmp_path / "cast", tmp_path / "hf", log=_quiet)
