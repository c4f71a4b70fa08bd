"""`torch.multinomial(probs, 1)` for only some rows, with the random stream advanced exactly as the full draw would.

Why: HF's block-diffusion step draws one proposal for every canvas position (`torch.multinomial` over all B·R rows
of `[B·R, V]` probabilities), then keeps only the accepted positions' proposals. On CPU, `torch.multinomial(p, 1)`
is `argmax(p / q)` with `q = empty_like(p).exponential_(1)`: one exponential per vocabulary entry per row, each
made from a 64-bit draw (two 32-bit outputs) of the generator's mt19937, row after row. Those exponentials are most
of a small model's sampling time, and all but a few rows' are thrown away.

`multinomial_rows` gives the same tokens for the rows it is asked for and leaves the generator where the full draw
would: it moves the generator over the other rows with `random_` on an int64 buffer (one 64-bit draw per word and
nothing else: a fraction of an exponential's cost), and draws each run of wanted rows with `torch.multinomial`
itself from the right place in the stream, so the tokens come from torch's own kernel. What this assumes (one
64-bit draw per vocabulary entry, rows in order, one per int64 word) is checked once per process against the full
draw (`_reproduces_torch`); where the check fails, for non-CPU generators and for non-fp32 probabilities it falls
back to the full `torch.multinomial`, with the same results.
"""

from __future__ import annotations

import functools
import threading

import torch
from torch import Tensor

__all__ = ["multinomial_rows"]

_SKIP_CHUNK = 1 << 17  # int64 words of the per-thread scratch buffer the generator is advanced through
_SCRATCH = threading.local()


def multinomial_rows(probs: Tensor, rows: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One sample per wanted row of `probs`, as `torch.multinomial(probs, 1, generator=generator)` draws it.

    Args:
        probs: `[N, V]` non-negative weights per row (contiguous; e.g. a softmax).
        rows: `[N]` bool, the rows whose sample is wanted.
        generator: the random source; None = torch's default generator for `probs`' device.

    Returns:
        `[N]` long: the wanted rows' samples, -1 in the other rows. The generator ends where the full draw leaves it.
    """
    if probs.dim() != 2 or rows.shape != probs.shape[:1]:
        raise ValueError(f"need probs [N, V] and rows [N], got {tuple(probs.shape)} and {tuple(rows.shape)}")
    source = torch.default_generator if generator is None and probs.device.type == "cpu" else generator
    if source is None or source.device.type != "cpu" or probs.dtype != torch.float32 or not _reproduces_torch():
        drawn = torch.multinomial(probs.contiguous(), 1, generator=generator).squeeze(-1)
        return drawn.masked_fill(~rows.to(drawn.device), -1)
    return _draw_rows(probs.contiguous(), rows.cpu(), source)


def _draw_rows(probs: Tensor, rows: Tensor, generator: torch.Generator) -> Tensor:
    """The fast path: skip unwanted rows, draw each run of wanted rows with torch.multinomial."""
    count, vocab = probs.shape
    drawn = torch.full((count,), -1, dtype=torch.long)
    wanted = rows.nonzero().flatten().tolist()
    position = 0  # the row the stream is at
    run_starts = [row for i, row in enumerate(wanted) if i == 0 or wanted[i - 1] != row - 1]
    run_ends = [row + 1 for i, row in enumerate(wanted) if i + 1 == len(wanted) or wanted[i + 1] != row + 1]
    for start, end in zip(run_starts, run_ends):
        _skip(generator, (start - position) * vocab)
        drawn[start:end] = torch.multinomial(probs[start:end], 1, generator=generator).squeeze(-1)
        position = end
    _skip(generator, (count - position) * vocab)
    return drawn


def _skip(generator: torch.Generator, draws: int) -> None:
    """Advance a CPU generator's mt19937 by `draws` 64-bit draws (`random_` on int64 words: one draw each)."""
    if not hasattr(_SCRATCH, "words"):
        # Reused (a fresh buffer each time would page-fault); an ordinary tensor, writable in and out of inference mode.
        with torch.inference_mode(False):
            _SCRATCH.words = torch.empty(_SKIP_CHUNK, dtype=torch.int64)
    while draws > 0:
        chunk = min(draws, _SKIP_CHUNK)
        _SCRATCH.words[:chunk].random_(generator=generator)
        draws -= chunk


@functools.cache
def _reproduces_torch() -> bool:
    """Whether the row-skipping draw equals torch's full draw on this build: tokens and the generator state after,
    for runs of wanted rows at the start, middle and end, across mt19937 block boundaries (checked once per
    process)."""
    probs = torch.rand(9, 101, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([True, False, False, True, True, False, True, False, True])
    for seed in range(3):
        full, subset = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        torch.rand(seed * 300, generator=full), torch.rand(seed * 300, generator=subset)  # other stream positions
        expected = torch.multinomial(probs, 1, generator=full).squeeze(-1)
        got = _draw_rows(probs, rows, subset)
        if not torch.equal(got[rows], expected[rows]) or not torch.equal(full.get_state(), subset.get_state()):
            return False
    return True
