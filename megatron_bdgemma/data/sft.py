"""SFT data: chat JSONL → token rows with a supervised mask → the block-diffusion SFT layout.

Input: one record per line, ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``,
any number of turns in any order. The rules are NeMo Automodel's DiffusionGemma recipe (docs/design.md §7):

- The conversation is tokenised whole by the tokenizer's chat template; the **supervised** tokens are what the
  template's ``{% generation %}`` spans mark (:meth:`~megatron_bdgemma.data.tokenizer.Tokenizer.tokenize_chat`,
  Hugging Face's ``return_assistant_tokens_mask``): every assistant turn with its end of turn (the reference's
  template includes the newline after ``<turn|>``). A Hugging Face template without those tags is refused with a
  clear error. The byte tokenizer (the embedded default) has its own fixed format: each assistant turn's bytes
  plus EOS are supervised.
- The prompt is everything before the first supervised token; the layout
  (:func:`~megatron_bdgemma.diffusion.layout.build_sft_batch`) supervises every assistant turn, keeps the turns
  between them clean and unscored, and adds the EOS block fill after the last valid token.
- ``mask_history=True`` (``data.mask_history``) is NeMo Automodel's ``ChatDataset(mask_history=True)``, which its
  DiffusionGemma recipe sets: only the **last contiguous run** of supervised tokens is kept, i.e. the final assistant
  turn with its end of turn exactly as the template marks it (with Automodel's template, consecutive assistant
  messages render as one model turn and stay together; the byte format separates them by a header). The earlier
  assistant turns become clean prompt context, so the response window starts at the final turn; turns after it (a
  record ending with a user turn) stay in the window, clean and unscored. A single-turn record is unchanged, and so
  is a record without an assistant turn (AR loss only). The run is taken after the cut of ``truncation`` (Automodel
  truncates in the tokenizer first): when the cut removes the final turn, the last turn it leaves is supervised.
  The AR loss keeps its rule: every valid pair, the history included (only the EOS fill, counted from the window's
  start, can change length).
- A record with no supervised token (no assistant turn) trains the AR loss only; :attr:`SFTDataset.ar_only` counts
  them.
- A record whose laid-out length (prompt, the history too under ``mask_history``, + the window rounded up to whole
  blocks) exceeds ``max_length`` is refused or skipped (``on_bad``), or with ``truncation=True`` cut at
  ``max_length`` as the reference does (the collate then cuts the EOS fill there too, which can leave a partial last
  block; :attr:`SFTDataset.truncated` counts them). Refusing is the default: a cut answer is trained without its
  end, which should be a choice.

- A user turn's content may be a list of text and image parts (``{"type": "image", "path": ...}``, relative to the
  JSONL file): with an HF tokenizer directory that has an image processor (:class:`~megatron_bdgemma.data.tokenizer.
  ImageProcessing`) each image becomes its placeholders, never supervised, never an AR target and never in a
  response window; the record carries its images and :func:`sft_collate` gives the batch's ``vision.Images``
  (``DiffusionBatch.images``). docs/design.md §9.

The whole file is tokenised in memory when the dataset is built (on every rank); that suits up to a few hundred
thousand records.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import numpy as np
import torch
from torch import Tensor

from megatron_bdgemma.data import BadRecords, OnBad
from megatron_bdgemma.data.tokenizer import Tokenizer
from megatron_bdgemma.diffusion.layout import DiffusionBatch, build_sft_batch, response_windows
from megatron_bdgemma.vision import Images

__all__ = ["ROLES", "ChatExample", "ChatRecordError", "SFTSample", "SFTDataset", "encode_chat", "sft_collate"]

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class ChatExample:
    """One tokenised record."""

    input_ids: np.ndarray
    """``[L]`` int32: the whole conversation."""
    supervised: np.ndarray
    """``[L]`` bool: the tokens the chat template marks as generated (all False: an AR-only row)."""
    truncated: bool = False
    """Cut at ``max_length`` (``truncation=True``)."""
    images: dict[str, Any] | None = None
    """The record's images as the processor gives them (``pixel_values`` ``[N, patches, 3·patch²]``,
    ``image_position_ids`` ``[N, patches, 2]``, ``mm_token_type_ids`` ``[L]``) and ``image_tokens`` ``[L]`` (its
    image tokens, placeholders and their begin/end), or None: a text record."""


class SFTSample(TypedDict):
    input_ids: Tensor
    """``[L]`` int64: the conversation."""
    loss_mask: Tensor
    """``[L]`` bool: the supervised tokens."""
    sample_index: int
    """Index of the example in the dataset: the key of its noise."""
    images: NotRequired[dict[str, Tensor]]
    """The record's images (:attr:`ChatExample.images`), when it has some."""


