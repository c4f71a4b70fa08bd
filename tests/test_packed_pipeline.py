"""Packed SFT under pipeline parallelism (docs/design.md §13, issue #24): at PP = 2 and PP = 2 × VPP = 2 the same
global batch of records gives the same losses and gradients packed (`data.packing=true`, rows of `data.seq_length`
with `data.max_records_per_row` canvas blocks each) as unpacked (one record per row, padded to `data.seq_length`).

The oracle is the unpacked pipeline run (today's trainer; tests/test_pipeline_parallel.py holds it to one process),
not anything the packing code computes. The chats make the packed steps differ in shape: steps 1 and 3 pack into 5
rows (3 micro-batches of 2 rows, the last with an empty filler row; 4 under VPP, whose interleaved schedule needs a
multiple of PP), steps 2 and 4 into 3 rows where `max_records_per_row` binds (2 micro-batches), and rows hold single-
and multi-turn chats and AR-only records (which take no canvas block).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from megatron_bdgemma.training.config import load_run_config
from tests.multiproc import run_in_processes
from tests.test_packed_training import _chat
from tests.tolerances import assert_steps_close

CONFIG = Path(__file__).resolve().parent.parent / "examples" / "configs" / "tiny_sft.yaml"
STEPS = 4
SEQ = 96
MAX_RECORDS = 3


def _write_chats(path: Path) -> Path:
    """17 chats, the first held out (every 20th). Laid out alone with 8-token blocks (byte tokenizer), the first
    step's 8 records take 64, 63, 59, 54, 54, 38, 34 and 31 positions (two of them two-answer chats, one AR only):
    first-fit decreasing into rows of 96 gives [64, 31], [63], [59, 34], [54, 38], [54]. The second step's take 38,
    32, 32, 32, 31, 31, 9 and 9 (the 9s AR only): [38, 32, 9], [32, 32, 31], [31, 9] with at most 3 records per row
    (without the bound the first row would take the second 9 too)."""
    first = [_chat(("user", "q" * 14), ("assistant", "a" * 18)),  # 59
             _chat(("user", "hi"), ("assistant", "yo")),  # 31
             _chat(("user", "ab"), ("assistant", "cd"), ("user", "ef"), ("assistant", "gh" * 3)),  # 63, two answers
             _chat(("user", "just a question, no answer")),  # 34, AR loss only
             _chat(("system", "be brief"), ("user", "w" * 9), ("assistant", "z" * 12)),  # 64
             _chat(("user", "x"), ("assistant", "y" * 9)),  # 38
             _chat(("user", "p" * 25), ("assistant", "r" * 7)),  # 54
             _chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))]  # 54, two answers
    second = [_chat(("user", "x"), ("assistant", "y" * 9)),  # 38
              _chat(("user", "q")),  # 9, AR loss only
              _chat(("user", "abc"), ("assistant", "defgh")),  # 32
              _chat(("user", "hi"), ("assistant", "yo")),  # 31
              _chat(("user", "ok?"), ("assistant", "ok")),  # 32
              _chat(("user", "q")),  # 9
              _chat(("user", "abc"), ("assistant", "defgh")),  # 32
              _chat(("user", "hi"), ("assistant", "yo"))]  # 31
    records = [_chat(("user", "held out"), ("assistant", "x")), *first, *second]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _run(tmp: Path, layers: int, *overrides: str):
    layer_types = ", ".join(["sliding_attention", "full_attention"] * (layers // 2))
    return load_run_config(CONFIG, [
        f"data.paths=[{tmp / 'chats.jsonl'}]", f"data.cache_dir={tmp / 'data'}", f"data.seq_length={SEQ}",
        f"train.steps={STEPS}", "train.global_batch_size=8", "train.micro_batch_size=2", "train.eval_interval=0",
        "optim.warmup_steps=2", "optim.distributed_optimizer=false", "checkpoint.save=null",
        f"model.overrides={{num_layers: {layers}, layer_types: [{layer_types}], canvas_length: 8, sliding_window: 12}}",
        *overrides,
    ])


LAYOUTS = {"pp2": (2, ["parallel.pp=2"]), "pp2_vpp2": (4, ["parallel.pp=2", "parallel.vpp=2"])}
"""Layers and parallel layout of each comparison."""
PACKED = ["data.packing=true", f"data.max_records_per_row={MAX_RECORDS}"]


def _train_in_rank(rank: int, tmp: str) -> dict:
    """Per layout, unpacked then packed: the runs' metrics, and the packed run's micro-batches per step (records per
    row, shapes)."""
    from megatron_bdgemma.training.data import build_step_data
    from megatron_bdgemma.training.trainer import _microbatches, build_model_config, train

    out = {}
    for name, (layers, layout) in LAYOUTS.items():
        unpacked = train(_run(Path(tmp), layers, *layout))
        run = _run(Path(tmp), layers, *layout, *PACKED)
        packed = train(run)
        config = build_model_config(run)
        state = SimpleNamespace(run=run, data=build_step_data(run, config), config=config)  # what _microbatches reads
        shapes = [[(tuple(mb.batch.input_ids.shape), tuple(mb.canvas.canvas_ids.shape),
                    [len(set(mb.batch.segment_ids[b].tolist()) - {-1}) for b in range(mb.batch.batch_size)],
                    int((mb.canvas.block_ids >= 0).sum())) for mb in _microbatches(state, step)]
                  for step in range(2)]
        out[name] = dict(unpacked=unpacked, packed=packed, shapes=shapes)
    return out


def _metrics(history) -> list[tuple[float, float, float]]:
    return [(h["diffusion"], h["ar"], h["grad_norm"]) for h in history]


def test_packed_pipeline_equals_unpacked(tmp_path):
    """Per step, packed against unpacked at PP = 2 (2 layers) and PP = 2 × VPP = 2 (4 layers), on both stages: both
    losses and the global grad norm within 1e-5 relative (the grad norm on every step, as in
    tests/test_packed_training.py), the data tokens read exactly; and the packed micro-batches are the shapes meant.
    """
    _write_chats(tmp_path / "chats.jsonl")
    ranks = run_in_processes(_train_in_rank, 2, str(tmp_path), timeout_s=400)
    C, B = MAX_RECORDS, 2
    first = [((B, SEQ), (B, C * 8), [2, 1], 3), ((B, SEQ), (B, C * 8), [2, 2], 3),
             ((B, SEQ), (B, C * 8), [1, 0], 1)]  # [64, 31] [63] | [59, 34] [54, 38] | [54] + filler; 34 AR only
    second = [((B, SEQ), (B, C * 8), [3, 3], 5), ((B, SEQ), (B, C * 8), [2, 0], 1)]  # 9s AR only
    padding = ((B, SEQ), (B, C * 8), [0, 0], 0)
    for name in LAYOUTS:
        for rank, got in enumerate(r[name] for r in ranks):
            what = f"{name} rank {rank} packed vs unpacked"
            assert got["shapes"] == [first + ([padding] if name == "pp2_vpp2" else []), second], what
            assert_steps_close(_metrics(got["packed"]), _metrics(got["unpacked"]), what, shared_weight_steps=STEPS)
            assert [h["tokens"] for h in got["packed"]] == [h["tokens"] for h in got["unpacked"]], what
