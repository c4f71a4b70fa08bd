"""Canvas samplers for block-diffusion generation, and the autoregressive baseline's decoding options.

A canvas sampler turns one decoder forward's softcapped fp32 logits `[B, R, V]` into the next canvas. Every
sampler shares DiffusionGemma's frame (docs/design.md §10):

- n counts the steps *remaining*, N..1; the logits are divided by `T_n = t_min + (t_max - t_min)·n/N`, computed
  in fp32 exactly as HF does (a float64 T changes multinomial draws on saturated logits);
- top-k / top-p, where a sampler draws, filter the softcapped logits *before* the temperature, which is what HF
  does with `TopKLogitsWarper` / `TopPLogitsWarper` passed as `logits_processor`;
- the tempered ("processed") logits are what the next step's self-conditioning sees and what the adaptive stop
  reads: a row stops when its argmax canvas equals the previous `stability_threshold` steps' and its mean
  tempered entropy (nats) is below `confidence_threshold` (HF's `StableAndConfidentStoppingCriteria`; both
  thresholds set = the rule is on).

Samplers (`SAMPLERS`, built by name with `build_sampler` / `parse_sampler`):

- `entropy_bound` — DiffusionGemma's default (HF's `EntropyBoundSampler`): sample every position, accept the
  lowest-entropy prefix with `cumsum(H) - H <= entropy_bound` (at least one), re-randomise **all** other positions
  with uniform tokens. Random draws per step, in HF's order: one multinomial over all positions, then one full
  uniform canvas.
- `max_prob_threshold` — Fast-dLLM-style parallel decoding: sample every position, accept those whose tempered
  maximum probability is at least `threshold` (at least the most confident one), re-randomise the rest. (Not
  called `confidence_threshold`: in HF that name is the stop rule's.)
- `greedy` — no sampling: the next canvas is the whole argmax canvas; stops as soon as the argmax is stable.
- `autoregressive` — not a canvas sampler: next-token decoding from the encoder logits (the AR baseline on the
  same weights), greedy at temperature 0.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import types
import typing
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_bdgemma.generation.row_multinomial import multinomial_rows

__all__ = [
    "AdaptiveStop",
    "Autoregressive",
    "CanvasSampler",
    "EntropyBound",
    "Greedy",
    "MaxProbThreshold",
    "SAMPLERS",
    "Sampler",
    "build_sampler",
    "entropy",
    "filter_logits",
    "parse_sampler",
]


def entropy(logits: Tensor, probs: Tensor) -> Tensor:
    """Entropy in nats of `probs = softmax(logits)` over the last dim: `[..., V]` → `[...]`.

    The quantity `torch.distributions.Categorical(logits=...).entropy()` computes (HF's acceptance and stop rule:
    `lse - Σ p·x`), written as `log Z + Σ p·(m - x)` with m the row maximum and `Z = Σ exp(x - m) = 1 / max(p)`.
    From the softmax the step has anyway this costs a max, a difference and a dot product instead of a logsumexp and
    a second softmax; both terms are non-negative, so a nearly saturated row's small entropy keeps its relative
    precision. It differs from Categorical's only in rounding (decisions equal but for near-ties). Filtered (-inf)
    logits contribute 0, as they do there.
    """
    gap = (logits.amax(dim=-1, keepdim=True) - logits).clamp_(max=torch.finfo(logits.dtype).max)  # 0·finite = 0
    return gap.mul_(probs).sum(dim=-1) - probs.amax(dim=-1).log()


def filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Top-k, then top-p (nucleus) filtering over the last dim; filtered logits become -inf.

    The same rules as HF's `TopKLogitsWarper` (ties with the k-th value are kept) and `TopPLogitsWarper` (drop the
    lowest tokens whose cumulative probability is at most `1 - top_p`, always keep the top one).

    Args:
        logits: `[..., V]` fp32.
        top_k: keep the k largest, or None.
        top_p: keep the smallest top set with probability mass >= top_p, or None.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - top_p)
        drop_sorted[..., -1:] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


class AdaptiveStop:
    """Per-canvas state of HF's stable-and-confident stop rule (one instance per canvas; nothing carries over).

    `__call__(argmax [B, R], token_entropy [B, R]) -> [B] bool`, the entropies being of the tempered logits:
    stable = the argmax equals each of the last `stability` steps' (the history starts at -1, so never on a
    canvas's first step); confident = mean entropy < `confidence`.
    """

    def __init__(self, stability: int, confidence: float) -> None:
        self.stability = stability
        self.confidence = confidence
        self.history: Tensor | None = None

    def __call__(self, argmax: Tensor, token_entropy: Tensor) -> Tensor:
        if self.stability == 0:
            stable = torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device)
        else:
            if self.history is None:
                self.history = torch.full((self.stability, *argmax.shape), -1, dtype=argmax.dtype, device=argmax.device)
            stable = (self.history == argmax[None]).all(dim=-1).all(dim=0)
            self.history = torch.roll(self.history, shifts=-1, dims=0)
            self.history[-1] = argmax
        return stable & (token_entropy.mean(dim=-1) < self.confidence)


@dataclass(frozen=True, kw_only=True)
class CanvasSampler(abc.ABC):
    """Options every canvas sampler has (HF's defaults). Subclasses define `step`."""

    max_denoising_steps: int = 48
    """N, the most decoder forwards per canvas."""
    t_max: float = 0.8
    """Temperature at the first step (n = N)."""
    t_min: float = 0.4
    """The schedule's end point; the last step (n = 1) uses `t_min + (t_max - t_min)/N`."""
    stability_threshold: int | None = 1
    """Steps the argmax canvas must stay unchanged before a row may stop; None disables the adaptive stop."""
    confidence_threshold: float | None = 0.005
    """A row may stop once its mean tempered entropy (nats) is below this; None disables the adaptive stop."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_denoising_steps, int) or self.max_denoising_steps < 1:
            raise ValueError(f"max_denoising_steps must be a positive integer, got {self.max_denoising_steps!r}")
        if self.t_min < 0 or self.t_max < self.t_min:
            raise ValueError(f"need 0 <= t_min <= t_max, got t_min={self.t_min}, t_max={self.t_max}")
        if self.t_max == 0:
            raise ValueError("t_max must be > 0 (the last step's temperature is t_min + (t_max - t_min)/N)")
        if self.stability_threshold is not None and self.stability_threshold < 0:
            raise ValueError(f"stability_threshold must be >= 0 or None, got {self.stability_threshold}")
        if self.confidence_threshold is not None and self.confidence_threshold <= 0:
            raise ValueError(f"confidence_threshold must be > 0 or None, got {self.confidence_threshold}")

    def process(self, logits: Tensor, steps_remaining: int) -> Tensor:
        """Softcapped fp32 logits `[B, R, V]` → tempered logits for step n = `steps_remaining`, computed in place of
        `logits` (a decode's fresh output: a vocabulary-wide temporary costs more than the division)."""
        # HF turns the step into an int32 tensor, so the temperature is an fp32 tensor, not a Python float.
        n = torch.tensor(steps_remaining, dtype=torch.int32, device=logits.device)
        temperature = self.t_min + (self.t_max - self.t_min) * (n / self.max_denoising_steps)
        return self.filter(logits).div_(temperature)

    def filter(self, logits: Tensor) -> Tensor:
        """Logit filtering before the temperature; none by default."""
        return logits

    def stop_rule(self) -> AdaptiveStop | None:
        """A fresh stop rule for one canvas, or None when the adaptive stop is off."""
        if self.stability_threshold is None or self.confidence_threshold is None:
            return None
        return AdaptiveStop(self.stability_threshold, self.confidence_threshold)

    @abc.abstractmethod
    def step(
        self,
        canvas: Tensor,
        processed: Tensor,
        probs: Tensor,
        token_entropy: Tensor,
        generator: torch.Generator | None,
    ) -> Tensor:
        """One denoising update.

        Args:
            canvas: `[B, R]` the canvas that was just decoded.
            processed: `[B, R, V]` its tempered (filtered) fp32 logits.
            probs: `[B, R, V]` `torch.softmax(processed, dim=-1)` (fp32), computed once per step for the sampler and
                the next step's self-conditioning.
            token_entropy: `[B, R]` `entropy(processed, probs)`.
            generator: the random source (None = torch's global generator, as HF uses).

        Returns:
            the next canvas `[B, R]`.
        """


@dataclass(frozen=True, kw_only=True)
class _Sampling(CanvasSampler):
    """A canvas sampler that draws proposals from the tempered distribution, re-randomising what it rejects."""

    top_k: int | None = None
    """Keep only the k most likely tokens before sampling (None = all)."""
    top_p: float | None = None
    """Nucleus filtering before sampling (None = off)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")

    def filter(self, logits: Tensor) -> Tensor:
        return filter_logits(logits, self.top_k, self.top_p)

    @abc.abstractmethod
    def accept(self, probs: Tensor, token_entropy: Tensor) -> Tensor:
        """`[B, R]` bool: positions that take their sampled token (`probs` `[B, R, V]` tempered)."""

    def step(
        self,
        canvas: Tensor,
        processed: Tensor,
        probs: Tensor,
        token_entropy: Tensor,
        generator: torch.Generator | None,
    ) -> Tensor:
        batch, length, vocab = processed.shape
        accepted = self.accept(probs, token_entropy)
        # HF's draw order: one multinomial over every position, then one full uniform canvas (drawn even where it
        # is not used), so the same seed gives the same tokens. Only the accepted positions' proposals are used,
        # so only theirs are drawn; the stream still moves past the others.
        proposals = multinomial_rows(probs.view(-1, vocab), accepted.view(-1), generator).view(batch, length)
        noise = torch.randint(0, vocab, (batch, length), generator=generator, device=canvas.device)
        # Nothing is frozen: every rejected position, including ones accepted at earlier steps, is re-randomised.
        return torch.where(accepted, proposals, noise)


@dataclass(frozen=True, kw_only=True)
class EntropyBound(_Sampling):
    """DiffusionGemma's default sampler (HF `EntropyBoundSampler`, https://arxiv.org/abs/2505.24857)."""

    entropy_bound: float = 0.1
    """Accept the k lowest-entropy positions with `sum(H_1..k) - max(H_1..k) <= entropy_bound` (nats)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.entropy_bound <= 0:
            raise ValueError(f"entropy_bound must be > 0, got {self.entropy_bound}")

    def accept(self, probs: Tensor, token_entropy: Tensor) -> Tensor:
        # Sorted ascending, the running maximum is the current entropy, so the bound is cumsum - H; the first
        # position always passes (0 <= bound).
        sorted_entropy, order = torch.sort(token_entropy, dim=-1, descending=False)
        keep_sorted = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= self.entropy_bound
        return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


@dataclass(frozen=True, kw_only=True)
class MaxProbThreshold(_Sampling):
    """Fast-dLLM-style threshold sampler (https://arxiv.org/abs/2505.22618), on a uniform-noise canvas."""

    threshold: float = 0.9
    """Accept every position whose tempered maximum probability is at least this."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")

    def accept(self, probs: Tensor, token_entropy: Tensor) -> Tensor:
        confidence = probs.amax(dim=-1)
        most_confident = torch.zeros_like(confidence, dtype=torch.bool).scatter(
            -1, confidence.argmax(dim=-1, keepdim=True), True
        )
        return (confidence >= self.threshold) | most_confident


@dataclass(frozen=True, kw_only=True)
class Greedy(CanvasSampler):
    """Deterministic refinement: the next canvas is the argmax canvas (only the initial canvas is random)."""

    confidence_threshold: float | None = math.inf
    """No confidence requirement by default: stop once the argmax canvas is stable."""

    def step(
        self,
        canvas: Tensor,
        processed: Tensor,
        probs: Tensor,
        token_entropy: Tensor,
        generator: torch.Generator | None,
    ) -> Tensor:
        return processed.argmax(dim=-1)


@dataclass(frozen=True, kw_only=True)
class Autoregressive:
    """Next-token decoding from the encoder logits: the AR baseline on the same weights."""

    temperature: float = 0.0
    """0 = greedy; otherwise sample from `softmax(filtered logits / temperature)`."""
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature == 0 and (self.top_k is not None or self.top_p is not None):
            raise ValueError("top_k / top_p need temperature > 0 (temperature 0 is greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")

    def next_token(self, logits: Tensor, generator: torch.Generator | None) -> Tensor:
        """Last-position logits `[B, V]` → next tokens `[B]`."""
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(filter_logits(logits, self.top_k, self.top_p) / self.temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


Sampler = CanvasSampler | Autoregressive

SAMPLERS: dict[str, type[CanvasSampler] | type[Autoregressive]] = {
    "entropy_bound": EntropyBound,
    "max_prob_threshold": MaxProbThreshold,
    "greedy": Greedy,
    "autoregressive": Autoregressive,
}


def build_sampler(name: str, **options: typing.Any) -> Sampler:
    """The sampler `name` (a key of `SAMPLERS`) with `options`; unknown names and options raise `ValueError`."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    cls = SAMPLERS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for sampler {name!r}; its options are {sorted(known)}")
    return cls(**options)


def parse_sampler(spec: str) -> Sampler:
    """Build a sampler from `"name"` or `"name:key=value,key=value"` (the command-line form).

    Values are converted to the option's type; `none` gives None where an option allows it.
    Example: `entropy_bound:entropy_bound=0.2,max_denoising_steps=16,top_k=50`.
    """
    name, _, rest = spec.partition(":")
    name = name.strip()
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    hints = typing.get_type_hints(SAMPLERS[name])
    options: dict[str, typing.Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"sampler option {item!r} is not key=value (in {spec!r})")
        if key not in hints:
            raise ValueError(
                f"unknown option {key!r} for sampler {name!r}; its options are "
                f"{sorted(f.name for f in dataclasses.fields(SAMPLERS[name]))}"
            )
        options[key] = _convert(value.strip(), hints[key], key)
    return build_sampler(name, **options)


def _convert(value: str, hint: typing.Any, key: str) -> typing.Any:
    """Parse a command-line option value as `hint` (`int`, `float` or an optional of one)."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value.lower() == "none":
        if type(None) not in allowed:
            raise ValueError(f"option {key!r} cannot be none")
        return None
    for kind in (int, float):
        if kind in allowed:
            try:
                return kind(value)
            except ValueError:
                raise ValueError(f"option {key!r} needs {kind.__name__}, got {value!r}") from None
    raise ValueError(f"option {key!r} has unsupported type {hint}")
