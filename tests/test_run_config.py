"""The config a run ran with (issue 22, item 1): `--print-config`, `run_config.yaml` in the run directory and in
every checkpoint, and docs/config.md in sync with the dataclasses; Megatron-LM's tracker file beside `latest` and
`--load` of a finished run (item 6). CLI behaviour through the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_bdgemma.training.config import config_yaml, flatten, load_run_config

REPO = Path(__file__).resolve().parent.parent
JOB = REPO / "examples" / "pretrain_bdgemma.py"
PRETRAIN = REPO / "examples" / "configs" / "tiny_pretrain.yaml"
SFT = REPO / "examples" / "configs" / "tiny_sft.yaml"
SMALL = ["data.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4", "train.eval_interval=0",
         "optim.warmup_steps=1", "model.overrides={num_layers: 2, layer_types: [sliding_attention, full_attention]}",
         "train.log_interval=1"]
LINE = re.compile(r"(?P<key>[\w.]+): (?P<value>.*?) +# (?P<source>.+)")


def _cli(*args: str, python: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *python, str(JOB), *args], env=env, capture_output=True, text=True,
                          timeout=300)


def _printed(done: subprocess.CompletedProcess) -> dict[str, tuple[str, str]]:
    """`--print-config`'s lines as key → (value, source); every line must have the form."""
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {}
    for line in done.stdout.splitlines():
        match = LINE.fullmatch(line)
        assert match, f"not a `key: value  # source` line: {line!r}"
        rows[match["key"]] = match["value"], match["source"]
    return rows


def test_print_config_shows_every_resolved_key_and_its_source_without_importing_torch():
    """Every key once, in order, with the value the run uses (read back as overrides onto the defaults alone, the
    printed values give the same run) and its source; the YAML's warmup shortened for a 3-step run says so. The
    path imports neither torch nor megatron (`-X importtime` lists every module imported)."""
    overrides = ["train.steps=3", "optim.lr=1e-3", "model.overrides.num_layers=2", "data.mask_history=true"]
    done = _cli("--print-config", "--config", str(SFT), *overrides, python=("-X", "importtime"))
    rows = _printed(done)
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert "yaml" in imported and not imported & {"torch", "megatron", "transformers"}, sorted(imported)

    resolved = load_run_config(SFT, overrides, notes=[])
    assert list(rows) == list(flatten(resolved.to_dict(), keep_empty=True))
    assert load_run_config(None, [f"{key}={value}" for key, (value, _) in rows.items()]).to_dict() == resolved.to_dict()
    assert rows["train.steps"] == ("3", "override") and rows["optim.lr"] == ("0.001", "override")
    assert rows["model.overrides.num_layers"] == ("2", "override") and rows["data.mode"] == ("sft", "yaml")
    assert rows["data.mask_history"] == ("true", "override") and rows["data.truncation"] == ("false", "default")
    assert rows["optim.warmup_steps"] == ("2", "yaml (5), shortened to train.steps - 1")
    assert rows["parallel.tp"] == ("1", "default") and rows["optim.eps"] == ("1.0e-08", "default")


@pytest.mark.parametrize("config", sorted((REPO / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_run_config_yaml_reads_back_to_the_same_run(tmp_path, config):
    """`run_config.yaml` as the trainer writes it loads with `--config` to the same run: each example config, with
    values YAML would read as another type if written carelessly (a string `yes`, `null` or `1e-3`, a float in
    scientific notation, nested lists)."""
    tricky = ["data.paths=[0.3, 'yes', 0.7, '1e-3']", "data.tokenizer='null'", "optim.eps=1e-12",
              "model.overrides={num_layers: 2, layer_types: [sliding_attention, full_attention]}",
              "checkpoint.save='runs/a b: c'", "data.split='1,0,0'"]
    for overrides in ([], tricky):
        run = load_run_config(config, overrides)
        (tmp_path / "run_config.yaml").write_text(config_yaml(run.to_dict()))
        assert load_run_config(tmp_path / "run_config.yaml").to_dict() == run.to_dict()


def test_a_run_saves_its_config_and_megatron_tracker_and_a_finished_run_says_so(tmp_path):
    """A 2-step run saving each step (keeping 1): `run_config.yaml` in the run directory and in the checkpoint loads
    to the resolved run, and `latest_checkpointed_iteration.txt` holds what Megatron-LM's `read_metadata` parses
    (`int(text.strip())`) naming the checkpoint `latest` names (its `get_checkpoint_name`: `iter_{:07d}`). `--load`
    of the finished run says so in one line and exits 0 without a sample or a new start in the owner record;
    `--print-config --load` shows the stored values as `checkpoint` and a change beside the stored value."""
    root = tmp_path / "run"
    overrides = [*SMALL, f"data.cache_dir={tmp_path / 'data'}", "train.steps=2", "checkpoint.interval=1",
                 "checkpoint.keep_last=1", f"checkpoint.save={root}"]
    done = _cli("--sample", "", *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    resolved = load_run_config(PRETRAIN, overrides, notes=[]).to_dict()
    for directory in (root, root / "iter_0000002"):
        assert load_run_config(directory / "run_config.yaml").to_dict() == resolved, directory
    assert sorted(p.name for p in root.iterdir()) == [
        "iter_0000002", "latest", "latest_checkpointed_iteration.txt", "metrics.jsonl", "run.json", "run.lock",
        "run_config.yaml"]
    tracker = (root / "latest_checkpointed_iteration.txt").read_text()
    assert tracker == "2" and (root / "latest").read_text() == "iter_{:07d}".format(int(tracker.strip()))

    done = _cli("--load", str(root))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"run already at step 2 of 2 ({root}): nothing to train; give train.steps > 2 to " \
                                  "continue it", done.stdout
    assert len(json.loads((root / "run.json").read_text())["starts"]) == 1

    rows = _printed(_cli("--print-config", "--load", str(root), "optim.lr=0.002"))
    assert rows["train.steps"] == ("2", "checkpoint") and rows["data.seq_length"] == ("32", "checkpoint")
    assert rows["optim.lr"] == ("0.002", "override (checkpoint: 0.003)")
    assert rows["checkpoint.load"] == (str(root), "--load") and rows["checkpoint.save"] == (str(root), "--load")


def test_docs_config_md_is_generated_from_the_dataclasses():
    """docs/config.md is what `tools/config_docs.py` prints (`--check` exits 0, through the CLI), and the generator
    refuses a field without a docstring by name."""
    sys.path.insert(0, str(REPO / "tools"))
    import config_docs

    done = subprocess.run([sys.executable, str(REPO / "tools" / "config_docs.py"), "--check"], capture_output=True,
                          text=True, env=os.environ | {"PYTHONPATH": str(REPO)}, timeout=120)
    assert done.returncode == 0, (f"{done.stderr.strip()} (docs/config.md must be regenerated: "
                                  f"{config_docs.REGENERATE})")
    source = Path(config_docs.config.__file__).read_text()
    undocumented = source.replace('    """Adam\'s epsilon."""\n', "")
    assert undocumented != source
    with pytest.raises(ValueError, match=r"no docstring under optim\.eps; every key needs one line of meaning"):
        config_docs.render(undocumented)
