"""Packed SFT through the trainer (docs/design.md §13, issue #24): the same global batch of records gives the same
losses and gradients packed (`data.packing=true`) as unpacked, at DP=1 and DP=2, with single- and multi-turn chats
and an AR-only record among them; a DP rank short of rows runs all-padding micro-batches that change nothing.

The oracle is the unpacked run (one record per row, today's trainer), not anything the packing code computes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_bdgemma.training.config import load_run_config
from tests.multiproc import run_in_processes
from tests.test_robustness import REPO
from tests.tolerances import assert_steps_close

CONFIG = Path(__file__).resolve().parent.parent / "examples" / "configs" / "tiny_sft.yaml"
STEPS = 4
"""Step 1 runs at learning rate 0 (warmup), so steps 1 and 2 share the starting weights (tests/tolerances.py)."""


def _chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def _write_chats(path: Path) -> Path:
    """17 chats: record 0 is held out (every 20th), then two steps of the same 8: laid out with 8-token blocks (byte
    tokenizer) 59, 31, 63 (two answers), 34 (AR only), 64, 32, 54, 59 positions. At DP=2 with one row per
    micro-batch the chats are dealt by size (largest first, each to the rank with the fewest tokens): rank 0 gets 64,
    59, 34, 32 (3 rows: 64 | 59 | 34 + 32), rank 1 63, 59, 54, 31 (4 rows; 31 fits beside none), so rank 0 runs one
    all-padding micro-batch."""
    longs = [_chat(("user", "q" * 14), ("assistant", "a" * 18)),
             _chat(("user", "ab"), ("assistant", "cd"), ("user", "ef"), ("assistant", "gh" * 3)),  # two answers
             _chat(("system", "be brief"), ("user", "w" * 9), ("assistant", "z" * 12)),
             _chat(("user", "p" * 25), ("assistant", "r" * 7))]
    shorts = [_chat(("user", "hi"), ("assistant", "yo")),
              _chat(("user", "just a question, no answer")),  # no assistant turn: AR loss only
              _chat(("user", "abc"), ("assistant", "defgh"))]
    step = [longs[0], shorts[0], longs[1], shorts[1], longs[2], shorts[2], longs[3], longs[0]]
    records = [_chat(("user", "held out"), ("assistant", "x"))] + step * 2
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _run(tmp: Path, *overrides: str):
    return load_run_config(CONFIG, [
        f"data.paths=[{tmp / 'chats.jsonl'}]", f"data.cache_dir={tmp / 'data'}", "data.seq_length=80",
        f"train.steps={STEPS}", "train.global_batch_size=8", "train.eval_interval=0", "optim.warmup_steps=2",
        "optim.distributed_optimizer=false", "checkpoint.save=null",
        "model.overrides={num_layers: 2, layer_types: [sliding_attention, full_attention], canvas_length: 8, "
        "sliding_window: 12}",
        *overrides,
    ])


def _metrics(history) -> list[tuple[float, float, float]]:
    return [(h["diffusion"], h["ar"], h["grad_norm"]) for h in history]


def _packed_in_rank(rank: int, tmp: str) -> dict:
    """DP=2, one packed row per micro-batch: the run's metrics and each step's records per micro-batch."""
    from megatron_bdgemma.training.data import build_step_data
    from megatron_bdgemma.training.trainer import build_model_config, train

    run = _run(Path(tmp), "data.packing=true", "train.micro_batch_size=1")
    history = train(run)
    data = build_step_data(run, build_model_config(run))
    records = [[mb.records.batch_size for mb, _ in data.microbatches(step)] for step in range(STEPS)]
    return dict(metrics=_metrics(history), history=history, records=records)


def test_packed_training_equals_unpacked(tmp_path, model_parallel):
    """Per step, packed against unpacked (DP=1, 2 records per micro-batch): both losses and the global grad norm at
    1e-5 relative, the data tokens read exactly. Packed at DP=1 (2 rows per micro-batch) and DP=2 (1 row per
    micro-batch; rank 0 runs an all-padding micro-batch).

    The grad norm is compared on every step, also after Adam updates (tests/tolerances.py compares it only on shared
    weights, where layouts amplified fp32 noise to 1.8e-5): here the worst of all 4 steps and three comparisons was
    1.3e-6 with the defaults (AVX-512, DP=2 step 4) and 4.3e-7 under AVX2 (DP=1); the losses 1.7e-7 with the
    defaults. Margins >= 7x. A planted bug (packed rows at row positions instead of each record's) fails at step 1
    by 1.7e-3 (diffusion loss; grad norm 1.3e-2).
    """
    from megatron_bdgemma.training.trainer import train

    _write_chats(tmp_path / "chats.jsonl")
    unpacked = train(_run(tmp_path, "train.micro_batch_size=2"))
    packed = train(_run(tmp_path, "data.packing=true", "train.micro_batch_size=2"))
    assert_steps_close(_metrics(packed), _metrics(unpacked), "packed vs unpacked, DP=1", shared_weight_steps=STEPS)
    assert [h["tokens"] for h in packed] == [h["tokens"] for h in unpacked]
    assert [h["flops"] for h in packed] == [h["flops"] for h in unpacked]  # the records' work, padding excluded
    # First-fit decreasing: rows [64], [63], [59], [59], [54], [34, 32], [31]; 2 rows per micro-batch, each as wide
    # as its longest row: 2·64 + 2·59 + 2·66 + 31 = 409 positions for 396 tokens, against 2·(59 + 63 + 64 + 59) = 490
    # for the unpacked pairs padded to the longer.
    assert [(h["tokens"], h["row_tokens"]) for h in packed] == [(396, 409)] * STEPS
    assert [h["row_tokens"] for h in unpacked] == [490] * STEPS

    ranks = run_in_processes(_packed_in_rank, 2, str(tmp_path), timeout_s=300)
    assert [r["records"] for r in ranks] == [[[1, 1, 2, 0]] * STEPS, [[1, 1, 1, 1]] * STEPS], "not the layout meant"
    for rank, got in enumerate(ranks):
        assert_steps_close(got["metrics"], _metrics(unpacked), f"packed DP=2 rank {rank} vs unpacked DP=1",
                           shared_weight_steps=STEPS)
        assert [h["tokens"] for h in got["history"]] == [h["tokens"] for h in unpacked]
        # Rank 0: rows of 64, 59, 66 and an all-padding row of 1 position; rank 1: 63, 59, 54, 31 (the busiest).
        assert [(h["row_tokens"], h["busiest_rank_rows"]) for h in got["history"]] == [(190 + 207, 207)] * STEPS


def test_packed_cli_run_resumes_exactly(tmp_path):
    """A packed SFT run through examples/pretrain_bdgemma.py: 4 steps saving at 2 and 4, a metrics row every step.
    Put back on step 2 (step 4's checkpoint moved aside, as if the run had died after step 4's row), `--load` runs
    steps 3 and 4 again: metrics.jsonl then holds the uninterrupted run's rows, losses, grad norms, tokens and
    packing efficiency bit for bit, and step 4's checkpoint every model and optimizer tensor of the uninterrupted
    run's. Resuming with `data.packing=false` is allowed (same records and noise, regrouped) and says so."""
    from megatron_bdgemma.training.resume import check_resume, read_training_extra, resume_run_config
    from tests.test_metrics import DETERMINISTIC, _rows
    from tests.test_stopping import SCRIPT, _tensors

    _write_chats(tmp_path / "chats.jsonl")
    root, env = tmp_path / "run", os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, SCRIPT, "--sample", "", "--config", str(CONFIG)]
    overrides = [f"data.paths=[{tmp_path / 'chats.jsonl'}]", f"data.cache_dir={tmp_path / 'data'}",
                 "data.seq_length=80", "data.packing=true", f"train.steps={STEPS}", "train.global_batch_size=8",
                 "train.micro_batch_size=2", "train.eval_interval=0", "train.log_interval=1", "optim.warmup_steps=2",
                 "checkpoint.interval=2", f"checkpoint.save={root}",
                 "model.overrides={num_layers: 2, layer_types: [sliding_attention, full_attention], canvas_length: 8, "
                 "sliding_window: 12}"]
    first = subprocess.run([*cli, *overrides], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0 and first.stdout.splitlines()[-1].startswith("baselines on the same text"), \
        first.stdout[-3000:] + first.stderr[-3000:]
    uninterrupted = _rows(root / "metrics.jsonl")
    assert [r["step"] for r in uninterrupted] == [1, 2, 3, 4]
    assert all(r["packing_efficiency"] == pytest.approx(396 / 409) for r in uninterrupted)  # rows as in the test above
    (root / f"iter_{STEPS:07d}").rename(tmp_path / "uninterrupted_iter")
    (root / "latest").write_text("iter_0000002")

    resumed = subprocess.run([*cli[:4], "--load", str(root)], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0 and f"saved checkpoint {root}/iter_{STEPS:07d}" in resumed.stdout, \
        resumed.stdout[-3000:] + resumed.stderr[-3000:]
    deterministic = [{k: v for k, v in r.items() if k in DETERMINISTIC | {"packing_efficiency"}}
                     for r in _rows(root / "metrics.jsonl")]
    assert deterministic == [{k: v for k, v in r.items() if k in DETERMINISTIC | {"packing_efficiency"}}
                             for r in uninterrupted]
    final = _tensors(root / f"iter_{STEPS:07d}", tmp_path / "resumed.pt")
    reference = _tensors(tmp_path / "uninterrupted_iter", tmp_path / "reference.pt")
    assert final.keys() == reference.keys() and len(final) > 50
    assert [k for k in final if not torch.equal(final[k], reference[k])] == []

    extra = read_training_extra(root, "--load")
    assert check_resume(resume_run_config(str(root), None, ["data.packing=false"]), extra["run"], extra["step"]) == [
        "data.packing: True → False (the same records and noise per step, regrouped: losses equal to rounding, not "
        "bit for bit)"]
