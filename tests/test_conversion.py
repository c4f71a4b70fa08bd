"""Contract of HF ↔ Megatron conversion (tools/convert_hf_to_megatron.py, tools/convert_megatron_to_hf.py).

- HF DiffusionGemma → Megatron → HF gives the original tensors back (the effective `down_proj · per_expert_scale`,
  `per_expert_scale = 1`, both `layer_scalar` copies, the vision tower bit-identical) and the logits of the model with those effective tensors
  within 1e-5; the export loads in `transformers`, `generate` runs, and its logits equal our model's within 1e-4.
- The converted checkpoint loads at TP=2 and EP=2 (2 gloo processes) with exactly the shards of loading the HF
  source directly there and the 1-process logits, and at PP=2 with the 1-process parameters; a checkpoint re-saved
  by those 2 ranks at TP=2 exports to the same HF tensors.
- A Gemma 4 (AR) source keeps its logits and gets a freshly initialised self-conditioning module, said so.
- Every bad input stops the tool with a message naming the problem and leaves no output, partial or temporary.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_bdgemma.conversion.hf_export import convert_megatron_to_hf
from megatron_bdgemma.conversion.megatron_checkpoint import (
    as_converted,
    convert_hf_to_megatron,
    load_model,
    max_logit_difference,
    model_config_to_dict,
    read_extra,
)
from megatron_bdgemma.runtime.distributed import init_distributed
from tests import hf_models
from tests.multiproc import run_in_processes
from tests.tolerances import record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import convert_hf_to_megatron as import_tool  # noqa: E402  (scripts, not a package)
import convert_megatron_to_hf as export_tool  # noqa: E402

# 2 KV heads on both layer types so TP=2 splits whole groups; 4 layers so PP=2 splits them.
TEXT = dict(num_global_key_value_heads=2, num_key_value_heads=2, num_hidden_layers=4,
            layer_types=["sliding_attention"] * 3 + ["full_attention"])
ROUND_TRIP_TOL, TRANSFORMERS_TOL = 1e-5, 1e-4
# The shards themselves are compared bit for bit (fp32); the logits, in float64, differ only by TP/EP's reduction
# order: worst measured 3.1e-14 with the defaults (AVX-512) and 4.6e-14 under AVX2 on logits of magnitude ~10 (in
# fp32 it was 1.2e-5; tests/test_parallel_equivalence.py owns those numerics).
LAYOUT_TOL = 1e-12


def _quiet(_: str) -> None:
    """Progress lines are not under test here (the CLI test reads them)."""


def _hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def _assert_round_trip(original: dict[str, torch.Tensor], exported: dict[str, torch.Tensor], prefix: str,
                       vision_prefix: str = "model.encoder.") -> None:
    """`exported` (DiffusionGemma names) holds `original`'s text stack (stored under `prefix`), scale folded, in the
    exported dtype (folded before rounding, as conversion does), and `original`'s vision tower and embedder (under
    `vision_prefix`) bit-identical; a text-only `original` gets the all-zero stand-in tower."""
    text = {key.removeprefix(prefix): t for key, t in original.items() if key.startswith(prefix)}
    decoder = {key.removeprefix("model.decoder."): t for key, t in exported.items() if key.startswith("model.decoder.")}
    missing = sorted(set(text) - set(decoder))
    assert not missing, missing
    for name, tensor in text.items():
        got = decoder[name]
        if name.endswith("router.per_expert_scale"):
            tensor = torch.ones_like(tensor)
        elif name.endswith("experts.down_proj"):
            tensor = tensor * text[name.replace("experts.down_proj", "router.per_expert_scale")][:, None, None]
        assert torch.equal(got, tensor.to(got.dtype)), name
    scalars = [key for key in decoder if key.endswith("layer_scalar")]
    for key in scalars:  # both copies, or transformers loads the encoder's as uninitialised memory
        assert torch.equal(exported["model.encoder.language_model." + key], decoder[key])
    source_vision = hf_models.vision_tensors(original, vision_prefix)
    exported_vision = hf_models.vision_tensors(exported)
    if source_vision:
        assert sorted(exported_vision) == sorted(source_vision)
        for name, tensor in source_vision.items():
            assert hf_models.same_bytes(exported_vision[name], tensor), name
    else:
        assert exported_vision and not any(t.any() for t in exported_vision.values()), "the zero stand-in tower"
    written = ({"model.decoder." + k for k in decoder} | {"model.encoder.language_model." + k for k in scalars}
               | {"model.encoder." + k for k in exported_vision})
    extra = sorted(set(exported) - written)
    assert not extra, extra


def _inputs(vocab: int = 96):
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randint(2, vocab, (2, 10), generator=generator)
    canvas = torch.randint(0, vocab, (2, 4), generator=generator)
    signal = torch.randn(2, 4, vocab, generator=generator)
    return prompt, canvas, 10 + torch.arange(4).expand(2, 4), signal


@torch.no_grad()
def _our_logits(model) -> dict[str, torch.Tensor]:
    prompt, canvas, positions, signal = _inputs()
    encoded = model.encode(prompt, return_logits=True)
    decoded = model.decode(canvas, encoded, canvas_position_ids=positions, self_conditioning_logits=signal)
    return dict(encoder=encoded.logits, decoder=decoded)


@torch.no_grad()
def _hf_logits(hf) -> torch.Tensor:
    prompt, canvas, positions, signal = _inputs()
    return hf(input_ids=prompt, decoder_input_ids=canvas, decoder_position_ids=positions,
              self_conditioning_logits=signal).logits


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "temporary output left behind"


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory, distributed_world):
    """A DiffusionGemma source, its Megatron conversion and the HF export of that (3 small shards)."""
    init_distributed()
    root = tmp_path_factory.mktemp("conversion")
    source = hf_models.save(hf_models.diffusion_gemma(TEXT, canvas_length=4), root / "hf")
    convert_hf_to_megatron(source, root / "megatron", log=_quiet)
    convert_megatron_to_hf(root / "megatron", root / "exported", max_shard_size=40_000, log=_quiet)
    return source, root / "megatron", root / "exported"


def test_round_trip_gives_the_original_tensors(round_trip):
    source, _, exported = round_trip
    original = load_file(source / "model.safetensors")
    tensors = _hf_tensors(exported)
    _assert_round_trip(original, tensors, "model.decoder.")
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors) and len(set(index["weight_map"].values())) > 1


def test_round_trip_logits_and_transformers_generate(round_trip, model_parallel):
    from transformers import DiffusionGemmaForBlockDiffusion

    source, megatron, exported = round_trip

    def hf(path: Path):
        return DiffusionGemmaForBlockDiffusion.from_pretrained(path, attn_implementation="eager").eval()

    # The reference holds the effective down_proj · per_expert_scale, as the export does: folding the scale changes
    # the fp32 rounding order, which alone moves logits of magnitude ~10 by ~1e-5.
    loaded, reference = hf(exported), as_converted(hf(source), torch.float32)
    assert (_hf_logits(loaded) - _hf_logits(reference)).abs().max() <= ROUND_TRIP_TOL
    assert max_logit_difference(load_model(megatron), loaded) <= TRANSFORMERS_TOL

    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1] and generation["pad_token_id"] == 0
    assert generation["max_denoising_steps"] == 48 and generation["t_min"] == 0.4
    prompt = torch.randint(2, 96, (1, 5), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    out = loaded.generate(input_ids=prompt, max_new_tokens=4, max_denoising_steps=2)
    assert out.sequences.shape[0] == 1 and out.sequences.shape[1] > 5


def _stage_parameters(model) -> dict[str, torch.Tensor]:
    """This pipeline stage's parameters under their 1-process names (the tied output layer as the embedding)."""
    out = {}
    for name, tensor in model.named_parameters():
        if name.startswith("decoder.layers."):
            local, rest = name.removeprefix("decoder.layers.").split(".", 1)
            name = f"decoder.layers.{model.decoder.layers[int(local)].layer_number - 1}.{rest}"
        out[name.replace("output_layer.weight", "embedding.word_embeddings.weight")] = tensor.detach().clone()
    return out


