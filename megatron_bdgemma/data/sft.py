"""SFT data: chat JSONL → (prompt, single supervised answer) examples → the block-diffusion SFT layout.

Input: one record per line, ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``.
Exactly one assistant turn, and it is the last message (DESIGN §7: single supervised turn; the references reject
the rest too). The split follows the tokenizer's chat template, at the text level::

    prompt   = template(messages[:-1], add_generation_prompt=True)      # what generation is given
    full     = template(messages)                                       # must start with `prompt`
    response = full[len(prompt):]                                       # the answer and its end-of-turn

Prompt and response are encoded separately, so the prompt ids are exactly those a generation call encodes. The
response is cut just after its first stop id (EOS, or e.g. Gemma's ``<end_of_turn>``: the trailing newline after
the turn is not supervised, as in the reference template's ``{% generation %}`` span); when it holds none, EOS is
appended. The collate then adds the EOS block fill (:func:`~megatron_bdgemma.diffusion.layout.build_sft_batch`).

Records that break these rules, or whose laid-out length ``prompt + roundup(response, block_size)`` exceeds
``max_length``, raise or are skipped and counted (``on_bad``). Over-long records are **never truncated**: a cut
answer followed by the EOS fill would teach the model to stop mid-answer.

The whole file is tokenised in memory when the dataset is built (on every rank); that suits up to a few hundred
thousand records.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from torch import Tensor

from megatron_bdgemma.data import BadRecords, OnBad
from megatron_bdgemma.data.tokenizer import Tokenizer
from megatron_bdgemma.diffusion.layout import DiffusionBatch, build_sft_batch

__all__ = ["ROLES", "ChatExample", "ChatRecordError", "SFTSample", "SFTDataset", "encode_chat", "sft_collate"]

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class ChatExample:
    """One tokenised record."""

    input_ids: np.ndarray
    """``[L]`` int32: prompt ids then response ids (the response ends with a stop id)."""
    prompt_len: int
    """``p``: the response starts at position ``p``."""


class SFTSample(TypedDict):
    input_ids: Tensor
    """``[L]`` int64: prompt + response."""
    prompt_len: int
    sample_index: int
    """Index of the example in the dataset: the key of its noise."""


class ChatRecordError(ValueError):
    """A chat record that breaks a rule of the module docstring; ``reason`` is its tally key in ``BadRecords``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def encode_chat(record: Any, tokenizer: Tokenizer, *, max_length: int, block_size: int) -> ChatExample:
    """Tokenise one chat record (already parsed from JSON) into prompt + response.

    Args:
        record: ``{"messages": [...]}``.
        tokenizer: supplies the chat template, ``encode`` and ``stop_ids``.
        max_length: the longest allowed ``prompt + roundup(response, block_size)``.
        block_size: canvas block length (for the EOS fill in the length budget).

    Returns:
        A :class:`ChatExample`.

    Raises:
        ChatRecordError: the record breaks a rule of the module docstring.
    """
    messages = _messages(record)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not answers:
        raise ChatRecordError("no_assistant", "the record has no assistant turn (one supervised answer is required)")
    if len(answers) > 1:
        raise ChatRecordError("multiple_assistant",
                         f"the record has {len(answers)} assistant turns (messages {answers}); only a single "
                         "supervised turn per example is supported")
    if answers[0] != len(messages) - 1:
        raise ChatRecordError("invalid_record", f"the assistant turn (message {answers[0]}) must be the last message")
    if answers[0] == 0:
        raise ChatRecordError("invalid_record", "the assistant turn has no prompt before it")
    if not messages[-1]["content"].strip():
        raise ChatRecordError("empty_response", "the assistant turn is empty")

    prompt_text = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise ChatRecordError("template_mismatch",
                         "the chat template does not render the prompt with its generation header as a prefix of "
                         "the whole conversation, so prompt and answer cannot be split")
    prompt = tokenizer.encode(prompt_text)
    response = tokenizer.encode(full_text[len(prompt_text):])
    stops = [i for i, t in enumerate(response) if t in tokenizer.stop_ids]
    response = response[: stops[0] + 1] if stops else [*response, tokenizer.eod]

    laid_out = len(prompt) + -(-len(response) // block_size) * block_size
    if laid_out > max_length:
        raise ChatRecordError("too_long",
                         f"prompt {len(prompt)} + response {len(response)} tokens take {laid_out} positions with the "
                         f"EOS block fill (block {block_size}), over max_length {max_length}")
    return ChatExample(np.asarray(prompt + response, dtype=np.int32), len(prompt))


class SFTDataset(torch.utils.data.Dataset):
    """A chat JSONL file, tokenised when constructed (see the module docstring).

    Args:
        path: the JSONL file.
        tokenizer: with a chat template.
        max_length: see :func:`encode_chat`.
        block_size: canvas block length.
        on_bad: ``"error"`` raises :class:`~megatron_bdgemma.data.BadDataError` naming ``path:line`` at the first
            bad record; ``"skip"`` drops bad records and counts them in :attr:`bad` (``bad.summary()``).

    Raises:
        BadDataError: a bad record under ``on_bad="error"``.
        ValueError: no usable record at all.
    """

    def __init__(self, path: str | Path, tokenizer: Tokenizer, *, max_length: int, block_size: int,
                 on_bad: OnBad = "error") -> None:
        self.path = Path(path)
        self.bad = BadRecords(on_bad)
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
                    self.examples.append(encode_chat(record, tokenizer, max_length=max_length, block_size=block_size))
                except ChatRecordError as bad:
                    self.bad.report(bad.reason, location, bad.detail)
        if not self.examples:
            raise ValueError(f"{self.path} has no usable chat record ({self.bad.summary()})")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> SFTSample:
        example = self.examples[index]
        return SFTSample(input_ids=torch.from_numpy(example.input_ids).long(), prompt_len=example.prompt_len,
                         sample_index=int(index))


def sft_collate(samples: Sequence[SFTSample], *, block_size: int, eos_id: int, pad_id: int,
                seq_multiple_of: int = 1) -> tuple[DiffusionBatch, Tensor]:
    """Right-pad SFT samples and lay them out with the EOS block fill.

    Args:
        samples: ``B`` samples, ``input_ids [L_b]`` with the response from ``prompt_len`` on.
        block_size: canvas block length.
        eos_id: the EOS fill id.
        pad_id: global padding id.
        seq_multiple_of: round ``S`` up to a multiple of this (e.g. 16 for FP8 kernels).

    Returns:
        ``(batch, sample_indices)``: a :class:`DiffusionBatch` with ``S = roundup(max_b(p_b + roundup(L_b - p_b,
        block_size)), seq_multiple_of)`` and the ``[B]`` int64 sample indices.
    """
    lengths = torch.tensor([len(s["input_ids"]) for s in samples], dtype=torch.long)  # [B]
    prompt_lens = torch.tensor([s["prompt_len"] for s in samples], dtype=torch.long)  # [B]
    ids = torch.full((len(samples), int(lengths.max())), pad_id, dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, : len(sample["input_ids"])] = sample["input_ids"]
    pos = torch.arange(ids.shape[1])[None, :]  # [1, L_max]
    valid = pos < lengths[:, None]
    loss_mask = valid & (pos >= prompt_lens[:, None])  # the response: one supervised span
    batch = build_sft_batch(ids, loss_mask, valid, block_size=block_size, eos_id=eos_id, pad_id=pad_id,
                            seq_multiple_of=seq_multiple_of)
    return batch, torch.tensor([s["sample_index"] for s in samples], dtype=torch.long)


def _messages(record: Any) -> list[dict[str, str]]:
    """Validate the record's shape; return its messages as plain dicts."""
    if not isinstance(record, Mapping) or not isinstance(record.get("messages"), list):
        raise ChatRecordError("invalid_record", 'the record is not an object with a "messages" list')
    messages = []
    for i, message in enumerate(record["messages"]):
        if (not isinstance(message, Mapping) or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)):
            raise ChatRecordError("invalid_record",
                             f"message {i} is not {{'role': one of {ROLES}, 'content': str}}: {str(message)[:80]}")
        try:
            message["content"].encode("utf-8")
        except UnicodeEncodeError as error:  # JSON's \ud800 escapes decode to lone surrogates no tokenizer takes
            raise ChatRecordError("invalid_text", f"message {i} content is not valid Unicode ({error.reason} at "
                                                  f"character {error.start})") from None
        messages.append({"role": message["role"], "content": message["content"]})
    return messages
