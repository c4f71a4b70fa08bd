"""Our SFT pipeline equals NeMo Automodel's DiffusionGemma SFT semantics, run as an oracle on untidy batches.

The oracle below is written for this test from the reference's rules (read, not copied; NVIDIA-NeMo/Automodel at
commit 36044ad, summarised in shared/reference/automodel_diffusion_gemma.md). Each rule names where it comes from:

- [collate]   nemo_automodel/components/datasets/dllm/collate.py, ``DLLMCollator(response_window=True)``:
              ``_first_supervised_index``, ``_block_fill_ends``, ``_compute_target_length``, ``_pad_and_fill``.
- [dataset]   ``ChatDataset(seq_length=..., truncation=True)`` as configured by
              examples/dllm_sft/diffusion_gemma_sft.yaml: content is cut at ``seq_length``.
- [history]   nemo_automodel/components/datasets/llm/chat_dataset.py, ``ChatDataset(mask_history=True)`` (that YAML
              sets it): after ``format_chat_template`` (which tokenises with the template's ``{% generation %}``
              mask and truncates), ``_keep_last_supervised_run`` keeps the last contiguous run of the loss mask and
              clears everything before it.
- [strategy]  nemo_automodel/recipes/dllm/strategy.py, ``BlockDiffusionStrategy.split_prompt_response``.
- [window]    nemo_automodel/recipes/dllm/train_ft.py, ``DiffusionGemmaSFTRecipe._build_response_window``.
- [denoms]    same file, ``_compute_loss_denominators``.
- [mask]      nemo_automodel/components/models/diffusion_gemma/attention_mask.py,
              ``build_block_diffusion_training_mask``, and train_ft.py ``_build_batched_block_mask``.
- [encoder]   the model's encoder pass (reference §1.2): causal ∧ key padding ∧ (sliding: ``q − k < window``).
- [corrupt]   nemo_automodel/components/datasets/dllm/corruption.py, ``corrupt_uniform_random``: noise only where
              ``loss_mask``; the noisy sequence is ``where(noise_mask, random id, clean)``.
- [loss]      nemo_automodel/components/loss/dllm_loss.py and train_ft.py: flat CE over the chosen block's
              supervised canvas slots / N_diff, plus 1.0 × AR CE over valid next-token pairs / N_AR.

One deliberate departure, from docs/design.md §7: the reference's collator refuses a loss mask with more than one supervised
run (its "single-turn guard"); everything else in its rules already handles several runs (the window starts at the
first supervised token, unsupervised tokens inside it are gathered clean and never scored), and that is what we
train on multi-turn chats with ``data.mask_history=false`` (the default). The oracle applies the rules without the
guard there. With ``data.mask_history=true`` ([history]) every loss mask has at most one run, so that comparison runs
the oracle **with** the guard, as the reference's recipe does, on chat records tokenised by ``transformers`` itself.

Randomness differs by design (the reference seeds per step and micro-batch, we per sample): our draws — which slots
are noised, their replacement ids, the chosen block, the self-conditioning coins — are injected into the oracle, which
then applies its own rules to them (e.g. ``noise_mask & loss_mask``), so a noised unsupervised slot would show.
The network both sides run is our model (its parity with HF is tests/test_decode_parity.py); the oracle runs it the
reference's way: all canvas blocks decoded with the reference's dense masks.

Shapes: the reference's canvas is ``max response`` wide, ours is rounded up to whole blocks; the extra slots must be
invalid and unscored. Canvas ids/targets are compared on valid slots (the reference gathers arbitrary ids into
padding slots, which attend only to themselves and are never scored); encoder mask rows on valid queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from megatron_bdgemma.config import tiny
from megatron_bdgemma.data.sft import sft_collate
from megatron_bdgemma.diffusion import build_sft_batch, corrupt, noise_batch, sample_t, take_blocks
from megatron_bdgemma.diffusion.layout import block_mask
from megatron_bdgemma.masks import AttentionMask, BlockDiffusionTrainingMask, EncoderMask
from megatron_bdgemma.model import BDGemmaModel
from tests.hf_models import randomise_scales
from tests.tolerances import record

EOS, PAD, VOCAB = 1, 0, 512
SEQ_LENGTH = 40  # data.seq_length / the reference's seq_length and max_seq_len
PAD_DIVISIBLE = 4  # the reference's pad_seq_len_divisible
WINDOW = 5  # sliding window, shorter than the rows so its block anchoring matters
SEED, STEP = 3, 7


def _rows() -> list[tuple[list[int], list[bool]]]:
    """(ids, supervised) per example: the chat shapes the issue lists."""
    g = torch.Generator().manual_seed(0)

    def row(*parts: tuple[int, bool]) -> tuple[list[int], list[bool]]:
        ids, sup = [], []
        for n, s in parts:
            ids += torch.randint(2, VOCAB, (n,), generator=g).tolist()
            sup += [s] * n
        return ids, sup

    return [
        row((5, False), (6, True)),  # single turn
        row((3, False), (4, True), (1, False)),  # a trailing unsupervised token (the template's newline)
        row((2, False), (3, True), (4, False), (2, True), (1, False)),  # two assistant turns
        row((4, False), (2, True), (3, False), (5, True), (2, False), (1, True), (1, False)),  # three
        row((7, False)),  # no supervised token: AR only
        row((6, False), (50, True)),  # over-long answer: cut at seq_length
        row((3, False), (1, True)),  # short single turn
        row((20, False), (17, True)),  # content fits, the EOS fill crosses seq_length: partial last block
    ]


# ------------------------------------------------------------------------------------------------------- the oracle


def ref_dataset(rows, mask_history: bool):
    """[dataset] + [history]: content cut at ``seq_length``, then (``mask_history``) the last supervised run only."""
    out = []
    for ids, sup in rows:
        ids, sup = ids[:SEQ_LENGTH], [bool(m) for m in sup[:SEQ_LENGTH]]
        if mask_history and any(sup):
            last = max(i for i, m in enumerate(sup) if m)
            start = next(i for i in range(last, -1, -1) if i == 0 or not sup[i - 1])
            sup = [m and i >= start for i, m in enumerate(sup)]
        out.append((ids, sup))
    return out


def ref_collate(rows, block_size: int, *, guard: bool):
    """[collate] on [dataset]'s rows: → input_ids, loss_mask, attention_mask ``[B, T]``; ``guard``: the single-turn
    guard (an AssertionError for a loss mask with more than one supervised run)."""
    if guard:
        for ids, sup in rows:
            runs = sum(m and (i == 0 or not sup[i - 1]) for i, m in enumerate(sup))
            if runs > 1:
                raise AssertionError(f"loss_mask has {runs} supervised runs (multi-turn)")
    content = torch.tensor([len(ids) for ids, _ in rows])
    # [collate] _first_supervised_index: first truthy loss_mask, else the content length (all prefix).
    prefix = torch.tensor([sup.index(True) if any(sup) else len(ids) for ids, sup in rows])
    # [collate] _block_fill_ends: response-relative rounding, content clamped to max_seq_len.
    cl = content.clamp(max=SEQ_LENGTH)
    pre = torch.minimum(prefix, cl)
    fill_end = pre + ((cl - pre).clamp(min=0) + block_size - 1) // block_size * block_size
    # [collate] _compute_target_length: round to lcm(block, pad_seq_len_divisible), then cap at max_seq_len.
    align = math.lcm(block_size, PAD_DIVISIBLE)
    T = max(min(-(-int(fill_end.max()) // align) * align, SEQ_LENGTH), 1)
    ids_out = torch.full((len(rows), T), PAD)
    loss_out = torch.zeros(len(rows), T)
    attn_out = torch.zeros(len(rows), T, dtype=torch.long)
    for b, (ids, sup) in enumerate(rows):  # [collate] _pad_and_fill: content, EOS fill (loss 1, attn 1), pad
        n = min(len(ids), T)
        ids_out[b, :n] = torch.tensor(ids[:n])
        loss_out[b, :n] = torch.tensor(sup[:n], dtype=torch.float)
        attn_out[b, :n] = 1
        fe = min(int(fill_end[b]), T)
        if fe > len(ids):
            ids_out[b, len(ids):fe], loss_out[b, len(ids):fe], attn_out[b, len(ids):fe] = EOS, 1, 1
    return ids_out, loss_out, attn_out


@dataclass
class RefWindow:
    prefix: torch.Tensor
    response: torch.Tensor
    canvas_ids: torch.Tensor
    target_ids: torch.Tensor
    noise_mask: torch.Tensor
    loss_mask: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    num_valid_blocks: torch.Tensor


def ref_window(clean, noisy, noise_mask, loss_mask, attention_mask, block_size: int, chosen: torch.Tensor):
    """[strategy] + [window]; ``chosen`` is the injected block choice (the reference draws floor(u·num_valid))."""
    B, S = clean.shape
    lm = loss_mask.bool()
    first = torch.argmax(lm.int(), dim=1)
    prefix = torch.where(lm.any(dim=1), first, torch.full_like(first, S))  # [strategy] no supervised token → S
    eff = attention_mask.long().sum(dim=1)
    response = (eff - prefix).clamp(min=0)
    R = max(int(response.max()), 1)
    j = torch.arange(R)[None, :]
    absolute = prefix[:, None] + j
    valid = (absolute < eff[:, None]) & (j < response[:, None])
    idx = absolute.clamp(max=S - 1)
    num_valid_blocks = ((response - 1).clamp(min=0) // block_size + 1).clamp(min=1)
    selected = (j // block_size) == chosen[:, None]
    return RefWindow(
        prefix, response, noisy.gather(1, idx), clean.gather(1, idx), noise_mask.gather(1, idx) & valid,
        lm.gather(1, idx) & valid & selected, idx, valid, num_valid_blocks,
    )


def ref_canvas_mask(w: RefWindow, S: int, block_size: int, window: int | None) -> torch.Tensor:
    """[mask]: ``[B, 1, R, S + R]`` bool, True = attend, per example then batched with the padded-row diagonal."""
    B, R = w.valid.shape
    out = torch.zeros(B, 1, R, S + R, dtype=torch.bool)
    for b in range(B):
        p, L = int(w.prefix[b]), int(w.response[b])
        if L > 0:
            q_block = torch.arange(L)[:, None] // block_size  # [L, 1]
            rel = torch.arange(S)[None, :] - p
            enc_block = torch.where(rel >= 0, rel // block_size, -1)
            keep = (q_block > enc_block) & (rel < L)  # M_OBC, strict
            if window is not None:
                keep &= torch.arange(S)[None, :] >= p + q_block * block_size - window + 1
            out[b, 0, :L, :S] = keep
            out[b, 0, :L, S:S + L] = q_block == torch.arange(L)[None, :] // block_size  # M_BD
        out[b, 0, torch.arange(R), S + torch.arange(R)] = True  # every row keeps its canvas diagonal
    return out


def ref_encoder_mask(attention_mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """[encoder]: ``[B, 1, S, S]``."""
    S = attention_mask.shape[1]
    q, k = torch.arange(S)[:, None], torch.arange(S)[None, :]
    keep = (k <= q) & attention_mask.bool()[:, None, :]
    if window is not None:
        keep &= (q - k) < window
    return keep[:, None]


class DenseRule(AttentionMask):
    """A given boolean grid as a mask rule, so our model can run the reference's masks."""

    def __init__(self, grid: torch.Tensor) -> None:
        self.grid = grid
        self.batch_size, _, self.num_queries, self.num_keys = grid.shape

    @property
    def device(self) -> torch.device:
        return self.grid.device

    def allowed_at(self, b, q, k):
        return self.grid[b, 0, q, k]

    def dense(self) -> torch.Tensor:
        return self.grid