class ChatRecordError(ValueError):
    """A chat record that breaks a rule of the module docstring; ``reason`` is its tally key in ``BadRecords``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def encode_chat(record: Any, tokenizer: Tokenizer, *, max_length: int, block_size: int,
                truncation: bool = False, mask_history: bool = False, base_dir: Path = Path(".")) -> ChatExample:
    """Tokenise one chat record (already parsed from JSON) with its supervised mask.

    Args:
        record: ``{"messages": [...]}``.
        tokenizer: supplies :meth:`~megatron_bdgemma.data.tokenizer.Tokenizer.tokenize_chat`.
        max_length: the longest allowed ``prompt + roundup(window, block_size)`` (``data.seq_length``).
        block_size: canvas block length (for the EOS fill in the length budget).
        truncation: cut an over-long record at ``max_length`` instead of refusing it.
        mask_history: supervise only the final assistant turn (the module docstring).
        base_dir: what image parts' paths are relative to (the JSONL file's directory).

    Returns:
        A :class:`ChatExample`.

    Raises:
        ChatRecordError: the record breaks a rule of the module docstring.
    """
    messages, image_paths = _messages(record, base_dir)
    if image_paths and tokenizer.images is None:
        raise ChatRecordError("images_unsupported", f"the record has {len(image_paths)} image part(s) but the tokenizer "
                                                    "(data.tokenizer) has no image processor; give the model's HF "
                                                    "processor directory")
    if tokenizer.images is None:  # a text tokenizer takes a user turn's text parts as one string
        messages = [{**m, "content": "".join(p["text"] for p in m["content"])} if isinstance(m["content"], list)
                    else m for m in messages]
    ids, supervised = tokenizer.tokenize_chat(messages)
    if len(ids) != len(supervised):  # a tokenizer contract, not a data problem
        raise ValueError(f"tokenize_chat gave {len(ids)} ids but {len(supervised)} mask entries")
    images = None
    if image_paths:
        ids, supervised, images = tokenizer.images.expand(ids, supervised, image_paths)
    keep = _last_run if mask_history else list
    kept = keep(supervised)  # the length check lays out what is trained
    first = kept.index(True) if any(kept) else None
    if images is not None and first is not None and any(images["mm_token_type_ids"][first:]):
        # The response window (canvas) is text: an image there would be noised as tokens, not seen.
        raise ChatRecordError("image_in_response", "an image part comes after the first supervised token (in the "
                                                   "response window); images go in the prompt's user turns")
    laid_out = len(ids) if first is None else first + -(-(len(ids) - first) // block_size) * block_size
    truncated = laid_out > max_length
    if truncated and not truncation:
        where = "tokens" if first is None else f"positions with the EOS block fill (block {block_size})"
        raise ChatRecordError("too_long", f"the conversation takes {laid_out} {where}, over max_length {max_length} "
                              "(data.seq_length); data.truncation=true cuts it there instead")
    if images is not None and len(ids) > max_length and (first is None or first > max_length):
        raise ChatRecordError("too_long", f"the conversation takes {len(ids)} tokens, over max_length {max_length} "
                                          "(data.seq_length), and a cut there could split an image")
    ids, supervised = ids[:max_length], keep(supervised[:max_length])  # cut first, then the last run (Automodel)
    if images is not None:
        images["mm_token_type_ids"] = np.asarray(images["mm_token_type_ids"][:max_length], dtype=np.int64)
        images["image_tokens"] = np.asarray(images["image_tokens"][:max_length], dtype=bool)
    return ChatExample(np.asarray(ids, dtype=np.int32), np.asarray(supervised, dtype=bool), truncated, images)


class SFTDataset(torch.utils.data.Dataset):
    """A chat JSONL file, tokenised when constructed (see the module docstring).

    Args:
        path: the JSONL file.
        tokenizer: with a chat template.
        max_length: see :func:`encode_chat`.
        block_size: canvas block length.
        on_bad: ``"error"`` raises :class:`~megatron_bdgemma.data.BadDataError` naming ``path:line`` at the first
            bad record; ``"skip"`` drops bad records and counts them in :attr:`bad` (``bad.summary()``).
        truncation: cut over-long records at ``max_length`` (see :func:`encode_chat`).
        mask_history: supervise only each record's final assistant turn (see :func:`encode_chat`).

    Raises:
        BadDataError: a bad record under ``on_bad="error"``.
        ValueError: no usable record at all.
    """

    def __init__(self, path: str | Path, tokenizer: Tokenizer, *, max_length: int, block_size: int,
                 on_bad: OnBad = "error", truncation: bool = False, mask_history: bool = False) -> None:
        self.path = Path(path)
        self.bad = BadRecords(on_bad, skip_setting="data.on_bad=skip")
        self.examples: list[ChatExample] = []
        with self.path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue  # blank lines separate nothing in JSONL; not a record
                location = f"{self.path}:{lineno}"
                try:
                    try:
                        record = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError) as err:
                        raise ChatRecordError("invalid_json", f"invalid JSON ({err})") from None
                    self.examples.append(encode_chat(record, tokenizer, max_length=max_length, block_size=block_size,
                                                     truncation=truncation, mask_history=mask_history,
                                                     base_dir=self.path.parent))
                except ChatRecordError as bad:
                    self.bad.report(bad.reason, location, bad.detail)
        if not self.examples:
            raise ValueError(f"{self.path} has no usable chat record ({self.bad.summary()})")
        self.ar_only = sum(not e.supervised.any() for e in self.examples)  # no supervised token: AR loss only
        self.truncated = sum(e.truncated for e in self.examples)  # cut at max_length
        self.with_images = sum(e.images is not None for e in self.examples)

    def summary(self) -> str:
        """One line for the logs: examples, AR-only and truncated counts, skipped records."""
        return (f"{len(self)} SFT examples from {self.path}: {self.ar_only} without a supervised token (AR loss "
                f"only), {self.truncated} truncated at max_length; {self.bad.summary()}")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> SFTSample:
        example = self.examples[index]
        sample = SFTSample(input_ids=torch.from_numpy(example.input_ids).long(),
                           loss_mask=torch.from_numpy(example.supervised), sample_index=int(index))
        if example.images is not None:
            sample["images"] = {name: torch.as_tensor(value) for name, value in example.images.items()}
        return sample


def sft_collate(samples: Sequence[SFTSample], *, block_size: int, eos_id: int, pad_id: int,
                seq_multiple_of: int = 1, max_len: int | None = None) -> tuple[DiffusionBatch, Tensor]:
    """Right-pad SFT samples and lay them out with the EOS block fill (:func:`build_sft_batch`).

    Args:
        samples: ``B`` samples.
        block_size: canvas block length.
        eos_id: the EOS fill id.
        pad_id: global padding id.
        seq_multiple_of: round ``S`` up to a multiple of this (e.g. 16 for FP8 kernels).
        max_len: cap on ``S`` (``data.seq_length``): an EOS fill past it is cut (truncated records).

    Returns:
        ``(batch, sample_indices)``: a :class:`DiffusionBatch` and the ``[B]`` int64 sample indices.
    """
    lengths = torch.tensor([len(s["input_ids"]) for s in samples], dtype=torch.long)  # [B]
    ids = torch.full((len(samples), int(lengths.max())), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(ids.shape, dtype=torch.bool)
    for row, sample in enumerate(samples):
        ids[row, : len(sample["input_ids"])] = sample["input_ids"]
        loss_mask[row, : len(sample["loss_mask"])] = sample["loss_mask"]
    valid = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
    batch = build_sft_batch(ids, loss_mask, valid, block_size=block_size, eos_id=eos_id, pad_id=pad_id,
                            seq_multiple_of=seq_multiple_of, max_len=max_len)
    if any("images" in s for s in samples):
        # Image tokens are inputs, never targets: no AR pair predicts one (the diffusion loss never sees them, they
        # lie in the prompt).
        targets = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
        for row, sample in enumerate(samples):
            if "images" in sample:
                tokens = sample["images"]["image_tokens"][1: batch.seq_len + 1]
                targets[row, : len(tokens)] = tokens
        batch = dataclasses.replace(batch, ar_loss_mask=batch.ar_loss_mask & ~targets,
                                    ar_labels=batch.ar_labels.masked_fill(targets, pad_id),
                                    images=_collate_images(samples, batch.seq_len))
    return batch, torch.tensor([s["sample_index"] for s in samples], dtype=torch.long)


def laid_out_tokens(sample: SFTSample, *, block_size: int, max_len: int) -> int:
    """The encoder tokens `sft_collate` gives `sample` (content and EOS block fill, cut at `max_len`), without laying
    it out: packed SFT deals a step's chats to the data-parallel ranks by it (`training.data.deal_by_size`)."""
    length = min(len(sample["input_ids"]), max_len)
    supervised = torch.as_tensor(sample["loss_mask"][:length], dtype=torch.bool)[None]
    _, _, ends = response_windows(torch.tensor([length]), supervised, block_size)
    return min(int(ends[0]), max_len)


