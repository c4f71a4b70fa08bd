"""Contract of megatron_bdgemma.data: tokenizers, GPTDataset pretraining (blends, splits), SFT, the embedded default.

Guards: the byte tokenizer's ids and chat format; a locally built HF tokenizer loads offline and its pad/EOS are
checked; pretraining samples are ``tokens [S]`` int64 with their sample index, splits take disjoint document ranges
and blends follow their weights; SFT supervises exactly what the chat template's {% generation %} spans mark
(HF's return_assistant_tokens_mask), every assistant turn of a multi-turn chat (only the final one with
data.mask_history), refuses a template without those tags, trains records without an answer on the AR loss only,
truncates on request; bad chat records (invalid JSON or shape, too long) raise naming file and line or are skipped
and counted; the embedded corpus and SFT set build offline.
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

# A chat template in the style of NeMo Automodel's DiffusionGemma template: a turn closes with an end-of-turn token
# and trailing text ("." here, "\n" in Gemma); {% generation %} wraps each assistant turn's content, end-of-turn and
# that trailing text, so exactly those tokens are supervised.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}<|end|>.{% endgeneration %}{% else %}{{ m['content'] }}<|end|>.{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PLAIN_TEMPLATE = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def build_hf_tokenizer(
    directory: Path, texts: list[str], *, pad: bool = True, chat_template: str = CHAT_TEMPLATE
) -> Path:
    """A word-level HF tokenizer trained on ``texts`` (plus digits and punctuation), saved with ``save_pretrained``.

    Ids: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, role markers 4-6, ``<|end|>`` 7.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS)
    tok.train_from_iterator([*texts, "0 1 2 3 4 5 6 7 8 9 . ? + - * ' ,"], trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        pad_token="<pad>" if pad else None, additional_special_tokens=SPECIALS[4:], chat_template=chat_template,
    )
    hf.save_pretrained(directory)
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
    assert (tok.pad, tok.eod, tok.bos) == (0, 1, 2)
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


def test_sft_supervises_what_the_template_marks(hf_dir, tmp_path):
    from transformers import AutoTokenizer

    records = [chat("what is 3 + 4 ?", "7"), chat("reverse ' apple ' .", "elppa", system="you are terse"),
               chat("what is 3 + 4 ?", "7", "reverse ' apple ' .", "elppa"),
               chat("1 + 1 ?", "2", "2 + 2 ?", "4", "3 + 3 ?", "6"), chat("1 + 1 ?", "2", "what is 3 + 4 ?")]
    data = SFTDataset(write_jsonl(tmp_path / "chat.jsonl", records), load_tokenizer(hf_dir), max_length=64,
                      block_size=4)
    hf = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    for i, record in enumerate(records):
        marked = hf.apply_chat_template(record["messages"], return_dict=True, return_assistant_tokens_mask=True)
        assert data[i]["input_ids"].tolist() == marked["input_ids"] and data[i]["sample_index"] == i
        assert data[i]["loss_mask"].tolist() == [bool(m) for m in marked["assistant_masks"]]
        # Each assistant turn is supervised as its content, <|end|> and the template's trailing ".".
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        supervised = [t for t, m in zip(marked["input_ids"], marked["assistant_masks"]) if m]
        assert hf.convert_ids_to_tokens(supervised) == [x for a in answers for x in (a, "<|end|>", ".")]
    assert data.ar_only == 0 and data.truncated == 0

    batch, indices = sft_collate([data[0], data[2]], block_size=4, eos_id=1, pad_id=0)
    ids0, ids2 = data[0]["input_ids"].tolist(), data[2]["input_ids"].tolist()
    p0 = data[0]["loss_mask"].tolist().index(True)
    assert indices.tolist() == [0, 2] and batch.prefix_lens[0] == p0
    assert batch.canvas_targets[0, :4].tolist() == ids0[p0:] + [1]  # "7 <|end|> ." then one EOS of fill
    # The multi-turn record: one window from the first answer; the user turn inside it is clean and unscored.
    p2 = data[2]["loss_mask"].tolist().index(True)
    L2 = int(batch.response_lens[1])
    assert batch.canvas_targets[1, : len(ids2) - p2].tolist() == ids2[p2:]
    assert batch.canvas_supervised[1, : len(ids2) - p2].tolist() == data[2]["loss_mask"].tolist()[p2:]
    assert batch.canvas_supervised[1, len(ids2) - p2 : L2].all() and L2 % 4 == 0