def _load_at_layouts(rank: int, megatron: str, source: str, resave: str) -> dict[str, Any]:
    """At TP=2 and at EP=2: logits, and the parameters that differ from loading the HF source directly at that
    layout (the in-memory loader slices each rank's shard itself). At PP=2: each stage's parameters (a forward across
    stages needs Megatron's pipeline schedule). The TP=2 model is also re-saved by both ranks (Megatron's writer)."""
    import megatron_bdgemma
    from megatron_bdgemma.training.checkpointing import save_checkpoint

    results: dict[str, Any] = {}
    for name, tp, ep, pp in (("tp2", 2, 1, 1), ("ep2", 1, 2, 1), ("pp2", 1, 1, 2)):
        init_distributed(tp=tp, ep=ep, pp=pp)
        model = load_model(megatron)
        if pp > 1:
            results[name] = _stage_parameters(model)
            continue
        direct = dict(megatron_bdgemma.from_hf(source, sequence_parallel=tp > 1).named_parameters())
        results[name] = dict(logits=_our_logits(load_model(megatron, dtype=torch.float64)),
                             differ=[n for n, p in model.named_parameters() if not torch.equal(p, direct[n])])
        if name == "tp2":
            save_checkpoint(resave, 0, model, extra={"model_config": model_config_to_dict(model.config)})
    return results


