"""Tokenise JSONL documents into a Megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``, int32 tokens).

    python tools/preprocess_data.py --input docs.jsonl --output-prefix data/corpus \\
        --tokenizer /path/to/hf_tokenizer_dir --workers 8 [--json-key text] [--on-bad skip]

One document per line (``{"text": "..."}``); several ``--input`` files are concatenated in order. Each document
becomes ``[BOS] + ids + [EOS]`` (BOS only when the tokenizer has one, e.g. Gemma's ``<bos>``) and one sequence in
the dataset, in input order. ``--tokenizer byte`` selects the built-in byte tokenizer; anything else is a local HF
tokenizer directory (nothing is downloaded). Tokens are stored as int32 because Gemma's 262,144-entry vocabulary does
not fit uint16.

Bad lines (invalid JSON or UTF-8, a record without a string under ``--json-key``, an empty or whitespace-only
document, a token id >= ``--vocab-size``) stop the run with the file and line (``--on-bad error``, the default), or
are skipped and counted in the final summary (``--on-bad skip``). Blank lines are not records and are ignored.
The output appears only when complete: it is written under temporary names and renamed at the end.

Progress goes to stderr every ``--log-interval`` documents; the summary goes to stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import NamedTuple

import numpy as np

from megatron_bdgemma.data import BadRecords
from megatron_bdgemma.data.tokenizer import Tokenizer, load_tokenizer
from megatron_bdgemma.runtime.cli import entry_point

Line = tuple[str, int, bytes]
"""``(file, line number, raw line)``."""


class BadLine(NamedTuple):
    reason: str
    location: str
    detail: str


class _Encoder:
    """Turns raw JSONL lines into documents (or the reason they are bad)."""

    def __init__(self, tokenizer: Tokenizer, json_key: str, vocab_size: int) -> None:
        self.tokenizer, self.json_key, self.vocab_size = tokenizer, json_key, vocab_size
        self.prefix = [] if tokenizer.bos is None else [tokenizer.bos]
        # Here, not at the top: data.pretrain imports torch, which `--help` need not wait for.
        from megatron_bdgemma.data.pretrain import TOKEN_DTYPE

        self.dtype = TOKEN_DTYPE

    def encode_line(self, line: Line) -> np.ndarray | BadLine:
        path, lineno, raw = line
        location = f"{path}:{lineno}"
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return BadLine("invalid_json", location, f"invalid JSON ({err})")
        text = record.get(self.json_key) if isinstance(record, dict) else None
        if not isinstance(text, str):
            return BadLine("invalid_record", location, f"no string under key {self.json_key!r}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # JSON's \ud800 escapes decode to lone surrogates no tokenizer takes
            return BadLine("invalid_text", location, f"text is not valid Unicode ({err.reason} at character {err.start})")
        ids = self.tokenizer.encode(text) if text.strip() else []
        if not ids:
            return BadLine("empty", location, "empty document")
        ids = np.asarray(self.prefix + ids + [self.tokenizer.eod], dtype=self.dtype)
        if (top := int(ids.max())) >= self.vocab_size:
            return BadLine("id_out_of_range", location,
                           f"token id {top} >= vocab size {self.vocab_size} (the tokenizer does not match the model)")
        return ids


_worker: _Encoder | None = None


def _init_worker(tokenizer_spec: str, json_key: str, vocab_size: int) -> None:
    global _worker
    _worker = _Encoder(load_tokenizer(tokenizer_spec), json_key, vocab_size)


def _encode_chunk(chunk: list[Line]) -> list[np.ndarray | BadLine]:
    return [_worker.encode_line(line) for line in chunk]


def _chunks(paths: Iterable[str], size: int) -> Iterator[list[Line]]:
    """Non-blank lines of the files in order, ``size`` at a time."""
    def lines() -> Iterator[Line]:
        for path in paths:
            with open(path, "rb") as f:
                yield from ((path, n, raw) for n, raw in enumerate(f, start=1) if raw.strip())

    stream = lines()
    while chunk := list(itertools.islice(stream, size)):
        yield chunk


def _encoded(args: argparse.Namespace, tokenizer: Tokenizer, vocab_size: int) -> Iterator[list[np.ndarray | BadLine]]:
    """Encoded chunks in input order, from ``args.workers`` processes (or this one when 1)."""
    chunks = _chunks(args.input, args.chunk_size)
    if args.workers == 1:
        encoder = _Encoder(tokenizer, args.json_key, vocab_size)
        yield from ([encoder.encode_line(line) for line in chunk] for chunk in chunks)
        return
    # Pool.imap reads its input on a feeder thread as fast as it can, i.e. the whole file into memory; the
    # semaphore keeps at most a few chunks per worker in flight.
    in_flight, stop = threading.Semaphore(4 * args.workers), threading.Event()

    def throttled() -> Iterator[list[Line]]:
        for chunk in chunks:
            in_flight.acquire()
            if stop.is_set():
                return
            yield chunk

    # Spawned (not forked) workers each load their own tokenizer: forking a process that already runs tokenizer or
    # torch threads can deadlock.
    init = (args.tokenizer, args.json_key, vocab_size)
    with multiprocessing.get_context("spawn").Pool(args.workers, _init_worker, init) as pool:
        try:
            for result in pool.imap(_encode_chunk, throttled()):
                in_flight.release()
                yield result
        finally:
            # On an early exit (a bad line under --on-bad error) the feeder thread may be waiting for a slot; wake
            # it so it ends, or the pool's shutdown would wait for it forever.
            stop.set()
            in_flight.release()


class _Progress:
    def __init__(self, interval: int) -> None:
        self.interval, self.next_report, self.start = interval, interval, time.perf_counter()
        self.documents = self.tokens = 0

    def add(self, ids: np.ndarray) -> None:
        self.documents += 1
        self.tokens += ids.size
        if self.documents >= self.next_report:
            self.next_report += self.interval
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return (f"{self.documents:,} documents, {self.tokens:,} tokens in {elapsed:.1f} s "
                f"({self.documents / elapsed:,.0f} docs/s, {self.tokens / elapsed:,.0f} tokens/s)")


def preprocess(args: argparse.Namespace) -> BadRecords:
    """Write the dataset described by parsed ``args``; return the tally of skipped lines.

    Raises:
        BadDataError: a bad line under ``--on-bad error`` (nothing is written).
        ValueError: no document survived.
    """
    from megatron_bdgemma.data.pretrain import IndexedDatasetWriter

    tokenizer = load_tokenizer(args.tokenizer)
    vocab_size = args.vocab_size or tokenizer.vocab_size
    bad = BadRecords(args.on_bad, skip_setting="--on-bad skip")
    progress = _Progress(args.log_interval)
    # closing(): a bad line must shut the worker pool down now, not whenever the generator is collected.
    with IndexedDatasetWriter(args.output_prefix) as writer, closing(_encoded(args, tokenizer, vocab_size)) as encoded:
        for results in encoded:
            for result in results:
                if isinstance(result, BadLine):
                    bad.report(*result)
                else:
                    writer.add_document(result)
                    progress.add(result)
    print(f"wrote {args.output_prefix}.bin/.idx: {progress.line()}; {bad.summary()}")
    return bad


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL file(s), one document per line")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", required=True, help="local HF tokenizer directory, or 'byte'")
    parser.add_argument("--json-key", default="text", help="the document's key in each record (default: text)")
    parser.add_argument("--workers", type=int, default=1, help="tokenising processes (default: 1)")
    parser.add_argument("--chunk-size", type=int, default=256, help="lines per task sent to a worker")
    parser.add_argument("--on-bad", choices=("error", "skip"), default="error",
                        help="bad lines stop the run (error, default) or are skipped and counted (skip)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="reject ids >= this, e.g. the model's vocabulary (default: the tokenizer's)")
    parser.add_argument("--log-interval", type=int, default=100_000, help="documents between progress lines")
    args = parser.parse_args(argv)
    for name in ("workers", "chunk_size", "log_interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    missing = [p for p in args.input if not Path(p).is_file()]
    if missing:
        parser.error(f"input file(s) not found: {missing}")
    return args


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 on bad data, with the reason on stderr in one line)."""
    preprocess(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
