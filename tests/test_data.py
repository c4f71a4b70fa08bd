"""Contract of megatron_bdgemma.data: tokenizers, GPTDataset pretraining (blends, splits), SFT, the embedded default.

Guards: the byte tokenizer's ids and chat format; a locally built HF tokenizer loads offline and its pad/EOS are
checked; pretraining samples are ``tokens [S]`` int64 with their sample index, splits take disjoint document ranges
and blends follow their weights; SFT splits prompt/response exactly as the chat template renders them, cuts the
response after its end-of-turn and lays it out with the EOS fill; bad chat records (no answer, two answers, invalid
JSON, too long) raise naming file and line or are skipped and counted; the embedded corpus and SFT set build offline.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from pathlib import Path

import pytest
import torch

from megatron_bdgemma.data import BadDataError, BadRecords
from megatron_bdgemma.data.embedded import embedded_pretrain_prefix, embedded_sft_path, sft_records
from megatron_bdgemma.data.pretrain import IndexedDatasetWriter, build_pretrain_datasets, pretrain_collate
from megatron_bdgemma.data.sft import SFTDataset, sft_collate
from megatron_bdgemma.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

# A chat template in the style of Gemma's: a turn closes with an end-of-turn token and trailing text ("." here,
# "\n" in Gemma), which generation never produces, so SFT must not supervise it.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>.{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def build_hf_tokenizer(
    directory: Path, texts: list[str], *, pad: bool = True, stop_on_end_of_turn: bool = True
) -> Path:
    """A word-level HF tokenizer trained on ``texts`` (plus digits and punctuation), saved with ``save_pretrained``.

    Ids: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, role markers 4-6, ``<|end|>`` 7. With
    ``stop_on_end_of_turn`` a ``generation_config.json`` lists ``<|end|>`` among the EOS ids, as DiffusionGemma's does.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS)
    tok.train_from_iterator([*texts, "0 1 2 3 4 5 6 7 8 9 . ? + - * ' ,"], trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        pad_token="<pad>" if pad else None, additional_special_tokens=SPECIALS[4:], chat_template=CHAT_TEMPLATE,
    )
    hf.save_pretrained(directory)
    if stop_on_end_of_turn:
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7], "pad_token_id": 0}))
    return directory


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chat(*turns: str, system: str | None = None) -> dict:
    """``chat("q", "a", "q2")`` -> user/assistant alternating messages."""
    roles = ["user", "assistant"]
    messages = [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    return {"messages": ([{"role": "system", "content": system}] if system else []) + messages}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    texts = [r["messages"][-1]["content"] + " " + r["messages"][-2]["content"] for r in sft_records(200)]
    return build_hf_tokenizer(tmp_path_factory.mktemp("tok"), texts + ["what is reverse you are terse elppa"])


# ---------------------------------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_ids_specials_and_chat_format():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad, tok.eod, tok.eos, tok.bos) == (320, 0, 1, 1, None)
    ids = tok.encode("hé!")
    assert ids == [b + 2 for b in "hé!".encode()] and max(ids) < 258
    assert tok.decode([0, *ids, 1]) == "hé!"  # pad and EOS are not text
    text = tok.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                                   add_generation_prompt=True)
    assert text == "<|system|>s<|user|>q<|assistant|>"
    assert load_tokenizer("byte").unique_identifiers == {"class": "ByteTokenizer", "vocab_size": 320}


def test_hf_tokenizer_loads_locally_with_checked_specials(hf_dir, tmp_path):
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad, tok.eod, tok.bos) == (0, 1, 2) and tok.stop_ids == {1, 7}
    assert tok.decode(tok.encode("what is 3 + 4 ?")) == "what is 3 + 4 ?"
    assert tok.unique_identifiers["path"] == str(hf_dir.resolve())

    with pytest.raises(ValueError, match="no pad_token"):
        HFTokenizer(build_hf_tokenizer(tmp_path / "nopad", ["x"], pad=False))
    with pytest.raises(FileNotFoundError, match="neither 'byte' nor a local directory"):
        load_tokenizer(tmp_path / "missing")