def _collate_images(samples: Sequence[SFTSample], width: int) -> Images:
    """The batch's images in the order of their placeholders, row after row: every image's patches padded to the
    batch's most (zero pixels at position (-1, -1), as the processor pads), the token types laid out as the rows."""
    images = [s["images"] for s in samples if "images" in s]
    rows = [row for row, s in enumerate(samples) if "images" in s for _ in range(len(s["images"]["pixel_values"]))]
    patches = max(i["pixel_values"].shape[1] for i in images)
    pixels, positions = [], []
    for i in images:
        pad = patches - i["pixel_values"].shape[1]
        pixels.append(torch.nn.functional.pad(i["pixel_values"], (0, 0, 0, pad)))
        positions.append(torch.nn.functional.pad(i["image_position_ids"], (0, 0, 0, pad), value=-1))
    types = torch.zeros(len(samples), width, dtype=torch.long)
    for row, sample in enumerate(samples):
        if "images" in sample:
            row_types = sample["images"]["mm_token_type_ids"][:width]
            types[row, : len(row_types)] = row_types
    return Images(torch.cat(pixels), torch.cat(positions), types, torch.tensor(rows, dtype=torch.long))


def _last_run(supervised: list[bool]) -> list[bool]:
    """``supervised`` with every token before its last contiguous run of True cleared (Automodel's ``mask_history``:
    each assistant turn renders as one run)."""
    end = len(supervised)
    while end and not supervised[end - 1]:
        end -= 1
    start = end
    while start and supervised[start - 1]:
        start -= 1
    return [False] * start + supervised[start:]