def test_checkpoint_loads_at_tp2_ep2_pp2(round_trip, tmp_path, model_parallel):
    source, megatron, _ = round_trip
    single = load_model(megatron)
    expected, parameters = _our_logits(load_model(megatron, dtype=torch.float64)), dict(single.named_parameters())
    ranks = run_in_processes(_load_at_layouts, 2, str(megatron), str(source), str(tmp_path / "resaved"))
    for rank, layouts in enumerate(ranks):
        for layout in ("tp2", "ep2"):
            assert not layouts[layout]["differ"], f"rank {rank} {layout}: shards differ {layouts[layout]['differ']}"
            for kind in ("encoder", "decoder"):
                diff = (layouts[layout]["logits"][kind] - expected[kind]).abs().max().item()
                record(f"rank {rank} {layout} {kind} logits", diff, LAYOUT_TOL)
                assert diff <= LAYOUT_TOL, f"rank {rank} {layout} {kind} logits differ by {diff:.2e}"
        for name, tensor in layouts["pp2"].items():
            assert torch.equal(tensor, parameters[name]), f"rank {rank} pp2 {name}"
    assert set(ranks[0]["pp2"]) | set(ranks[1]["pp2"]) == set(parameters)
    # A checkpoint written by 2 ranks at TP=2 (a training run's layout) exports to the same HF tensors.
    convert_megatron_to_hf(tmp_path / "resaved", tmp_path / "exported", log=_quiet)
    _assert_round_trip(load_file(source / "model.safetensors"), _hf_tensors(tmp_path / "exported"), "model.decoder.")


def test_gemma4_source_gets_fresh_self_conditioning(tmp_path, model_parallel):
    from transformers import Gemma4ForCausalLM

    source = hf_models.save(hf_models.gemma4_causal_lm(), tmp_path / "hf")
    lines: list[str] = []
    convert_hf_to_megatron(source, tmp_path / "megatron", dtype=torch.bfloat16, log=lines.append)
    assert any("freshly initialised" in line for line in lines)
    assert read_extra(tmp_path / "megatron")["self_conditioning_initialised"]
    ours = load_model(tmp_path / "megatron", dtype=torch.float32)
    assert ours.config.self_conditioning
    # The same bf16-rounded weights on both sides (the scale folded before rounding, as conversion does), in fp32.
    oracle = as_converted(Gemma4ForCausalLM.from_pretrained(source, attn_implementation="eager").eval(), torch.bfloat16)
    assert max_logit_difference(ours, oracle) <= TRANSFORMERS_TOL
    convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "exported", log=_quiet)
    exported = _hf_tensors(tmp_path / "exported")
    assert all(t.dtype == torch.bfloat16 for t in exported.values())
    text = {key: t for key, t in exported.items() if "self_conditioning" not in key}
    _assert_round_trip(load_file(source / "model.safetensors"), text, "model.")
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["architectures"] == ["DiffusionGemmaForBlockDiffusion"]


