"""Contract: native generation (`megatron_bdgemma.generation`) reproduces HF `DiffusionGemmaForBlockDiffusion.generate`.

With torch's global generator seeded identically before both, our loop draws the same random numbers in HF's order
(one uniform canvas, then per step a multinomial over every position and a full uniform canvas), so on a tiny
random model the tokens are equal: batched left-padded prompts (one longer than the sliding window), the adaptive
stop, top-k, EOS ending rows at different canvases. Also: the KV cache equals re-encoding the prefix, the AR
baseline's cache equals recomputation, the samplers' rules, streaming, and clear errors for bad input.

The HF oracle runs with sdpa attention: its eager decoder-mask builder fails on padded batches
(`create_diffusion_decoder_attention_mask` passes the integer canvas as `inputs_embeds`, and `eager_mask` calls
`torch.finfo` on its dtype).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessorList, TopKLogitsWarper

import megatron_bdgemma
from megatron_bdgemma.generation import (
    Autoregressive,
    EncoderKVCache,
    EntropyBound,
    Greedy,
    MaxProbThreshold,
    build_sampler,
    encode_into,
    generate,
    left_pad,
    parse_sampler,
)
from megatron_bdgemma.generation import row_multinomial
from megatron_bdgemma.generation.samplers import entropy, filter_logits
from tests import hf_models
from tests.multiproc import run_in_processes

# The module (the package's `generate` is the function).
generate_module = importlib.import_module("megatron_bdgemma.generation.generate")

SEED = 7
CANVAS = 4
WINDOW = hf_models.BASE_TEXT["sliding_window"]  # 4
PAD = 0
PROMPTS = [list(range(5, 16)), [20, 21, 22, 23, 24]]  # 11 tokens (> window) and 5 (left-padded by 6)
NO_STOP = dict(max_denoising_steps=6)  # HF's temperatures: the random model never meets the adaptive stop
SHARP = dict(max_denoising_steps=8, t_max=0.03, t_min=0.015)  # low temperature: rows stop at different steps


def sharp_model(text_overrides=None):
    hf = hf_models.diffusion_gemma(text_overrides, canvas_length=CANVAS)
    with torch.no_grad():
        # Larger (tied) embeddings give sharper logits, so the adaptive stop can fire, and no near-ties.
        hf.model.decoder.embed_tokens.weight.mul_(10)
    return hf


@pytest.fixture(scope="module")
def models(tmp_path_factory, distributed_world):
    hf = sharp_model()
    path = hf_models.save(hf, tmp_path_factory.mktemp("generation") / "hf")
    hf.set_attn_implementation("sdpa")
    return hf, megatron_bdgemma.from_hf(path), path


def run_hf(hf, prompts, *, max_new_tokens=20, eos=None, logits_processor=None, **sampling):
    input_ids, padding = left_pad(prompts, PAD)
    if padding.any():
        sampling["attention_mask"] = (~padding).long()  # HF rejects attention_mask=None
    torch.manual_seed(SEED)
    return hf.generate(
        input_ids,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=PAD,
        logits_processor=logits_processor,
        **sampling,
    )


def run_ours(model, prompts, sampler, *, max_new_tokens=20, eos=(), **kwargs):
    input_ids, padding = left_pad(prompts, PAD)
    torch.manual_seed(SEED)
    return generate(
        model, input_ids, padding_mask=padding, sampler=sampler, max_new_tokens=max_new_tokens,
        eos_token_ids=list(eos), pad_token_id=PAD, **kwargs,
    )


@pytest.mark.parametrize(
    "case", ["batch_left_padded", "adaptive_stop", "top_k", "single_prompt_longer_than_window"]
)
def test_tokens_match_hf(models, model_parallel, case):
    hf, ours, _ = models
    prompts, sampling, processors = PROMPTS, NO_STOP, None
    if case == "adaptive_stop":
        sampling = SHARP
    elif case == "top_k":
        sampling = NO_STOP | dict(top_k=5)
        processors = LogitsProcessorList([TopKLogitsWarper(5)])
    elif case == "single_prompt_longer_than_window":
        prompts = [list(range(30, 43))]
    expected = run_hf(hf, prompts, logits_processor=processors, **{k: v for k, v in sampling.items() if k != "top_k"})
    got = run_ours(ours, prompts, EntropyBound(**sampling))
    assert torch.equal(got.sequences, expected.sequences)
    assert not got.sequences.is_inference()  # the loop runs in inference mode; what it returns is ordinary
    torch.testing.assert_close(got.tokens_per_forward, expected.tokens_per_forward.float())
    if case == "adaptive_stop":
        # The case is only meaningful if rows stopped early, and not in lock-step.
        assert (got.forwards < 5 * SHARP["max_denoising_steps"]).all()
        assert got.forwards[0] != got.forwards[1]


def test_rows_end_at_different_canvases_like_hf(models, model_parallel):
    """EOS in a committed canvas ends its row: pad after the EOS, later canvases all pad, loop stops when all end."""
    hf, ours, _ = models
    # Without the adaptive stop every canvas runs all its steps, so EOS handling cannot change the random draws and
    # the EOS ids can be read off a run without them.
    free = run_hf(hf, PROMPTS, **NO_STOP).sequences[:, len(PROMPTS[0]) :].view(2, 5, CANVAS).tolist()
    seen_row1 = [set(c) for c in free[1]]
    end_row0 = next(t for t in free[0][0] if t not in seen_row1[0] | seen_row1[1] | seen_row1[2] and t != PAD)
    end_row1 = next(t for t in free[1][2] if t not in seen_row1[0] | seen_row1[1] and t != PAD)
    eos = [end_row0, end_row1]

    expected = run_hf(hf, PROMPTS, eos=eos, **NO_STOP)
    got = run_ours(ours, PROMPTS, EntropyBound(**NO_STOP), eos=eos)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.tokens_per_forward, expected.tokens_per_forward.float())
    canvases = got.generated.view(2, -1, CANVAS)
    assert canvases.shape[1] == 3  # row 1 ends in canvas 2, so canvases 3 and 4 are never generated
    assert (canvases[0, 1:] == PAD).all() and (canvases[1, 2] != PAD).any()
    first = free[0][0].index(end_row0)
    assert canvases[0, 0, : first + 1].tolist() == free[0][0][: first + 1]
    assert (canvases[0, 0, first + 1 :] == PAD).all()


def test_compiled_decode_keeps_hf_tokens(models, model_parallel, monkeypatch):
    """`compile=True` through inductor (the product path; ~1 min of compiling on one CPU core): the canvas forward's
    logits are the eager ones up to fp32 rounding, and the tokens and forward counts stay HF's. Five canvases (the
    second recompiles with the prefix dynamic) under the adaptive stop (rows stop apart, so the live-rows decode
    compiles too)."""
    hf, ours, _ = models
    compiled = generate_module.compiled_decode(ours)
    errors = []

    def compared(*args, **kwargs):
        logits = compiled(*args, **kwargs)
        # The eager decode rewrites the canvas K/V in the KVBuffers: the same values up to rounding, read by no one
        # before the next decode writes its own.
        eager = ours.decode(*args, **kwargs)
        errors.append(((logits - eager).abs().max() / eager.abs().max()).item())
        return logits

    monkeypatch.setattr(generate_module, "compiled_decode", lambda model: compared)
    expected = run_hf(hf, PROMPTS, **SHARP)
    got = run_ours(ours, PROMPTS, EntropyBound(**SHARP), compile=True)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.tokens_per_forward, expected.tokens_per_forward.float())
    assert got.forwards[0] != got.forwards[1]  # the live-rows path ran
    # Relative to the step's largest logit (softcapped, |x| < 30): inductor sums the norms' and GEMMs' terms in
    # another order, a few fp32 ulps.
    assert errors and max(errors) < 1e-5, errors


def test_compiled_distribution_is_the_eager_one():
    """The compiled softmax / entropy / argmax of tempered logits, filtered (-inf) entries included: argmax equal,
    probabilities and entropies to fp32 rounding (inductor's exp and sums in another order)."""
    generator = torch.Generator().manual_seed(0)
    processed = torch.randn(2, 4, 96, generator=generator) * 8
    processed[0, :, 5:] = float("-inf")  # top-k-filtered rows
    processed[1, 0, 1:] = float("-inf")  # a one-hot row: zero entropy
    expected = generate_module.distribution(processed)
    got = generate_module.compiled_distribution()(processed)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[2], expected[2])
    assert got[1][1, 0] == 0


