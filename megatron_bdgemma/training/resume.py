"""Resuming a training run, as opposed to starting a new run from a checkpoint's weights.

- **Resume** (`--load DIR`, `checkpoint.load`): DIR is a training run (its run directory, or one of its `iter_N`
  checkpoints). The run continues with the run config stored in the checkpoint and saves into DIR's run directory
  unless `checkpoint.save` is given on the command line (a YAML's does not move it); a YAML given with `--config`
  and the command-line overrides apply on top. Every value that differs from the stored run is printed, and each
  printed change takes effect: the optimizer's hyperparameters and the LR / weight-decay schedule are this config's,
  the schedule rebuilt and positioned at the checkpoint's step (Megatron's `--override-opt_param-scheduler`, not
  `--use-checkpoint-opt_param-scheduler`), so a new `optim.lr` or a longer `train.steps` (the decay horizon) applies
  from the next step. A change that breaks exact resume (the data, the objective, the sample stream, the model) or
  that cannot happen (`train.steps` before the checkpoint's step) is refused.
- **Start from weights** (`--init-from DIR`, `checkpoint.init_from`): a new run whose model architecture and
  weights come from DIR (a checkpoint converted from HF, or another run, e.g. SFT from a pretraining run);
  optimizer, schedule and step start fresh, and the run config is the one given.

A run's relative input paths (`INPUT_PATHS`) are relative to the directory it was launched from, which each
checkpoint records (`extra["launch_dir"]`): a resume from another directory reads the run's own files, and a path
given again compares by the file it names (`absolute_inputs`), never by its spelling.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_bdgemma.training.config import (
    RunConfig, _build, apply_override, flatten, format_value, key_origins, read_config_file,
)
from megatron_bdgemma.training.run_dir import locate_checkpoint, save_root

# Keys whose change makes a resumed run differ from the uninterrupted one: which samples, in which order, under
# which objective, with which model. Prefixes end with a dot.
BREAKS_EXACT_RESUME = (
    "data.mode", "data.paths", "data.tokenizer", "data.seq_length", "data.split", "objective.", "train.seed",
    "train.global_batch_size", "model.overrides.", "model.preset", "model.hf",
    "data.chat_template", "data.truncation", "data.mask_history",  # which tokens each record holds and supervises
    "data.reset_document_masks",  # which records a step holds (windows or their documents) and their noise keys
)
# Keys the LR / weight-decay schedule is built from: a change rebuilds it from the checkpoint's step.
SCHEDULE = ("optim.lr", "optim.min_lr", "optim.warmup_steps", "optim.decay_style", "optim.weight_decay", "train.steps")
# Keys that regroup each step's records (the same records, the same noise) into other micro-batches or packed rows:
# allowed, like a change of layout, but the sums are then taken in another order, so the losses equal the
# uninterrupted run's to rounding, not bit for bit (docs/design.md §13).
REGROUPS = ("data.packing", "data.max_records_per_row", "train.micro_batch_size")
# `model.overrides` keys that choose an implementation, not the model: same values and gradients (to rounding).
IMPLEMENTATION_OVERRIDES = ("attention_impl", "attention_chunk_size")
# Not part of what a resumed run reproduces: where it comes from and where it writes.
_NOT_COMPARED = ("checkpoint.load", "checkpoint.init_from")
# Keys naming files or directories the run reads (`section.key`); a relative one is the launch directory's.
INPUT_PATHS = ("data.paths", "data.tokenizer", "data.chat_template", "data.cache_dir", "model.hf")


def absolute_inputs(values: dict[str, Any], base: str | Path | None) -> dict[str, Any]:
    """A copy of the run-config dict `values` whose relative `INPUT_PATHS` are joined to `base` (a checkpoint's
    launch directory; None: this process's working directory, where a run saved before it was recorded started).
    A blend's weights (numbers, or strings that read as numbers: `is_weighted_blend`, the rule the data reads them
    by) and the `byte` tokenizer are not paths."""
    from megatron_bdgemma.data.pretrain import is_weighted_blend

    values, base = copy.deepcopy(values), Path(os.getcwd() if base is None else base)

    def absolute(value: Any) -> Any:
        return str(base / value) if isinstance(value, str) and value != "byte" else value

    for key in INPUT_PATHS:
        section, name = key.split(".")
        if (value := (values.get(section) or {}).get(name)) is None:
            continue
        if isinstance(value, list):
            weighted = is_weighted_blend(value)
            values[section][name] = [v if weighted and i % 2 == 0 else absolute(v) for i, v in enumerate(value)]
        else:
            values[section][name] = absolute(value)
    return values


def read_checkpoint_extra(path: str | Path, flag: str) -> dict[str, Any]:
    """The `extra` of the checkpoint at `path`; ValueError naming `flag` and `path` when it is missing, has a broken
    `latest` or is not a checkpoint."""
    from megatron_bdgemma.conversion.megatron_checkpoint import ConversionError, read_extra

    try:
        return read_extra(locate_checkpoint(path, option=f"{flag} " if flag.startswith("--") else f"{flag}="))
    except (ConversionError, ValueError, FileNotFoundError) as error:
        raise ValueError(f"{flag} {path}: {error}") from None


def read_training_extra(path: str | Path, flag: str) -> dict[str, Any]:
    """The `extra` of the training checkpoint at `path` (a save root or an `iter_N` directory).

    Raises ValueError naming `flag` and `path` when it is missing, has a broken `latest`, is not a checkpoint, or
    holds weights only (converted from HF: start from it with `--init-from`).
    """
    extra = read_checkpoint_extra(path, flag)
    if "step" not in extra or "run" not in extra:
        raise ValueError(
            f"{flag} {path} resumes a training run, but this checkpoint holds weights only (converted from HF, or "
            f"saved without a run config); start a new run from its weights with --init-from {path} "
            "(checkpoint.init_from)"
        )
    return extra


def resume_run_config(load: str | Path, config_path: str | Path | None = None, overrides: Sequence[str] = (),
                      sources: dict[str, str] | None = None) -> RunConfig:
    """The run config that resumes the training run at `load`: the stored one, then the values of the YAML at
    `config_path` (if given), saving into `load`'s run directory, then `overrides` (`section.key=value`; only
    these can move `checkpoint.save`).

    `sources`: when given, filled with where each dotted key's value came from: `checkpoint` (the stored run
    config, its relative input paths joined to the run's launch directory), `yaml`, `--load` or `override`, with
    the stored value beside a value that changes it."""
    extra = read_training_extra(load, "--load")
    stored = absolute_inputs(extra["run"], extra.get("launch_dir"))
    values = copy.deepcopy(stored)
    layers = [("checkpoint", stored)]
    if config_path is not None:
        layers.append(("yaml", read_config_file(config_path)))
        _merge(values, layers[-1][1])
    layers.append(("--load", {"checkpoint": dict(save=str(save_root(load)), load=str(load), init_from=None)}))
    values.setdefault("checkpoint", {}).update(layers[-1][1]["checkpoint"])
    for override in overrides:
        apply_override(values, override)
        layers.append(("override", {}))
        apply_override(layers[-1][1], override)
    values["checkpoint"]["load"] = str(load)
    layers.append(("--load", {"checkpoint": {"load": str(load)}}))
    run = _build(RunConfig, values, "")
    if sources is not None:
        sources.update(key_origins(layers))
        old = flatten(stored, keep_empty=True)
        for key, value in flatten(run.to_dict(), keep_empty=True).items():
            if key in old and old[key] != value and not key.startswith(_NOT_COMPARED):
                sources[key] += f" (checkpoint: {format_value(old[key])})"
    return run


def check_resume(run: RunConfig, stored: dict[str, Any], step: int, launch_dir: str | None = None) -> list[str]:
    """Compare `run` with the stored run config of the checkpoint it resumes, saved after `step` steps in a run
    launched from `launch_dir`; input paths compare by what they name (`absolute_inputs`).

    Returns one line per changed value (`key: old → new`, saying so where the schedule is rebuilt or the step's
    records are regrouped); raises ValueError listing the changes that break exact resume, or naming a `train.steps`
    the run is already past.
    """
    # A key the stored run predates compares as its default: options are added with the old behaviour as default.
    old = flatten(_build(RunConfig, absolute_inputs(stored, launch_dir), "").to_dict())
    new = flatten(absolute_inputs(run.to_dict(), None))
    changed = [key for key in sorted(old.keys() | new.keys())
               if not key.startswith(_NOT_COMPARED) and old.get(key) != new.get(key)]
    refused = [key for key in changed if key.startswith(BREAKS_EXACT_RESUME)
               and key.removeprefix("model.overrides.") not in IMPLEMENTATION_OVERRIDES]
    notes = dict.fromkeys(SCHEDULE, f" (the schedule is rebuilt from step {step})") | dict.fromkeys(
        REGROUPS, " (the same records and noise per step, regrouped: losses equal to rounding, not bit for bit)")
    lines = [f"{key}: {old.get(key)!r} → {new.get(key)!r}{notes.get(key, '')}" for key in changed]
    if run.train.steps < step:
        raise ValueError(f"resuming {run.checkpoint.load}, saved at step {step}, with train.steps={run.train.steps}: "
                         f"the run is already past it; give train.steps > {step}")
    if refused:
        raise ValueError(
            f"resuming {run.checkpoint.load} with a different "
            + ", ".join(f"{key} ({old.get(key)!r} → {new.get(key)!r})" for key in refused)
            + " would not continue the same run (other data, objective or model); drop those overrides, or start a "
            f"new run from its weights with --init-from {run.checkpoint.load}"
        )
    return lines


def _merge(into: dict[str, Any], given: dict[str, Any]) -> None:
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