def test_cli_round_trip_with_verify(tmp_path, capsys, model_parallel):
    source = hf_models.save(hf_models.diffusion_gemma(canvas_length=4), tmp_path / "hf")
    assert import_tool.main(["--hf", str(source), "--out", str(tmp_path / "mg"), "--verify"]) == 0
    assert export_tool.main(["--megatron", str(tmp_path / "mg"), "--out", str(tmp_path / "out"), "--verify",
                             "--max-shard-size", "50KB"]) == 0
    out = capsys.readouterr().out
    assert ("vision: 15 × model.encoder.vision_tower.*, 1 × model.encoder.embed_vision.* carried unchanged (float32); "
            "merged: 3 duplicate encoder copies") in out
    assert "[1/6] embedding, final norm, self-conditioning" in out and "[4/6] layer 2" in out  # progress per file
    assert "[6/6] vision layer 0" in out and "vision: 16 tensors carried unchanged (float32)" in out
    assert "model-00001-of-" in out
    assert out.count("verify: max-abs logit difference") == 2
    assert f"tokenizer: none written (the HF source {source} has no tokenizer files on this machine)" in out


def test_export_writes_the_tokenizer_the_model_was_trained_with(tmp_path):
    """`tokenizer_files_of` picks the files the export writes beside the model: a training run's `data.tokenizer`
    directory's tokenizer and processor files (never its weights or config.json), its chat template replaced by
    `data.chat_template`; a converted checkpoint's HF source files; none for the byte tokenizer or a directory this
    machine does not have, each said in the note. (tests/test_image_sft.py exports a real run and generates with it.)"""
    from megatron_bdgemma.conversion.hf_export import tokenizer_files_of
    from megatron_bdgemma.conversion.megatron_checkpoint import checkpoint_tokenizer

    tokenizer, source, template = tmp_path / "tok", tmp_path / "src", tmp_path / "template.jinja"
    for directory, names in ((tokenizer, ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                                          "preprocessor_config.json", "config.json", "model.safetensors")),
                             (source, ("tokenizer.json", "config.json"))):
        directory.mkdir()
        for name in names:
            (directory / name).write_text(name)
    template.write_text("{{ messages }}")
    converted = {"converted_from": {"path": str(source)}}

    def run(**data):
        return {"run": {"data": data}, **converted}

    files, note = tokenizer_files_of(run(tokenizer=str(tokenizer), chat_template=str(template)))
    assert files == {"tokenizer.json": tokenizer / "tokenizer.json",
                     "tokenizer_config.json": tokenizer / "tokenizer_config.json",
                     "chat_template.jinja": template, "preprocessor_config.json": tokenizer / "preprocessor_config.json"}
    assert note == f"4 files from data.tokenizer {tokenizer}, chat template from data.chat_template {template}"
    files, note = tokenizer_files_of(run(tokenizer=str(tokenizer), chat_template=str(tmp_path / "gone.jinja")))
    assert files["chat_template.jinja"] == tokenizer / "chat_template.jinja" and "gone.jinja is not on this" in note
    # generate --load says so on stderr (`incomplete`); a complete record is silent.
    assert checkpoint_tokenizer(run(tokenizer=str(tokenizer), chat_template=str(tmp_path / "gone.jinja"))).incomplete
    assert not checkpoint_tokenizer(run(tokenizer=str(tokenizer), chat_template=str(template))).incomplete
    assert tokenizer_files_of(converted) == ({"tokenizer.json": source / "tokenizer.json"},
                                             f"1 file from the HF source {source}")
    # The run's tokenizer or nothing: never the source's in its place.
    assert tokenizer_files_of(run(tokenizer="byte")) == (
        {}, "none written (the run's byte tokenizer, which has no Hugging Face files)")
    assert tokenizer_files_of(run(tokenizer=str(tmp_path / "elsewhere"))) == (
        {}, f"none written (data.tokenizer {tmp_path / 'elsewhere'} has no tokenizer files on this machine)")
    assert tokenizer_files_of({}) == ({}, "none written (the checkpoint records no tokenizer)")


# ---- bad inputs ------------------------------------------------------------------------------------------------


def _edit(path: Path, edit) -> Path:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _edit_config(path: Path, **values) -> Path:
    config = json.loads((path / "config.json").read_text())
    config.update(values)
    (path / "config.json").write_text(json.dumps(config))
    return path


def _shrink_down_proj(tensors):
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"][:, :-1].clone()


