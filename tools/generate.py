"""Generate text with a block-diffusion Gemma model (or its AR baseline) from an HF or Megatron checkpoint.

    python tools/generate.py --hf /path/to/diffusiongemma --prompt "Why is the sky blue?" --chat
    python tools/generate.py --hf DIR --prompt "5 17 42" --sampler max_prob_threshold:threshold=0.8,top_k=50
    python tools/generate.py --hf DIR --chat --image cat.png --image dog.png --prompt "What differs?"
    python tools/generate.py --load CKPT --tokenizer TOKDIR --prompt "..." --sampler autoregressive
    python tools/generate.py --load runs/tiny_pretrain --prompt "def "      # the run's own (byte) tokenizer
    torchrun --nproc-per-node 2 tools/generate.py --hf DIR --tp 2 --prompt "..."

`--sampler NAME[:key=value,...]` picks one of `entropy_bound` (DiffusionGemma's default), `max_prob_threshold`,
`greedy` or `autoregressive`; see `megatron_bdgemma.generation.samplers` for the options. Several `--prompt`s run
as one left-padded batch. The tokenizer is `--tokenizer`, else the `--hf` directory's, else for `--load` the one the
checkpoint's model was trained with (a run's `data.tokenizer`, `byte` or a tokenizer directory on this machine, with
its `data.chat_template`; a converted checkpoint's HF source directory); without one, prompts are whitespace-separated
token ids and the output is printed as ids. EOS / pad ids come from
`--eos-token-id` / `--pad-token-id`, else the checkpoint's `generation_config.json`, else the run's tokenizer, else
the model config. Every rank of a TP group
runs the same loop with the same seed (lock-step); rank 0 prints.

`--image PATH` (repeat for several, in order) puts images in the user turn of a `--chat` prompt, before its text, as
the SFT data places image parts (`megatron_bdgemma.data.sft`): the chat template renders each as the image token,
which the tokenizer directory's image processor (`preprocessor_config.json`) and Gemma 4's placeholder rule turn into
`boi`, one placeholder per soft token, `eoi` (`data.tokenizer.ImageProcessing`); the prompt's KV-cached prefill runs
the model's vision tower on them (`generate(..., pixel_values=...)`), as HF's `generate` does. One `--prompt` then.

While it runs, rank 0 prints a progress line per canvas on stderr (`canvas 3/8: 96 tokens, 0.67 tokens per forward,
41.2 tokens/s`, counted over all prompts; the AR baseline: one per canvas length of tokens); `--stream` prints the
text on stdout as its blocks commit, the same text the run ends with. An error is one line `error: <message>`, exit 1
(`BDGEMMA_TRACEBACK=1` adds the traceback).
"""

from __future__ import annotations

import os

# Set before torch loads oneDNN: every step of a growing KV cache (one position per AR token) brings new matmul
# shapes, and oneDNN's default cache of 1024 primitives thrashes on CPU, costing up to 20x per AR step.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "65536")

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Light: torch, megatron-core and transformers load in main, after the arguments are parsed (`--help` at once).
from megatron_bdgemma.runtime.cli import entry_point