def test_sft_template_without_generation_tags_is_refused_or_replaced(tmp_path):
    tok_dir = build_hf_tokenizer(tmp_path / "tok", ["hi there"], chat_template=PLAIN_TEMPLATE)
    path = write_jsonl(tmp_path / "c.jsonl", [chat("hi", "there")])
    with pytest.raises(ValueError, match=r"no \{% generation %\} tags.*data.chat_template"):
        SFTDataset(path, load_tokenizer(tok_dir), max_length=64, block_size=4)
    (tmp_path / "tagged.jinja").write_text(CHAT_TEMPLATE)
    data = SFTDataset(path, load_tokenizer(tok_dir, tmp_path / "tagged.jinja"), max_length=64, block_size=4)
    assert data[0]["loss_mask"].sum() == 3  # "there <|end|> ."
    with pytest.raises(FileNotFoundError, match="data.chat_template"):
        load_tokenizer(tok_dir, tmp_path / "missing.jinja")


def test_byte_sft_supervises_answer_bytes_then_eos(tmp_path):
    tok = ByteTokenizer()
    data = SFTDataset(write_jsonl(tmp_path / "c.jsonl", [chat("2+2?", "4"), chat("1?", "a", "2?", "b")]), tok,
                      max_length=64, block_size=16)
    ids, mask = data[0]["input_ids"].tolist(), data[0]["loss_mask"].tolist()
    p = mask.index(True)
    assert tok.decode(ids[:p]) == "<|user|>2+2?<|assistant|>" and ids[p:] == tok.encode("4") + [tok.eos]
    assert mask == [False] * p + [True] * 2
    ids, mask = data[1]["input_ids"].tolist(), data[1]["loss_mask"].tolist()
    assert [i for i, m in zip(ids, mask) if m] == tok.encode("a") + [tok.eos] + tok.encode("b") + [tok.eos]


def test_byte_sft_mask_history_supervises_the_final_turn_only(tmp_path, model_parallel):
    """`data.mask_history=true` through the run config: of 1-, 2- and 3-turn chats in the byte format only the final
    answer's bytes and its EOS are supervised, the history joins the prompt (the window starts at the final turn) and
    every pair of the chat keeps its AR loss; a record without an answer stays AR only. The default supervises every
    answer. A resume that changes the key is refused; a checkpoint older than it resumes as false."""
    from megatron_bdgemma.config import tiny
    from megatron_bdgemma.training.data import build_step_data
    from megatron_bdgemma.training.resume import check_resume

    tok = ByteTokenizer()
    records = [chat("q0?", "a"), chat("q1?", "a", "q2?", "bb"), chat("q1?", "a", "q2?", "bb", "q3?", "ccc"),
               chat("no answer"), chat("q1?", "a", "q2?", system="s")]
    path = write_jsonl(tmp_path / "turns.jsonl", records)
    runs = {h: _sft_run(tmp_path, f"data.paths=[{path}]", f"data.mask_history={str(h).lower()}") for h in (False, True)}
    step_data = {h: build_step_data(run, tiny()) for h, run in runs.items()}
    full = {h: data.splits["train"].dataset for h, data in step_data.items()}  # the SFTDataset, valid split included
    for i, record in enumerate(records):
        ids = full[False][i]["input_ids"].tolist()
        every, final = full[False][i]["loss_mask"], full[True][i]["loss_mask"]
        assert full[True][i]["input_ids"].tolist() == ids
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        assert [t for t, m in zip(ids, every.tolist()) if m] == [x for a in answers for x in tok.encode(a) + [tok.eos]]
        if not answers:
            assert not final.any()
            continue
        start = len(tok.encode(tok.apply_chat_template(record["messages"][: 1 + max(
            j for j, m in enumerate(record["messages"]) if m["role"] == "assistant")], add_generation_prompt=False)))
        start -= len(tok.encode(answers[-1]))  # the final answer's first byte
        assert final.tolist() == [False] * start + every.tolist()[start:], i
        assert [t for t, m in zip(ids, final.tolist()) if m] == tok.encode(answers[-1]) + [tok.eos], i
    batch = {h: step_data[h].collate([full[h][i] for i in range(len(records))])[0] for h in (False, True)}
    for h, i in [(h, i) for h in (False, True) for i in range(len(records))]:  # every pair of the chat has AR loss
        n = len(full[h][i]["input_ids"])
        assert torch.equal(batch[h].input_ids[i, :n], full[h][i]["input_ids"])
        assert batch[h].ar_loss_mask[i, : n - 1].all()
    assert batch[True].prefix_lens.tolist()[:3] == [full[True][i]["loss_mask"].tolist().index(True) for i in range(3)]
    assert (batch[True].prefix_lens[1:3] > batch[False].prefix_lens[1:3]).all()

    stored = runs[False].to_dict()
    del stored["data"]["mask_history"]  # saved before the key existed
    assert check_resume(runs[False], stored, step=0) == []
    with pytest.raises(ValueError, match=r"data\.mask_history \(False → True\)"):
        check_resume(runs[True], stored, step=0)


