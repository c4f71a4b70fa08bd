"""Pretraining and SFT of block-diffusion Gemma 4 MoE models on Megatron-Core.

    python examples/pretrain_bdgemma.py                                    # embedded default: tiny model, CPU
    python examples/pretrain_bdgemma.py --config examples/configs/tiny_sft.yaml train.steps=20
    torchrun --nproc-per-node 8 examples/pretrain_bdgemma.py --config examples/configs/diffusiongemma_26b_sft.yaml

Positional `section.key=value` arguments override the YAML (values are parsed as YAML).

`--load DIR` resumes the training run in DIR (its run directory, or one of its `iter_N` checkpoints) exactly: with
the run config stored in its checkpoint, saving into DIR unless `checkpoint.save=...` is given here (a YAML's does
not move it); `--config` and overrides apply on top, each change is printed and takes effect (the LR schedule is
rebuilt from the new values at the checkpoint's step), and changes to the data, objective, sample stream or model
are refused. `--init-from DIR` starts a new run
(the `--config` and overrides given) from DIR's model: a checkpoint converted from HF, or another run's (e.g. SFT
from a pretraining run); optimizer, schedule and step start fresh.
At the end a run with the byte tokenizer prints its final losses beside what a model that learned nothing would
score on the same text (the byte-unigram entropy of the embedded training text, and ln 256), then samples from the
saved model, at any parallel layout (under pipeline parallelism the saved checkpoint is loaded again with the whole
stack on every rank). Pretraining continues `--sample PROMPT` (default: a line of the embedded training text) twice,
seeded with `train.seed`: with DiffusionGemma's block-diffusion sampler (`entropy_bound`) and with the AR head of the
same weights (temperature 0.7, top-k 10). An SFT run answers its data's first prompt (the chat template's rendering
of the first record up to its first user turn) greedily, unless `--sample` gives a user turn of its own.

`--print-config` prints the resolved run config (every key, where its value came from) and exits without
building anything; the trainer writes the same config as `run_config.yaml` into `checkpoint.save` and into each
checkpoint (docs/config.md lists every key).

An error ends the job with one line `error: <message>` and exit code 1, or 3 when the run diverged (a non-finite
loss or gradient); a signal (SIGTERM, SIGINT, SIGUSR1) saves the current step and exits 0
(`megatron_bdgemma/runtime/cli.py`, `megatron_bdgemma/training/stopping.py`; `BDGEMMA_TRACEBACK=1` adds the
traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_bdgemma.runtime.cli import entry_point, process_rank

if TYPE_CHECKING:
    from megatron_bdgemma.training.config import RunConfig

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny_pretrain.yaml"
PRETRAIN_SAMPLE = "    def __init__(self, "
"""A line of the embedded training text (Python's standard library): the model has seen how it goes on."""
AR_SAMPLING = dict(temperature=0.7, top_k=10)
"""The AR head's sample: a greedy AR decoder of a model this small repeats its most likely bytes (spaces)."""


@entry_point
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help=f"YAML run config (default: {DEFAULT_CONFIG.name}; with --load: the run's own, this on top)")
    parser.add_argument("--load", default=None, help="resume the training run in this save root or iter_N directory")
    parser.add_argument("--init-from", default=None,
                        help="start a new run from this checkpoint's model (converted from HF, or another run's)")
    parser.add_argument("--sample", default=None,
                        help=f"prompt to generate from after training ('' = none; default {PRETRAIN_SAMPLE!r}, for SFT "
                             "the data's first user turn)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved run config, one `key: value  # source` line per key (source: default, "
                             "yaml, override; checkpoint for --load's stored config), and exit without training")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_intermixed_args()

    if args.load and args.init_from:
        parser.error("--load resumes a run, --init-from starts a new one from weights: give one")

    from megatron_bdgemma.training.config import format_config, load_run_config

    sources: dict[str, str] = {}
    if args.load:  # reads the checkpoint: imports torch and megatron-core, also for --print-config
        from megatron_bdgemma.training.resume import resume_run_config

        run = resume_run_config(args.load, args.config, args.overrides, sources)
    else:
        start = [f"checkpoint.init_from={args.init_from}", "model.hf=null"] if args.init_from else []
        notes: list[str] = []
        run = load_run_config(args.config or DEFAULT_CONFIG, [*args.overrides, *start], notes, sources)
        if args.init_from:
            sources |= dict.fromkeys(("checkpoint.init_from", "model.hf"), "--init-from")
        if notes and not args.print_config and process_rank() == 0:
            print("\n".join(notes), flush=True)
    if args.print_config:
        print(format_config(run, sources), flush=True)
        return

    from megatron_bdgemma.training.trainer import train

    history = train(run)
    if run.data.tokenizer == "byte" and process_rank() == 0:
        print_losses_and_baselines(run, history)
    if args.sample != "" and run.checkpoint.save and run.data.tokenizer == "byte":
        print_sample(run, args.sample)


