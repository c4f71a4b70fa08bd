"""Nothing lost, every bad input named (issue 12, items 1-11): resume vs start from weights, converters that never
touch their input, checkpoint pruning and disk-full saves, stale data caches, layout-independent initialisation,
and a named error for each kind of bad data, config and checkpoint input."""

from __future__ import annotations

import errno
import json
import math
import re
import shutil
import sys
from collections import Counter, namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_bdgemma.training.config import load_run_config
from tests import hf_models

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "configs" / "tiny_pretrain.yaml"
SFT_CONFIG = REPO / "examples" / "configs" / "tiny_sft.yaml"
sys.path.insert(0, str(REPO / "tools"))
import convert_hf_to_megatron as import_tool  # noqa: E402  (scripts, not a package)
import convert_megatron_to_hf as export_tool  # noqa: E402

SMALL = ["data.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4", "train.eval_interval=0",
         "optim.warmup_steps=1", "model.overrides={num_layers: 2, layer_types: [sliding_attention, full_attention]}"]


def _run(tmp: Path, *overrides: str, config: Path = CONFIG):
    return load_run_config(config, [f"data.cache_dir={tmp / 'data'}", "checkpoint.save=null", *SMALL, *overrides])


def _losses(history):
    return [(h["diffusion"], h["ar"]) for h in history]


# ---- 1. resume uses the run config stored in the checkpoint; starting from weights is --init-from --------------


@pytest.fixture
def sft_run(tmp_path, model_parallel) -> tuple[Path, list]:
    """A 4-step SFT run saved at steps 2 and 4, with `latest` put back on step 2 (as if it stopped there)."""
    from megatron_bdgemma.training.trainer import train

    root = tmp_path / "ft"
    history = train(_run(tmp_path, "data.seq_length=96", "train.steps=4", f"checkpoint.save={root}",
                         "checkpoint.interval=2", config=SFT_CONFIG))
    (root / "latest").write_text("iter_0000002")
    return root, history


def test_load_resumes_the_runs_own_config_and_save_directory(sft_run, capsys):
    """`--load DIR` with only `train.steps` (the pretraining default config is not read): the SFT data and its
    save directory come from the checkpoint, and the losses continue the run bit for bit."""
    from megatron_bdgemma.training.resume import resume_run_config
    from megatron_bdgemma.training.trainer import train

    root, full = sft_run
    run = resume_run_config(root, None, ["train.log_interval=100"])
    assert run.data.mode == "sft" and run.checkpoint.save == str(root) and run.checkpoint.load == str(root)
    resumed = train(run)
    assert [h["step"] for h in resumed] == [3, 4]
    assert _losses(resumed) == _losses(full)[2:]
    assert "train.log_interval: 10 → 100" in capsys.readouterr().out  # each change is printed


def _cosine_lr(n: int, *, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """The LR after `n` scheduler steps, written out: linear warmup from 0, then cosine decay to `min_lr` at `steps`."""
    if n <= warmup:
        return lr * n / warmup
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(n - warmup, steps - warmup) / (steps - warmup)))


@pytest.mark.parametrize("optimizer", ["optim.distributed_optimizer=true", "optim.distributed_optimizer=false"],
                         ids=["distributed", "plain"])
