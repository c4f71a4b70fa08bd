"""tools/generate.py --image: images in a chat prompt's user turn give HF `generate`'s tokens; bad input is named.

Oracle: transformers' `DiffusionGemmaForBlockDiffusion.generate` on the inputs transformers' own `Gemma4Processor`
makes of the same chat text and images (tests/test_image_sft.py's tiny local processor: a word-level tokenizer with
Gemma 4's image tokens and a Gemma 4 image processor), under the same seed. The tiny model's vocabulary is the
tokenizer's, so every generated id decodes to a word of its own and the printed text is the tokens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import hf_models
from tests.test_image_sft import _oracle_processor, build_processor_dir, write_images

TOOL = Path(__file__).resolve().parent.parent / "tools" / "generate.py"
PROMPT = "what is in this picture"
SEED, STEPS, NEW = 7, 6, 8


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], text=True, capture_output=True, timeout=300,
                          env=os.environ | {"PYTHONPATH": str(TOOL.parents[1]), "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("generate_images")
    processor = build_processor_dir(root / "processor")
    tok = AutoTokenizer.from_pretrained(processor)
    ids = dict(image_token_id=tok.image_token_id, boi_token_id=tok.convert_tokens_to_ids(tok.boi_token),
               eoi_token_id=tok.convert_tokens_to_ids(tok.eoi_token))
    hf = hf_models.diffusion_gemma(dict(vocab_size=len(tok), use_bidirectional_attention="vision"), **ids)
    images = [root / name for name in write_images(root, 2)]
    return hf, hf_models.save(hf, root / "hf"), processor, images


def _hf_tokens(hf, processor: Path, images: list[Path], blank: bool = False) -> list[int]:
    """HF `generate`'s new tokens for the chat prompt with `images` (`blank`: their pixels zeroed)."""
    from PIL import Image

    oracle = _oracle_processor(processor)
    parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": PROMPT}]
    text = oracle.tokenizer.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                                add_generation_prompt=True)
    inputs = oracle(text=[text], images=[[Image.open(p).convert("RGB") for p in images]], return_tensors="pt",
                    add_special_tokens=False)
    pixels = inputs["pixel_values"] * (0 if blank else 1)
    hf.set_attn_implementation("sdpa")  # what our generation's decode runs, as tests/test_generation.py does
    try:
        torch.manual_seed(SEED)
        out = hf.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=NEW,
                          pad_token_id=0, eos_token_id=1, max_denoising_steps=STEPS, pixel_values=pixels,
                          image_position_ids=inputs["image_position_ids"],
                          mm_token_type_ids=inputs["mm_token_type_ids"]).sequences
    finally:
        hf.set_attn_implementation("eager")
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_generate_with_images_prints_hf_generate_tokens(setup):
    """Two images, in order, and a chat prompt through the CLI: exit 0, the text printed is the decode of HF
    `generate`'s tokens (pad dropped), and those tokens depend on the pixels (zeroed pixels give others)."""
    from transformers import AutoTokenizer

    hf, path, processor, images = setup
    done = _run("--hf", str(path), "--tokenizer", str(processor), "--chat", "--image", str(images[0]), "--image",
                str(images[1]), "--prompt", PROMPT, "--sampler", f"entropy_bound:max_denoising_steps={STEPS}",
                "--max-new-tokens", str(NEW), "--seed", str(SEED), "--eos-token-id", "1", "--pad-token-id", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    expected = _hf_tokens(hf, processor, images)
    tok = AutoTokenizer.from_pretrained(processor)
    assert lines[0] == f"=== prompt 0: {PROMPT!r}" and lines[-1].startswith("generated tokens: ")
    # Word-level: the printed words are the tokens, one each (8 of them, a canvas of 4 twice).
    assert tok.convert_tokens_to_ids(lines[1].split()) == [t for t in expected if t != 0], (lines, expected)
    assert lines[1] == tok.decode([t for t in expected if t != 0])
    assert int(lines[-1].split()[2]) == sum(t != 0 for t in expected)
    assert _hf_tokens(hf, processor, images, blank=True) != expected  # the images matter


def test_generate_image_errors_are_one_line(setup, tmp_path, capsys, model_parallel):
    """A missing image file (through the CLI: the last line and exit 1, before the model loads), an unreadable one,
    `--image` without `--chat` or with several prompts, a model without a vision tower and a tokenizer directory
    without an image processor: each one line `error: ...` naming the flag and the path, exit 1."""
    from tests.test_generation import generate_tool

    _, path, processor, images = setup
    missing = tmp_path / "nope.png"
    done = _run("--hf", str(path), "--tokenizer", str(processor), "--chat", "--image", str(missing), "--prompt", PROMPT)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == f"error: --image {missing} is not a file", \
        done.stderr[-2000:]

    tool = generate_tool()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    text_only = hf_models.save(hf_models.gemma4_causal_lm(), tmp_path / "text_only")
    no_processor = tmp_path / "tokenizer_only"
    shutil.copytree(processor, no_processor)
    (no_processor / "preprocessor_config.json").unlink()
    base = ["--chat", "--prompt", PROMPT, "--max-new-tokens", "4"]
    cases = {
        f"--image {broken} is not a readable image: cannot identify image file": [
            "--hf", str(path), "--tokenizer", str(processor), *base, "--image", str(broken)],
        "--image places the images in the chat template's user turn: add --chat": [
            "--hf", str(path), "--tokenizer", str(processor), "--prompt", PROMPT, "--image", str(images[0])],
        "--image goes with one --prompt (the user turn it is shown in), got 2 prompts": [
            "--hf", str(path), "--tokenizer", str(processor), *base, "--prompt", "a", "--image", str(images[0])],
        f"--image: the model (--hf {text_only}) has no vision tower (its config has no vision_config)": [
            "--hf", str(text_only), "--tokenizer", str(processor), *base, "--image", str(images[0])],
        f"--image needs the model's image processor, but the tokenizer directory {no_processor} has none": [
            "--hf", str(path), "--tokenizer", str(no_processor), *base, "--image", str(images[0])],
    }
    for message, args in cases.items():
        assert tool.main(args) == 1, message
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: {message}"), (message, err)