def test_sft_record_without_answer_is_ar_only(tmp_path):
    data = SFTDataset(write_jsonl(tmp_path / "c.jsonl", [chat("1+1?", "2"), chat("only a question")]), ByteTokenizer(),
                      max_length=64, block_size=16)
    assert len(data) == 2 and data.ar_only == 1 and not data[1]["loss_mask"].any()
    assert "1 without a supervised token (AR loss only)" in data.summary()
    batch, _ = sft_collate([data[0], data[1]], block_size=16, eos_id=1, pad_id=0)
    assert batch.response_lens[1] == 0 and batch.ar_loss_mask[1].sum() == len(data[1]["input_ids"]) - 1


def test_sft_truncation_cuts_at_max_length(tmp_path):
    # Prompts of 41 bytes: an answer cut inside (A), an answer that fits whose EOS fill does not (B).
    path = write_jsonl(tmp_path / "c.jsonl", [chat("word " * 4, "x" * 30), chat("word " * 4, "x")])
    with pytest.raises(BadDataError, match="over max_length 48 .*data.truncation"):
        SFTDataset(path, ByteTokenizer(), max_length=48, block_size=16)
    data = SFTDataset(path, ByteTokenizer(), max_length=48, block_size=16, truncation=True)
    assert data.truncated == 2 and [len(data[i]["input_ids"]) for i in range(2)] == [48, 43]
    batch, _ = sft_collate([data[0], data[1]], block_size=16, eos_id=1, pad_id=0, max_len=48)
    assert batch.seq_len == 48 and batch.encoder_valid.all()
    assert batch.response_lens.tolist() == [7, 7]  # partial last (only) block
    assert batch.input_ids[1, 43:].tolist() == [1] * 5  # the fill, cut at max_length


def test_sft_record_exactly_at_max_length_is_kept_whole(tmp_path):
    """The limit is inclusive: a record whose laid-out length (41-byte prompt + answer "x" and EOS, rounded up to
    one 16-token block = 57) equals max_length is accepted as it is, not refused and not truncated, and its EOS fill
    reaches max_length; one position less refuses it."""
    path = write_jsonl(tmp_path / "c.jsonl", [chat("word " * 4, "x")])
    data = SFTDataset(path, ByteTokenizer(), max_length=57, block_size=16)
    assert len(data) == 1 and data.truncated == 0 and data.bad.counts == {}
    assert len(data[0]["input_ids"]) == 43 and data[0]["loss_mask"].sum() == 2  # "x" + EOS, nothing cut
    batch, _ = sft_collate([data[0]], block_size=16, eos_id=1, pad_id=0, max_len=57)
    assert batch.seq_len == 57 and batch.response_lens.tolist() == [16]  # one whole block
    assert batch.input_ids[0, 43:].tolist() == [1] * 14  # the whole EOS fill
    assert SFTDataset(path, ByteTokenizer(), max_length=57, block_size=16, truncation=True).truncated == 0
    with pytest.raises(BadDataError, match="takes 57 positions .* over max_length 56"):
        SFTDataset(path, ByteTokenizer(), max_length=56, block_size=16)


