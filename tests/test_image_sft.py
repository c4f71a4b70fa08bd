"""SFT with images (issue #26): chat JSONL whose user turns hold image parts, processed with the model's HF
processor's image half, trained through the public CLI.

- the data layout: each image becomes `boi, image × n, eoi` with the ids, `pixel_values`, `image_position_ids` and
  `mm_token_type_ids` of transformers' own `Gemma4Processor` on the same rendered text and images; no image token
  is supervised or in a response window; the collate's `Images` hold the images in placeholder order, row after row;
- the byte tokenizer refuses an image part with the file and line;
- a tiny image SFT run through `examples/pretrain_bdgemma.py` (frozen tower, then `model.overrides.train_vision=
  true`) exits 0 and its loss decreases; packed (`data.packing=true`), TP = 2, PP = 2, EP = 2 packed and CP = 2
  packed equal one process unpacked; the trained tower's export holds trained values;
- packing image records (model level): rows selected and packed carry exactly their records' images, no attention
  weight crosses a record (its images included), and every packed record computes as alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_bdgemma.data import BadDataError
from megatron_bdgemma.data.sft import SFTDataset, sft_collate
from megatron_bdgemma.data.tokenizer import ByteTokenizer, HFTokenizer

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
            "<|image|>", "<|boi|>", "<|eoi|>"]
# The test chat template: a user turn's content may be a list of parts, an image part renders as the image token.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{% set parts = [{'type': 'text', 'text': m['content']}] %}"
    "{% else %}{% set parts = m['content'] %}{% endif %}"
    "{% if m['role'] == 'assistant' %}{% generation %}{% for p in parts %}{{ p['text'] }}{% endfor %}<|end|>."
    "{% endgeneration %}{% else %}{% for p in parts %}{% if p['type'] == 'image' %}<|image|>{% else %}{{ p['text'] }}"
    "{% endif %}{% endfor %}<|end|>.{% endif %}{% endfor %}"
)
WORDS = "what is in this picture a red square blue circle two shapes left right"


def build_processor_dir(directory: Path) -> Path:
    """A word-level tokenizer with Gemma 4's image tokens and a Gemma 4 image processor (patch 16, 3 × 3 pooling:
    `TINY_VISION`'s), saved with `save_pretrained`: the local stand-in of the model's HF processor directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([WORDS, ". ,"], trainers.WordLevelTrainer(special_tokens=SPECIALS))
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=SPECIALS[4:], chat_template=TEMPLATE,
        extra_special_tokens={"image_token": "<|image|>", "boi_token": "<|boi|>", "eoi_token": "<|eoi|>"},
    ).save_pretrained(directory)
    Gemma4ImageProcessorPil(patch_size=16, max_soft_tokens=70, pooling_kernel_size=3).save_pretrained(directory)
    return directory


def write_images(directory: Path, count: int, seed: int = 0) -> list[str]:
    """`count` small random PNGs of different sizes, named relative to `directory`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(directory / f"img{i}.png")
        names.append(f"img{i}.png")
    return names


def image_chat(images: list[str], answer: str) -> dict:
    parts = [{"type": "image", "path": p} for p in images] + [{"type": "text", "text": "what is in this picture"}]
    return {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": answer}]}


def _oracle_processor(directory: Path):
    """transformers' `Gemma4Processor` over the directory's tokenizer and image processor. Its constructor builds
    the video processor, which needs torchvision (absent here, and images never reach it), so the instance is
    assembled with the attributes its `__init__` sets; `__call__` is transformers' own. The audio tokens only pass
    `validate_inputs` (it reads them whether or not audio is given)."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.gemma4 import Gemma4Processor

    processor = object.__new__(Gemma4Processor)
    tok = AutoTokenizer.from_pretrained(directory)
    processor.tokenizer, processor.image_processor, processor.chat_template = \
        tok, AutoImageProcessor.from_pretrained(directory), TEMPLATE
    processor.image_token, processor.boi_token, processor.eoi_token = tok.image_token, tok.boi_token, tok.eoi_token
    processor.image_token_id = tok.image_token_id
    processor.video_processor = processor.feature_extractor = None
    processor.audio_token = processor.boa_token = processor.eoa_token = tok.unk_token
    return processor


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory) -> Path:
    return build_processor_dir(tmp_path_factory.mktemp("processor"))


