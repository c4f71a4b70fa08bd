"""The tokenizer interface of the data pipeline and the trainer, and its two implementations.

- :class:`HFTokenizer` wraps a local Hugging Face tokenizer directory (never the hub).
- :class:`ByteTokenizer` needs no files at all: UTF-8 bytes shifted past two special ids, with a tiny built-in chat
  format, so pretraining and SFT both run offline on any machine (the embedded default).

The same object serves three readers: megatron-core's ``GPTDatasetConfig`` (which only reads ``eod``, ``pad``,
``vocab_size`` and ``unique_identifiers``), the SFT pipeline (``tokenize_chat``) and the trainer
(``eos``, ``pad``, ``decode``). This module imports neither torch nor megatron, so tokenisation workers start fast.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Tokenizer", "HFTokenizer", "ByteTokenizer", "load_tokenizer", "BYTE_TOKENIZER"]

BYTE_TOKENIZER = "byte"
"""The spec string that selects :class:`ByteTokenizer` in :func:`load_tokenizer` (and ``--tokenizer byte``)."""

ChatMessage = Mapping[str, Any]
"""``{"role": "system" | "user" | "assistant", "content": str | list of parts}``; a part is ``{"type": "text",
"text": str}`` or ``{"type": "image", "path": str}`` (absolute: :mod:`~megatron_bdgemma.data.sft` resolves it)."""

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class Tokenizer(ABC):
    """What the datasets and the trainer need from a tokenizer."""

    vocab_size: int
    """Number of ids the tokenizer can emit; every id is ``< vocab_size``. The model's vocabulary may be larger."""
    eod: int
    """End-of-document id: appended to every pretraining document and used as the EOS block fill in SFT."""
    pad: int
    """Global padding id (never attended, never scored). Distinct from ``eod`` (checked at construction)."""
    bos: int | None
    """Beginning-of-sequence id prepended to pretraining documents, or None when the tokenizer has none."""

    @property
    def eos(self) -> int:
        """Alias of :attr:`eod` (megatron-core calls it ``eod``, Hugging Face ``eos``)."""
        return self.eod

    @property
    @abstractmethod
    def unique_identifiers(self) -> dict[str, Any]:
        """A JSON-serialisable description; megatron-core hashes it into the dataset index cache names."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special tokens added."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (for samples and logs)."""

    @abstractmethod
    def apply_chat_template(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool) -> str:
        """Render a conversation as text; ``add_generation_prompt`` appends the header that opens an assistant turn.

        Generation renders its prompt with this; SFT tokenises whole conversations with :meth:`tokenize_chat`.
        """

    @abstractmethod
    def tokenize_chat(self, messages: Sequence[ChatMessage]) -> tuple[list[int], list[bool]]:
        """Token ids of a whole conversation and, per token, whether it is supervised (part of an assistant turn).

        The supervised tokens are what the chat template marks as generated: every assistant turn, each with its
        end of turn (docs/design.md §7; see :mod:`megatron_bdgemma.data.sft`).
        """

    images: ImageProcessing | None = None
    """How images become placeholders and patches; None: the tokenizer takes text only (the byte tokenizer, an HF
    directory with no image processor)."""

    def _check_specials(self, where: str) -> None:
        if self.pad == self.eod:
            # megatron-core would then stop masking pad (it resets pad to -1), and pad and the EOS fill, which is
            # supervised, could no longer be told apart in the data.
            raise ValueError(f"{where}: pad id {self.pad} equals the EOS/EOD id; give the tokenizer a distinct pad")
        bad = {name: i for name, i in [("eod", self.eod), ("pad", self.pad), ("bos", self.bos)]
               if i is not None and not 0 <= i < self.vocab_size}
        if bad:
            raise ValueError(f"{where}: special ids {bad} lie outside the vocabulary [0, {self.vocab_size})")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: id = byte + 2, with 0 = pad and 1 = EOS; no files, no training.

    ``vocab_size`` is 258 rounded up to a multiple of 64 (320) so embedding tables stay kernel-friendly; ids 258..319
    are never produced. Chat format (plain bytes, markers included)::

        <|system|>{content}<|user|>{content}<|assistant|>{content}<|user|>...

    An assistant turn has no closing marker in the text; as tokens (:meth:`tokenize_chat`, what SFT trains on) it
    ends with the EOS id, and its content plus that EOS are the supervised tokens. Generation stops at that EOS.
    """

    PAD = 0
    EOS = 1
    OFFSET = 2
    ROLES = ("system", "user", "assistant")

    def __init__(self) -> None:
        self.vocab_size = _round_up(256 + self.OFFSET, 64)
        self.eod = self.EOS
        self.pad = self.PAD
        self.bos = None
        self._check_specials("ByteTokenizer")

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "vocab_size": self.vocab_size}

    def encode(self, text: str) -> list[int]:
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        """Drops ids outside the byte range (pad, EOS, unused rows); invalid UTF-8 becomes U+FFFD."""
        data = bytes(i - self.OFFSET for i in map(int, ids) if self.OFFSET <= i < 256 + self.OFFSET)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool) -> str:
        parts = []
        for message in messages:
            if message.get("role") not in self.ROLES:
                raise ValueError(f"unknown chat role {message.get('role')!r}; ByteTokenizer knows {self.ROLES}")
            parts.append(f"<|{message['role']}|>{message['content']}")
        if add_generation_prompt:
            parts.append("<|assistant|>")
        return "".join(parts)

    def tokenize_chat(self, messages: Sequence[ChatMessage]) -> tuple[list[int], list[bool]]:
        ids: list[int] = []
        supervised: list[bool] = []
        for message in messages:
            header = self.encode(self.apply_chat_template([{**message, "content": ""}], add_generation_prompt=False))
            ids += header
            supervised += [False] * len(header)
            content = self.encode(message["content"])
            if message["role"] == "assistant":
                content.append(self.EOS)
            ids += content
            supervised += [message["role"] == "assistant"] * len(content)
        return ids, supervised


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer loaded from a local directory (``local_files_only``: nothing is downloaded).

    ``vocab_size`` is ``len(tokenizer)`` (base vocabulary plus added tokens). SFT needs a chat template with
    ``{% generation %}`` tags (:meth:`tokenize_chat`); ``chat_template`` (a Jinja file) replaces the tokenizer's own,
    e.g. NeMo Automodel's ``examples/dllm_sft/diffusion_gemma_chat_template.jinja`` for DiffusionGemma, whose
    released template has no such tags.

    Raises:
        ValueError: the tokenizer has no EOS or no pad token, or its pad id equals its EOS id.
        FileNotFoundError: ``chat_template`` is not a file.
    """

    def __init__(self, path: str | Path, chat_template: str | Path | None = None) -> None:
        from transformers import AutoTokenizer

        self.path = Path(path).resolve()
        self._tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        if chat_template is not None:
            if not Path(chat_template).is_file():
                raise FileNotFoundError(f"chat template {str(chat_template)!r} (data.chat_template) is not a file")
            self._tok.chat_template = Path(chat_template).read_text()
        where = f"tokenizer at {self.path}"
        if self._tok.eos_token_id is None:
            raise ValueError(f"{where} has no eos_token; documents and answers need one")
        if self._tok.pad_token_id is None:
            raise ValueError(f"{where} has no pad_token; set one (not eos_token) in its tokenizer_config.json")
        self.vocab_size = len(self._tok)
        self.eod = int(self._tok.eos_token_id)
        self.pad = int(self._tok.pad_token_id)
        self.bos = None if self._tok.bos_token_id is None else int(self._tok.bos_token_id)
        self._check_specials(where)
        self.images = ImageProcessing.load(self.path, self._tok)

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "path": str(self.path), "vocab_size": self.vocab_size,
                "eod": self.eod, "pad": self.pad}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(map(int, ids)))

    def apply_chat_template(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool) -> str:
        if self._tok.chat_template is None:
            raise ValueError(f"tokenizer at {self.path} has no chat_template; SFT needs one")
        return self._tok.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def tokenize_chat(self, messages: Sequence[ChatMessage]) -> tuple[list[int], list[bool]]:
        """Hugging Face's own mechanism: ``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks the
        tokens the template's ``{% generation %}`` spans render (NeMo Automodel's DiffusionGemma template wraps each
        model turn's content and its end-of-turn line in them).

        Raises:
            ValueError: the tokenizer has no chat template, or its template has no ``{% generation %}`` tags.
        """
        template = self._tok.chat_template
        if template is None:
            raise ValueError(f"tokenizer at {self.path} has no chat_template; SFT needs one")
        if not _GENERATION_TAG.search(template if isinstance(template, str) else str(template)):
            raise ValueError(
                f"the chat template of the tokenizer at {self.path} has no {{% generation %}} tags, so SFT cannot "
                "tell which tokens to supervise; wrap each assistant turn's content and end of turn in "
                "{% generation %}...{% endgeneration %} (as NeMo Automodel's DiffusionGemma template does) or give "
                "such a template with data.chat_template"
            )
        out = self._tok.apply_chat_template(
            [dict(m) for m in messages], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]


