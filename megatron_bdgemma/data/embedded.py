"""The embedded default data: what training uses when no data is given. Offline, on any machine.

- Pretraining: the source of a fixed list of standard-library modules of the running Python (about 460 KB), cut into
  documents at function and class definitions, tokenised with
  :class:`~megatron_bdgemma.data.tokenizer.ByteTokenizer` and written once as a ``.bin/.idx`` corpus, so the
  embedded default runs the normal ``GPTDataset`` path.
- SFT: a few hundred generated chat records (arithmetic, word reversal, capitals, letter counts) in the chat JSONL
  format of :mod:`megatron_bdgemma.data.sft`, short enough to fit one canvas block of the ``tiny`` preset.

Both are deterministic. File names carry a hash of their content, so another Python version (whose sources differ)
or a change to the generator writes new files instead of reusing stale ones. Every writer uses its own temporary
file and an atomic rename, so ranks that build at the same time cannot corrupt each other.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import re
import uuid
from pathlib import Path

from megatron_bdgemma.data.pretrain import IndexedDatasetWriter
from megatron_bdgemma.data.tokenizer import ByteTokenizer

__all__ = ["STDLIB_MODULES", "embedded_pretrain_prefix", "embedded_sft_path", "stdlib_documents", "sft_records"]

STDLIB_MODULES = (
    "textwrap", "heapq", "bisect", "fractions", "functools", "argparse", "difflib", "shlex", "string",
    "json.decoder", "json.encoder", "statistics", "graphlib", "contextlib", "queue",
)
"""Pure-Python modules present in every CPython ≥ 3.12; their ``.py`` source is the corpus."""

# A new document starts at a def/class/decorator at module or class level (indent 0 or 4) that follows a blank line:
# a decorator stays with its function, and a document is one function or method (with the comments before it), so
# even the 1% validation split gets a few documents.
_DOCUMENT_BREAK = re.compile(r"\n\s*\n(?=(?:    )?(?:@|def |async def |class ))")

_WORDS = (
    "apple", "river", "python", "garden", "silver", "planet", "window", "candle", "forest", "bridge", "orange",
    "music", "winter", "yellow", "rocket", "island", "pencil", "thunder", "marble", "lantern", "coffee", "dragon",
    "shadow", "castle", "butter", "mirror", "violet", "harbor", "meadow", "puzzle", "tiger", "cloud", "stone",
    "ocean", "paper", "light", "sugar", "honey", "table", "chair",
)


def stdlib_documents() -> list[str]:
    """The corpus text as documents, in a fixed order (module by module, top to bottom).

    Raises:
        RuntimeError: none of :data:`STDLIB_MODULES` has readable ``.py`` source (a stripped Python install).
    """
    documents = []
    for name in STDLIB_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue  # e.g. a distribution that ships only bytecode for this module
        source = Path(spec.origin).read_text(encoding="utf-8")
        documents += [doc.strip("\n") for doc in _DOCUMENT_BREAK.split(source) if doc.strip()]
    if not documents:
        raise RuntimeError(f"no standard-library source found for any of {STDLIB_MODULES}; the embedded corpus "
                           "needs a Python installation that ships .py files")
    return documents


def embedded_pretrain_prefix(cache_dir: str | Path) -> str:
    """Write the embedded corpus into ``cache_dir`` unless it is there already; return its dataset prefix.

    Each document is ``ByteTokenizer`` ids followed by EOS. Use it with ``build_pretrain_datasets(prefix,
    tokenizer=ByteTokenizer(), ...)``.
    """
    tokenizer = ByteTokenizer()
    documents = stdlib_documents()
    digest = _digest(json.dumps([tokenizer.unique_identifiers, documents]))
    prefix = str(Path(cache_dir) / f"embedded-stdlib-byte-{digest}")
    if not (Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()):
        with IndexedDatasetWriter(prefix) as writer:
            for doc in documents:
                writer.add_document(tokenizer.encode(doc) + [tokenizer.eod])
    return prefix


def sft_records(num_records: int = 600, seed: int = 0) -> list[dict]:
    """Simple single-answer chat records, generated deterministically from ``seed``.

    Returns:
        ``num_records`` records ``{"messages": [(system,) user, assistant]}``; about one in four has a system turn.
    """
    rng = random.Random(seed)
    records = []
    for _ in range(num_records):
        kind = rng.randrange(6)
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        word = rng.choice(_WORDS)
        if kind == 0:
            question, answer = f"What is {a} + {b}?", str(a + b)
        elif kind == 1:
            question, answer = f"What is {max(a, b)} - {min(a, b)}?", str(max(a, b) - min(a, b))
        elif kind == 2:
            a, b = a % 13, b % 13
            question, answer = f"What is {a} * {b}?", str(a * b)
        elif kind == 3:
            question, answer = f"Reverse the word '{word}'.", word[::-1]
        elif kind == 4:
            question, answer = f"Write '{word}' in capital letters.", word.upper()
        else:
            question, answer = f"How many letters are in '{word}'?", str(len(word))
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.25:
            messages.insert(0, {"role": "system", "content": "Answer briefly."})
        records.append({"messages": messages})
    return records


def embedded_sft_path(cache_dir: str | Path) -> str:
    """Write the embedded SFT set (:func:`sft_records`) as chat JSONL into ``cache_dir`` unless it is there already;
    return its path."""
    text = "".join(json.dumps(record) + "\n" for record in sft_records())
    path = Path(cache_dir) / f"embedded-sft-{_digest(text)}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return str(path)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