def save_vision_model(tok: HFTokenizer, directory: Path) -> Path:
    """A tiny random `DiffusionGemmaForBlockDiffusion` with a vision tower, saved: two layers (a sliding one of window
    4, shorter than an image, and a full one), bidirectional over images, its image token ids the processor's."""
    from tests import hf_models

    ids = dict(image_token_id=tok.images.image_token_id, boi_token_id=tok.images.boi_token_id,
               eoi_token_id=tok.images.eoi_token_id)
    text = dict(use_bidirectional_attention="vision", num_global_key_value_heads=2, num_hidden_layers=2,
                layer_types=[hf_models.SLIDING, hf_models.FULL])
    return hf_models.save(hf_models.diffusion_gemma(text, canvas_length=4, **ids), directory)


def test_image_records_are_laid_out_as_the_hf_processor_does(processor_dir, tmp_path):
    from PIL import Image

    tok = HFTokenizer(processor_dir)
    names = write_images(tmp_path, 3)
    records = [image_chat(names[:1], "a red square"), {"messages": [{"role": "user", "content": "what is in this"},
                                                                    {"role": "assistant", "content": "two shapes"}]},
               image_chat(names[1:], "a blue circle left right")]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = SFTDataset(path, tok, max_length=512, block_size=4)
    assert data.with_images == 2

    oracle = _oracle_processor(processor_dir)
    special = {tok.images.image_token_id, tok.images.boi_token_id, tok.images.eoi_token_id}
    expected_pixels, expected_positions = [], []
    for index, record in enumerate(records):
        sample = data[index]
        ids = sample["input_ids"]
        own = [p["path"] for m in record["messages"] if isinstance(m["content"], list) for p in m["content"]
               if p["type"] == "image"]
        text = oracle.tokenizer.apply_chat_template(record["messages"], tokenize=False)
        want = oracle(text=[text], images=[[Image.open(tmp_path / p).convert("RGB") for p in own]] if own else None,
                      return_tensors="pt", add_special_tokens=False)
        assert ids.tolist() == want["input_ids"][0].tolist(), index
        image_tokens = torch.tensor([i in special for i in ids.tolist()])
        assert not (sample["loss_mask"] & image_tokens).any(), "an image token is supervised"
        assert sample["loss_mask"].any()
        if own:
            got = sample["images"]
            assert got["mm_token_type_ids"].tolist() == want["mm_token_type_ids"][0].tolist()
            assert torch.equal(got["pixel_values"], want["pixel_values"])
            assert torch.equal(got["image_position_ids"], want["image_position_ids"])
            assert int(got["mm_token_type_ids"].sum()) == int((ids == tok.images.image_token_id).sum()) > 0
            expected_pixels += list(want["pixel_values"])
            expected_positions += list(want["image_position_ids"])
        else:
            assert "images" not in sample

    batch, _ = sft_collate([data[i] for i in range(3)], block_size=4, eos_id=tok.eod, pad_id=tok.pad)
    images = batch.images
    patches = images.pixel_values.shape[1]
    for got_pixels, got_positions, pixels, positions in zip(images.pixel_values, images.image_position_ids,
                                                            expected_pixels, expected_positions, strict=True):
        assert torch.equal(got_pixels[: len(pixels)], pixels) and not got_pixels[len(pixels):].any()
        assert torch.equal(got_positions[: len(positions)], positions)
        assert (got_positions[len(positions):] == -1).all() and patches >= len(pixels)
    assert images.mm_token_type_ids.shape == batch.input_ids.shape
    assert torch.equal(images.mm_token_type_ids.bool(), batch.input_ids == tok.images.image_token_id)
    # No image token in a response window: every one lies before its row's prompt end.
    rows, columns = images.mm_token_type_ids.nonzero(as_tuple=True)
    assert (columns < batch.prefix_lens[rows]).all()
    assert not torch.isin(batch.canvas_targets, torch.tensor(sorted(special))).any()
    # Nor is one an AR target; every other valid pair is.
    plain, _ = sft_collate([{k: v for k, v in data[i].items() if k != "images"} for i in range(3)], block_size=4,
                           eos_id=tok.eod, pad_id=tok.pad)
    image_target = torch.zeros_like(plain.ar_loss_mask)
    image_target[:, :-1] = torch.isin(plain.input_ids[:, 1:], torch.tensor(sorted(special)))
    assert image_target.any() and torch.equal(batch.ar_loss_mask, plain.ar_loss_mask & ~image_target)
    assert torch.equal(batch.ar_labels[batch.ar_loss_mask], plain.ar_labels[batch.ar_loss_mask])
    assert (batch.ar_labels[~batch.ar_loss_mask] == tok.pad).all()