def test_cached_loop_matches_recomputing_the_prefix(models, model_parallel):
    _, ours, _ = models
    kwargs = dict(eos=[37, 55])
    cached = run_ours(ours, PROMPTS, EntropyBound(**SHARP), **kwargs)
    recomputed = run_ours(ours, PROMPTS, EntropyBound(**SHARP), recompute_prefix=True, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert torch.equal(cached.forwards, recomputed.forwards)


def test_cache_keeps_what_a_full_encode_gives(models, model_parallel):
    """Prompt then two chunks through `encode_into` = one causal encode of everything (sliding: last window-1)."""
    _, ours, _ = models
    input_ids, padding = left_pad(PROMPTS, PAD)
    chunks = [torch.tensor([[40, 41, 42, 43], [50, 51, 52, 53]]), torch.tensor([[60, 61, 62, 63], [70, 71, 72, 73]])]
    cache = EncoderKVCache.for_model(ours)
    with torch.no_grad():
        encode_into(ours, cache, input_ids, padding_mask=padding)
        for chunk in chunks:
            encode_into(ours, cache, chunk)
        full_ids = torch.cat([input_ids, *chunks], dim=1)
        full = ours.encode(full_ids, padding_mask=torch.cat([padding, torch.zeros(2, 8, dtype=torch.bool)], dim=1))
    assert cache.length == full_ids.shape[1]
    valid = ~padding.any(dim=0)  # positions valid in every row; padded keys are never attended
    for layer, ((key, value), (full_key, full_value)) in enumerate(zip(cache.kv, full.kv)):
        kept = full_ids.shape[1] if ours.config.layer_types[layer] == hf_models.FULL else WINDOW - 1
        assert key.shape[2] == kept
        row_valid = torch.cat([valid, torch.ones(8, dtype=torch.bool)])[-kept:]
        for got, expected in ((key, full_key), (value, full_value)):
            expected = expected[:, :, -kept:]
            torch.testing.assert_close(got[:, :, row_valid], expected[:, :, row_valid], atol=1e-5, rtol=1e-5)


def test_buffered_decode_matches_the_core_attention_decode(models, model_parallel):
    """A decode through the cache's `KVBuffer`s (fused SDPA) gives the logits of one through the configured core
    attention over the same K/V and masks, to the fp32 canvas-logit tolerance of tests/test_decode_parity.py (the
    kernels differ only in summation order; this model's ×10 embeddings make its logits large)."""
    _, ours, _ = models
    input_ids, padding = left_pad(PROMPTS, PAD)
    cache = EncoderKVCache.for_model(ours)
    canvas = torch.tensor([[40, 41, 42, 43], [50, 51, 52, 53]])
    positions = (cache.length + input_ids.shape[1] + torch.arange(CANVAS)).expand(2, CANVAS)
    signal = torch.randn(2, CANVAS, ours.config.vocab_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        encode_into(ours, cache, input_ids, padding_mask=padding)
        decodes = [
            ours.decode(canvas, kv, canvas_position_ids=positions, attention_mask=cache.decode_masks(CANVAS),
                        self_conditioning_logits=signal)
            for kv in (cache.decode_buffers(CANVAS), cache.kv)
        ]
    torch.testing.assert_close(decodes[0], decodes[1], atol=1e-4, rtol=0)


def test_autoregressive_baseline_matches_recomputation(models, model_parallel):
    _, ours, _ = models
    input_ids, padding = left_pad(PROMPTS, PAD)
    got = generate(ours, input_ids, padding_mask=padding, sampler=Autoregressive(), max_new_tokens=6, eos_token_ids=[])
    sequence = input_ids
    with torch.no_grad():
        for _ in range(6):
            generated = torch.zeros(2, sequence.shape[1] - padding.shape[1], dtype=torch.bool)
            full_padding = torch.cat([padding, generated], dim=1)
            logits = ours.encode(sequence, padding_mask=full_padding, return_logits=True).logits
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got.sequences, sequence)
    assert got.forwards.tolist() == [6, 6]


def _generate_both_ways(model):
    """Diffusion (adaptive stop on) and AR generations of `PROMPTS` with a fixed seed."""
    input_ids, padding = left_pad(PROMPTS, PAD)
    torch.manual_seed(SEED)
    diffusion = generate(model, input_ids, padding_mask=padding, sampler=EntropyBound(**SHARP), max_new_tokens=12,
                         eos_token_ids=[])
    autoregressive = generate(model, input_ids, padding_mask=padding, sampler=Autoregressive(), max_new_tokens=6,
                              eos_token_ids=[])
    return diffusion.sequences, diffusion.forwards, autoregressive.sequences


def _generate_at_tp2(rank, path):
    from megatron_bdgemma.runtime.distributed import init_distributed

    init_distributed(tp=2)
    return _generate_both_ways(megatron_bdgemma.from_hf(path))


def test_tensor_parallel_ranks_generate_in_lock_step(tmp_path, model_parallel):
    """TP=2 (both ranks seeded alike) generates what one rank does, on both ranks."""
    path = str(hf_models.save(sharp_model(dict(num_global_key_value_heads=2, num_key_value_heads=2)), tmp_path / "hf"))
    expected = _generate_both_ways(megatron_bdgemma.from_hf(path))
    for rank, got in enumerate(run_in_processes(_generate_at_tp2, 2, path)):
        for ours, reference in zip(got, expected):
            assert torch.equal(ours, reference), rank


def test_sampler_rules():
    # Entropy bound: sorted entropies 0, .08, .3, .5 → cumsum - H = 0, 0, .08, .38 → the three lowest pass 0.1.
    entropies = torch.tensor([[0.5, 0.0, 0.3, 0.08]])
    assert EntropyBound().accept(None, entropies).tolist() == [[False, True, True, True]]
    # Max-probability threshold: every position at or above it, and always the most confident one.
    probs = torch.tensor([[[0.95, 0.05], [0.5, 0.5], [0.09, 0.91]], [[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]]])
    assert MaxProbThreshold(threshold=0.9).accept(probs, None).tolist() == [[True, False, True], [False, True, False]]
    # At the threshold exactly the position is accepted, as in Fast-dLLM (NVlabs/Fast-dLLM `get_transfer_index`
    # drops a position only when `confidence < threshold`); one fp32 step below it is not. Position 0 is the most
    # confident, so positions 1 and 2 are judged by the threshold alone.
    below = torch.nextafter(torch.tensor(0.75), torch.tensor(0.0)).item()
    probs = torch.tensor([[[0.875, 0.125], [0.75, 0.25], [below, 1 - below]]])
    assert probs[0, 1, 0] == 0.75 and probs[0, 2, 0] < 0.75
    assert MaxProbThreshold(threshold=0.75).accept(probs, None).tolist() == [[True, True, False]]
    # Top-p keeps the smallest top set reaching p; top-k keeps the k largest.
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1)  # probs ≈ .64 .24 .09 .03
    assert torch.isfinite(filter_logits(logits, None, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, 3, None)).tolist() == [[True, True, True, False]]