@pytest.mark.parametrize(
    "break_it,message",
    [
        (lambda p: _edit(p, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight")),
         r"missing tensor model\.layers\.1\.self_attn\.k_norm\.weight"),
        (lambda p: _edit(p, lambda t: t.__setitem__("model.layers.0.mystery.weight", torch.zeros(2))),
         r"unexpected tensors \['model\.layers\.0\.mystery\.weight'\]"),
        (lambda p: _edit(p, _shrink_down_proj), r"model\.layers\.0\.mlp\.down_proj\.weight.*needs"),
        (lambda p: _edit_config(p, model_type="llama"), r"unsupported model_type 'llama'"),
        (lambda p: _edit_config(p, hidden_size_per_layer_input=256), r"hidden_size_per_layer_input=256"),
        (lambda p: p, r"does not fit TP=3 EP=1 PP=1:\n  - num_attention_heads \(4\) must be a multiple of"),
    ],
    ids=["missing", "unexpected", "misshaped", "model_type", "config_feature", "layout"],
)
def test_bad_hf_input_is_named_and_leaves_no_output(tmp_path, capsys, model_parallel, break_it, message):
    source = break_it(hf_models.save(hf_models.gemma4_causal_lm(), tmp_path / "hf"))
    out = tmp_path / "mg"
    layout = ["--tp", "3"] if "TP=3" in message else []
    assert import_tool.main(["--hf", str(source), "--out", str(out), *layout]) == 2
    assert re.search(message, capsys.readouterr().err)
    _no_output(out)


def test_failure_while_writing_leaves_no_output(tmp_path, model_parallel):
    """The encoder's untied layer_scalar copy is only compared when read, after some layers are on disk."""
    source = hf_models.save(hf_models.diffusion_gemma(), tmp_path / "hf")
    _edit(source, lambda t: t["model.encoder.language_model.layers.2.layer_scalar"].mul_(2))
    with pytest.raises(ValueError, match=r"layers\.2\.layer_scalar.*differ"):
        convert_hf_to_megatron(source, tmp_path / "mg", log=_quiet)
    _no_output(tmp_path / "mg")


def test_existing_output_needs_overwrite(round_trip, tmp_path, capsys, model_parallel):
    source, megatron, _ = round_trip
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert import_tool.main(["--hf", str(source), "--out", str(out)]) == 2
    assert export_tool.main(["--megatron", str(megatron), "--out", str(out)]) == 2
    assert capsys.readouterr().err.count("already exists and is not empty; pass --overwrite") == 2
    assert (out / "keep.txt").read_text() == "mine" and not list(tmp_path.glob(".taken.*"))
    assert export_tool.main(["--megatron", str(megatron), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file() and not list(tmp_path.glob(".taken.*"))


def _save_with_recorded_config(root: Path, model_config: dict | None) -> Path:
    """A real tiny checkpoint whose `extra` records `model_config` (which may not match the weights)."""
    from megatron_bdgemma.config import tiny
    from megatron_bdgemma.model import BDGemmaModel
    from megatron_bdgemma.training.checkpointing import save_checkpoint

    extra = {} if model_config is None else {"model_config": model_config}
    return save_checkpoint(root, 0, BDGemmaModel(tiny()), extra=extra)


@pytest.mark.parametrize(
    "change,message",
    [
        (None, r"does not record its model config"),
        (dict(num_layers=5, layer_types=["sliding_attention"] * 4 + ["full_attention"]),
         r"missing tensors \['decoder\.layers\.4\."),
        (dict(num_layers=3, layer_types=["sliding_attention"] * 2 + ["full_attention"]),
         r"unexpected tensors \['decoder\.layers\.3\."),
        (dict(moe_ffn_hidden_size=48),
         r"tensor decoder\.layers\.0\.mlp\.experts\.experts\.linear_fc1\.weight has shape"),
        (dict(self_conditioning=False), r"self_conditioning=False"),
    ],
    ids=["no_config", "missing", "unexpected", "misshaped", "config_feature"],
)
def test_bad_megatron_input_is_named_and_leaves_no_output(tmp_path, capsys, model_parallel, change, message):
    from megatron_bdgemma.config import tiny

    recorded = None if change is None else model_config_to_dict(tiny()) | change
    checkpoint = _save_with_recorded_config(tmp_path / "ckpt", recorded)
    out = tmp_path / "out"
    assert export_tool.main(["--megatron", str(checkpoint), "--out", str(out)]) == 2
    assert re.search(message, capsys.readouterr().err)
    _no_output(out)


SCALED_ROPE = [
    {"sliding_attention": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
     "full_attention": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 64,
                        "attention_factor": 1.2, "beta_fast": 16.0}},
    {"sliding_attention": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
     "full_attention": {"rope_type": "longrope", "rope_theta": 1e6, "original_max_position_embeddings": 2,
                        "short_factor": [1.0 + 0.1 * j for j in range(8)], "long_factor": [1.0 + 0.9 * j for j in range(8)]}},
]


@pytest.mark.parametrize("rope", SCALED_ROPE, ids=["dynamic_yarn", "llama3_longrope"])
def test_scaled_rope_round_trips(tmp_path, model_parallel, rope):
    """HF → Megatron → HF keeps every rope parameter of every type, and the export computes the source's logits
    (longrope's original context of 2 positions puts the test prompt on its long factors)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    text = TEXT | dict(rope_parameters=rope)
    if any(params["rope_type"] == "longrope" for params in rope.values()):
        text["allow_global_per_layer_attribute_access"] = True  # HF's longrope validation reads the global head_dim
    hf_models.diffusion_gemma(text).save_pretrained(tmp_path / "hf")
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "megatron", log=_quiet)
    assert load_model(tmp_path / "megatron").config.rope_parameters == rope
    convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "exported", log=_quiet)
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["text_config"]["rope_parameters"] == rope

    def hf(path: Path):
        return DiffusionGemmaForBlockDiffusion.from_pretrained(path, attn_implementation="eager").eval()

    with torch.no_grad():
        reference = as_converted(hf(tmp_path / "hf"), torch.float32)  # down_proj · per_expert_scale folded
        diff = (_hf_logits(hf(tmp_path / "exported")) - _hf_logits(reference)).abs().max().item()
    assert diff <= ROUND_TRIP_TOL


def test_not_a_checkpoint_is_named(tmp_path, capsys, model_parallel):
    assert export_tool.main(["--megatron", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "is not a Megatron distributed checkpoint" in capsys.readouterr().err
    _no_output(tmp_path / "out")


def test_sharded_source_with_any_softcap_and_linear_rope_round_trips(tmp_path, model_parallel):
    """A DiffusionGemma checkpoint saved in several shards (model.safetensors.index.json), with a final softcap of 20
    and a linear sliding RoPE (factor 2): from_hf and the converter read it, and the export keeps both (HF's config
    stores and honours any softcap), so transformers' logits of the export equal the source's."""
    import megatron_bdgemma
    from transformers import DiffusionGemmaForBlockDiffusion

    sliding = {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}
    full = {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6, "factor": 1.5}
    model = hf_models.diffusion_gemma(TEXT | dict(final_logit_softcapping=20.0,
                                                  rope_parameters={"sliding_attention": sliding, "full_attention": full}))
    source = tmp_path / "hf"
    model.save_pretrained(source, max_shard_size="40KB")
    shards = set(json.loads((source / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 2 and not (source / "model.safetensors").exists()

    def hf(path: Path):
        return DiffusionGemmaForBlockDiffusion.from_pretrained(path, attn_implementation="eager").eval()

    reference = as_converted(hf(source), torch.float32)
    assert max_logit_difference(megatron_bdgemma.from_hf(source), reference) <= TRANSFORMERS_TOL
    convert_hf_to_megatron(source, tmp_path / "megatron", log=_quiet)
    assert max_logit_difference(load_model(tmp_path / "megatron"), reference) <= TRANSFORMERS_TOL
    convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "exported", log=_quiet)
    text = json.loads((tmp_path / "exported" / "config.json").read_text())["text_config"]
    assert text["final_logit_softcapping"] == 20.0
    assert text["rope_parameters"]["sliding_attention"] == sliding
    assert text["rope_parameters"]["full_attention"] == full
    assert (_hf_logits(hf(tmp_path / "exported")) - _hf_logits(reference)).abs().max() <= ROUND_TRIP_TOL