def test_resume_runs_the_schedule_it_prints(tmp_path, model_parallel, capsys, optimizer):
    """A 3-step run (lr 3e-3 → min_lr 3e-4, warmup 1) extended to 5 steps, and extended with a new lr, min_lr and
    beta1: the lr each resumed step's optimizer update uses (every param group) is the closed-form schedule of the
    new config at that step (Megatron's --override-opt_param-scheduler), and the printed lines say so. Before, steps
    4-5 ran at the old min_lr. A train.steps the run is already past is refused by name."""
    from megatron_bdgemma.training.resume import resume_run_config
    from megatron_bdgemma.training.trainer import setup, train, train_step

    root = tmp_path / "run"
    train(_run(tmp_path, "train.steps=3", f"checkpoint.save={root}", optimizer))
    capsys.readouterr()
    for overrides, config in [
        (["train.steps=5"], dict(lr=3e-3, min_lr=3e-4, beta1=0.95)),
        (["train.steps=5", "optim.lr=0.001", "optim.min_lr=0.0001", "optim.beta1=0.9"], dict(lr=1e-3, min_lr=1e-4, beta1=0.9)),
    ]:
        state = setup(resume_run_config(root / "iter_0000003", None, overrides))
        try:
            used = []
            while state.step < 5:
                used.append({group["lr"] for group in state.optimizer.param_groups})
                assert {group["betas"][0] for group in state.optimizer.param_groups} == {config["beta1"]}
                train_step(state)
        finally:
            state.release_run_directory()
        expected = [_cosine_lr(n, lr=config["lr"], min_lr=config["min_lr"], warmup=1, steps=5) for n in (3, 4)]
        assert len(used) == 2 and all(len(lrs) == 1 for lrs in used), used
        assert [lrs.pop() for lrs in used] == pytest.approx(expected, rel=1e-12, abs=0)
        assert expected[0] > 2 * config["min_lr"]  # not the old schedule's min_lr
        printed = capsys.readouterr().out
        assert "train.steps: 3 → 5 (the schedule is rebuilt from step 3)" in printed
        assert ("optim.lr: 0.003 → 0.001 (the schedule is rebuilt from step 3)" in printed) == (config["lr"] == 1e-3)
    with pytest.raises(ValueError, match=rf"resuming {root}, saved at step 3, with train\.steps=2: the run is already "
                                         r"past it; give train\.steps > 3"):
        train(resume_run_config(root, None, ["train.steps=2"]))