def test_image_parts_are_refused_without_an_image_processor(tmp_path):
    names = write_images(tmp_path, 1)
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(image_chat([], "a")) + "\n" + json.dumps(image_chat(names, "a")) + "\n")
    with pytest.raises(BadDataError) as error:
        SFTDataset(path, ByteTokenizer(), max_length=512, block_size=4)
    assert str(error.value).startswith(f"{path}:2: the record has 1 image part(s) but the tokenizer")
    assert "\n" not in str(error.value)


def test_image_records_need_a_model_that_takes_them(processor_dir, tmp_path):
    """Image records with a text-only model, or a model whose image token is not the tokenizer's, are refused
    before the first step, in one line naming data.paths and what the model lacks."""
    from megatron_bdgemma.config import tiny
    from megatron_bdgemma.training.config import load_run_config
    from megatron_bdgemma.training.data import build_step_data

    names = write_images(tmp_path, 1)
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(image_chat(names, "a red square")) + "\n" for _ in range(4)))
    run = load_run_config("examples/configs/tiny_sft.yaml", [f"data.tokenizer={processor_dir}", f"data.paths=[{path}]",
                                                             "data.seq_length=192"])
    image_token = HFTokenizer(processor_dir).images.image_token_id
    vision = dict(model_type="gemma4_vision", hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=1, num_key_value_heads=1, head_dim=8)
    for config, message in [
        (tiny(vocab_size=512), "has no vision tower (model.hf: a DiffusionGemma checkpoint that has one)"),
        (tiny(vocab_size=512, vision_config=vision, image_token_id=image_token + 1),
         f"takes image_token_id {image_token + 1}, not data.tokenizer's image token {image_token}"),
    ]:
        with pytest.raises(ValueError) as error:
            build_step_data(run, config)
        assert str(error.value) == f"data.paths: {path} has 4 record(s) with images, but the model {message}"
    build_step_data(run, tiny(vocab_size=512, vision_config=vision, image_token_id=image_token))  # takes them


def test_image_in_a_response_window_and_missing_file_are_refused(processor_dir, tmp_path):
    names = write_images(tmp_path, 1)
    late = {"messages": [{"role": "user", "content": "what"}, {"role": "assistant", "content": "a"},
                         {"role": "user", "content": [{"type": "image", "path": names[0]}]},
                         {"role": "assistant", "content": "red"}]}
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [late, image_chat(["nope.png"], "a"), image_chat(names, "a")]))
    data = SFTDataset(path, HFTokenizer(processor_dir), max_length=512, block_size=4, on_bad="skip")
    assert len(data) == 1 and dict(data.bad.counts) == {"image_in_response": 1, "missing_image": 1}
    assert data.bad.locations == {"image_in_response": [f"{path}:1"], "missing_image": [f"{path}:2"]}