def test_entropy_from_the_softmax_is_categoricals():
    """`entropy(logits, softmax(logits))` is `Categorical(logits).entropy()` (HF's) to fp32 rounding: on flat, peaked
    and nearly saturated rows (tempered logits reach ±75), and with top-k filtered (-inf) logits."""
    scales = torch.tensor([0.5, 5.0, 75.0])[:, None, None]
    logits = torch.randn(3, 16, 2048, generator=torch.Generator().manual_seed(0)) * scales
    logits = torch.cat([logits, filter_logits(logits, 5, None)])
    got = entropy(logits, torch.softmax(logits, dim=-1))
    expected = torch.distributions.Categorical(logits=logits.double()).entropy()
    assert got.isfinite().all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fast_path", [True, False])
def test_row_multinomial_draws_what_torch_multinomial_draws(monkeypatch, fast_path):
    """The wanted rows' samples, the generator state after, and the uniform canvas drawn next all equal a full
    `torch.multinomial`'s, for the passed generator and for torch's global one, across mt19937 block boundaries."""
    if not fast_path:
        monkeypatch.setattr(row_multinomial, "_reproduces_torch", lambda: False)
    assert row_multinomial._reproduces_torch() is fast_path  # this build takes the path under test
    shapes = torch.Generator().manual_seed(0)
    for seed in range(60):
        rows, vocab = int(torch.randint(1, 40, (), generator=shapes)), int(torch.randint(1, 3000, (), generator=shapes))
        probs = torch.softmax(3 * torch.randn(rows, vocab, generator=shapes), dim=-1)
        wanted = torch.rand(rows, generator=shapes) < (0.3 if seed % 3 else 1.0)
        use_global = seed % 2 == 0

        def draw(sample):
            generator = None if use_global else torch.Generator().manual_seed(seed)
            if use_global:
                torch.manual_seed(seed)
            tokens = sample(generator)
            noise = torch.randint(0, vocab, (rows,), generator=generator)
            return tokens, noise, (torch.get_rng_state() if use_global else generator.get_state())

        expected = draw(lambda g: torch.multinomial(probs, 1, generator=g).squeeze(-1))
        got = draw(lambda g: row_multinomial.multinomial_rows(probs, wanted, g))
        assert torch.equal(got[0][wanted], expected[0][wanted]), seed
        assert (got[0][~wanted] == -1).all()
        assert torch.equal(got[1], expected[1]) and torch.equal(got[2], expected[2]), seed