def ref_loss(model, ref_ids, attn, w: RefWindow, masks_by_type, coins):
    """[loss] + [denoms] through the reference's forward: encode, pass 1 (no grad), pass 2 with gated signal."""
    encoded = model.encode(ref_ids, padding_mask=~attn.bool(), return_logits=True)
    rules = {t: DenseRule(m) for t, m in masks_by_type.items()}
    with torch.no_grad():
        first = model.decode(w.canvas_ids, encoded, canvas_position_ids=w.positions, attention_mask=rules)
    logits = model.decode(w.canvas_ids, encoded, canvas_position_ids=w.positions, attention_mask=rules,
                          self_conditioning_logits=first, self_conditioning_mask=coins)
    n_diff = int(w.loss_mask.sum())
    ce = F.cross_entropy(logits.flatten(0, 1), w.target_ids.flatten(), reduction="none")
    diffusion = (ce * w.loss_mask.flatten()).sum() / max(n_diff, 1)
    v = attn.bool()
    pairs = v[:, :-1] & v[:, 1:]
    ar_ce = F.cross_entropy(encoded.logits[:, :-1].flatten(0, 1), ref_ids[:, 1:].flatten(), reduction="none")
    ar = (ar_ce * pairs.flatten()).sum() / max(int(pairs.sum()), 1)
    return diffusion + 1.0 * ar, n_diff, int(pairs.sum())


