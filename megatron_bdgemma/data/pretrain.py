"""Pretraining data: Megatron indexed datasets (``.bin/.idx``) through megatron-core's ``GPTDataset``.

Documents are token ids (int32: Gemma's 262,144-entry vocabulary does not fit uint16) written by
``tools/preprocess_data.py`` or :mod:`megatron_bdgemma.data.embedded` through :class:`IndexedDatasetWriter`.
``GPTDataset`` packs them into fixed-length rows of ``seq_length`` tokens across document boundaries (each document
ends with EOS) and shuffles; ``BlendedMegatronDatasetBuilder`` mixes several corpora by weight and carves the
train/valid/test splits. The block-diffusion layout (prefix 0, every block scored) and the noise are applied later,
per micro-batch: :func:`pretrain_collate` here, the noise in the training step.

Samples are non-overlapping ``seq_length`` windows (``add_extra_token_to_sequence=False``): the diffusion objective
and the AR loss both work inside the row, so megatron's extra label token would be wasted.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, NamedTuple, TypedDict

import numpy as np
import torch
from torch import Tensor

from megatron_bdgemma.data.tokenizer import Tokenizer
from megatron_bdgemma.diffusion.layout import DiffusionBatch, build_pretrain_batch

if TYPE_CHECKING:
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.gpt_dataset import GPTDataset

__all__ = [
    "TOKEN_DTYPE",
    "Blend",
    "IndexedDatasetWriter",
    "PretrainSample",
    "PretrainDataset",
    "PretrainSplits",
    "build_pretrain_datasets",
    "pretrain_collate",
    "document_records",
]

TOKEN_DTYPE = np.int32
"""On-disk token dtype of every dataset this package writes."""

Blend = str | os.PathLike | Sequence[str | float] | Mapping[str, float]
"""One dataset prefix; several prefixes, mixed in proportion to their sizes; ``[w1, prefix1, w2, prefix2, ...]``
(Megatron's form); or ``{prefix: weight}``."""


class IndexedDatasetWriter:
    """Write a Megatron ``.bin/.idx`` pair that appears only once it is complete.

    Tokens go to temporary files beside the target, renamed into place (``.bin`` first, then ``.idx``, which
    megatron-core reads first) when the ``with`` block ends without an exception; on an exception the temporary
    files are deleted and nothing at ``prefix`` changes. A crashed run leaves at most ``prefix.tmp-*`` files.
    One document is one sequence.

        with IndexedDatasetWriter("out/corpus") as writer:
            writer.add_document(ids)          # ids: 1-D ints, EOS included
    """

    def __init__(self, prefix: str | Path) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = str(prefix)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        # Unique per writer so concurrent writers of the same prefix (e.g. every rank building the embedded corpus)
        # never share a temporary file; the last rename wins with identical content.
        self._tmp = f"{self.prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._builder = IndexedDatasetBuilder(self._tmp + ".bin", dtype=TOKEN_DTYPE)
        self.num_documents = 0
        self.num_tokens = 0

    def add_document(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append one document (1-D token ids, at least one)."""
        ids = np.asarray(ids, dtype=TOKEN_DTYPE)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"a document must be a non-empty 1-D id sequence, got shape {ids.shape}")
        self._builder.add_document(ids, [ids.size])
        self.num_documents += 1
        self.num_tokens += ids.size

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self._discard()
            return
        if self.num_documents == 0:
            # An empty corpus would only fail later, inside megatron-core, with a less helpful message.
            self._discard()
            raise ValueError(f"no documents were written to {self.prefix}")
        self._builder.finalize(self._tmp + ".idx")
        os.replace(self._tmp + ".bin", self.prefix + ".bin")
        os.replace(self._tmp + ".idx", self.prefix + ".idx")

    def _discard(self) -> None:
        self._builder.data_file.close()
        for suffix in (".bin", ".idx"):
            Path(self._tmp + suffix).unlink(missing_ok=True)


class PretrainSample(TypedDict):
    tokens: Tensor
    """``[S]`` int64 token ids (a packed window; documents are separated by EOS)."""
    sample_index: int
    """Index of the sample in its split's dataset: the key of its noise (same on any number of GPUs)."""


class PretrainDataset(torch.utils.data.Dataset):
    """A megatron-core ``GPTDataset`` / ``BlendedDataset`` whose samples carry their own index."""

    def __init__(self, dataset: GPTDataset | BlendedDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> PretrainSample:
        return PretrainSample(tokens=self.dataset[index]["tokens"], sample_index=int(index))


class PretrainSplits(NamedTuple):
    """Each split's dataset, or None when its weight in ``split`` is 0."""

    train: PretrainDataset | None
    valid: PretrainDataset | None
    test: PretrainDataset | None


def build_pretrain_datasets(
    blend: Blend,
    *,
    tokenizer: Tokenizer,
    seq_length: int,
    seed: int,
    num_samples: Sequence[int | None],
    split: str = "98,1,1",
    cache_dir: str | Path | None = None,
    is_built_on_rank: Callable[[], bool] = lambda: True,
    vocab_size: int | None = None,
) -> PretrainSplits:
    """Build the train/valid/test datasets of a blend of indexed corpora.

    Documents are divided between the splits by ``split`` (e.g. ``"98,1,1"``: the first 98% of each corpus's
    documents train, ...); within a split, ``GPTDataset`` shuffles documents, packs them into ``seq_length`` windows
    and repeats epochs until ``num_samples`` windows exist. With a weighted blend, each split draws from the corpora
    in proportion to the weights.

    Must be called on every rank when ``torch.distributed`` is initialised: megatron-core builds the index cache
    (``cache_dir``; by default ``<corpus dir>/cache``) on rank 0 while the others wait at a barrier, then they load it.

    Args:
        blend: see :data:`Blend`; prefixes name ``prefix.bin`` / ``prefix.idx``.
        tokenizer: the tokenizer the corpora were written with (``eod``, ``pad``, ``vocab_size``, cache hash).
        seq_length: tokens per sample ``S``.
        seed: shuffling seed.
        num_samples: ``(train, valid, test)`` sample counts: a weighted blend gives exactly these and needs all
            three; a single corpus gives whole epochs, at least this many samples (``None``: one epoch). ``0``: the
            split is not needed and not built (``None`` in the result), so it may get no documents.
        split: train/valid/test weights of the documents.
        cache_dir: where megatron-core caches its index arrays (keyed on the corpora's size and modification time,
            so a corpus rewritten at the same prefix gets a fresh index) and each corpus's token range.
        is_built_on_rank: whether this rank needs the datasets (e.g. only pipeline stages that read tokens); rank 0
            must return True.
        vocab_size: the model's vocabulary; a corpus with a token id outside ``[0, vocab_size)`` is refused.

    Returns:
        :class:`PretrainSplits`; each sample is a :class:`PretrainSample` with ``tokens [S]``.

    Raises:
        FileNotFoundError: a prefix has no ``.bin``/``.idx`` (names it).
        ValueError: an empty, truncated or foreign ``.bin``/``.idx``; token ids past ``vocab_size``; a weighted blend
            without all sample counts, or a split that gets no documents of some corpus.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    prefixes, weights = _parse_blend(blend)
    cache = Path(cache_dir) if cache_dir is not None else Path(prefixes[0]).parent / "cache"
    corpora = [inspect_corpus(prefix, cache) for prefix in prefixes]
    if vocab_size is not None:
        for corpus in corpora:
            if corpus.max_token >= vocab_size or corpus.min_token < 0:
                raise ValueError(
                    f"{corpus.prefix}.bin holds token ids {corpus.min_token}..{corpus.max_token}, but the model's "
                    f"vocabulary has ids 0..{vocab_size - 1}: was it written with another tokenizer? (data.tokenizer, "
                    "the model's vocab_size)"
                )
    num_samples = list(num_samples)
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must be (train, valid, test), got {num_samples}")
    if weights is not None and None in num_samples:
        raise ValueError(f"a weighted blend needs a sample count for every split, got num_samples={num_samples}")
    config_class, dataset_class = _gpt_dataset_classes()
    config = config_class(
        data_identity={c.prefix: c.identity for c in corpora},
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        tokenizer=tokenizer,
        path_to_cache=None if cache_dir is None else str(cache_dir),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # the model builds its own block-diffusion masks
        add_extra_token_to_sequence=False,
        drop_last_partial_validation_sequence=True,  # every row is full, so pretrain_collate needs no valid mask
    )
    config.split_matrix = [None if n == 0 else bounds for n, bounds in zip(num_samples, config.split_matrix)]
    _check_splits(prefixes, split, config.split_matrix)
    datasets = BlendedMegatronDatasetBuilder(dataset_class, num_samples, is_built_on_rank, config).build()
    return PretrainSplits(*(None if d is None else PretrainDataset(d) for d in datasets))


class CorpusInfo(NamedTuple):
    prefix: str
    identity: str
    """Sizes and modification times of ``.bin`` and ``.idx``: a corpus rewritten in place gets another identity."""
    min_token: int
    max_token: int


_IDX_HEADER_BYTES = 34  # magic (9), version (8), dtype code (1), sequence count (8), document count (8)


def inspect_corpus(prefix: str, cache_dir: Path) -> CorpusInfo:
    """Check that ``prefix.bin/.idx`` is a whole Megatron indexed dataset, and read its token range.

    The structure is checked from the ``.idx`` alone (header, array sizes, the ``.bin`` size they imply); the token
    range needs one pass over the ``.bin``, so it is cached in ``cache_dir`` under the files' identity.

    Raises:
        ValueError: naming the file, when it is empty, truncated or not an indexed dataset.
    """
    import hashlib
    import json
    import struct

    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    stats = [idx.stat(), bin_.stat()]
    identity = ";".join(f"{st.st_size}:{st.st_mtime_ns}" for st in stats)
    idx_size, bin_size = stats[0].st_size, stats[1].st_size
    with idx.open("rb") as f:
        header = f.read(_IDX_HEADER_BYTES)
    if len(header) < _IDX_HEADER_BYTES or header[:9] != _INDEX_HEADER:
        raise ValueError(f"{idx} is not a Megatron indexed-dataset index ({idx_size} bytes: "
                         f"{'too short' if len(header) < _IDX_HEADER_BYTES else 'no MMIDIDX header'}); rewrite it with "
                         "tools/preprocess_data.py")
    version, code, num_sequences, num_documents = struct.unpack("<QBQQ", header[9:])
    try:
        dtype = np.dtype(DType.dtype_from_code(code))
    except (KeyError, ValueError):
        dtype = None
    expected = _IDX_HEADER_BYTES + num_sequences * 12 + num_documents * 8
    if version != 1 or dtype is None or idx_size not in (expected, expected + num_sequences):
        raise ValueError(f"{idx} is damaged or truncated (version {version}, dtype code {code}, {num_sequences} "
                         f"sequences and {num_documents} documents need {expected} bytes, the file has {idx_size}); "
                         "rewrite it with tools/preprocess_data.py")
    lengths = np.fromfile(idx, dtype=np.int32, count=num_sequences, offset=_IDX_HEADER_BYTES)
    needed = int(lengths.sum(dtype=np.int64)) * dtype.itemsize
    if bin_size != needed or num_sequences == 0:
        raise ValueError(f"{bin_} does not match its index: {num_sequences} sequences of {dtype} need {needed} bytes, "
                         f"the file has {bin_size} (truncated, or written separately from {idx.name}); rewrite both "
                         "with tools/preprocess_data.py")

    record = cache_dir / f"{hashlib.sha1(str(Path(prefix).resolve()).encode()).hexdigest()[:16]}-token_range.json"
    if record.is_file():
        cached = json.loads(record.read_text())
        if cached.get("identity") == identity:
            return CorpusInfo(prefix, identity, cached["min"], cached["max"])
    tokens = np.memmap(bin_, dtype=dtype, mode="r")
    chunks = [tokens[start:start + (1 << 26)] for start in range(0, len(tokens), 1 << 26)]  # views, not copies
    ranges = [(int(chunk.min()), int(chunk.max())) for chunk in chunks]  # one pass over the file
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    del tokens
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(f"{record.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps({"prefix": str(prefix), "identity": identity, "min": lo, "max": hi}))
    os.replace(tmp, record)  # atomic: ranks computing it at once write the same content
    return CorpusInfo(prefix, identity, lo, hi)


@functools.cache
def _gpt_dataset_classes() -> tuple[type, type]:
    """megatron-core's GPTDataset and its config, with the corpora's identity in the index cache's key."""
    import dataclasses

    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    @dataclasses.dataclass
    class IdentifiedGPTDatasetConfig(GPTDatasetConfig):
        data_identity: dict[str, str] = dataclasses.field(default_factory=dict)
        """{prefix: CorpusInfo.identity}: megatron-core keys its cache on paths and settings only."""

    class IdentifiedGPTDataset(GPTDataset):
        @staticmethod
        def _key_config_attributes() -> list[str]:
            return [*GPTDataset._key_config_attributes(), "data_identity"]

    return IdentifiedGPTDatasetConfig, IdentifiedGPTDataset


def pretrain_collate(
    samples: Sequence[PretrainSample], *, block_size: int, pad_id: int
) -> tuple[DiffusionBatch, Tensor]:
    """Stack samples into the pretraining layout (prefix 0, the whole row is the response).

    Args:
        samples: ``B`` samples with ``tokens [S]``.
        block_size: canvas block length.
        pad_id: id of padding up to a multiple of ``block_size``.

    Returns:
        ``(batch, sample_indices)``: a :class:`DiffusionBatch` with ``S_out = roundup(S, block_size)`` and the
        ``[B]`` int64 sample indices that key each example's noise.
    """
    tokens = torch.stack([s["tokens"] for s in samples]).long()
    indices = torch.tensor([s["sample_index"] for s in samples], dtype=torch.long)
    return build_pretrain_batch(tokens, block_size=block_size, pad_id=pad_id), indices


def document_records(
    samples: Sequence[PretrainSample], stream_positions: Sequence[int], *, block_size: int, pad_id: int, eod_id: int
) -> tuple[DiffusionBatch, list[int], list[list[int]]]:
    """Split each window after every EOD into documents and lay each out alone (``data.reset_document_masks``).

    The EOD ends its document, as in Megatron's ``reset_attention_mask`` (so the pair "EOD → next document's first
    token" is no AR pair: a record's last token has no successor inside it); a window's first piece, the tail of a
    document cut by the previous window, is a document of its own there too.

    Args:
        samples: windows with ``tokens [S]``.
        stream_positions: each window's position in the sample stream, the key of its noise (docs/design.md §7).

    Returns:
        ``(documents, keys, windows)``: the documents laid out alone as :func:`build_pretrain_batch` lays out a row
        (prefix 0, every block scored, a partial last block possible); each one's noise key, ``s · (S + 1) + j`` for
        document ``j`` of the window at stream position ``s`` (distinct: a window has at most ``S`` documents); and
        each window's documents in order, indices into ``documents``.
    """
    pieces, keys, windows = [], [], []
    for sample, position in zip(samples, stream_positions, strict=True):
        tokens = sample["tokens"].long()
        S = len(tokens)
        bounds = sorted({0, S, *((tokens == eod_id).nonzero().flatten() + 1).tolist()})
        windows.append(list(range(len(pieces), len(pieces) + len(bounds) - 1)))
        for j, (start, end) in enumerate(zip(bounds, bounds[1:])):
            pieces.append(tokens[start:end])
            keys.append(position * (S + 1) + j)
    width = max(len(piece) for piece in pieces)
    ids = torch.full((len(pieces), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(pieces), width), dtype=torch.bool)
    for i, piece in enumerate(pieces):
        ids[i, : len(piece)], valid[i, : len(piece)] = piece, True
    return build_pretrain_batch(ids, block_size=block_size, valid=valid, pad_id=pad_id), keys, windows


def _parse_blend(blend: Blend) -> tuple[list[str], list[float] | None]:
    if isinstance(blend, (str, os.PathLike)):
        prefixes, weights = [str(blend)], None
    elif isinstance(blend, Mapping):
        prefixes, weights = [str(p) for p in blend], [float(w) for w in blend.values()]
    elif is_weighted_blend(blend):
        prefixes, weights = [str(p) for p in blend[1::2]], [float(w) for w in blend[::2]]
    else:
        prefixes, weights = [str(p) for p in blend], None
    if weights is not None and any(w <= 0 for w in weights):
        raise ValueError(f"blend weights must be positive, got {dict(zip(prefixes, weights))}")
    if not prefixes:
        raise ValueError("the blend names no dataset")
    missing = [p for p in prefixes if not (Path(p + ".bin").is_file() and Path(p + ".idx").is_file())]
    if missing:
        raise FileNotFoundError(
            f"no indexed dataset (.bin and .idx) at {missing}; write one with tools/preprocess_data.py"
        )
    return prefixes, weights


def is_weighted_blend(blend: Sequence[object]) -> bool:
    """Megatron's `[w1, p1, w2, p2, ...]`: an even number of entries, each one from the first on a weight."""
    return len(blend) % 2 == 0 and bool(blend) and all(_is_number(w) for w in blend[::2])


def _is_number(value: object) -> bool:
    """A blend weight: a number, or a string that reads as one (YAML / command lines give either)."""
    if isinstance(value, bool):
        return False
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def _check_splits(prefixes: Iterable[str], split: str, split_matrix: Sequence[tuple[float, float] | None]) -> None:
    """Fail early, by name, where megatron-core would loop forever or assert: a split that gets no document."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    names = ("train", "valid", "test")
    for prefix in prefixes:
        n = len(IndexedDataset(prefix).sequence_lengths)
        empty = [names[i] for i, count in enumerate(_documents_per_split(n, split_matrix)) if count == 0]
        if empty:
            fix = _split_with_documents(n, split, split_matrix)
            raise ValueError(
                f"{prefix} has {n} documents: split {split!r} leaves the {'/'.join(empty)} split without any; "
                + (f"e.g. data.split={fix} gives every split in use a document" if fix else "use more documents")
            )


def _documents_per_split(n: int, split_matrix: Sequence[tuple[float, float] | None]) -> list[int | None]:
    """Documents of each split out of `n` (None: not built): the ranges megatron-core's builder computes."""
    return [None if bounds is None else round(bounds[1] * n) - round(bounds[0] * n) for bounds in split_matrix]


def _split_with_documents(n: int, split: str, split_matrix: Sequence[tuple[float, float] | None]) -> str | None:
    """A `split` in whole percents close to the given one under which every split that is built gets a document
    (and one that is not gets 0), or None when `n` is too small for that."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    used = [bounds is not None for bounds in split_matrix]
    percents = [round(100 * w) if use else 0 for w, use in zip(parse_and_normalize_split(split), used)]
    percents[0] = 100 - sum(percents[1:])
    while percents[0] > 1:
        matrix = convert_split_vector_to_split_matrix([p / 100 for p in percents])
        counts = _documents_per_split(n, [m if use else None for m, use in zip(matrix, used)])
        starved = [i for i, count in enumerate(counts) if count == 0]
        if not starved:
            return ",".join(map(str, percents))
        for i in starved:
            percents[i] += 1
            percents[0] -= 1
    return None