def test_cli_load_and_init_from(sft_run, monkeypatch):
    """The job's flags: `--load DIR` alone resumes DIR's SFT run (the default pretraining YAML is not read);
    `--init-from DIR` takes the YAML given and DIR's model; both at once are refused."""
    import importlib.util

    from megatron_bdgemma.training import trainer

    spec = importlib.util.spec_from_file_location("pretrain_bdgemma", REPO / "examples" / "pretrain_bdgemma.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    runs = []
    monkeypatch.setattr(trainer, "train", runs.append)
    root, _ = sft_run
    elsewhere = root.parent / "elsewhere"
    for args in (["--load", str(root), "train.steps=8"],
                 # the YAML's checkpoint.save (runs/tiny_sft) does not move a resumed run; the command line does
                 ["--load", str(root), "--config", str(SFT_CONFIG)],
                 ["--load", str(root), "--config", str(SFT_CONFIG), f"checkpoint.save={elsewhere}"]):
        monkeypatch.setattr(sys, "argv", ["pretrain_bdgemma.py", *args, "--sample", ""])
        job.main()
    big = REPO / "examples" / "configs" / "diffusiongemma_26b_sft.yaml"  # sets model.hf, which --init-from replaces
    monkeypatch.setattr(sys, "argv", ["pretrain_bdgemma.py", "--config", str(big), "--init-from", str(root), "--sample", ""])
    job.main()
    resumed, with_yaml, moved, started = runs
    assert (resumed.data.mode, resumed.checkpoint.save, resumed.checkpoint.load, resumed.train.steps) == (
        "sft", str(root), str(root), 8)
    assert (with_yaml.checkpoint.save, with_yaml.train.steps, moved.checkpoint.save) == (str(root), 60, str(elsewhere))
    assert started.checkpoint.init_from == str(root) and started.model.hf is None and started.checkpoint.load is None
    monkeypatch.setattr(sys, "argv", ["pretrain_bdgemma.py", "--load", str(root), "--init-from", str(root)])
    with pytest.raises(SystemExit):
        job.main()


@pytest.mark.parametrize("override,key", [("data.mode=pretrain", "data.mode"), ("train.seed=7", "train.seed"),
                                          ("objective.ar_weight=0.5", "objective.ar_weight"),
                                          ("data.truncation=true", "data.truncation"),
                                          ("model.overrides.canvas_length=32", "model.overrides.canvas_length")])
def test_load_refuses_changes_that_break_exact_resume(sft_run, override, key):
    from megatron_bdgemma.training.resume import resume_run_config
    from megatron_bdgemma.training.trainer import train

    root, _ = sft_run
    with pytest.raises(ValueError, match=rf"resuming {root} with a different {key} .*--init-from {root}"):
        train(resume_run_config(root, None, [override]))
    assert (root / "latest").read_text() == "iter_0000002"


def test_a_run_built_from_another_config_cannot_resume_silently(sft_run, tmp_path):
    """The API path: a pretraining config pointed at the SFT run is refused, naming the data it would switch to."""
    from megatron_bdgemma.training.trainer import train

    root, _ = sft_run
    with pytest.raises(ValueError, match=r"data\.mode \('sft' → 'pretrain'\)"):
        train(_run(tmp_path, f"checkpoint.load={root}", f"checkpoint.save={root}"))


def test_a_resume_from_another_directory_reads_the_runs_own_files(tmp_path, monkeypatch, model_parallel):
    """A run launched with relative `data.paths` and `data.cache_dir`, resumed (`--load`) from a directory where
    the same relative path names other chats, still trains on its own: the losses continue the uninterrupted run bit
    for bit. A config that names the other directory's file is refused, naming both files."""
    from megatron_bdgemma.training.resume import resume_run_config
    from megatron_bdgemma.training.trainer import train
    from tests.test_data import chat, write_jsonl

    launch, elsewhere, root = tmp_path / "launch", tmp_path / "elsewhere", tmp_path / "ft"
    launch.mkdir(), elsewhere.mkdir()
    write_jsonl(launch / "chats.jsonl", [chat(f"what is {i} plus {i}", f"{2 * i}") for i in range(8)])
    write_jsonl(elsewhere / "chats.jsonl", [chat("another question", "another answer")] * 8)
    monkeypatch.chdir(launch)
    relative = ["data.paths=[chats.jsonl]", "data.cache_dir=cache"]
    full = train(load_run_config(SFT_CONFIG, [*SMALL, *relative, "data.seq_length=96", "train.steps=4",
                                              f"checkpoint.save={root}", "checkpoint.interval=2"]))
    (root / "latest").write_text("iter_0000002")

    monkeypatch.chdir(elsewhere)
    run = resume_run_config(root, None, [])
    assert (run.data.paths, run.data.cache_dir) == ([str(launch / "chats.jsonl")], str(launch / "cache"))
    assert _losses(train(run)) == _losses(full)[2:]
    (root / "latest").write_text("iter_0000002")
    refused = rf"data\.paths \(\['{launch}/chats\.jsonl'\] → \['{elsewhere}/chats\.jsonl'\]\)"
    with pytest.raises(ValueError, match=refused):
        train(load_run_config(SFT_CONFIG, [*SMALL, *relative, "data.seq_length=96", "train.steps=4",
                                           f"checkpoint.load={root}", f"checkpoint.save={root}"]))


def test_input_paths_join_the_launch_directory_but_blend_weights_stay_weights():
    """`absolute_inputs` joins relative input paths to the launch directory and leaves absolute ones, the `byte`
    tokenizer, and a blend's weights, numbers or strings that read as numbers (the rule the data reads them by), as
    they are; an odd list has no weights."""
    from megatron_bdgemma.training.resume import absolute_inputs

    values = dict(data=dict(paths=["0.3", "a/b", 0.7, "/abs/c"], tokenizer="byte", chat_template="t.jinja",
                            cache_dir="cache"), model=dict(hf=None))
    assert absolute_inputs(values, "/launch") == dict(
        data=dict(paths=["0.3", "/launch/a/b", 0.7, "/abs/c"], tokenizer="byte", chat_template="/launch/t.jinja",
                  cache_dir="/launch/cache"), model=dict(hf=None))
    assert absolute_inputs(dict(data=dict(paths=["1", "2", "3"])), "/l")["data"]["paths"] == ["/l/1", "/l/2", "/l/3"]
    assert values["data"]["paths"][1] == "a/b"  # a copy: the stored config is unchanged


def test_resuming_into_another_runs_directory_names_both(sft_run, tmp_path):
    from megatron_bdgemma.training.resume import resume_run_config
    from megatron_bdgemma.training.trainer import train

    other = tmp_path / "other"
    other.mkdir()
    (other / "iter_0000009").mkdir()
    (other / "latest").write_text("iter_0000009")
    root, _ = sft_run
    with pytest.raises(ValueError, match=rf"cannot resume {root} into checkpoint.save={other}: it holds another run "
                                         rf"\(checkpoints iter_0000009; latest: iter_0000009\); `--load {root}` alone "
                                         "saves into its own directory"):
        train(resume_run_config(root, None, [f"checkpoint.save={other}"]))


def test_init_from_starts_a_new_run_from_weights(sft_run, tmp_path):
    """SFT from a run's weights: step 1 again, another save directory, and `--load` of a weights-only checkpoint
    points to `--init-from`."""
    from megatron_bdgemma.config import tiny
    from megatron_bdgemma.conversion.megatron_checkpoint import model_config_to_dict
    from megatron_bdgemma.model import BDGemmaModel
    from megatron_bdgemma.training.checkpointing import save_checkpoint
    from megatron_bdgemma.training.resume import resume_run_config
    from megatron_bdgemma.training.trainer import train

    root, _ = sft_run
    history = train(_run(tmp_path, "train.steps=2", f"checkpoint.init_from={root}", f"checkpoint.save={tmp_path / 'b'}"))
    assert [h["step"] for h in history] == [1, 2]
    config = tiny(num_layers=1, layer_types=["full_attention"])
    weights = tmp_path / "weights"
    save_checkpoint(weights, 1, BDGemmaModel(config), extra={"model_config": model_config_to_dict(config)})
    with pytest.raises(ValueError, match=rf"holds weights only.*--init-from {weights}"):
        resume_run_config(weights)


def test_the_hf_source_and_tokenizer_travel_through_runs_into_the_export(tmp_path, capsys, model_parallel):
    """A checkpoint converted from HF records its source (`extra["converted_from"]`). An SFT run started from it
    (`--init-from`), and that run resumed (`--load`), carry the record into every checkpoint they save, so the export
    of the resumed run writes back the source's ids that the model config does not hold (image boundaries, BOS), and
    the tokenizer the run trained with: `data.tokenizer`'s files, its template replaced by `data.chat_template`; and
    `tools/generate.py --load` tokenizes with that tokenizer too."""
    from transformers import AutoTokenizer

    from megatron_bdgemma.conversion.megatron_checkpoint import read_extra
    from megatron_bdgemma.training.resume import resume_run_config
    from megatron_bdgemma.training.trainer import train
    from tests.test_data import CHAT_TEMPLATE, build_hf_tokenizer, chat, write_jsonl

    ids = dict(boi_token_id=60, eoi_token_id=61, image_token_id=62)  # transformers' defaults are 255999, 258882, 258880
    hf = build_hf_tokenizer(hf_models.save(hf_models.diffusion_gemma(canvas_length=4, **ids), tmp_path / "hf"),
                            ["what is two plus two", "four"])
    template = tmp_path / "template.jinja"
    template.write_text("{#- the run's own template -#}\n" + CHAT_TEMPLATE)
    chats = write_jsonl(tmp_path / "chats.jsonl", [chat("what is two plus two", "four")] * 8)
    assert import_tool.main(["--hf", str(hf), "--out", str(tmp_path / "mg")]) == 0
    run = tmp_path / "sft"
    train(load_run_config(SFT_CONFIG, [
        f"checkpoint.init_from={tmp_path / 'mg'}", f"checkpoint.save={run}", f"data.paths=[{chats}]",
        f"data.tokenizer={hf}", f"data.chat_template={template}", "data.seq_length=32", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.eval_interval=0", "optim.warmup_steps=0", "train.steps=1"]))
    train(resume_run_config(run, None, ["train.steps=2"]))
    assert sorted(p.name for p in run.glob("iter_*")) == ["iter_0000001", "iter_0000002"]
    assert all(read_extra(run / name)["converted_from"]["path"] == str(hf) for name in ("iter_0000001", "iter_0000002"))

    capsys.readouterr()
    assert export_tool.main(["--megatron", str(run), "--out", str(tmp_path / "out")]) == 0
    assert f"from data.tokenizer {hf}, chat template from data.chat_template {template}" in capsys.readouterr().out
    source, exported = (json.loads((d / "config.json").read_text()) for d in (hf, tmp_path / "out"))
    assert {k: exported[k] for k in ids} == ids and exported["text_config"]["bos_token_id"] == source[
        "text_config"]["bos_token_id"]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.chat_template == template.read_text() != AutoTokenizer.from_pretrained(hf).chat_template
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(hf).get_vocab()
    # tools/generate.py --load tokenizes with the same: the run's (its template), the converted checkpoint's source's.
    from tests.test_generation import generate_tool

    tool = generate_tool()
    assert tool.run_tokenizer(run)._tok.chat_template == template.read_text()
    assert tool.run_tokenizer(tmp_path / "mg")._tok.chat_template == AutoTokenizer.from_pretrained(hf).chat_template


def test_a_runs_relative_paths_reach_the_export_from_any_directory(tmp_path, capsys, monkeypatch, model_parallel):
    """A run launched with relative `model.hf`, `data.tokenizer` and `data.chat_template` records its launch
    directory and its source's absolute path, so an export and `tools/generate.py --load` run from another directory
    still write and use the tokenizer and template the run trained with."""
    from transformers import AutoTokenizer

    from megatron_bdgemma.conversion.megatron_checkpoint import read_extra
    from megatron_bdgemma.training.trainer import train
    from tests.test_data import CHAT_TEMPLATE, build_hf_tokenizer, chat, write_jsonl
    from tests.test_generation import generate_tool

    launch, elsewhere = tmp_path / "launch", tmp_path / "elsewhere"
    elsewhere.mkdir()
    hf = build_hf_tokenizer(hf_models.save(hf_models.diffusion_gemma(canvas_length=4), launch / "hf"),
                            ["what is two plus two", "four"])
    (launch / "template.jinja").write_text("{#- the run's own template -#}\n" + CHAT_TEMPLATE)
    write_jsonl(launch / "chats.jsonl", [chat("what is two plus two", "four")] * 4)
    monkeypatch.chdir(launch)
    run = tmp_path / "run"
    train(load_run_config(SFT_CONFIG, [
        "model.hf=hf", "model.overrides={}", f"checkpoint.save={run}", "data.paths=[chats.jsonl]",
        "data.tokenizer=hf", "data.chat_template=template.jinja", "data.seq_length=32", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.eval_interval=0", "optim.warmup_steps=0", "train.steps=1"]))
    extra = read_extra(run / "iter_0000001")
    assert (extra["launch_dir"], extra["converted_from"]["path"]) == (str(launch), str(hf))

    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert export_tool.main(["--megatron", str(run), "--out", "out"]) == 0
    assert (f"from data.tokenizer {hf}, chat template from data.chat_template {launch / 'template.jinja'}"
            in capsys.readouterr().out)
    tokenizer = AutoTokenizer.from_pretrained(elsewhere / "out")
    assert tokenizer.chat_template == (launch / "template.jinja").read_text()
    assert generate_tool().run_tokenizer(run)._tok.chat_template == tokenizer.chat_template


# ---- 2. converters never replace their input ---------------------------------------------------------------------


def test_converters_refuse_an_output_that_overlaps_the_source(tmp_path, capsys, model_parallel):
    from megatron_bdgemma.conversion.megatron_checkpoint import convert_hf_to_megatron

    hf = hf_models.save(hf_models.diffusion_gemma(), tmp_path / "hf")
    run = tmp_path / "project" / "run"
    convert_hf_to_megatron(hf, run, log=lambda _: None)
    (tmp_path / "project" / "notes.txt").write_text("mine")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    for out, relation in [(run, "is"), (tmp_path / "project", "contains"), (run / "hf", "is inside")]:
        assert export_tool.main(["--megatron", str(run), "--out", str(out), "--overwrite"]) == 2
        assert f"--out {out} {relation} the source" in capsys.readouterr().err
    for out, relation in [(hf, "is"), (tmp_path, "contains"), (hf / "mg", "is inside")]:
        assert import_tool.main(["--hf", str(hf), "--out", str(out), "--overwrite"]) == 2
        assert f"--out {out} {relation} the source" in capsys.readouterr().err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


# ---- 3. keep_last, 7. config values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("checkpoint.keep_last=0", r"checkpoint\.keep_last must be >= 1.*got 0"),
        ("checkpoint.keep_last=-1", r"checkpoint\.keep_last must be >= 1.*got -1"),
        ("data.seq_length=0", r"data\.seq_length must be >= 1, got 0"),
        ("data.seq_length=-8", r"data\.seq_length must be >= 1, got -8"),
        ("model.overrides={num_layerz: 2}", r"model\.overrides\.num_layerz is not a BDGemmaConfig field.*num_layers"),
        ("model.overrides={num_layers: two}", r"model\.overrides\.num_layers='two': expected int"),
        ("model.overrides={attention_impl: fast}", r"model\.overrides\.attention_impl='fast': expected one of"),
    ],
)
def test_bad_config_values_are_named(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        _run(tmp_path, override).validate(world_size=1)


def _corpus(prefix: Path, token: int, num_docs: int = 40, length: int = 8) -> str:
    from megatron_bdgemma.data.pretrain import IndexedDatasetWriter

    with IndexedDatasetWriter(prefix) as writer:
        for _ in range(num_docs):
            writer.add_document(np.full(length, token))
    return str(prefix)


def test_weighted_blend_as_the_readme_writes_it(tmp_path):
    """`data.paths=[w1, p1, w2, p2]` from the command line: numbers are weights, the rest prefixes."""
    from megatron_bdgemma.data import ByteTokenizer
    from megatron_bdgemma.data.pretrain import build_pretrain_datasets

    a, b = _corpus(tmp_path / "a", 10), _corpus(tmp_path / "b", 20)
    run = _run(tmp_path, f"data.paths=[0.25, {a}, 0.75, {b}]")
    assert run.data.paths == [0.25, a, 0.75, b]
    splits = build_pretrain_datasets(run.data.paths, tokenizer=ByteTokenizer(), seq_length=8, seed=0,
                                     num_samples=(200, 8, 8), split="90,5,5", cache_dir=tmp_path / "cache")
    assert Counter(int(splits.train[i]["tokens"][0]) for i in range(200)) == {10: 50, 20: 150}


# ---- 4. stale index cache, 6. bad pretraining data -----------------------------------------------------------------


def test_corpus_rewritten_in_place_gets_a_fresh_index(tmp_path):
    from megatron_bdgemma.data import ByteTokenizer
    from megatron_bdgemma.data.pretrain import build_pretrain_datasets

    def build(prefix):
        return build_pretrain_datasets(prefix, tokenizer=ByteTokenizer(), seq_length=8, seed=0, num_samples=(30, 2, 2),
                                       split="80,10,10", cache_dir=tmp_path / "cache")

    prefix = _corpus(tmp_path / "c", 10, num_docs=40)
    assert int(build(prefix).train[0]["tokens"][0]) == 10
    _corpus(tmp_path / "c", 30, num_docs=60, length=5)  # preprocess_data.py run again into the same prefix
    fresh = build(prefix)
    assert all(set(fresh.train[i]["tokens"].tolist()) == {30} for i in range(len(fresh.train)))


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p: Path(p + ".idx").write_bytes(b""), r"c\.idx is not a Megatron indexed-dataset index \(0 bytes"),
        (lambda p: Path(p + ".bin").write_bytes(b""), r"c\.bin does not match its index.*the file has 0"),
        (lambda p: _truncate(Path(p + ".bin"), 100), r"c\.bin does not match its index: 40 sequences of int32 need 1280"),
        (lambda p: _truncate(Path(p + ".idx"), 60), r"c\.idx is damaged or truncated"),
        (lambda p: Path(p + ".idx").write_bytes(np.random.default_rng(0).bytes(700)), r"c\.idx is not a Megatron"),
        (lambda p: None, r"c\.bin holds token ids 300\.\.300, but the model's vocabulary has ids 0\.\.255"),
    ],
    ids=["empty_idx", "empty_bin", "truncated_bin", "truncated_idx", "random_idx", "token_past_vocab"],
)
def test_bad_pretraining_data_is_named(tmp_path, damage, message):
    from megatron_bdgemma.data import ByteTokenizer
    from megatron_bdgemma.data.pretrain import build_pretrain_datasets

    prefix = _corpus(tmp_path / "c", 300)
    damage(prefix)
    with pytest.raises(ValueError, match=message):
        build_pretrain_datasets(prefix, tokenizer=ByteTokenizer(), seq_length=8, seed=0, num_samples=(8, 2, 2),
                                split="80,10,10", cache_dir=tmp_path / "cache", vocab_size=256)


# ---- 8. SFT -----------------------------------------------------------------------------------------------------


def _chat(q: str, a: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})


def test_sft_with_too_few_records_is_named(tmp_path, model_parallel):
    from megatron_bdgemma.config import tiny
    from megatron_bdgemma.training.data import build_step_data

    path = tmp_path / "one.jsonl"
    path.write_text(_chat("hi", "hello") + "\n")
    run = _run(tmp_path, "data.mode=sft", f"data.paths=[{path}]", "data.seq_length=96", config=SFT_CONFIG)
    with pytest.raises(ValueError, match=rf"{path} has 1 usable chat record\(s\); SFT needs at least 2"):
        build_step_data(run, tiny())


def test_sft_lone_surrogate_is_a_bad_record_with_its_line(tmp_path):
    from megatron_bdgemma.data import BadDataError, ByteTokenizer
    from megatron_bdgemma.data.sft import SFTDataset

    path = tmp_path / "chat.jsonl"
    path.write_text(_chat("a", "b") + "\n" + _chat("x\ud800y", "z") + "\n")
    assert "\\ud800" in path.read_text()
    skipped = SFTDataset(path, ByteTokenizer(), max_length=64, block_size=16, on_bad="skip")
    assert len(skipped) == 1 and skipped.bad.counts == {"invalid_text": 1}
    assert skipped.bad.locations["invalid_text"] == [f"{path}:2"]
    with pytest.raises(BadDataError, match=rf"{path}:2: message 0 content is not valid Unicode"):
        SFTDataset(path, ByteTokenizer(), max_length=64, block_size=16)


# ---- 9. HF input ---------------------------------------------------------------------------------------------------


def _int_tensor(path: Path) -> None:
    tensors = load_file(path / "model.safetensors")
    key = "model.layers.0.self_attn.q_norm.weight"
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p: _truncate(p / "model.safetensors", (p / "model.safetensors").stat().st_size - 1000),
         r"model\.safetensors: truncated safetensors file: its header describes \d+ bytes, the file holds \d+"),
        (lambda p: _truncate(p / "model.safetensors", 5), r"model\.safetensors: not a safetensors file, or truncated"),
        (_int_tensor, r"model\.layers\.0\.self_attn\.q_norm\.weight is stored as I32; a floating-point tensor"),
    ],
    ids=["truncated_data", "truncated_header", "integer_tensor"],
)
def test_bad_hf_files_exit_2_with_the_file_named(tmp_path, capsys, model_parallel, damage, message):
    from megatron_bdgemma.conversion.hf_checkpoint import HFCheckpoint

    source = hf_models.save(hf_models.gemma4_causal_lm(), tmp_path / "hf")
    damage(source)
    assert import_tool.main(["--hf", str(source), "--out", str(tmp_path / "mg")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "mg").exists()
    if "I32" in message:  # training straight from HF (model.hf) reads through the same checks
        with pytest.raises(ValueError, match="is stored as torch.int32; a floating-point tensor is expected"):
            HFCheckpoint(source).tensor("layers.0.self_attn.q_norm.weight")


# ---- 10. --load of a missing or broken checkpoint ------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda root: None, r"checkpoint directory .*/ckpt does not exist"),
        (lambda root: (root / "latest").write_text(""), r"ckpt/latest is empty; it should name"),
        (lambda root: (root / "latest").write_bytes(b"\x00\xff\xfe\x81binary"), r"ckpt/latest is not a checkpoint marker"),
    ],
    ids=["missing", "empty_latest", "binary_latest"],
)
def test_load_of_a_broken_checkpoint_says_which(tmp_path, model_parallel, make, message):
    from megatron_bdgemma.training.resume import resume_run_config
    from megatron_bdgemma.training.trainer import train

    root = tmp_path / "ckpt"
    if "does not exist" not in message:
        root.mkdir()
        (root / "iter_0000002").mkdir()
    make(root)
    with pytest.raises(ValueError, match=rf"--load {root}: .*{message}"):
        resume_run_config(root)
    with pytest.raises(ValueError, match=rf"checkpoint\.load {root}: .*{message}"):
        train(_run(tmp_path, f"checkpoint.load={root}"))