@pytest.mark.parametrize("sampler", [Greedy(max_denoising_steps=8), MaxProbThreshold(threshold=0.5, **SHARP)])
def test_other_samplers_are_seeded(models, model_parallel, sampler):
    _, ours, _ = models
    input_ids, padding = left_pad(PROMPTS, PAD)

    def run(seed):
        return generate(ours, input_ids, padding_mask=padding, sampler=sampler, max_new_tokens=12, eos_token_ids=[],
                        generator=torch.Generator().manual_seed(seed))

    first, again = run(1), run(1)
    assert torch.equal(first.sequences, again.sequences)
    assert first.generated.shape == (2, 12)
    if isinstance(sampler, Greedy):
        # Greedy stops each canvas as soon as its argmax canvas repeats.
        assert (first.forwards < 3 * sampler.max_denoising_steps).all()


def test_streaming_gets_each_committed_canvas(models, model_parallel):
    """Each committed canvas in order, with each row's forwards so far: the last call's are the output's."""
    _, ours, _ = models
    streamed = []
    out = run_ours(ours, PROMPTS, EntropyBound(**NO_STOP),
                   on_canvas=lambda i, b, f: streamed.append((i, b.clone(), f.clone())))
    assert [i for i, _, _ in streamed] == list(range(5))
    assert torch.equal(torch.cat([block for _, block, _ in streamed], dim=1), out.generated)
    forwards = torch.stack([f for _, _, f in streamed])
    assert (forwards[1:] >= forwards[:-1]).all() and (forwards[0] > 0).all()
    assert torch.equal(forwards[-1], out.forwards)