def test_image_sft_cli_run_learns_with_the_tower_frozen_and_trained(processor_dir, tmp_path, model_parallel):
    """`examples/pretrain_bdgemma.py` on a tiny HF DiffusionGemma with a vision tower (its image tokens the
    processor's, bidirectional over images) and its local processor as data.tokenizer: 8 steps of image chats, once
    with the tower frozen (the default) and once with `model.overrides.train_vision=true`. Both exit 0 and their
    loss decreases; step 1 (learning rate 0, same weights) has the same losses in both, and a larger grad norm with
    the tower's gradients counted (so the images reach the tower).

    Against the trained run (one process, unpacked), the same global batches of records, on the steps that share
    weights (1 and 2, tests/tolerances.py), both losses and the grad norm at 1e-5 relative:
    - `data.packing=true`: each step's four records (76 to 86 tokens, each with its image) two to a row of 192;
    - `torchrun --nproc-per-node 2 ... parallel.tp=2` and `parallel.pp=2`, unpacked;
    - `parallel.ep=2` (DP = 2) with `data.packing=true`: each rank packs the two records dealt to it and their
      images into a row;
    - `parallel.cp=2` with `data.packing=true`: each rank encodes every image of the packed rows and takes the
      features of the placeholders in its half of them.
    Worst measured (defaults / AVX2): packed 5.1e-7 / 3.0e-7, TP = 2 6.1e-7 / 1.6e-7, PP = 2 4.0e-7 / 1.0e-7,
    EP = 2 packed 6.6e-7 / 2.5e-7, CP = 2 packed 8.1e-7 / 2.5e-7.

    The trained tower comes out trained: the run's export to HF holds every vision tensor of the source, in its
    dtype and shape, and none of them holds the source's values; its config has the source's image tokens; and
    `tools/generate.py --load` on the run prints what `--hf` on its export prints for a chat with an image."""
    from megatron_bdgemma.training.config import load_run_config
    from megatron_bdgemma.training.data import build_step_data
    from megatron_bdgemma.training.trainer import build_model_config
    from tests.test_errors import _cli
    from tests.test_metrics import _rows
    from tests.tolerances import assert_steps_close

    hf = save_vision_model(HFTokenizer(processor_dir), tmp_path / "hf")
    names = write_images(tmp_path, 4)
    answers = ["a red square", "a blue circle", "two shapes left", "a red circle right"]
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(image_chat([names[i % 4]], answers[i % 4])) + "\n" for i in range(8)))

    def run(name: str, *overrides: str, nproc: int = 0) -> list[dict]:
        done = _cli("examples/pretrain_bdgemma.py", "--config", "examples/configs/tiny_sft.yaml", "--sample", "",
                    f"model.hf={hf}", f"data.tokenizer={processor_dir}", f"data.paths=[{chats}]",
                    "data.seq_length=192", "train.steps=8", "train.micro_batch_size=2", "train.global_batch_size=4",
                    "train.log_interval=1", "train.eval_interval=0", "optim.warmup_steps=1", "optim.lr=1.0e-2",
                    f"checkpoint.save={tmp_path / name}", *overrides, nproc=nproc)
        assert done.returncode == 0, (name, done.stdout[-3000:], done.stderr[-3000:])
        return _rows(tmp_path / name / "metrics.jsonl")

    def metrics(rows: list[dict]) -> list[tuple[float, float, float]]:
        return [(r["diffusion"], r["ar"], r["grad_norm"]) for r in rows]

    frozen = run("frozen")
    trained = run("trained", "model.overrides={train_vision: true}")
    for rows in (frozen, trained):
        assert [r["step"] for r in rows] == list(range(1, 9))
        first, last = [sum(r["diffusion"] + r["ar"] for r in part) / 2 for part in (rows[:2], rows[-2:])]
        assert last < 0.9 * first, [(r["diffusion"], r["ar"]) for r in rows]
    assert (frozen[0]["diffusion"], frozen[0]["ar"]) == pytest.approx((trained[0]["diffusion"], trained[0]["ar"]),
                                                                      rel=1e-6)
    assert trained[0]["grad_norm"] > frozen[0]["grad_norm"] * (1 + 1e-6)
    _assert_exported_tower_is_trained(hf, tmp_path / "trained", tmp_path / "trained_hf")
    # The export writes back the source's image tokens and bidirectional images (the run trained from model.hf
    # records that source in its checkpoints); before, it wrote transformers' defaults (258880, 255999, 258882, None).
    source, exported = (json.loads((d / "config.json").read_text()) for d in (hf, tmp_path / "trained_hf"))
    keys = ("image_token_id", "boi_token_id", "eoi_token_id")
    assert [exported[k] for k in keys] == [source[k] for k in keys] and exported["image_token_id"] < 64, exported
    assert exported["text_config"]["use_bidirectional_attention"] == "vision" == source["text_config"][
        "use_bidirectional_attention"]
    _assert_generate_from_run_equals_its_export(tmp_path / "trained", tmp_path / "trained_hf", processor_dir,
                                                tmp_path / names[0])

    # The packed run's rows (the one-process layout it trains on): each step's four records two to a row.
    packing = load_run_config(tmp_path / "trained" / "run_config.yaml", ["data.packing=true"])
    steps = build_step_data(packing, build_model_config(packing))
    assert [[(type(mb).__name__, mb.records.batch_size, mb.batch_size) for mb, _ in steps.microbatches(s)]
            for s in range(2)] == [[("PackedBatch", 4, 2)]] * 2
    # Steps 1-2 run on the same weights (step 1's lr is 0): at this learning rate (1e-2, for a visible decrease in 8
    # steps) fp32 reduction-order differences grow after the updates (4.0e-5 packed, 6.9e-5 at TP = 2 by step 8), so
    # the runs are compared where the weights are shared (tests/tolerances.py), and run those two steps only (the
    # schedule's length changes no earlier step).
    compared = ("model.overrides={train_vision: true}", "train.steps=2")
    others = {"packed": run("packed", *compared, "data.packing=true")}
    for layout, packed in (("tp", "false"), ("pp", "false"), ("ep", "true"), ("cp", "true")):
        others[f"{layout.upper()} = 2, data.packing={packed}"] = run(
            f"{layout}2", *compared, f"parallel.{layout}=2", f"data.packing={packed}", nproc=2)
    for name, rows in others.items():
        assert [r["consumed_tokens"] for r in rows] == [r["consumed_tokens"] for r in trained[:2]], name
        assert_steps_close(metrics(rows), metrics(trained)[:2], f"image SFT, {name} vs one process unpacked",
                           shared_weight_steps=2)

    # The byte tokenizer has no image processor: one line naming the file and line, exit 1.
    done = _cli("examples/pretrain_bdgemma.py", "--config", "examples/configs/tiny_sft.yaml", f"data.paths=[{chats}]",
                f"checkpoint.save={tmp_path / 'byte'}")
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith(
        f"error: {chats}:1: the record has 1 image part(s) but the tokenizer (data.tokenizer) has no image processor"), \
        done.stderr[-2000:]


