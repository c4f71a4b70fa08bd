"""One-line errors, named (issue 21 items 5, 5b, 6): every entry point ends an error with one `error: <message>` line
printed once for the whole job; each bad input of the issue is named; ranks building the embedded data on an empty
cache agree; a pipeline-parallel run ends with its sample and exit code 0."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_bdgemma.runtime import cli
from megatron_bdgemma.training.config import load_run_config
from tests.multiproc import run_in_processes

# Spawned ranks import this module by name: it imports nothing heavy at the top (tests.test_robustness loads
# transformers and the converter scripts), so the helpers shared with it are imported inside the tests.
REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "configs" / "tiny_pretrain.yaml"


def _cli(*args: str, nproc: int = 0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A command of this repository as a user runs it (`nproc` > 0: under torchrun with that many ranks)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc \
        else [sys.executable]
    return subprocess.run([*launch, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"} | (env or {}))


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the entry point -------------------------------------------------------------------------------------------


def test_entry_point_exit_codes_and_traceback_on_request(capsys, monkeypatch):
    def raising(error: BaseException):
        @cli.entry_point
        def main() -> None:
            raise error
        return main

    class Stopped(RuntimeError):
        exit_code = 17

    assert raising(ValueError("data.seq_length must be >= 1"))() == 1
    assert capsys.readouterr().err == "error: data.seq_length must be >= 1\n"
    assert raising(KeyError("x"))() == 1  # not one of ours: its class and where the traceback is
    assert capsys.readouterr().err == "error: KeyError: 'x' (BDGEMMA_TRACEBACK=1 prints the traceback)\n"
    assert raising(Stopped("diverged at step 3"))() == 17  # a class of ours: its code, its message alone
    assert capsys.readouterr().err == "error: diverged at step 3\n"
    assert raising(KeyboardInterrupt())() == 130
    assert capsys.readouterr().err == "error: interrupted\n"
    with pytest.raises(SystemExit, match="usage"):
        raising(SystemExit("usage"))()
    monkeypatch.setenv("BDGEMMA_TRACEBACK", "1")
    assert raising(ValueError("named"))() == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and err.endswith("ValueError: named\nerror: named\n")


def _report_in_rank(rank: int) -> dict[str, tuple[int, str]]:
    """Three failures in turn: the same on both ranks, a different one on each, one on rank 1 only (rank 0 is
    meanwhile busy, as a rank blocked in a collective would be)."""
    import contextlib
    import io

    import torch.distributed as dist

    cli.PEER_WAIT_S, cli.LINGER_S = 1.0, 0.1
    cases = {"same": {0: "bad key", 1: "bad key"}, "different": {0: "bad key", 1: "no file"}, "one": {1: "no file"}}
    seen = {}
    for case, failing in cases.items():
        os.environ["TORCHELASTIC_RESTART_COUNT"] = case  # each case its own keys in the store
        dist.barrier()
        stderr = io.StringIO()

        @cli.entry_point
        def main() -> None:
            if rank not in failing:
                time.sleep(3 * cli.PEER_WAIT_S)
                return
            raise ValueError(failing[rank])

        start = time.monotonic()
        with contextlib.redirect_stderr(stderr):
            code = main()
        seen[case] = (code, stderr.getvalue(), time.monotonic() - start)
    return seen


def test_one_line_per_distinct_error_across_ranks():
    """Through the launcher's store, never a collective: rank 0 prints an error every rank shares; a rank whose
    error differs from rank 0's (or that failed alone) prints its own, naming itself, after at most 2 waits."""
    rank0, rank1 = run_in_processes(_report_in_rank, 2)
    assert rank0["same"][:2] == (1, "error: bad key\n") and rank1["same"][:2] == (1, "")
    assert rank0["different"][:2] == (1, "error: rank 0: bad key\n")
    assert rank1["different"][:2] == (1, "error: rank 1: no file\n")
    assert rank0["one"][:2] == (0, "") and rank1["one"][:2] == (1, "error: rank 1: no file\n")
    assert rank1["one"][2] < 2 * 1.0 + 1.0  # waited for rank 0's message (2 x PEER_WAIT_S), then printed