# --------------------------------------------------------------------------------------------------------- pretraining


def _write_corpus(prefix: Path, first_id: int, num_docs: int, doc_len: int = 7) -> str:
    """Document ``i`` is ``doc_len`` copies of id ``first_id + i`` and EOS, so a sample shows which documents fed it."""
    with IndexedDatasetWriter(prefix) as writer:
        for i in range(num_docs):
            writer.add_document([first_id + i] * doc_len + [1])
    return str(prefix)


def _doc_ids(dataset) -> set[int]:
    return {t for i in range(len(dataset)) for t in dataset[i]["tokens"].tolist() if t > 1}


def test_pretrain_samples_splits_and_collate(tmp_path):
    prefix = _write_corpus(tmp_path / "a", first_id=10, num_docs=50)
    tok = ByteTokenizer()
    splits = build_pretrain_datasets(prefix, tokenizer=tok, seq_length=32, seed=3, num_samples=(60, 4, 4),
                                     split="60,20,20", cache_dir=tmp_path / "cache")
    sample = splits.train[5]
    assert sample["tokens"].shape == (32,) and sample["tokens"].dtype == torch.int64 and sample["sample_index"] == 5
    # Documents 0-29 train, 30-39 valid, 40-49 test (the builder's contiguous ranges), each split several epochs.
    assert _doc_ids(splits.train) == set(range(10, 40))
    assert _doc_ids(splits.valid) == set(range(40, 50))
    assert _doc_ids(splits.test) == set(range(50, 60))

    batch, indices = pretrain_collate([splits.train[i] for i in (7, 3)], block_size=16, pad_id=tok.pad)
    assert indices.tolist() == [7, 3]
    assert batch.input_ids.shape == (2, 32) and batch.prefix_lens.tolist() == [0, 0]
    assert batch.response_lens.tolist() == [32, 32] and batch.canvas_len == 32
    assert torch.equal(batch.input_ids[0], splits.train[7]["tokens"])

    # The same call again is served from the index cache and gives the same samples.
    again = build_pretrain_datasets(prefix, tokenizer=tok, seq_length=32, seed=3, num_samples=(60, 4, 4),
                                    split="60,20,20", cache_dir=tmp_path / "cache")
    assert torch.equal(again.train[11]["tokens"], splits.train[11]["tokens"])


def _build_on_rank(rank: int, prefix: str, cache_dir: str) -> list[list[int]]:
    """Runs in each of 2 gloo ranks: build the datasets (rank 0 writes the index cache, rank 1 waits and loads it)."""
    splits = build_pretrain_datasets(prefix, tokenizer=ByteTokenizer(), seq_length=16, seed=5, num_samples=(20, 2, 2),
                                     split="60,20,20", cache_dir=cache_dir)
    return [splits.train[i]["tokens"].tolist() for i in range(20)]


def test_ranks_share_one_index_cache(tmp_path):
    from tests.multiproc import run_in_processes

    prefix = _write_corpus(tmp_path / "a", first_id=10, num_docs=30)
    rank0, rank1 = run_in_processes(_build_on_rank, 2, prefix, str(tmp_path / "cache"), timeout_s=120)
    assert rank0 == rank1
    assert len(list((tmp_path / "cache").glob("*GPTDataset-train-shuffle_index.npy"))) == 1


def test_blend_follows_weights(tmp_path):
    a = _write_corpus(tmp_path / "a", first_id=10, num_docs=40)
    b = _write_corpus(tmp_path / "b", first_id=100, num_docs=40)
    splits = build_pretrain_datasets({a: 1.0, b: 3.0}, tokenizer=ByteTokenizer(), seq_length=8, seed=0,
                                     num_samples=(400, 8, 0), split="90,10,0", cache_dir=tmp_path / "cache")
    assert splits.test is None and len(splits.train) == 400
    # Document lengths are 8 = seq_length, so every sample holds tokens of exactly one corpus.
    source = Counter("b" if splits.train[i]["tokens"].max() >= 100 else "a" for i in range(400))
    assert source == {"a": 100, "b": 300}