@pytest.mark.parametrize(
    "prompt,padding,match",
    [
        (torch.zeros(1, 0, dtype=torch.long), None, "empty prompt"),
        (torch.tensor([[0, 0], [5, 6]]), torch.tensor([[True, True], [False, False]]), "empty prompt"),
        (torch.tensor([[5, 6, 0]]), torch.tensor([[False, False, True]]), "left-padded"),
        (torch.full((1, 513), 5), None, "longer than the model's maximum"),
        (torch.full((1, 510), 5), None, "lower max_new_tokens"),
        (torch.tensor([[5, 96]]), None, r"in \[0, 96\)"),
    ],
)
def test_bad_input_is_a_clear_error(models, model_parallel, prompt, padding, match):
    _, ours, _ = models
    with pytest.raises(ValueError, match=match):
        generate(ours, prompt, padding_mask=padding, sampler=Greedy(max_denoising_steps=1), max_new_tokens=8)


def test_compiling_the_ar_baseline_is_a_clear_error(models, model_parallel):
    _, ours, _ = models
    with pytest.raises(ValueError, match="compile=True compiles the block-diffusion canvas forward"):
        generate(ours, torch.tensor([[5, 6]]), sampler=Autoregressive(), max_new_tokens=2, compile=True)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("beam_search", "unknown sampler 'beam_search'"),
        ("entropy_bound:temperature=1", "unknown option 'temperature' for sampler 'entropy_bound'"),
        ("greedy:top_k=5", "unknown option 'top_k' for sampler 'greedy'"),
        ("entropy_bound:entropy_bound=-1", "entropy_bound must be > 0"),
        ("max_prob_threshold:threshold", "not key=value"),
        ("entropy_bound:max_denoising_steps=2.5", "needs int"),
    ],
)
def test_bad_sampler_option_is_a_clear_error(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_sampler(spec)
    with pytest.raises(ValueError, match="unknown option"):
        build_sampler("entropy_bound", confidence=0.1)


def test_parse_sampler_converts_values():
    sampler = parse_sampler("max_prob_threshold:threshold=0.8, max_denoising_steps=16, top_k=none, top_p=0.9")
    assert sampler == MaxProbThreshold(threshold=0.8, max_denoising_steps=16, top_p=0.9)


GENERATE_TOOL = Path(__file__).resolve().parent.parent / "tools" / "generate.py"
PROGRESS = re.compile(r"canvas (\d+)/3: (\d+) tokens, (\d+\.\d\d) tokens per forward, \d+\.\d tokens/s")
SUMMARY = re.compile(r"generated tokens: (\d+) in \d+\.\d+ s = \d+\.\d tokens/s")


def generate_tool():
    spec = importlib.util.spec_from_file_location("generate_tool", GENERATE_TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_text_stream_prints_only_settled_text():
    """A block that ends inside a UTF-8 character, or before a token that rewrites the text before it: nothing
    printed is taken back, and what is printed, with `finish`, reads as the final text."""
    from megatron_bdgemma.data import ByteTokenizer

    tokenizer = ByteTokenizer()
    text = "naïve — 日本語 \n ok"
    ids = tokenizer.encode(text)
    stream = generate_tool().TextStream(tokenizer.decode)
    pieces = [stream.add(ids[i:i + 3]) for i in range(0, len(ids), 3)]  # 3 bytes per block: cuts characters
    assert all("\ufffd" not in piece for piece in pieces) and "".join(pieces) + stream.finish(text) == text
    assert pieces[:2] == ["na", "ïve"]  # "na" + 0xC3 (half of ï) prints "na"; then 0xAF "ve" completes it
    # A decoder that joins " n't" to the word before (as HF's clean-up does): the printed "is n" is not the final
    # text's beginning, so `finish` gives the whole text again on a line of its own.
    stream = generate_tool().TextStream(lambda ids: "".join(map(chr, ids)).replace(" n't", "n't"))
    assert [stream.add(list(map(ord, part))) for part in ("is n", "'t", " ok")] == ["is n", "", ""]
    assert stream.finish("isn't ok") == "\nisn't ok"


def test_generate_tool_prints_progress_and_streams(models, model_parallel, capsys):
    """tools/generate.py: a progress line per canvas on stderr whose last counts are the run's; `--stream`'s text,
    one prompt inline and several a line per block, reads as the run's final text."""
    _, _, path = models
    tool = generate_tool()
    args = ["--hf", str(path), "--max-new-tokens", "12", "--sampler", "entropy_bound:max_denoising_steps=3",
            "--eos-token-id", "1", "--pad-token-id", "0"]

    def progress(stderr: str) -> list[tuple[int, int, float]]:
        lines = stderr.splitlines()
        assert lines and all(PROGRESS.fullmatch(line) for line in lines), stderr
        counts = [(int(a), int(b), float(c)) for a, b, c in (PROGRESS.fullmatch(line).groups() for line in lines)]
        assert [done for done, _, _ in counts] == list(range(1, len(counts) + 1))
        return counts

    # Two prompts, in this process: a line per block of each row's new text, then the final texts.
    assert tool.main([*args, "--prompt", "5 6 7 8 9", "--prompt", "20 21", "--stream"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    blocks = [line.removeprefix(f"[block {i}] ").split(" | ") for i, line in enumerate(lines) if line.startswith("[block")]
    assert lines[len(blocks)] == "=== prompt 0: '5 6 7 8 9'" and lines[len(blocks) + 2] == "=== prompt 1: '20 21'"
    assert ["".join(row) for row in zip(*blocks)] == [lines[len(blocks) + 1], lines[len(blocks) + 3]]
    per_forward = [float(x) for x in lines[-2].removeprefix("tokens per forward: ").split(", ")]
    (_, tokens, last_per_forward), total = progress(err)[-1], int(SUMMARY.fullmatch(lines[-1]).group(1))
    assert len(blocks) == len(progress(err)) and tokens == total == sum(len(t.split()) for t in lines[-6:-3:2])
    assert abs(last_per_forward - sum(per_forward) / 2) <= 0.006  # both rounded: 2 and 3 decimals
    assert tool.main([*args, "--prompt", "5", "--sampler", "nucleus"]) == 1
    assert capsys.readouterr().err.startswith("error: --sampler: unknown sampler 'nucleus'; choose one of")

    # One prompt streamed inline through the CLI: the same output as without --stream, but the time.
    assert tool.main([*args, "--prompt", "5 6 7 8 9"]) == 0
    plain = capsys.readouterr().out.splitlines()
    done = subprocess.run([sys.executable, str(GENERATE_TOOL), *args, "--prompt", "5 6 7 8 9", "--stream"], text=True,
                          capture_output=True, timeout=300,
                          env=os.environ | {"PYTHONPATH": str(GENERATE_TOOL.parents[1]), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and done.stdout.splitlines()[:-1] == plain[:-1], (done.stdout, plain, done.stderr)
    assert progress(done.stderr)[-1][1] == int(SUMMARY.fullmatch(done.stdout.splitlines()[-1]).group(1))