BAD_RECORDS = {
    "invalid_json": '{"messages": [',
    "invalid_record": {"messages": [{"role": "robot", "content": "x"}]},
    "too_long": chat("word " * 40, "x"),
}


@pytest.mark.parametrize("reason", BAD_RECORDS)
def test_sft_bad_record_raises_with_location(tmp_path, reason):
    path = write_jsonl(tmp_path / "c.jsonl", [chat("1+1?", "2"), BAD_RECORDS[reason]])
    expected = {"invalid_json": "invalid JSON", "invalid_record": "message 0 is not",
                "too_long": "over max_length 64"}[reason]
    with pytest.raises(BadDataError, match=f"{path}:2: .*{expected}"):
        SFTDataset(path, ByteTokenizer(), max_length=64, block_size=16)


def test_sft_skip_counts_bad_records(tmp_path):
    good = [chat("1+1?", "2"), chat("2+2?", "4")]
    path = write_jsonl(tmp_path / "c.jsonl", [good[0], *BAD_RECORDS.values(), "", good[1]])
    data = SFTDataset(path, ByteTokenizer(), max_length=64, block_size=16, on_bad="skip")
    assert len(data) == 2 and [data[i]["sample_index"] for i in range(2)] == [0, 1]
    assert data.bad.counts == {reason: 1 for reason in BAD_RECORDS}
    assert f"{path}:3" in data.bad.summary() and data.bad.summary().startswith("skipped 3 bad records")
    with pytest.raises(ValueError, match="no usable chat record"):
        SFTDataset(write_jsonl(tmp_path / "bad.jsonl", [BAD_RECORDS["invalid_json"]]), ByteTokenizer(),
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


def test_multi_turn_chat_jsonl_trains(hf_dir, tmp_path, model_parallel, capsys):
    """Multi-turn JSONL on a local HF tokenizer with {% generation %} tags → SFTDataset → two training steps."""
    from megatron_bdgemma.training.config import load_run_config
    from megatron_bdgemma.training.trainer import train

    records = [chat(f"{i} + 1 ?", str(i + 1), f"{i} + 2 ?", str(i + 2), *([f"{i} * 2 ?", str(2 * i)] if i % 2 else []))
               for i in range(38)]
    records += [chat("what is 3 + 4 ?"), chat("what is 3 + 4 ?", "7 " * 80)]  # AR only; answer truncated
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    config = Path(__file__).resolve().parent.parent / "examples" / "configs" / "tiny_sft.yaml"
    run = load_run_config(config, [
        f"data.paths=[{path}]", f"data.tokenizer={hf_dir}", "data.seq_length=64", "data.truncation=true",
        f"data.cache_dir={tmp_path / 'cache'}", "train.steps=2", "train.micro_batch_size=4",
        "train.global_batch_size=4", "train.eval_interval=0", "optim.warmup_steps=1", "checkpoint.save=null",
        "model.overrides={num_layers: 2, layer_types: [sliding_attention, full_attention]}",
    ])
    history = train(run)
    assert [h["step"] for h in history] == [1, 2] and all(h["diffusion"] > 0 and h["ar"] > 0 for h in history)
    assert "1 without a supervised token (AR loss only), 1 truncated at max_length" in capsys.readouterr().out


def test_sft_width_is_padded_to_the_parallel_multiple(tmp_path):
    """Context parallelism cuts the width into 2·cp chunks, TP sequence parallelism splits each rank's share over
    the TP ranks and FP8 GEMMs need multiples of 16: the collated width is padded up with global pad (not attended,
    not scored), the rows themselves unchanged."""
    from types import SimpleNamespace

    from megatron_bdgemma.training.data import sft_seq_multiple

    def multiple(tp, sp, fp8, cp=1):
        return sft_seq_multiple(SimpleNamespace(tensor_model_parallel_size=tp, sequence_parallel=sp, fp8=fp8,
                                                context_parallel_size=cp))

    assert [multiple(2, True, None), multiple(2, False, None), multiple(3, True, "hybrid"), multiple(1, False, "e4m3"),
            multiple(1, False, None, cp=2), multiple(2, True, None, cp=3), multiple(1, False, "e4m3", cp=4)] == \
        [2, 1, 48, 16, 4, 12, 16]
    data = SFTDataset(write_jsonl(tmp_path / "c.jsonl", [chat("2+2?", "4"), chat("what is 1+2?", "three")]),
                      ByteTokenizer(), max_length=64, block_size=4)
    plain, _ = sft_collate([data[0], data[1]], block_size=4, eos_id=1, pad_id=0)
    assert plain.seq_len % 2 == 1  # the natural width could not be split over 2 ranks
    for m in (2, 16):
        padded, _ = sft_collate([data[0], data[1]], block_size=4, eos_id=1, pad_id=0, seq_multiple_of=m, max_len=64)
        S = plain.seq_len
        assert padded.seq_len == -(-S // m) * m
        assert torch.equal(padded.input_ids[:, :S], plain.input_ids) and (padded.input_ids[:, S:] == 0).all()
        assert torch.equal(padded.encoder_valid[:, :S], plain.encoder_valid) and not padded.encoder_valid[:, S:].any()
        assert torch.equal(padded.ar_loss_mask[:, :S], plain.ar_loss_mask) and not padded.ar_loss_mask[:, S:].any()
        for name in ("prefix_lens", "response_lens", "canvas_targets", "canvas_supervised"):
            assert torch.equal(getattr(padded, name), getattr(plain, name)), name


def _sft_run(tmp: Path, *overrides: str):
    from megatron_bdgemma.training.config import load_run_config

    config = Path(__file__).resolve().parent.parent / "examples" / "configs" / "tiny_sft.yaml"
    # Questions of 1..7 bytes: widths (longest prompt + one 16-token block) of either parity.
    path = write_jsonl(tmp / "chat.jsonl", [chat("q" * (i % 7 + 1) + "?", str(i)) for i in range(40)])
    return load_run_config(config, [
        f"data.paths=[{path}]", f"data.cache_dir={tmp / 'cache'}", "data.seq_length=96", "train.steps=2",
        "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.eval_interval=0", "optim.warmup_steps=1", "checkpoint.save=null",
        "model.overrides={num_layers: 2, layer_types: [sliding_attention, full_attention], num_global_query_groups: 2}",
        *overrides,
    ])


def _sft_widths(run) -> list[int]:
    from megatron_bdgemma.config import tiny
    from megatron_bdgemma.training.data import build_step_data

    config = tiny(num_global_query_groups=2, tensor_model_parallel_size=run.parallel.tp, sequence_parallel=run.parallel.tp > 1)
    step_data = build_step_data(run, config)
    return [batch.seq_len for step in range(run.train.steps) for batch, _ in step_data.microbatches(step)]


def _tp2_sft_in_rank(rank: int, tmp: str) -> tuple[list, list[int]]:
    from megatron_bdgemma.training.trainer import train

    run = _sft_run(Path(tmp), "parallel.tp=2")
    history = train(run)
    return [(h["diffusion"], h["ar"]) for h in history], _sft_widths(run)


def test_tp2_sequence_parallel_sft_trains_on_odd_widths(tmp_path, model_parallel):
    """SFT at TP=2 with sequence parallelism on batches whose natural widths are odd: it runs, and its losses equal
    one process's (the padding is neither attended nor scored)."""
    from megatron_bdgemma.training.trainer import train
    from tests.multiproc import run_in_processes

    natural = _sft_widths(_sft_run(tmp_path))
    assert any(width % 2 for width in natural), natural
    reference = [(h["diffusion"], h["ar"]) for h in train(_sft_run(tmp_path))]
    for losses, widths in run_in_processes(_tp2_sft_in_rank, 2, str(tmp_path), timeout_s=300):
        assert all(width % 2 == 0 for width in widths) and widths == [-(-w // 2) * 2 for w in natural]
        for got, expected in zip(losses, reference, strict=True):
            assert got == pytest.approx(expected, rel=1e-5)


def test_sft_seq_length_must_split_over_tp(tmp_path):
    with pytest.raises(ValueError, match=r"data.seq_length \(95\) must be a multiple of parallel.tp \(2\)"):
        _sft_run(tmp_path, "parallel.tp=2", "data.seq_length=95").validate(world_size=2)