def test_pretrain_errors_name_the_problem(tmp_path):
    tok = ByteTokenizer()
    with pytest.raises(FileNotFoundError, match="tools/preprocess_data.py"):
        build_pretrain_datasets(str(tmp_path / "nope"), tokenizer=tok, seq_length=8, seed=0, num_samples=(1, 1, 1))
    small = _write_corpus(tmp_path / "small", first_id=10, num_docs=20)
    with pytest.raises(ValueError, match="20 documents: split '98,1,1' leaves the valid/test split without any"):
        build_pretrain_datasets(small, tokenizer=tok, seq_length=8, seed=0, num_samples=(1, 1, 1))
    with pytest.raises(ValueError, match="weighted blend needs a sample count for every split"):
        build_pretrain_datasets({small: 1.0}, tokenizer=tok, seq_length=8, seed=0, num_samples=(1, None, 1))


def test_writer_leaves_nothing_behind_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "x") as writer:
            writer.add_document([5, 6, 1])
            raise RuntimeError("crash mid-write")
    with pytest.raises(ValueError, match="no documents"):
        with IndexedDatasetWriter(tmp_path / "y"):
            pass
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------------------------ SFT


def test_sft_split_matches_chat_template(hf_dir, tmp_path):
    from transformers import AutoTokenizer

    records = [chat("what is 3 + 4 ?", "7"), chat("reverse ' apple ' .", "elppa", system="you are terse")]
    data = SFTDataset(write_jsonl(tmp_path / "chat.jsonl", records), load_tokenizer(hf_dir), max_length=64,
                      block_size=4)
    hf = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    for i, record in enumerate(records):
        sample = data[i]
        prompt = hf.apply_chat_template(record["messages"][:-1], add_generation_prompt=True)["input_ids"]
        full = hf.apply_chat_template(record["messages"])["input_ids"]
        end = full.index(7, len(prompt))  # the answer's <|end|>; the template's trailing "." is not supervised
        assert sample["prompt_len"] == len(prompt) and sample["sample_index"] == i
        assert sample["input_ids"].tolist() == full[: end + 1]

    batch, indices = sft_collate([data[0], data[1]], block_size=4, eos_id=1, pad_id=0)
    p0, p1 = data[0]["prompt_len"], data[1]["prompt_len"]
    assert indices.tolist() == [0, 1] and batch.prefix_lens.tolist() == [p0, p1]
    answer0 = data[0]["input_ids"][p0:].tolist()  # "7 <|end|>"
    assert hf.convert_ids_to_tokens(answer0) == ["7", "<|end|>"] and batch.response_lens[0] == 4
    assert batch.canvas_targets[0].tolist() == answer0 + [1, 1] + [0] * (batch.canvas_len - 4)  # EOS fill, then pad
    assert torch.equal(batch.input_ids[1, :p1], data[1]["input_ids"][:p1])


def test_sft_without_stop_id_appends_eos(tmp_path):
    tok_dir = build_hf_tokenizer(tmp_path / "tok", ["hi there"], stop_on_end_of_turn=False)
    data = SFTDataset(write_jsonl(tmp_path / "c.jsonl", [chat("hi", "there")]), load_tokenizer(tok_dir),
                      max_length=64, block_size=4)
    tok, p = load_tokenizer(tok_dir), data[0]["prompt_len"]
    # The whole rendered turn "there<|end|>." is kept (nothing marks where it ends), then EOS.
    assert data[0]["input_ids"][p:].tolist() == tok.encode("there<|end|>.") + [tok.eos]