# ------------------------------------------------------------------------------------------------------------ ours


def _padded(rows, left: list[bool]):
    """Our inputs: rows padded to a common width, on the left where ``left[b]``, else on the right."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), PAD)
    sup = torch.zeros(len(rows), width, dtype=torch.bool)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, (x, s) in enumerate(rows):
        start = width - len(x) if left[b] else 0
        ids[b, start:start + len(x)], sup[b, start:start + len(x)], valid[b, start:start + len(x)] = (
            torch.tensor(x), torch.tensor(s), True)
    return ids, sup, valid


@pytest.mark.parametrize("block_size", [2, 3, 4, 8])
def test_sft_equals_reference_recipe(model_parallel, block_size):
    rows = _rows()
    compare_with_reference(rows, ref_dataset(rows, mask_history=False), block_size, guard=False)


def compare_with_reference(rows, ref_rows, block_size: int, *, guard: bool) -> None:
    """Our layout, noise, masks and loss of ``rows`` (ids, supervised) equal the oracle's of ``ref_rows`` ([dataset]
    already applied), which runs the collate ``guard`` or not."""
    B = len(rows)
    align = math.lcm(block_size, PAD_DIVISIBLE)
    ids, sup, valid = _padded(rows, left=[b % 2 == 1 for b in range(B)])
    batch = build_sft_batch(ids, sup, valid, block_size=block_size, eos_id=EOS, pad_id=PAD, seq_multiple_of=align,
                            max_len=SEQ_LENGTH)
    # The dataset path (truncated samples, right padding) gives the same batch.
    samples = [{"input_ids": torch.tensor(x[:SEQ_LENGTH]), "loss_mask": torch.tensor(s[:SEQ_LENGTH]),
                "sample_index": b} for b, (x, s) in enumerate(rows)]
    collated, _ = sft_collate(samples, block_size=block_size, eos_id=EOS, pad_id=PAD, seq_multiple_of=align,
                              max_len=SEQ_LENGTH)
    for name in ("input_ids", "encoder_valid", "prefix_lens", "response_lens", "canvas_supervised"):
        assert torch.equal(getattr(batch, name), getattr(collated, name)), name

    key = dict(sample_indices=list(range(B)), step=STEP, seed=SEED)
    noised = noise_batch(batch, vocab_size=VOCAB, **key)
    chosen = noised.block_ids[:, 0]
    # The whole canvas's corruption, by the same calls noise_batch makes; its chosen blocks are noise_batch's.
    full = corrupt("uniform", batch.canvas_targets, batch.canvas_supervised, sample_t(**key), vocab_size=VOCAB, **key)
    assert torch.equal(take_blocks(full.noisy_ids, chosen, block_size), noised.canvas_ids)

    ref_ids, ref_lm, attn = ref_collate(ref_rows, block_size, guard=guard)
    S = ref_ids.shape[1]
    # Inject our noise at the absolute positions of our canvas; the reference's own rule gates it by its loss mask.
    noise_full = torch.zeros(B, S, dtype=torch.bool)
    replacement = ref_ids.clone()
    R_ours = batch.canvas_len
    absolute = batch.prefix_lens[:, None] + torch.arange(R_ours)[None, :]
    for b, j in batch.canvas_valid.nonzero().tolist():
        noise_full[b, absolute[b, j]] = full.noised[b, j]
        replacement[b, absolute[b, j]] = full.noisy_ids[b, j]
    ref_noise = noise_full & ref_lm.bool()  # [corrupt]
    ref_noisy = torch.where(ref_noise, replacement, ref_ids)
    w = ref_window(ref_ids, ref_noisy, ref_noise, ref_lm, attn, block_size, chosen)
    R = w.valid.shape[1]

    # Encoder side.
    assert torch.equal(batch.input_ids, ref_ids), "encoder ids"
    assert torch.equal(batch.encoder_valid, attn.bool()), "encoder valid"
    # Canvas side (ours is R_ours >= R wide; the extra slots hold nothing).
    assert R_ours >= R and not batch.canvas_valid[:, R:].any()
    assert torch.equal(batch.prefix_lens, w.prefix) and torch.equal(batch.response_lens, w.response)
    assert torch.equal(batch.canvas_valid[:, :R], w.valid), "canvas valid"
    assert torch.equal(batch.canvas_position_ids[:, :R], w.positions), "positions"
    assert torch.equal(torch.where(w.valid, full.noisy_ids[:, :R], -1), torch.where(w.valid, w.canvas_ids, -1))
    assert torch.equal(torch.where(w.valid, batch.canvas_targets[:, :R], -1), torch.where(w.valid, w.target_ids, -1))
    assert torch.equal(full.noised[:, :R], w.noise_mask), "noised slots"
    assert (chosen < w.num_valid_blocks).all(), "a block the reference cannot choose"
    scored = block_mask(chosen, batch.canvas_supervised, block_size)
    assert torch.equal(scored[:, :R], w.loss_mask) and not scored[:, R:].any(), "scored slots"
    assert torch.equal(take_blocks(scored, chosen, block_size), noised.scored)
    # AR pairs.
    assert torch.equal(batch.ar_loss_mask[:, :-1], attn.bool()[:, :-1] & attn.bool()[:, 1:])
    assert torch.equal(batch.ar_labels[:, :-1][batch.ar_loss_mask[:, :-1]], ref_ids[:, 1:][batch.ar_loss_mask[:, :-1]])

    # Masks for every layer type: encoder, whole training canvas, and the decoded (chosen) blocks.
    config = tiny(canvas_length=block_size, sliding_window=WINDOW)
    ref_masks = {}
    for layer_type in set(config.layer_types):
        window = config.window_of(layer_type)
        rows_valid = attn.bool()[:, None, :, None]
        ours_enc = EncoderMask(batch.encoder_valid, window).dense()
        assert torch.equal(ours_enc & rows_valid, ref_encoder_mask(attn, window) & rows_valid), layer_type
        ours = BlockDiffusionTrainingMask(batch.prefix_lens, batch.response_lens, S, R_ours, block_size, window).dense()
        ref = ref_canvas_mask(w, S, block_size, window)
        ref_masks[layer_type] = ref
        assert torch.equal(ours[:, :, :R, :S + R], ref), layer_type
        assert not ours[:, :, :R, S + R:].any()
        decoded = BlockDiffusionTrainingMask(batch.prefix_lens, batch.response_lens, S, block_size, block_size, window,
                                             canvas_block_ids=chosen[:, None]).dense()
        rows_idx = chosen[:, None] * block_size + torch.arange(block_size)[None, :]  # [B, bs] canvas slots
        for b in range(B):
            r = rows_idx[b][rows_idx[b] < R]
            assert torch.equal(decoded[b, 0, : len(r), :S], ref[b, 0, r, :S]), (layer_type, b)
            assert torch.equal(decoded[b, 0, : len(r), S:][:, : len(r)], ref[b, 0, r][:, S + r]), (layer_type, b)

    # Counts and total loss, same network, same noise. In float64 (the logits, softmaxes and losses too:
    # `precision.compute_dtype`): ours decodes only the chosen blocks and the reference the whole window, the same
    # values by different matrix shapes, whose fp32 rounding alone reaches 2e-6 on a loss of ~12. Worst measured in
    # float64 1.8e-15 with the defaults (AVX-512), 0 under AVX2: bound 1e-12.
    torch.manual_seed(0)
    model = BDGemmaModel(config).double()
    randomise_scales(model)  # no norm weight or scalar is the identity
    with torch.no_grad():
        out = model.training_forward(batch, noised)
        ref_total, ref_diff, ref_ar = ref_loss(model, ref_ids, attn, w, ref_masks, noised.self_conditioning)
    assert int(out.diffusion_tokens) == ref_diff and int(out.ar_tokens) == ref_ar
    ours_total = out.diffusion_loss_sum / out.diffusion_tokens.clamp(min=1) + out.ar_loss_sum / out.ar_tokens.clamp(min=1)
    print(f"block {block_size}: diffusion tokens {ref_diff}, AR tokens {ref_ar}, loss ours {float(ours_total):.7f} "
          f"reference {float(ref_total):.7f}, |diff| {abs(float(ours_total - ref_total)):.2e}")
    record("total loss", abs(float(ours_total - ref_total)), 1e-12)
    assert abs(float(ours_total - ref_total)) <= 1e-12


# ------------------------------------------------------------------------------------------------ data.mask_history


def _chat(*turns: str, system: str | None = None, last: str = "assistant") -> dict:
    """Alternating user/assistant turns ending with ``last``'s turn."""
    roles = ["user", "assistant"] if (len(turns) % 2 == 0) == (last == "assistant") else ["assistant", "user"]
    messages = [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    return {"messages": ([{"role": "system", "content": system}] if system else []) + messages}


LONG = " ".join(["one two three four five"] * 2)
HISTORY_RECORDS = [  # (record, number of assistant turns left after the cut at SEQ_LENGTH)
    (_chat("what is 3 + 4 ?", "7"), 1),
    (_chat("1 + 1 ?", "2", "2 + 2 ?", "4 four"), 2),
    (_chat("1 + 1 ?", "2", "2 + 2 ?", "4", "3 + 3 ?", "6 six"), 3),
    (_chat("1 + 1 ?", LONG, "2 + 2 ?", "4"), 2),  # a long first answer, a short final one
    (_chat("1 + 1 ?", "2", "2 + 2 ?", "4", "and 3 + 3 ?", system="you are terse", last="user"), 2),  # ends asking
    (_chat("only a question ?", last="user"), 0),  # AR only
    (_chat("1 + 1 ?", "2", "2 + 2 ?", "4", "3 + 3 ?", LONG + " " + LONG), 3),  # cut inside the final answer
    (_chat("1 + 1 ?", "2", f"{LONG} {LONG} {LONG} ?", "4"), 1),  # the cut removes the final answer: the first is left
]


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    from tests.test_data import build_hf_tokenizer

    words = [m["content"] for r, _ in HISTORY_RECORDS for m in r["messages"]]
    return build_hf_tokenizer(tmp_path_factory.mktemp("tok"), words)


@pytest.mark.parametrize("block_size", [2, 3, 4, 8])
def test_mask_history_equals_reference_recipe(model_parallel, chat_tokenizer, tmp_path, block_size):
    """``data.mask_history=true`` supervises Automodel's spans on 1-, 2- and 3-turn records (and one ending with a
    user turn, one without an answer, two cut by truncation), and the whole step equals the oracle's, which now runs
    the reference collator's single-turn guard. ``data.mask_history=false`` keeps every turn: the spans
    ``transformers`` marks, bit for bit, which the guard refuses."""
    from transformers import AutoTokenizer

    from megatron_bdgemma.data.sft import SFTDataset
    from megatron_bdgemma.data.tokenizer import load_tokenizer
    from tests.test_data import write_jsonl

    path = write_jsonl(tmp_path / "chat.jsonl", [r for r, _ in HISTORY_RECORDS])
    hf = AutoTokenizer.from_pretrained(chat_tokenizer, local_files_only=True)
    assert len(hf) <= VOCAB
    # The reference's tokenisation ([history]: format_chat_template's call), truncated at seq_length.
    marked = [hf.apply_chat_template(r["messages"], return_dict=True, return_assistant_tokens_mask=True,
                                     truncation=True, max_length=SEQ_LENGTH) for r, _ in HISTORY_RECORDS]
    raw = [(m["input_ids"], [bool(x) for x in m["assistant_masks"]]) for m in marked]
    ref_rows = ref_dataset(raw, mask_history=True)

    def ours(**kwargs):
        data = SFTDataset(path, load_tokenizer(chat_tokenizer), max_length=SEQ_LENGTH, block_size=block_size,
                          truncation=True, **kwargs)
        assert len(data) == len(HISTORY_RECORDS) and data.bad.total == 0
        return [(data[i]["input_ids"].tolist(), data[i]["loss_mask"].tolist()) for i in range(len(data))]

    rows = ours(mask_history=True)
    for b, ((chat, turns), (ids, sup), (ref_ids, ref_sup), (_, raw_sup)) in enumerate(
            zip(HISTORY_RECORDS, rows, ref_rows, raw)):
        assert ids == ref_ids and sup == ref_sup, f"record {b}: supervised spans differ from the reference's"
        runs = sum(m and (i == 0 or not raw_sup[i - 1]) for i, m in enumerate(raw_sup))
        assert runs == turns, f"record {b}: {runs} assistant turns before mask_history, expected {turns}"
        if turns:  # the kept run is the last assistant turn left, as the template marks it: content, <|end|>, "."
            answers = [m["content"] for m in chat["messages"] if m["role"] == "assistant"]
            kept = hf.convert_ids_to_tokens([t for t, m in zip(ids, sup) if m])
            whole = [*answers[turns - 1].split(), "<|end|>", "."]
            assert kept == whole[: len(kept)] and (kept == whole or len(ids) == SEQ_LENGTH), (b, kept)
            assert sup.index(True) == max(i for i, m in enumerate(raw_sup) if m and (i == 0 or not raw_sup[i - 1]))
        else:
            assert not any(sup), b
    # The default keeps today's spans, bit for bit, with the argument given or not; the guard refuses them.
    assert ours(mask_history=False) == ours() == raw
    with pytest.raises(AssertionError, match="2 supervised runs"):  # record 1 (two turns) is the first
        ref_collate(ref_dataset(raw, mask_history=False), block_size, guard=True)

    compare_with_reference(rows, ref_rows, block_size, guard=True)