def print_losses_and_baselines(run: RunConfig, history: list[dict[str, float]]) -> None:
    """The run's final losses (nats per byte) beside two models that learned nothing from context, on the same
    text: one that knows only how often each byte occurs (the unigram entropy of the embedded pretraining text;
    it scores the same on both losses, which predict each byte of the text) and one that knows nothing (ln 256)."""
    last = [h for h in history if not h.get("skipped")][-run.train.log_interval:]
    if not last:
        return
    train = (f"train diffusion {sum(h['diffusion'] for h in last) / len(last):.2f}, AR "
             f"{sum(h['ar'] for h in last) / len(last):.2f} (mean of steps {last[0]['step']}-{last[-1]['step']})")
    evaluated = [h for h in history if "eval_ar" in h]
    held_out = (f"; held-out diffusion {evaluated[-1]['eval_diffusion']:.2f}, AR {evaluated[-1]['eval_ar']:.2f} "
                f"(step {evaluated[-1]['step']})" if evaluated else "")
    print(f"final losses, nats per byte: {train}{held_out}", flush=True)
    unigram = ""
    if run.data.mode == "pretrain" and not run.data.paths:
        unigram = (f"{embedded_unigram_entropy():.2f} for a model that knows only how often each byte occurs (the "
                   "unigram entropy of the training text), ")
    print(f"baselines on the same text: {unigram}{math.log(256):.2f} = ln 256 for a model that knows nothing",
          flush=True)


def embedded_unigram_entropy() -> float:
    """Entropy in nats of the token frequencies of the embedded pretraining corpus, as the model reads it (each
    document's bytes and its EOS)."""
    from collections import Counter

    from megatron_bdgemma.data import ByteTokenizer
    from megatron_bdgemma.data.embedded import stdlib_documents

    tokenizer = ByteTokenizer()
    counts = Counter(t for doc in stdlib_documents() for t in [*tokenizer.encode(doc), tokenizer.eod])
    total = sum(counts.values())
    return -sum(n / total * math.log(n / total) for n in counts.values())


def sample_messages(run: RunConfig, prompt: str | None) -> list[dict[str, str]] | None:
    """The conversation an SFT run samples from: `prompt` as a user turn, or the first record of its data up to its
    first user turn ([] when no record has one). None for pretraining (plain text)."""
    if run.data.mode != "sft":
        return None
    if prompt is not None:
        return [{"role": "user", "content": prompt}]
    from megatron_bdgemma.data import embedded_sft_path

    path = Path(run.data.paths[0]) if run.data.paths else Path(embedded_sft_path(run.data.cache_dir))
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            messages = json.loads(line).get("messages", []) if line.strip() else []
            users = [i for i, message in enumerate(messages) if message.get("role") == "user"]
            if users:
                return messages[: users[0] + 1]
    return []


def print_sample(run: RunConfig, prompt: str | None) -> None:
    """Samples from the saved checkpoint (rank 0 prints): an SFT run's greedy block-diffusion answer; a pretraining
    run's continuations by block diffusion (`entropy_bound`) and by the AR head, seeded with `train.seed`.

    Generation needs the whole stack and the whole sequence on each rank: under pipeline or context parallelism the
    model-parallel groups are made again with PP = 1 and CP = 1 (TP and EP kept, the pipeline and CP ranks joining
    data parallelism), and the checkpoint, which reshards, is loaded at that layout."""
    import torch

    from megatron_bdgemma.checkpointing import load_model
    from megatron_bdgemma.data import ByteTokenizer
    from megatron_bdgemma.generation import Autoregressive, EntropyBound, Greedy, generate
    from megatron_bdgemma.runtime.distributed import init_distributed

    p = run.parallel
    if p.pp > 1 or p.cp > 1:
        init_distributed(tp=p.tp, pp=1, ep=p.ep, etp=p.etp, cp=1, seed=run.train.seed)
    tokenizer = ByteTokenizer()
    messages = sample_messages(run, prompt)
    if messages == []:
        if process_rank() == 0:
            print("sample skipped: no record of the SFT data has a user turn to prompt with", flush=True)
        return
    if messages is not None:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        shown = messages[-1]["content"]
    else:
        text = shown = PRETRAIN_SAMPLE if prompt is None else prompt
    model = load_model(run.checkpoint.save, sequence_parallel=False).eval()
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer.encode(text)], device=device)
    # An SFT answer is a fact: greedy. Greedy continuations of free text by a model this small are runs of its most
    # likely byte (spaces), so pretraining samples, seeded alike on every rank (TP ranks decode in lock-step).
    seed = run.train.seed
    samplers = ([("", Greedy())] if messages is not None else
                [(f"block diffusion, entropy_bound, seed {seed}, ", EntropyBound()),
                 (f"AR head of the same weights, temperature {AR_SAMPLING['temperature']}, top-k "
                  f"{AR_SAMPLING['top_k']}, seed {seed}, ", Autoregressive(**AR_SAMPLING))])
    for how, sampler in samplers:
        out = generate(model, ids, sampler=sampler, max_new_tokens=2 * model.config.canvas_length,
                       eos_token_ids=[tokenizer.eod], pad_token_id=tokenizer.pad,
                       generator=torch.Generator(device).manual_seed(seed))
        if process_rank() == 0:
            answer = tokenizer.decode([t for t in out.generated[0].tolist() if t != tokenizer.pad])
            sample = f"{shown!r} → {answer!r}" if messages is not None else repr(shown + answer)
            print(f"sample ({how}{out.tokens_per_forward[0]:.2f} tokens per forward): {sample}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