def test_byte_sft_response_is_answer_bytes_then_eos(tmp_path):
    tok = ByteTokenizer()
    data = SFTDataset(write_jsonl(tmp_path / "c.jsonl", [chat("2+2?", "4")]), tok, max_length=64, block_size=16)
    ids, p = data[0]["input_ids"].tolist(), data[0]["prompt_len"]
    assert tok.decode(ids[:p]) == "<|user|>2+2?<|assistant|>" and ids[p:] == tok.encode("4") + [tok.eos]


BAD_RECORDS = {
    "no_assistant": chat("only a question"),
    "multiple_assistant": chat("q", "a", "q2", "a2"),
    "invalid_json": '{"messages": [',
    "invalid_record": {"messages": [{"role": "robot", "content": "x"}]},
    "too_long": chat("word " * 40, "x"),
}


@pytest.mark.parametrize("reason", BAD_RECORDS)
def test_sft_bad_record_raises_with_location(tmp_path, reason):
    path = write_jsonl(tmp_path / "c.jsonl", [chat("1+1?", "2"), BAD_RECORDS[reason]])
    expected = {"no_assistant": "no assistant turn", "multiple_assistant": "2 assistant turns",
                "invalid_json": "invalid JSON", "invalid_record": "message 0 is not",
                "too_long": "over max_length 64"}[reason]
    with pytest.raises(BadDataError, match=f"{path}:2: .*{expected}"):
        SFTDataset(path, ByteTokenizer(), max_length=64, block_size=16)


def test_sft_skip_counts_bad_records(tmp_path):
    good = [chat("1+1?", "2"), chat("2+2?", "4")]
    path = write_jsonl(tmp_path / "c.jsonl", [good[0], *BAD_RECORDS.values(), "", good[1]])
    data = SFTDataset(path, ByteTokenizer(), max_length=64, block_size=16, on_bad="skip")
    assert len(data) == 2 and [data[i]["sample_index"] for i in range(2)] == [0, 1]
    assert data.bad.counts == {reason: 1 for reason in BAD_RECORDS}
    assert f"{path}:3" in data.bad.summary() and data.bad.summary().startswith("skipped 5 bad records")
    with pytest.raises(ValueError, match="no usable chat record"):
        SFTDataset(write_jsonl(tmp_path / "bad.jsonl", [BAD_RECORDS["no_assistant"]]), ByteTokenizer(),
                   max_length=64, block_size=16, on_bad="skip")


def test_bad_records_policy_is_validated():
    with pytest.raises(ValueError, match="on_bad must be"):
        BadRecords("ignore")


# ---------------------------------------------------------------------------------------------------- embedded default


def test_embedded_default_builds_offline(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the embedded default must not touch the network")

    monkeypatch.setattr(socket, "socket", no_network)
    cache = tmp_path / "cache"
    prefix = embedded_pretrain_prefix(cache)
    assert embedded_pretrain_prefix(cache) == prefix  # built once, then found
    tok = ByteTokenizer()
    splits = build_pretrain_datasets(prefix, tokenizer=tok, seq_length=64, seed=0, num_samples=(16, 4, 4),
                                     cache_dir=cache)
    batch, _ = pretrain_collate([splits.train[i] for i in range(4)], block_size=16, pad_id=tok.pad)
    assert batch.input_ids.shape == (4, 64) and int(batch.input_ids.max()) < 258
    text = "".join(tok.decode(splits.train[i]["tokens"].tolist()) for i in range(16))
    assert "self" in text or "return" in text  # Python source

    path = embedded_sft_path(cache)
    assert embedded_sft_path(cache) == path
    data = SFTDataset(path, tok, max_length=128, block_size=16)
    assert len(data) == len(sft_records()) and data.bad.total == 0
    batch, _ = sft_collate([data[i] for i in range(8)], block_size=16, eos_id=tok.eos, pad_id=tok.pad)
    assert batch.num_blocks == 1 and batch.seq_len <= 128  # every answer fits one tiny-preset canvas block