@dataclass(frozen=True)
class ImageProcessing:
    """The model's HF processor's image half: its image processor (``AutoImageProcessor`` of the tokenizer
    directory's ``preprocessor_config.json``: patches, their positions, soft tokens per image) and its placeholder
    rule, Gemma 4's (``Gemma4Processor.replace_image_token``): the chat template renders each image part as the
    tokenizer's ``image_token``, which becomes ``boi_token``, ``num_soft_tokens`` × ``image_token``, ``eoi_token``.
    The ids are what ``Gemma4Processor`` gives for the same text and images (tests/test_image_sft.py checks it); the
    processor itself is not loaded because transformers builds its video half only with torchvision.
    """

    image_processor: Any
    image_token_id: int
    boi_token_id: int
    eoi_token_id: int

    @classmethod
    def load(cls, path: Path, tokenizer: Any) -> ImageProcessing | None:
        """The image processing of a tokenizer directory, or None when it has no image processor."""
        if not (path / "preprocessor_config.json").is_file():
            return None
        from transformers import AutoImageProcessor

        names = {name: getattr(tokenizer, name, None) for name in ("image_token", "boi_token", "eoi_token")}
        if None in names.values():
            missing = [name for name, token in names.items() if token is None]
            raise ValueError(f"tokenizer at {path} has an image processor but no {', '.join(missing)} (its "
                             "tokenizer_config.json's extra_special_tokens name them)")
        ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in names.items()}
        return cls(AutoImageProcessor.from_pretrained(str(path), local_files_only=True), ids["image_token"],
                   ids["boi_token"], ids["eoi_token"])

    def expand(self, ids: Sequence[int], supervised: Sequence[bool], image_paths: Sequence[str]
               ) -> tuple[list[int], list[bool], dict[str, Any]]:
        """Each ``image_token`` of a rendered conversation → its image's placeholders, unsupervised; with the
        processor's ``pixel_values`` ``[N, patches, 3·patch²]``, ``image_position_ids`` ``[N, patches, 2]`` and
        ``mm_token_type_ids`` ``[L]`` (1 on the placeholders) and ``image_tokens`` ``[L]`` (True on every image token:
        ``boi``, placeholders, ``eoi``; no loss predicts them).

        Raises:
            ValueError: the rendered text holds another number of image tokens than there are images.
        """
        from PIL import Image

        if (found := sum(i == self.image_token_id for i in ids)) != len(image_paths):
            raise ValueError(f"the chat template rendered {found} image tokens for {len(image_paths)} image parts")
        pixels = self.image_processor([Image.open(p).convert("RGB") for p in image_paths], return_tensors="pt")
        soft = iter(pixels["num_soft_tokens_per_image"])
        out_ids: list[int] = []
        out_supervised: list[bool] = []
        for token, marked in zip(ids, supervised):
            if token == self.image_token_id:
                placeholders = [self.boi_token_id, *[self.image_token_id] * int(next(soft)), self.eoi_token_id]
                out_ids += placeholders
                out_supervised += [False] * len(placeholders)  # image tokens are never supervised
            else:
                out_ids.append(token)
                out_supervised.append(marked)
        types = [int(i == self.image_token_id) for i in out_ids]
        image_tokens = [i in (self.boi_token_id, self.image_token_id, self.eoi_token_id) for i in out_ids]
        return out_ids, out_supervised, {"pixel_values": pixels["pixel_values"], "image_position_ids":
                                         pixels["image_position_ids"], "mm_token_type_ids": types,
                                         "image_tokens": image_tokens}


def load_tokenizer(spec: str | Path, chat_template: str | Path | None = None) -> Tokenizer:
    """``"byte"`` gives :class:`ByteTokenizer`; anything else is a local HF tokenizer directory, whose chat template
    a Jinja file ``chat_template`` replaces (the byte tokenizer's chat format is fixed: no template accepted)."""
    if str(spec) == BYTE_TOKENIZER:
        if chat_template is not None:
            raise ValueError("data.chat_template needs a Hugging Face tokenizer; the byte tokenizer's format is fixed")
        return ByteTokenizer()
    if not Path(spec).is_dir():
        raise FileNotFoundError(f"tokenizer {str(spec)!r} is neither {BYTE_TOKENIZER!r} nor a local directory")
    return HFTokenizer(spec, chat_template)


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple
