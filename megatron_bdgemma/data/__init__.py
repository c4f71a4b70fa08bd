"""Training data: indexed pretraining corpora, SFT chat data, the embedded offline default, tokenizers.

- :mod:`.tokenizer` — ``Tokenizer`` (``HFTokenizer`` from a local directory, ``ByteTokenizer`` offline).
- :mod:`.pretrain` — ``.bin/.idx`` corpora through megatron-core's ``GPTDataset`` (blends, splits) and
  ``pretrain_collate``; ``tools/preprocess_data.py`` writes the corpora.
- :mod:`.sft` — chat JSONL → ``SFTDataset`` (ids + the chat template's supervised mask) and ``sft_collate``.
- :mod:`.embedded` — a corpus and an SFT set built from what ships with Python, for runs with no data given.

Both collates return ``(DiffusionBatch, sample_indices [B])``; the indices key each example's noise.

Bad input (unreadable JSON, empty documents, ids past the vocabulary, chat records that are not a list of role messages, ...)
goes through :class:`BadRecords`: ``on_bad="error"`` stops at the first one with its file and line,
``on_bad="skip"`` drops it and counts it by reason. This module stays light: the submodules load on first use, so
tokenisation workers do not import megatron-core.
"""

from __future__ import annotations

import importlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

OnBad = Literal["error", "skip"]

_MAX_LOCATIONS = 5  # locations remembered per reason for the summary

# Public names of the submodules, loaded lazily (see the module docstring).
_LAZY = {
    "Tokenizer": "tokenizer", "HFTokenizer": "tokenizer", "ByteTokenizer": "tokenizer", "load_tokenizer": "tokenizer",
    "IndexedDatasetWriter": "pretrain", "PretrainDataset": "pretrain", "PretrainSplits": "pretrain",
    "build_pretrain_datasets": "pretrain", "pretrain_collate": "pretrain",
    "SFTDataset": "sft", "ChatRecordError": "sft", "encode_chat": "sft", "sft_collate": "sft",
    "embedded_pretrain_prefix": "embedded", "embedded_sft_path": "embedded",
}

__all__ = ["OnBad", "BadDataError", "BadRecords", *_LAZY]


class BadDataError(ValueError):
    """A bad input record under ``on_bad="error"``; the message names the file and line."""


@dataclass
class BadRecords:
    """The bad-record policy of one input pass, and its tally."""

    on_bad: OnBad
    """``"error"``: raise :class:`BadDataError` at the first bad record; ``"skip"``: drop and count it."""
    counts: Counter[str] = field(default_factory=Counter)
    """Skipped records per reason."""
    locations: dict[str, list[str]] = field(default_factory=dict)
    """The first few locations (``file:line``) per reason."""
    skip_setting: str = "on_bad='skip'"
    """How the caller's user asks for ``"skip"`` (``data.on_bad=skip``, ``--on-bad skip``): the error names it."""

    def __post_init__(self) -> None:
        if self.on_bad not in ("error", "skip"):
            raise ValueError(f"on_bad must be 'error' or 'skip', got {self.on_bad!r}")

    def report(self, reason: str, location: str, detail: str) -> None:
        """Handle one bad record: raise under ``"error"``, count under ``"skip"``.

        Args:
            reason: a short category (``"empty"``, ``"invalid_json"``, ...), the key of the tally.
            location: ``file:line`` of the record.
            detail: what is wrong, for the error message.
        """
        if self.on_bad == "error":
            raise BadDataError(f"{location}: {detail}; {self.skip_setting} drops such records and counts them")
        self.counts[reason] += 1
        where = self.locations.setdefault(reason, [])
        if len(where) < _MAX_LOCATIONS:
            where.append(location)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line: ``skipped 3 bad records: empty 2 (a.jsonl:3, a.jsonl:7), invalid_json 1 (a.jsonl:5)``."""
        if not self.counts:
            return "skipped 0 bad records"
        parts = [f"{reason} {n} ({', '.join(self.locations[reason])}{', ...' if n > _MAX_LOCATIONS else ''})"
                 for reason, n in sorted(self.counts.items())]
        return f"skipped {self.total} bad records: " + ", ".join(parts)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