def _assert_exported_tower_is_trained(source_dir: Path, checkpoint: Path, exported_dir: Path) -> None:
    """The export of a run that trained the tower holds the source's vision tensors (names, shapes, dtypes), each
    with a trained value: none is the source's (all 16 have gradients here)."""
    from safetensors.torch import load_file

    from megatron_bdgemma.conversion.hf_export import convert_megatron_to_hf
    from tests import hf_models

    convert_megatron_to_hf(checkpoint, exported_dir, dtype=torch.float32, log=lambda _: None)
    source, exported = ({name: t for f in sorted(d.glob("*.safetensors")) for name, t in hf_models.vision_tensors(
        load_file(f)).items()} for d in (source_dir, exported_dir))
    assert {n: (t.shape, t.dtype) for n, t in exported.items()} == {n: (t.shape, t.dtype) for n, t in source.items()}
    unchanged = [name for name, t in exported.items() if hf_models.same_bytes(t, source[name])]
    assert len(exported) == 16 and not unchanged, unchanged


def _assert_generate_from_run_equals_its_export(checkpoint: Path, exported_dir: Path, processor: Path,
                                               image: Path) -> None:
    """The export holds the run's tokenizer and image processor files (data.tokenizer's, byte for byte), and
    `tools/generate.py --load RUN --chat --image` (the run's own tokenizer and image processor, from its stored run
    config) prints the tokens that `--hf` on the export alone prints, same seed: the checkpoint's tower, image token
    and processor reach generation (tests/test_generate_images.py holds `--hf` to HF's `generate`)."""
    from megatron_bdgemma.conversion.hf_export import TOKENIZER_FILES
    from tests.test_generate_images import _run

    written = sorted(name for name in TOKENIZER_FILES if (exported_dir / name).is_file())
    assert written == sorted(name for name in TOKENIZER_FILES if (processor / name).is_file()) and \
        "preprocessor_config.json" in written, written
    assert all((exported_dir / name).read_bytes() == (processor / name).read_bytes() for name in written)
    common = ("--chat", "--image", str(image), "--prompt", "what is in this picture", "--sampler",
              "entropy_bound:max_denoising_steps=6", "--max-new-tokens", "8", "--seed", "7")
    printed = []
    for source in (("--load", str(checkpoint)), ("--hf", str(exported_dir))):
        done = _run(*source, *common)
        assert done.returncode == 0, (source, done.stderr[-3000:])
        printed.append([line for line in done.stdout.splitlines() if not line.startswith("generated tokens: ")])
        assert done.stdout.splitlines()[-1].startswith("generated tokens: "), done.stdout
    assert printed[0] == printed[1] and len(printed[0]) >= 2 and printed[0][1].strip(), printed