# ---- 11. disk full during a save -----------------------------------------------------------------------------------


def test_disk_full_during_a_save_names_the_directory_and_keeps_the_last_checkpoint(tmp_path, model_parallel,
                                                                                   monkeypatch):
    """ENOSPC inside megatron-core's writer (which keeps only the exception's class) and a full file system."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_bdgemma.config import tiny
    from megatron_bdgemma.model import BDGemmaModel
    from megatron_bdgemma.training.checkpointing import load_checkpoint, save_checkpoint
    from megatron_bdgemma.training.run_dir import latest_checkpoint

    model = BDGemmaModel(tiny(num_layers=1, layer_types=["full_attention"]))
    save_checkpoint(tmp_path, 1, model)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filesystem_async, "_write_item", no_space)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("usage", "total used free")(1 << 30, 1 << 30, 0))
    with pytest.raises(OSError, match=rf"no space left on {tmp_path} while saving iter_0000002 \(0\.0 MiB free, the "
                                      rf"checkpoint needs [\d.]+ MiB\): removed the partial iter_0000002\.tmp; "
                                      rf"{tmp_path}/iter_0000001 is kept") as error:
        save_checkpoint(tmp_path, 2, model)
    assert error.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "latest", "latest_checkpointed_iteration.txt"]
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "iter_0000001"
    load_checkpoint(tmp_path, model)


# ---- 5. random initialisation does not depend on the expert layout -------------------------------------------------


def _ep_losses_in_rank(rank: int, tmp: str, overrides: list[str]) -> list[tuple[float, float, float]]:
    from megatron_bdgemma.training.trainer import train

    history = train(_run(Path(tmp), "train.steps=3", "train.log_interval=100", *overrides))
    return [(h["diffusion"], h["ar"], h["grad_norm"]) for h in history]


def test_ep2_from_random_init_matches_one_process(tmp_path, model_parallel):
    """From the preset's random init (no HF weights), EP=2 gives the 1-process losses and grad norms at every step."""
    from tests.multiproc import run_in_processes

    from tests.tolerances import assert_steps_close

    reference = _ep_losses_in_rank(0, str(tmp_path), [])
    for rank, rank_values in enumerate(run_in_processes(_ep_losses_in_rank, 2, str(tmp_path), ["parallel.ep=2"],
                                                        timeout_s=300)):
        # Steps 1-2 run on the starting weights (step 1's lr is 0; tests/tolerances.py). 1e-5 relative (1e-4 of
        # max(1, value) before): worst measured 1.5e-7 with the defaults (AVX-512), 1.9e-7 under AVX2.
        assert_steps_close(rank_values, reference, f"EP=2 rank {rank} vs 1 process", shared_weight_steps=2)


def test_a_checkpoint_older_than_an_option_resumes_with_its_default():
    """A run config stored before an option existed holds no value for it: it compares as the option's default
    (which is the old behaviour), so the resume goes on, and a value other than the default is still refused."""
    from megatron_bdgemma.training.config import RunConfig
    from megatron_bdgemma.training.resume import check_resume

    run = RunConfig()
    stored = run.to_dict()
    del stored["objective"]["ar_weight"]
    assert check_resume(run, stored, step=0) == []
    run.objective.ar_weight = 0.5
    with pytest.raises(ValueError, match=r"objective\.ar_weight \(1\.0 → 0\.5\)"):
        check_resume(run, stored, step=0)