def test_torchrun_error_is_one_line_from_rank_0(tmp_path):
    """Both ranks read the same broken YAML: one line, no Python traceback from the ranks, exit 1; torchrun's own
    failure summary names the same line instead of 'To enable traceback see ...'."""
    config = tmp_path / "tab.yaml"
    config.write_text("train:\n\tsteps: 5\n")
    done = _cli("examples/pretrain_bdgemma.py", "--config", str(config), nproc=2)
    assert done.returncode == 1
    line = f"error: {config}:2:1: a tab character; YAML indents with spaces only"
    assert _errors(done.stderr) == [line], done.stderr
    assert "[rank0]" not in done.stderr and "[rank1]" not in done.stderr and "ScannerError" not in done.stderr
    assert f"traceback : {line}" in done.stderr  # torchrun's ChildFailedError summary, printed by the launcher


# ---- the run config ----------------------------------------------------------------------------------------------


def test_yaml_mistakes_are_named(tmp_path):
    cases = {
        "tab": ("train:\n\tsteps: 5\n", r"tab\.yaml:2:1: a tab character; YAML indents with spaces only"),
        "section": ("train:\n  steps: 3\noptim:\n  lr: 0.1\ntrain:\n  log_interval: 1\n",
                    r"section\.yaml:5:1: 'train' is given twice \(first at line 1\); YAML would keep only the last, "
                    r"dropping every key of the first"),
        "key": ("train:\n  steps: 3\n  steps: 4\n", r"key\.yaml:3:3: 'steps' is given twice \(first at line 2\)"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        with pytest.raises(ValueError, match=message):
            load_run_config(tmp_path / f"{name}.yaml")
    with pytest.raises(ValueError, match=r"override 'model.overrides=\{a: 1, a: 2\}': 'a' is given twice"):
        load_run_config(None, ["model.overrides={a: 1, a: 2}"])
    with pytest.raises(ValueError, match=r"override 'optim.lr=\[1': expected ',' or '\]'"):
        load_run_config(None, ["optim.lr=[1"])


def test_scientific_notation_is_a_float_where_a_float_is_expected(tmp_path):
    (tmp_path / "run.yaml").write_text("optim:\n  lr: 5e-4\n  min_lr: 1.0e-5\n")
    run = load_run_config(tmp_path / "run.yaml", [
        "optim.weight_decay=1e-3", "objective.t_min=2E-3", "optim.eps=-1e+2", "data.paths=[1e3]",
        "data.tokenizer=1e5", "checkpoint.save=1e3", "model.overrides={final_logit_softcapping: 3e1}"])
    assert (run.optim.lr, run.optim.min_lr, run.optim.weight_decay, run.objective.t_min, run.optim.eps) == (
        5e-4, 1e-5, 1e-3, 2e-3, -100.0)
    # strings stay strings where a string is expected (a path, a tokenizer, a blend's prefix)
    assert (run.data.paths, run.data.tokenizer, run.checkpoint.save) == (["1e3"], "1e5", "1e3")
    run.validate(world_size=1)
    assert run.model.overrides == {"final_logit_softcapping": 30.0}
    for bad in ["optim.lr=1e-3x", "optim.lr=e5", "train.steps=1e3"]:
        with pytest.raises(ValueError, match=rf"{bad.split('=')[0]}='{bad.split('=')[1]}': expected (float|int)"):
            load_run_config(None, [bad])


def test_a_short_run_shortens_a_warmup_it_was_not_given():
    notes: list[str] = []
    run = load_run_config(CONFIG, ["train.steps=5"], notes)
    assert run.optim.warmup_steps == 4
    assert notes == ["optim.warmup_steps: 5 (from tiny_pretrain.yaml) → 4, to fit train.steps=5; give "
                     "optim.warmup_steps to choose"]
    notes.clear()
    assert load_run_config(None, ["train.steps=1"], notes).optim.warmup_steps == 0 and "(the default) → 0" in notes[0]
    given = load_run_config(CONFIG, ["train.steps=5", "optim.warmup_steps=5"], [])  # the command line's own: refused
    with pytest.raises(ValueError, match=r"^invalid run configuration: optim\.warmup_steps \(5\) must be < train"
                                         r"\.steps \(5\): set optim\.warmup_steps=4 or fewer, or more train\.steps$"):
        given.validate(world_size=1)
    assert load_run_config(CONFIG, ["train.steps=5"]).optim.warmup_steps == 5  # library callers: nothing adapted


def test_small_corpora_train_without_the_splits_they_do_not_use(tmp_path, model_parallel):
    """38 documents leave the test split empty at 98,1,1: the trainer never reads it (nor the valid split without
    evaluation), so it is not built; an empty split that is used is refused with a split that fixes it."""
    from megatron_bdgemma.config import tiny
    from megatron_bdgemma.training.data import build_step_data
    from tests.test_robustness import _corpus, _run

    prefix = _corpus(tmp_path / "c38", 10, num_docs=38)
    for overrides in (["train.eval_interval=0"], ["train.eval_interval=2"]):
        data = build_step_data(_run(tmp_path, f"data.paths=[{prefix}]", *overrides), tiny())
        assert len(data.microbatches(0)) == 2 and len(data.microbatches(0, "valid")) == 2
    prefix = _corpus(tmp_path / "c20", 10, num_docs=20)
    with pytest.raises(ValueError, match=r"c20 has 20 documents: split '98,1,1' leaves the valid split without any; "
                                         r"e\.g\. data\.split=97,3,0 gives every split in use a document"):
        build_step_data(_run(tmp_path, f"data.paths=[{prefix}]", "train.eval_interval=2"), tiny())
    fixed = build_step_data(_run(tmp_path, f"data.paths=[{prefix}]", "train.eval_interval=2", "data.split=97,3,0"),
                            tiny())
    assert len(fixed.splits["valid"]) >= 1


def test_a_missing_chat_file_is_named_with_its_key(tmp_path, model_parallel):
    """One line naming data.paths and the file (it was Python's `[Errno 2] No such file or directory`); a missing
    indexed dataset is named by the blend parser."""
    from megatron_bdgemma.config import tiny
    from megatron_bdgemma.training.data import build_step_data
    from tests.test_robustness import CONFIG, SFT_CONFIG, _run

    with pytest.raises(ValueError, match=rf"^data\.paths: {tmp_path}/chats\.jsonl is not a file \(sft reads one chat "
                                         r"JSONL file\)$"):
        build_step_data(_run(tmp_path, f"data.paths=[{tmp_path}/chats.jsonl]", config=SFT_CONFIG), tiny())
    with pytest.raises(FileNotFoundError, match=rf"^no indexed dataset \(\.bin and \.idx\) at \['{tmp_path}/nope'\]"):
        build_step_data(_run(tmp_path, f"data.paths=[{tmp_path}/nope]", config=CONFIG), tiny())


# ---- checkpoints and the converters ------------------------------------------------------------------------------


def test_damaged_checkpoints_and_converter_inputs_are_named(tmp_path, capsys, model_parallel):
    """A truncated shard in the newest checkpoint: the trainer's load and the exporter name the file and the newest
    intact checkpoint (exit 2, bad input); a staging `iter_N.tmp` is refused as an unfinished save; `--out` through
    or onto a file says so."""
    from megatron_bdgemma.config import tiny
    from megatron_bdgemma.conversion.megatron_checkpoint import model_config_to_dict
    from megatron_bdgemma.model import BDGemmaModel
    from megatron_bdgemma.training.checkpointing import DamagedCheckpointError, load_checkpoint, save_checkpoint
    from tests.test_robustness import export_tool

    config = tiny(num_layers=1, layer_types=["full_attention"])
    model, root = BDGemmaModel(config), tmp_path / "run"
    for step in (1, 2):
        save_checkpoint(root, step, model, extra={"model_config": model_config_to_dict(config)})
    shard = root / "iter_0000002" / "__0_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as file:
        file.truncate(size // 3)
    damaged = (rf"checkpoint {root}/iter_0000002 is damaged: {shard} is truncated \({size // 3} of {size} bytes\); "
               rf"the newest intact checkpoint is {root}/iter_0000001: give that directory instead \(training "
               rf"resumes from it with --load {root}/iter_0000001\)")
    with pytest.raises(DamagedCheckpointError, match=damaged):
        load_checkpoint(root, model)
    load_checkpoint(root / "iter_0000001", model)

    def export(source: Path, out: Path) -> str:
        assert export_tool.main(["--megatron", str(source), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1, err
        return err

    assert re.fullmatch(f"error: {damaged}\n", export(root, tmp_path / "hf"))
    staging = shutil.copytree(root / "iter_0000001", root / "iter_0000003.tmp")
    assert export(staging, tmp_path / "hf") == (
        f"error: {staging} is the staging directory of a save that did not finish (a complete save is renamed to "
        "iter_0000003); use a complete checkpoint\n")
    (tmp_path / "file").write_text("")
    assert export(root / "iter_0000001", tmp_path / "file" / "hf") == (
        f"error: --out {tmp_path}/file/hf: {tmp_path}/file is a file, not a directory\n")
    assert export(root / "iter_0000001", tmp_path / "file") == (
        f"error: --out {tmp_path}/file is a file; the output is a directory: give a new path, or pass --overwrite "
        "to replace the file\n")
    assert not (tmp_path / "hf").exists()


def test_generate_names_its_inputs(tmp_path, capsys):
    """A run directory given to --hf, an HF directory given to --load: named before anything is loaded; a prompt that
    is not UTF-8 (the shell passes its bytes through): named, through the CLI, in one line."""
    tool = _load_script(REPO / "tools" / "generate.py")
    run, hf = tmp_path / "run", tmp_path / "hf"
    run.mkdir()
    (run / "latest").write_text("iter_0000002")
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    cases = [(["--hf", str(run)], f"--hf {run} is a Megatron checkpoint (latest), not a Hugging Face model "
                                  f"directory; use --load {run}"),
             (["--load", str(hf)], f"--load {hf} is a Hugging Face model directory (config.json), not a Megatron "
                                   f"checkpoint; use --hf {hf}"),
             (["--hf", str(tmp_path / "nope")], f"--hf {tmp_path / 'nope'} does not exist: expected a local Hugging "
                                                "Face model directory")]
    for args, message in cases:
        assert tool.main([*args, "--prompt", "x"]) == 1
        assert capsys.readouterr().err == f"error: {message}\n"
    latin1 = "é caf".encode() + b"\xe9"  # UTF-8, then a byte of another encoding
    done = subprocess.run([sys.executable, str(REPO / "tools" / "generate.py"), "--load", str(run), "--prompt", latin1],
                          capture_output=True, text=True, timeout=300, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert (done.returncode, done.stderr) == (1, (
        "error: --prompt 1 ('é caf\\udce9') is not valid UTF-8 text: byte b'\\xe9' at character 5; pass UTF-8 "
        "(check the terminal's or the file's encoding)\n"))


def test_plan_names_a_placeholder_hf_path_and_the_preset_instead():
    done = _cli("tools/plan.py", "--config", "examples/configs/diffusiongemma_26b_sft.yaml")
    assert (done.returncode, done.stderr) == (1, (
        "error: model.hf=/path/to/diffusiongemma-26B-A4B-it does not exist on this machine (model.hf is a local "
        "Hugging Face model directory; nothing is downloaded); to plan or train from the architecture alone, use "
        "model.hf=null model.preset=diffusiongemma-26b-a4b\n"))


def test_sft_bad_record_names_the_run_settings(tmp_path):
    from megatron_bdgemma.data import BadDataError, ByteTokenizer
    from megatron_bdgemma.data.sft import SFTDataset

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q" * 80},
                                             {"role": "assistant", "content": "a"}]}) + "\n")
    with pytest.raises(BadDataError, match=rf"^{path}:1: the conversation takes 117 positions with the EOS block fill "
                                           r"\(block 16\), over max_length 64 \(data\.seq_length\); data\.truncation="
                                           r"true cuts it there instead; data\.on_bad=skip drops such records and "
                                           r"counts them$"):
        SFTDataset(path, ByteTokenizer(), max_length=64, block_size=16)


# ---- 5b. ranks on an empty data cache ----------------------------------------------------------------------------


def _embedded_data_in_rank(rank: int, caches: list[str], overrides: list[str]) -> list[list[int]]:
    """Build the trainer's data on each empty cache in turn; rank 1 writes slowly, so if both ranks wrote the corpus
    rank 1's file would replace rank 0's after rank 0 had keyed its index on it (the race of issue 21)."""
    from megatron_bdgemma.data import pretrain
    from megatron_bdgemma.runtime.distributed import init_distributed
    from megatron_bdgemma.training.data import build_step_data
    from megatron_bdgemma.training.trainer import build_model_config

    finish = pretrain.IndexedDatasetWriter.__exit__

    def slow_finish(self, *args):
        time.sleep(1.0 + 2.0 * rank)
        return finish(self, *args)

    pretrain.IndexedDatasetWriter.__exit__ = slow_finish
    init_distributed()
    first_samples = []
    for cache in caches:
        run = load_run_config(CONFIG, [f"data.cache_dir={cache}", "checkpoint.save=null", *overrides])
        first_samples.append(build_step_data(run, build_model_config(run)).splits["train"][0]["tokens"].tolist())
    return first_samples


def test_ranks_on_an_empty_data_cache_build_it_once(tmp_path):
    caches = [str(tmp_path / f"cache{i}") for i in range(3)]
    from tests.test_robustness import SMALL

    rank0, rank1 = run_in_processes(_embedded_data_in_rank, 2, caches, SMALL)
    assert rank0 == rank1 and len(rank0) == 3 and rank0[0] == rank0[1] == rank0[2]
    for cache in caches:  # one corpus, no temporary files left
        assert len(list(Path(cache).glob("embedded-stdlib-*.bin"))) == 1 and not list(Path(cache).glob("*.tmp-*"))


# ---- 6. the end-of-run sample --------------------------------------------------------------------------------------


def test_pipeline_parallel_run_ends_with_its_sample(tmp_path):
    """torchrun, 2 gloo ranks, PP = 2, on an empty data cache: trains, saves, samples from the saved checkpoint with
    the whole stack on each rank, exit 0; the sample is the last line."""
    from tests.test_robustness import SMALL

    done = _cli("examples/pretrain_bdgemma.py", *SMALL, "train.steps=2", "parallel.pp=2",
                f"checkpoint.save={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    prompt = re.escape(repr("    def __init__(self, ")[:-1])  # the default prompt, continued
    assert re.fullmatch(rf"sample \(block diffusion, entropy_bound, seed 1234, \d+\.\d\d tokens per forward\): "
                        rf"{prompt}.*'", lines[-2]), done.stdout
    assert re.fullmatch(rf"sample \(AR head of the same weights, temperature 0.7, top-k 10, seed 1234, 1.00 tokens per "
                        rf"forward\): {prompt}.*'", lines[-1]), done.stdout
    assert lines[-5] == f"saved checkpoint {tmp_path / 'run'}/iter_0000002" and done.stderr.count("error") == 0


def test_sft_run_samples_its_first_prompt(tmp_path, model_parallel, capsys):
    from megatron_bdgemma.training.trainer import train
    from tests.test_robustness import SFT_CONFIG, _run

    job = _load_script(REPO / "examples" / "pretrain_bdgemma.py")
    run = _run(tmp_path, "data.seq_length=96", "train.steps=2", f"checkpoint.save={tmp_path / 'sft'}",
               config=SFT_CONFIG)
    train(run)
    capsys.readouterr()
    job.print_sample(run, None)
    first = json.loads(next(Path(tmp_path / "data").glob("embedded-sft-*.jsonl")).read_text().splitlines()[0])
    question = next(m["content"] for m in first["messages"] if m["role"] == "user")
    assert re.fullmatch(rf"sample \(\d+\.\d\d tokens per forward\): {re.escape(repr(question))} → '.*'\n",
                        capsys.readouterr().out)
    assert job.sample_messages(run, "2+2?") == [{"role": "user", "content": "2+2?"}]