def _messages(record: Any, base_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Validate the record's shape; return its messages as plain dicts and its image paths (resolved against
    ``base_dir``, in the order of their parts)."""
    if not isinstance(record, Mapping) or not isinstance(record.get("messages"), list):
        raise ChatRecordError("invalid_record", 'the record is not an object with a "messages" list')
    messages, images = [], []
    for i, message in enumerate(record["messages"]):
        if not isinstance(message, Mapping) or message.get("role") not in ROLES:
            raise ChatRecordError("invalid_record",
                                  f"message {i} is not {{'role': one of {ROLES}, 'content': ...}}: {str(message)[:80]}")
        content = message.get("content")
        if isinstance(content, list) and message["role"] == "user":
            parts = [_part(i, part, base_dir, images) for part in content]
            texts = [part["text"] for part in parts if part["type"] == "text"]
        elif isinstance(content, str):
            parts, texts = content, [content]
        else:
            raise ChatRecordError("invalid_record", f"message {i} content is not a string (or, in a user turn, a list "
                                                    f"of text and image parts): {str(message)[:80]}")
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:  # JSON's \ud800 escapes decode to lone surrogates no tokenizer takes
                raise ChatRecordError("invalid_text", f"message {i} content is not valid Unicode ({error.reason} at "
                                                      f"character {error.start})") from None
        messages.append({"role": message["role"], "content": parts})
    if not messages:
        raise ChatRecordError("invalid_record", "the record has no messages")
    return messages, images


def _part(i: int, part: Any, base_dir: Path, images: list[str]) -> dict[str, str]:
    """One part of a user turn's content list, checked; an image's path resolved and appended to ``images``."""
    if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if isinstance(part, Mapping) and part.get("type") == "image" and isinstance(part.get("path"), str):
        path = base_dir / part["path"]
        if not path.is_file():
            raise ChatRecordError("missing_image", f"message {i}: image {str(path)!r} is not a file")
        images.append(str(path))
        return {"type": "image", "path": str(path)}
    raise ChatRecordError("invalid_record", f"message {i} has a part that is neither {{'type': 'text', 'text': str}} "
                                            f"nor {{'type': 'image', 'path': str}}: {str(part)[:80]}")
