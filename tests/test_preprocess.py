"""Contract of tools/preprocess_data.py: JSONL -> int32 ``.bin/.idx`` -> GPTDataset -> diffusion batches.

Guards: every document is ``[BOS] + encode(text) + [EOS]``, in input order across files and worker processes; the
output is readable by megatron-core's GPTDataset; bad lines (invalid JSON, empty documents, ids >= vocab) stop the
run naming file and line and leave no output, or are skipped and counted as ``--on-bad`` says.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_bdgemma.data.pretrain import build_pretrain_datasets, pretrain_collate
from megatron_bdgemma.data.tokenizer import load_tokenizer
from tests.test_data import build_hf_tokenizer, write_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import preprocess_data  # noqa: E402  (a script, not a package; spawned workers find it through sys.path too)

WORDS = "the cat sat on a mat while dogs ran far away from home".split()


def documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) for _ in range(n)]


def read_documents(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = IndexedDataset(prefix)
    assert data.index.dtype == np.int32
    return [data[i].tolist() for i in range(len(data))]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return build_hf_tokenizer(tmp_path_factory.mktemp("tok"), [" ".join(WORDS)])


def test_jsonl_to_gpt_dataset_to_batches(tok_dir, tmp_path):
    texts = documents(300, seed=0)
    inputs = [write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:170]]),
              write_jsonl(tmp_path / "b.jsonl", [{"body": t, "id": i} for i, t in enumerate(texts[170:])])]
    prefix = str(tmp_path / "out" / "corpus")
    argv = ["--input", *map(str, inputs), "--output-prefix", prefix, "--tokenizer", str(tok_dir),
            "--json-key", "text", "--workers", "2", "--chunk-size", "16"]
    # b.jsonl keeps its text under "body": every line of it is bad, which also proves the key is honoured.
    assert preprocess_data.main(argv) == 1
    assert list((tmp_path / "out").iterdir()) == []  # the workers were stopped and the partial output removed
    write_jsonl(inputs[1], [{"text": t} for t in texts[170:]])
    assert preprocess_data.main(argv) == 0

    tok = load_tokenizer(tok_dir)
    assert read_documents(prefix) == [[tok.bos, *tok.encode(t), tok.eod] for t in texts]  # order kept

    splits = build_pretrain_datasets(prefix, tokenizer=tok, seq_length=24, seed=1, num_samples=(40, 4, 4),
                                     split="90,5,5", cache_dir=tmp_path / "cache")
    batch, indices = pretrain_collate([splits.train[i] for i in range(4)], block_size=8, pad_id=tok.pad)
    assert batch.input_ids.shape == (4, 24) and indices.tolist() == [0, 1, 2, 3]
    assert set(batch.input_ids.flatten().tolist()) <= set(range(tok.vocab_size)) - {tok.pad}


BAD_LINES = {
    "invalid_json": ('{"text": "the cat', "invalid JSON"),
    "empty": ({"text": "   "}, "empty document"),
    "invalid_record": ({"title": "no text"}, "no string under key 'text'"),
    "invalid_text": ({"text": "x\ud800y"}, "text is not valid Unicode (surrogates not allowed at character 1)"),
}


@pytest.mark.parametrize("reason", BAD_LINES)
def test_bad_line_stops_the_run_with_its_location(tmp_path, capsys, reason):
    line, message = BAD_LINES[reason]
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "the cat"}, "", line, {"text": "a mat"}])
    prefix = tmp_path / "out"
    assert preprocess_data.main(["--input", str(path), "--output-prefix", str(prefix), "--tokenizer", "byte"]) == 1
    assert f"error: {path}:3: {message}" in capsys.readouterr().err  # line numbers count blank lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no output, no temporary files


def test_token_ids_past_the_vocabulary(tok_dir, tmp_path, capsys):
    tok = load_tokenizer(tok_dir)
    word = max(WORDS, key=lambda w: tok.encode(w)[0])
    high = tok.encode(word)[0]  # the largest word id; --vocab-size high puts only this word out of range
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "the"}, {"text": "the cat"}, {"text": word}])
    argv = ["--input", str(path), "--output-prefix", str(tmp_path / "out"), "--tokenizer", str(tok_dir),
            "--vocab-size", str(high)]
    assert preprocess_data.main(argv) == 1
    assert f"{path}:3: token id {high} >= vocab size {high}" in capsys.readouterr().err

    assert preprocess_data.main([*argv, "--on-bad", "skip"]) == 0
    assert len(read_documents(str(tmp_path / "out"))) == 2
    assert f"skipped 1 bad records: id_out_of_range 1 ({path}:3)" in capsys.readouterr().out


def test_skip_counts_every_kind(tmp_path, capsys):
    lines = [{"text": "the cat"}, *(line for line, _ in BAD_LINES.values()), {"text": "sat"}, {"text": ""}]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    argv = ["--input", str(path), "--output-prefix", str(tmp_path / "out"), "--tokenizer", "byte", "--on-bad", "skip",
            "--workers", "1", "--log-interval", "1"]
    assert preprocess_data.main(argv) == 0
    out, err = capsys.readouterr()
    assert "skipped 5 bad records: empty 2" in out and "invalid_json 1" in out and "invalid_record 1" in out
    assert "invalid_text 1" in out
    assert "2 documents" in err  # progress lines
    byte = load_tokenizer("byte")
    assert read_documents(str(tmp_path / "out")) == [byte.encode("the cat") + [1], byte.encode("sat") + [1]]

    only_bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": ""}])
    assert preprocess_data.main(["--input", str(only_bad), "--output-prefix", str(tmp_path / "none"),
                                 "--tokenizer", "byte", "--on-bad", "skip"]) == 1
    assert "no documents were written" in capsys.readouterr().err