def test_packed_image_records_equal_records_alone(processor_dir, tmp_path, model_parallel):
    """Packing image records (docs/design.md §13, §9), at the model level on the tiny vision model: six chats (one
    and two images, text only, an AR-only one with an image) from `SFTDataset` / `sft_collate`, packed two to a row
    of 200 by first-fit decreasing.

    - `DiffusionBatch.select` takes exactly the chosen rows' images, in their order (what collating those records
      gives), and none for a text record; the packed rows hold each row's records' images, record after record, and
      their token types at each record's offset;
    - brute force: the packed encoder mask the model builds (sliding and full layers) is the rule written here from
      §13 and HF's vision rule, each image known by its own `boi` (not by the token types the mask reads): no weight
      crosses a record, an image's tokens see the whole image and nothing of the other record's images; the canvas
      mask is §13's;
    - `training_forward` with the tower trained: every packed record's encoder and canvas logits equal the record
      alone (one per row) to 1e-5 of the largest |logit|, both losses to 1e-5 relative, every gradient (the tower's
      too) to 1e-5 of its largest entry (`tests.test_packing.assert_packed_equals_alone`)."""
    import megatron_bdgemma
    from tests.test_packing import _packed, _ref_canvas, _ref_encoder, assert_packed_equals_alone

    tok = HFTokenizer(processor_dir)
    names = write_images(tmp_path, 5, seed=1)
    question = {"role": "user", "content": [{"type": "image", "path": names[4]}, {"type": "text", "text": "what"}]}
    chats = [image_chat(names[:1], "a red square"), image_chat(names[1:3], "two shapes left right"),
             {"messages": [{"role": "user", "content": "what is in this"},
                           {"role": "assistant", "content": "a blue circle"}]},
             image_chat(names[3:4], "a blue circle right"), {"messages": [question]},  # AR only
             image_chat([names[4], names[0]], "red")]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chats))
    data = SFTDataset(path, tok, max_length=200, block_size=4)
    samples = [data[i] for i in range(len(data))]
    records, _ = sft_collate(samples, block_size=4, eos_id=tok.eod, pad_id=tok.pad)

    def collated(indices):
        return sft_collate([samples[i] for i in indices], block_size=4, eos_id=tok.eod, pad_id=tok.pad)[0].images

    chosen, alone = records.select([5, 2, 0]).images, collated([5, 2, 0])
    for name in ("pixel_values", "image_position_ids", "image_rows"):
        assert torch.equal(getattr(chosen, name), getattr(alone, name)), name
    assert torch.equal(chosen.mm_token_type_ids[:, : alone.mm_token_type_ids.shape[1]], alone.mm_token_type_ids)
    assert chosen.image_rows.tolist() == [0, 0, 2] and records.select([2]).images is None

    batch, canvas, noised = _packed(records, "one_block", row=200, vocab_size=96)
    rows = [sorted((batch.record_rows == b).nonzero().flatten().tolist(), key=lambda i: int(batch.record_starts[i]))
            for b in range(batch.batch_size)]
    assert rows == [[1, 4], [5, 2], [0, 3]], rows  # lengths 138 + 62, 137 + 17, 84 + 76: every row mixes kinds
    for b, row in enumerate(rows):
        own = collated(row)
        mine = batch.images.image_rows == b
        assert torch.equal(batch.images.pixel_values[mine], own.pixel_values)
        assert torch.equal(batch.images.image_position_ids[mine], own.image_position_ids)
        # Each record's token types over its laid-out length (the EOS fill is text), then the row's padding.
        lengths = records.encoder_valid.sum(dim=1)
        types = sum((records.images.mm_token_type_ids[i, : int(lengths[i])].tolist() for i in row), [])
        assert batch.images.mm_token_type_ids[b].tolist() == types + [0] * (batch.seq_len - len(types))

    # Brute force: the image of each placeholder, numbered along the row by the `boi` that opens it.
    placeholder = batch.input_ids == tok.images.image_token_id
    image_ids = torch.where(placeholder, (batch.input_ids == tok.images.boi_token_id).cumsum(dim=1) - 1, -1)
    model = megatron_bdgemma.from_hf(save_vision_model(tok, tmp_path / "hf"), train_vision=True)
    inputs = model.training_layout(batch, canvas, batch.images)
    for layer_type, encoder in inputs.encoder_mask.items():
        window = model.config.window_of(layer_type)
        dense, expected = encoder.dense()[:, 0], _ref_encoder(batch, window, image_ids)
        assert torch.equal(dense, expected), (layer_type, (dense != expected).nonzero()[:5].tolist())
        real = batch.encoder_valid[:, :, None] & batch.encoder_valid[:, None, :]
        assert not (dense & real & (batch.segment_ids[:, :, None] != batch.segment_ids[:, None, :])).any()
        causal = torch.ones(batch.seq_len, batch.seq_len, dtype=torch.bool).tril()
        assert (dense & ~causal).any(), f"{layer_type}: no image token sees a later one"
        assert torch.equal(inputs.canvas_mask[layer_type].dense()[:, 0], _ref_canvas(batch, canvas, window))

    alone_model = megatron_bdgemma.from_hf(tmp_path / "hf", train_vision=True)
    alone = alone_model.training_forward(records, noised, images=records.images)
    (alone.diffusion_loss_sum + alone.ar_loss_sum).backward()
    packed = model.training_forward(batch, canvas, images=batch.images)
    (packed.diffusion_loss_sum + packed.ar_loss_sum).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision.parameters())
    worst = assert_packed_equals_alone(records, batch, canvas, noised, packed, alone, model, alone_model)
    print(f"packed image records vs alone: worst relative logit difference {worst:.1e}")