if TYPE_CHECKING:
    from torch import Tensor

    from megatron_bdgemma.data.tokenizer import ImageProcessing


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", type=Path, help="local HF DiffusionGemma (or Gemma 4 MoE) directory")
    source.add_argument("--load", type=Path, help="Megatron checkpoint directory (megatron_bdgemma.checkpointing)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    parser.add_argument("--sampler", default="entropy_bound", help="NAME[:key=value,...] (default: entropy_bound)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--tokenizer", type=Path, help="HF tokenizer directory (default: the --hf directory)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    parser.add_argument("--image", action="append", type=Path, default=[],
                        help="an image for the prompt's user turn (with --chat and one --prompt); repeat for several, "
                             "in order")
    parser.add_argument("--eos-token-id", type=int, nargs="+", help="end-of-sequence ids")
    parser.add_argument("--pad-token-id", type=int, help="pad id written after EOS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (launch with torchrun)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads per process (default: OMP_NUM_THREADS, else 1; see load_model)")
    parser.add_argument("--stream", action="store_true",
                        help="print the text as its blocks commit (one prompt: inline; several: a line per block)")
    parser.add_argument(
        "--compile", action="store_true",
        help="canvas forward under torch.compile (CUDA graphs on GPU); the first two canvases pay the compilation",
    )
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def check_source(args: argparse.Namespace) -> None:
    """Refuse, by name, a `--hf` that is not an HF model directory and a `--load` that is one (each is the other's
    kind of directory more often than anything else)."""
    from megatron_bdgemma.training.run_dir import LATEST

    if args.hf is not None and not (args.hf / "config.json").is_file():
        megatron = [name for name in (LATEST, "metadata.json") if (args.hf / name).is_file()] or (
            [p.name for p in args.hf.glob("iter_*")][:1] if args.hf.is_dir() else [])
        if megatron:
            raise ValueError(f"--hf {args.hf} is a Megatron checkpoint ({megatron[0]}), not a Hugging Face model "
                             f"directory; use --load {args.hf}")
        what = "has no config.json" if args.hf.is_dir() else "does not exist"
        raise ValueError(f"--hf {args.hf} {what}: expected a local Hugging Face model directory")
    if args.load is not None and (args.load / "config.json").is_file() and not (args.load / "metadata.json").is_file():
        raise ValueError(f"--load {args.load} is a Hugging Face model directory (config.json), not a Megatron "
                         f"checkpoint; use --hf {args.load}")


def check_prompts(prompts: Sequence[str]) -> None:
    """A prompt the shell passed in another encoding than UTF-8 arrives with its bytes as lone surrogates (Python's
    surrogateescape); no tokenizer can encode it, so it is named here."""
    for index, prompt in enumerate(prompts):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as error:
            char = prompt[error.start]
            escaped = "\udc80" <= char <= "\udcff"  # surrogateescape's stand-in for the byte ord(char) - 0xDC00
            what = f"byte {bytes([ord(char) - 0xDC00])!r}" if escaped else f"lone surrogate {char!r}"
            raise ValueError(f"--prompt {index + 1} ({prompt!r}) is not valid UTF-8 text: {what} at character "
                             f"{error.start}; pass UTF-8 (check the terminal's or the file's encoding)") from None


def check_images(args: argparse.Namespace) -> None:
    """Refuse, before the model loads, `--image` without the one chat prompt it belongs to, and an image file that
    is missing or that PIL cannot read (named by its path)."""
    if not args.image:
        return
    if len(args.prompt) != 1:
        raise ValueError(f"--image goes with one --prompt (the user turn it is shown in), got "
                         f"{len(args.prompt)} prompts")
    if not args.chat:
        raise ValueError("--image places the images in the chat template's user turn: add --chat")
    from PIL import Image

    for path in args.image:
        if not path.is_file():
            raise ValueError(f"--image {path} is not a file")
        try:
            with Image.open(path) as image:
                image.load()
        except OSError as error:  # PIL's UnidentifiedImageError and a truncated file are OSErrors, as is EACCES
            raise ValueError(f"--image {path} is not a readable image: {error}") from None


def load_model(args: argparse.Namespace) -> Any:
    """The model on this rank's device, from `--hf` or `--load`.

    On CPU one thread unless `--threads` or OMP_NUM_THREADS asks for more (torchrun's default too): a decode is
    hundreds of small ops, and on a machine whose cores other jobs share each op's threads wait for one another;
    on 2 cores shared with other jobs, the tiny run's 256 tokens took 2.1-4.1 s on one thread, 2.2-99 s on two.
    """
    import torch

    from megatron_bdgemma.runtime.distributed import init_distributed

    if args.threads is not None or "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(args.threads or 1)

    init_distributed(tp=args.tp, seed=args.seed)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.hf is not None:
        import megatron_bdgemma

        model = megatron_bdgemma.from_hf(args.hf, dtype=dtype)
    else:
        from megatron_bdgemma.checkpointing import load_model as load_checkpoint

        # Generation runs without sequence parallelism (see generation.generate).
        model = load_checkpoint(args.load, dtype=dtype, sequence_parallel=False)
    if torch.cuda.is_available():
        model = model.cuda()
    return model.eval()


def load_tokenizer(args: argparse.Namespace) -> Any | None:
    """The HF tokenizer of `--tokenizer`, else of the `--hf` directory when it has one, else the tokenizer a
    `--load` checkpoint's run trained with (a `megatron_bdgemma.data.Tokenizer`), else None (token ids)."""
    path = args.tokenizer or args.hf
    if path is None:
        return run_tokenizer(args.load)
    has_tokenizer = any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
    if args.tokenizer is None and not has_tokenizer:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def run_tokenizer(checkpoint: Path) -> Any | None:
    """The tokenizer `checkpoint`'s model was trained with (`checkpoint_tokenizer`: a run's `data.tokenizer` and
    `data.chat_template`, a converted checkpoint's HF source), when this machine has it; else None (token ids). Stderr
    says what is missing."""
    from megatron_bdgemma.conversion.megatron_checkpoint import checkpoint_tokenizer, read_extra
    from megatron_bdgemma.data import load_tokenizer as load_run_tokenizer

    tokenizer = checkpoint_tokenizer(read_extra(checkpoint))
    if tokenizer.spec is None:
        print(f"no tokenizer ({tokenizer.note}): prompts are token ids; --tokenizer DIR gives one", file=sys.stderr)
        return None
    if tokenizer.incomplete:
        print(f"tokenizer: {tokenizer.note}", file=sys.stderr)
    return load_run_tokenizer(tokenizer.spec, tokenizer.chat_template)


def image_inputs(args: argparse.Namespace, model_config: Any, tokenizer: Any | None) -> ImageProcessing:
    """The `ImageProcessing` of the tokenizer that renders the prompt (the run's tokenizer, else the HF tokenizer
    directory's image processor). Refuses a model without a vision tower, a tokenizer without an image processor and
    one whose image token is not the model's placeholder id."""
    from megatron_bdgemma.data import Tokenizer
    from megatron_bdgemma.data.tokenizer import ImageProcessing

    source = f"--hf {args.hf}" if args.hf is not None else f"--load {args.load}"
    if model_config.vision_config is None or model_config.image_token_id is None:
        raise ValueError(f"--image: the model ({source}) has no vision tower (its config has no vision_config); "
                         "images need a DiffusionGemma checkpoint that has one")
    if isinstance(tokenizer, Tokenizer):
        processing = tokenizer.images
        where = f"the run's tokenizer ({getattr(tokenizer, 'path', 'byte')})"
    elif tokenizer is not None:
        directory = args.tokenizer or args.hf
        processing = ImageProcessing.load(directory, tokenizer)
        where = f"the tokenizer directory {directory}"
    else:
        processing, where = None, "no tokenizer (--tokenizer, or an --hf directory with one)"
    if processing is None:
        raise ValueError(f"--image needs the model's image processor, but {where} has none (no "
                         "preprocessor_config.json); give --tokenizer the model's HF processor directory")
    if processing.image_token_id != model_config.image_token_id:
        raise ValueError(f"--image: the tokenizer's image token id {processing.image_token_id} is not the model's "
                         f"image_token_id {model_config.image_token_id}; give the model's own processor directory")
    return processing


def special_ids(args: argparse.Namespace, config: Any, tokenizer: Any | None) -> tuple[list[int], int]:
    """EOS ids and pad id: the flags, else the checkpoint's generation_config.json, else the tokenizer of a
    `--load` checkpoint's run, else the model config."""
    from megatron_bdgemma.data import Tokenizer

    generation: dict[str, Any] = {}
    if args.hf is not None and (args.hf / "generation_config.json").exists():
        generation = json.loads((args.hf / "generation_config.json").read_text())
    if isinstance(tokenizer, Tokenizer):
        # A run's HF tokenizer directory may carry the model's generation_config.json (e.g. Gemma's end-of-turn id).
        path = getattr(tokenizer, "path", None)
        stored = path / "generation_config.json" if path is not None else None
        eos_ids = json.loads(stored.read_text()).get("eos_token_id") if stored and stored.exists() else None
        generation = {"eos_token_id": eos_ids or tokenizer.eos, "pad_token_id": tokenizer.pad}
    eos = args.eos_token_id or generation.get("eos_token_id") or list(config.eos_token_ids)
    pad = args.pad_token_id if args.pad_token_id is not None else generation.get("pad_token_id", config.pad_token_id)
    return ([eos] if isinstance(eos, int) else list(eos)), pad


def tokenize(prompts: Sequence[str], tokenizer: Any | None, chat: bool,
             images: Sequence[Path] = ()) -> list[list[int]]:
    """Each prompt's ids; with `images` (one chat prompt), its user turn holds them as image parts before the text
    (the placeholders are expanded by `ImageProcessing.expand`)."""
    from megatron_bdgemma.data import Tokenizer

    def user_turn(prompt: str) -> list[dict[str, Any]]:
        if not images:
            return [{"role": "user", "content": prompt}]
        parts = [{"type": "image", "path": str(path)} for path in images]
        return [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]

    if isinstance(tokenizer, Tokenizer):  # a training run's tokenizer: its chat template renders text
        if chat:
            prompts = [tokenizer.apply_chat_template(user_turn(p), add_generation_prompt=True) for p in prompts]
        return [tokenizer.encode(p) for p in prompts]
    if tokenizer is None:
        if chat:
            raise ValueError("--chat needs a tokenizer (--tokenizer or an --hf directory with one)")
        try:
            return [[int(token) for token in prompt.split()] for prompt in prompts]
        except ValueError:
            raise ValueError("without a tokenizer, --prompt must be whitespace-separated token ids") from None
    if chat:
        # transformers 5 returns a BatchEncoding here (a mapping: its list is its keys), so the ids are taken by name.
        return [
            list(tokenizer.apply_chat_template(
                user_turn(p), tokenize=True, add_generation_prompt=True, return_dict=True
            )["input_ids"])
            for p in prompts
        ]
    return [tokenizer(p)["input_ids"] for p in prompts]


class TextStream:
    """One row's text, printed as its blocks commit. The text is decoded anew from all the row's tokens each time (a
    block can end inside a character, or before a token that changes how the text before it decodes), and only what
    later tokens cannot change is printed: up to a trailing incomplete character (U+FFFD) or whitespace."""

    _UNSETTLED = re.compile(r"[\s\ufffd]+$")

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.printed = ""

    def add(self, ids: list[int]) -> str:
        """Take a block's tokens → the text to print now."""
        self.ids += ids
        settled = self._UNSETTLED.sub("", self.decode(self.ids))
        if not settled.startswith(self.printed):
            return ""  # a later token rewrote printed text; `finish` prints the whole text again
        new, self.printed = settled[len(self.printed):], settled
        return new

    def finish(self, text: str) -> str:
        """The rest of the final `text` after what was printed (the whole text on a new line, should the printed part
        not be its beginning), so that what was streamed reads as `text`."""
        return text[len(self.printed):] if text.startswith(self.printed) else "\n" + text


def progress_line(label: str, done: int, total: int, tokens: Tensor, forwards: Tensor, seconds: float) -> str:
    """`canvas 3/8: 96 tokens, 0.67 tokens per forward, 41.2 tokens/s`: non-pad tokens so far over all rows, each
    row's tokens over its forwards so far (HF's tokens per forward, mean over rows), tokens per second so far."""
    per_forward = (tokens / forwards.clamp(min=1)).mean().item()
    total_tokens = int(tokens.sum())
    return (f"{label} {done}/{total}: {total_tokens} tokens, {per_forward:.2f} tokens per forward, "
            f"{total_tokens / seconds:.1f} tokens/s")


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from megatron_bdgemma.generation import Autoregressive, generate, left_pad, parse_sampler

    check_prompts(args.prompt)
    check_source(args)
    check_images(args)
    try:
        sampler = parse_sampler(args.sampler)
    except ValueError as error:
        raise ValueError(f"--sampler: {error}") from None
    model = load_model(args)
    tokenizer = load_tokenizer(args)
    eos, pad = special_ids(args, model.config, tokenizer)
    processing = image_inputs(args, model.config, tokenizer) if args.image else None
    prompts = tokenize(args.prompt, tokenizer, args.chat, args.image)
    images: dict[str, Tensor] = {}
    if processing is not None:
        try:
            ids, _, processed = processing.expand(prompts[0], [False] * len(prompts[0]), [str(p) for p in args.image])
        except ValueError as error:  # the chat template has no image part (another count of image tokens)
            raise ValueError(f"--image: {error}") from None
        prompts = [ids]
        images = dict(pixel_values=processed["pixel_values"], image_position_ids=processed["image_position_ids"],
                      mm_token_type_ids=torch.tensor([processed["mm_token_type_ids"]]))
    input_ids, padding_mask = left_pad(prompts, pad)
    is_printer = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

    def show(tokens: Tensor) -> list[str]:
        return [decode([t for t in row.tolist() if t != pad]) for row in tokens]

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))

    # Progress per canvas (an AR run: per canvas_length tokens) on stderr, the streamed text on stdout; rank 0 only.
    autoregressive = isinstance(sampler, Autoregressive)
    length = model.config.canvas_length
    label, total, every = ("token", args.max_new_tokens, length) if autoregressive else (
        "canvas", math.ceil(args.max_new_tokens / length), 1)
    tokens_so_far = torch.zeros(len(args.prompt), dtype=torch.long)
    streams = [TextStream(decode) for _ in args.prompt] if args.stream else []
    inline = len(streams) == 1  # one prompt streams as running text; several, one line per block
    if inline:
        print(f"=== prompt 0: {args.prompt[0]!r}", flush=True)

    def report(index: int, block: Tensor, forwards: Tensor) -> None:
        tokens_so_far.add_((block != pad).sum(dim=1).cpu())
        if streams:
            pieces = [stream.add([t for t in row.tolist() if t != pad]) for stream, row in zip(streams, block)]
            print(pieces[0] if inline else f"[block {index}] " + " | ".join(pieces), end="" if inline else "\n",
                  flush=True)
        if (index + 1) % every == 0 or index + 1 == total:
            line = progress_line(label, index + 1, total, tokens_so_far, forwards.cpu(), time.perf_counter() - start)
            print(line, file=sys.stderr, flush=True)

    # Same seed on every rank: TP ranks draw identical noise and stay in lock-step.
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    start = time.perf_counter()
    output = generate(
        model, input_ids, padding_mask=padding_mask, sampler=sampler, max_new_tokens=args.max_new_tokens,
        eos_token_ids=eos, pad_token_id=pad, generator=generator, on_canvas=report if is_printer else None,
        compile=args.compile, **images,
    )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if is_printer:
        tokens = int((output.generated != pad).sum())
        texts = show(output.generated)
        if inline:
            print(streams[0].finish(texts[0]))
        else:
            for row, text in enumerate(texts):
                print(f"=== prompt {row}: {args.prompt[row]!r}\n{text}")
        per_forward = ", ".join(f"{x:.3f}" for x in output.tokens_per_forward.tolist())
        print(f"sampler: {sampler}")
        print(f"tokens per forward: {per_forward}")
        print(f"generated tokens: {tokens} in {seconds:.3f} s = {tokens / seconds:.1f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
