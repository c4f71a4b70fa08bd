"""tools/plan.py: the model it plans is the one transformers builds (parameter count), at any layout, on meta."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SFT_26B = ROOT / "examples" / "configs" / "diffusiongemma_26b_sft.yaml"
PRETRAIN_26B = ROOT / "examples" / "configs" / "diffusiongemma_26b_pretrain.yaml"

# google/diffusiongemma-26B-A4B-it's text config as recorded in /work/shared/reference/automodel_diffusion_gemma.md
# §1.1 (its checkpoint's config.json, not transformers' defaults).
TEXT_26B = dict(
    vocab_size=262_144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16,
    num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 5, sliding_window=1024, num_experts=128,
    top_k_experts=8, moe_intermediate_size=704, max_position_embeddings=262_144, final_logit_softcapping=30.0,
    pad_token_id=0, eos_token_id=1,
)


def _plan(config: Path, gpus: int, *overrides: str) -> tuple[dict[str, float], str]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plan.py"), "--config", str(config), "--gpus", str(gpus), *overrides],
        capture_output=True, text=True, timeout=300, env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), out.stdout
    return {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", last)}, out.stdout


def _hf_text_params(model: torch.nn.Module, experts_only: bool = False) -> int:
    """Unique parameters of the text model (encoder and decoder stacks are tied copies), without the vision tower
    and without `per_expert_scale`, which import folds into each expert's down projection; or only the routed
    experts' (`experts_only`)."""
    seen, total = set(), 0
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen or re.search(r"vision|audio", name) or name.endswith("per_expert_scale"):
            continue
        if experts_only and ".experts." not in name:
            continue
        seen.add(id(param))
        total += param.numel()
    return total


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> tuple[str, int, int]:
    """4 layers, three sliding then one full, so each pipeline stage (and virtual stage) holds a different mix."""
    from tests import hf_models

    layer_types = [hf_models.SLIDING] * 3 + [hf_models.FULL]
    model = hf_models.diffusion_gemma(dict(num_global_key_value_heads=2, num_experts=4, num_hidden_layers=4,
                                           layer_types=layer_types), canvas_length=8)
    # Active per token: all but the experts a token is not routed to (top 2 of 4).
    active = _hf_text_params(model) - _hf_text_params(model, experts_only=True) // 2
    return str(hf_models.save(model, tmp_path_factory.mktemp("tiny") / "hf")), _hf_text_params(model), active


PP2 = ["parallel.pp=2", "checkpoint.save=null"]


@pytest.mark.parametrize(
    "gpus,layout",
    [(1, []), (4, ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1", "train.global_batch_size=16"]), (2, PP2),
     (2, [*PP2, "parallel.vpp=2"])],
    ids=["one_rank", "tp2_ep2", "pp2", "pp2_vpp2"],
)
def test_tiny_params_equal_transformers(tmp_path, tiny_hf, model_parallel, gpus, layout):
    """The planner's whole-model and active-per-token counts, rebuilt from one rank's shards (one rank per pipeline
    stage), equal transformers' counts. Under PP each stage's count equals its share of the one-stage model on the
    meta device: Megatron's even split of the layers into pp × vpp chunks, chunk c on stage c mod pp, the embedding
    and the self-conditioning module on the first stage, the final norm and the tied copy of the embedding on the
    last."""
    path, expected, active = tiny_hf
    result, table = _plan(ROOT / "examples" / "configs" / "tiny_sft.yaml", gpus, f"model.hf={path}",
                          f"data.cache_dir={tmp_path}", *layout)
    assert (result["params_total"], result["params_active_per_token"]) == (expected, active), table
    if "parallel.pp=2" not in layout:
        return
    from transformers import AutoConfig

    from megatron_bdgemma.config import config_from_hf
    from megatron_bdgemma.model import BDGemmaModel

    pp, vpp = 2, 2 if "parallel.vpp=2" in layout else 1
    config = config_from_hf(AutoConfig.from_pretrained(path), use_cpu_initialization=True, perform_initialization=False)
    with torch.device("meta"):
        whole = BDGemmaModel(config)
    per_chunk = config.num_layers // (pp * vpp)
    params, layers = [0] * pp, [[] for _ in range(pp)]
    for name, param in whole.named_parameters():
        if match := re.match(r"decoder\.layers\.(\d+)\.", name):
            stage = int(match.group(1)) // per_chunk % pp
        else:
            stage = pp - 1 if name.startswith("decoder.final_layernorm") else 0
            assert name.startswith(("embedding.", "self_conditioning.", "decoder.final_layernorm")), name
        params[stage] += param.numel()
    params[-1] += whole.embedding.word_embeddings.weight.numel()  # the LM head's tied copy
    for chunk in range(pp * vpp):
        first = chunk * per_chunk + 1
        layers[chunk % pp].append(f"{first}-{first + per_chunk - 1}" if per_chunk > 1 else f"{first}")
    stages = re.findall(r"^\| (\d+) \| ([\d, -]+) \| ([\d,]+) \| (\d+) \|", table, re.M)
    assert [(int(s), lay, int(n.replace(",", ""))) for s, lay, n, _ in stages] == [
        (stage, ", ".join(layers[stage]), params[stage]) for stage in range(pp)
    ], table
    assert sum(params) - whole.embedding.word_embeddings.weight.numel() == expected


def test_26b_params_equal_transformers_and_recipes_fit(tmp_path):
    """The real shape on the meta device: transformers' DiffusionGemma (from the checkpoint's config values) and the
    planner at the SFT recipe's layout count the same parameters; the preset agrees, also at PP 2 (the README's
    example); both recipes fit 80 GB."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma import DiffusionGemmaTextConfig

    from megatron_bdgemma.hf_reference import TINY_VISION

    config = DiffusionGemmaConfig(text_config=DiffusionGemmaTextConfig(**TEXT_26B), vision_config=TINY_VISION,
                                  canvas_length=256)
    with torch.device("meta"):
        expected = _hf_text_params(DiffusionGemmaForBlockDiffusion(config))
    config.save_pretrained(tmp_path / "hf")  # config.json only: the planner needs no weights
    from_hf, table = _plan(SFT_26B, 8, f"model.hf={tmp_path / 'hf'}")
    assert from_hf["params_total"] == expected, table
    assert 3.5e9 < from_hf["params_active_per_token"] < 4.5e9, table  # "A4B"
    assert from_hf["peak_gib_per_rank"] <= 80 * 0.9, table
    from_preset, _ = _plan(PRETRAIN_26B, 64)
    assert from_preset["params_total"] == expected
    assert from_preset["peak_gib_per_rank"] <= 80 * 0.9
    # The README's pipeline example: same model over two stages, its stage rows and RESULT line as printed there.
    pipelined, table = _plan(PRETRAIN_26B, 64, "parallel.pp=2")
    assert pipelined["params_total"] == expected, table
    readme = (ROOT / "README.md").read_text()
    shown = [line for line in table.splitlines() if line.startswith(("| 0 |", "| 1 |", "RESULT"))]
    assert len(shown) == 3 and all(line in readme for line in shown), table


class _Live(torch.autograd.Function):
    """Identity that counts a micro-batch in flight from its forward until its backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counter: list[int]) -> torch.Tensor:
        ctx.counter = counter
        counter[0] += 1
        counter[1] = max(counter[1], counter[0])
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.counter[0] -= 1
        return grad, None


def _schedules_in_flight(rank: int, cases: list[tuple[int, int | None, int]]) -> list[tuple[list[int], list[int]]]:
    """Per case (pp, vpp, micro-batches) and stage: the most micro-batches in flight while Megatron's own training
    schedule runs (a one-parameter model per chunk; the fake backend's p2p does nothing), and the planner's count."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_bdgemma.config import PRESETS
    from megatron_bdgemma.runtime.distributed import destroy_distributed
    from megatron_bdgemma.training.plan import _in_flight

    class Chunk(torch.nn.Module):
        def __init__(self, config) -> None:
            super().__init__()
            self.config, self.model_type, self.input_tensor = config, ModelType.encoder_or_decoder, None
            self.weight = torch.nn.Parameter(torch.ones(()))

        def set_input_tensor(self, tensor) -> None:
            self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

    destroy_distributed()  # this check needs fake worlds, one per stage, instead of the helper's gloo world
    out = []
    for pp, vpp, microbatches in cases:
        measured, planned = [], []
        for stage in range(pp):
            dist.init_process_group("fake", store=FakeStore(), rank=stage, world_size=pp)
            parallel_state.initialize_model_parallel(pipeline_model_parallel_size=pp,
                                                     virtual_pipeline_model_parallel_size=vpp,
                                                     create_gloo_process_groups=False)
            config = PRESETS["tiny"](pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                                     pipeline_dtype=torch.float32, hidden_size=4)
            chunks, counter = [Chunk(config) for _ in range(vpp or 1)], [0, 0]

            def step(data, model):
                x = model.input_tensor if model.input_tensor is not None else torch.zeros(3, 1, 4)
                return _Live.apply(x * model.weight, counter), lambda y: (y.sum() * 0, {})

            get_forward_backward_func()(
                forward_step_func=step, model=chunks, num_microbatches=microbatches, seq_length=3, micro_batch_size=1,
                data_iterator=[iter(range(microbatches)) for _ in chunks] if vpp else iter(range(microbatches)),
            )
            measured.append(counter[1])
            planned.append(_in_flight(microbatches, config))
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
        out.append((measured, planned))
    return out


SCHEDULE_CASES = [(2, None, 4), (4, None, 8), (4, None, 2), (2, 2, 4), (4, 2, 8), (2, 3, 2)]
"""(pp, vpp, micro-batches) whose in-flight counts are measured on Megatron's schedules."""


def test_in_flight_counts_megatrons_schedules(fake_world_results):
    """The micro-batches the planner holds in flight per stage are those Megatron's 1F1B (and interleaved 1F1B)
    schedule keeps between a forward and its backward, counted while the schedule runs: stage i of pp holds
    min(pp - i, m); interleaved, 2·(pp - i - 1) + (vpp - 1)·pp + 1 model-chunk micro-batches (capped at vpp·m)."""
    cases, results = SCHEDULE_CASES, fake_world_results["schedules"]
    for (pp, vpp, m), (measured, planned) in zip(cases, results):
        assert planned == measured, f"pp {pp}, vpp {vpp}, {m} micro-batches: planned {planned}, schedule {measured}"
    assert results[1][0] == [4, 3, 2, 1] and results[2][0] == [2, 2, 2, 1] and results[4][0] == [11, 9, 7, 5]


# The `tiny` preset's shape (megatron_bdgemma/config.py): hidden 64; 4 query heads of 16 (sliding) or 32 (full)
# channels; KV 2 groups x 16 (sliding) or 1 x 32 (full); dense GeGLU 128; top-2 experts of 32; vocabulary 512;
# 4 layers; canvas 16; self-conditioning on. fp32 activations: 4 bytes.
H, HEADS, DENSE_I, EXPERT_I, TOP_K, VOCAB, LAYERS, CANVAS, FP32 = 64, 4, 128, 32, 2, 512, 4, 16, 4
Q = HEADS * 32  # the widest layer's query width (full layers), which the estimate takes for every layer
KV = max(2 * 16, 1 * 32)
KEPT_PER_TOKEN = {  # elements a layer keeps per token: attention + dense GeGLU + router, norms and experts
    "none": (4 * H + 2 * Q + 2 * KV) + (3 * H + 3 * DENSE_I) + (6 * H + TOP_K * (2 * H + 3 * EXPERT_I)),
    # selective core_attn + moe + shared_experts: the dense branch keeps its input and output; the experts keep
    # the dispatched inputs and their outputs (no fc1 / activation); attention's own tensors are unchanged.
    "selective": (4 * H + 2 * Q + 2 * KV) + 2 * H + (6 * H + TOP_K * 2 * H),
}
assert KEPT_PER_TOKEN == {"none": 1984, "selective": 1344}


def _eager_probabilities(batch: int, s: int, r: int) -> int:
    """Eager attention's fp32 probabilities and their dropout-free copy (x 2) per layer: the encoder's S x S
    scores, and the canvas' R queries over S + R keys."""
    return batch * HEADS * (s * s + r * (s + r)) * FP32 * 2


def _in_fake_worlds(rank: int, schedule_cases: list, plan_cases: list[tuple[Path, int, list[str]]]) -> dict[str, list]:
    """One spawned process (a spawn costs seconds) for both checks that need fake worlds: in-flight counts on
    Megatron's schedules, and the planner's (in-flight, activation bytes) per stage."""
    from megatron_bdgemma.training.config import load_run_config
    from megatron_bdgemma.training.plan import plan_run

    schedules = _schedules_in_flight(rank, schedule_cases)  # it leaves no world behind; plan_run makes its own
    plans = [[(stage.in_flight, stage.activation_bytes) for stage in plan_run(load_run_config(config, overrides),
                                                                              gpus).stages]
             for config, gpus, overrides in plan_cases]
    return dict(schedules=schedules, plans=plans)


SFT_CONFIG = ROOT / "examples" / "configs" / "tiny_sft.yaml"
PRETRAIN_CONFIG = ROOT / "examples" / "configs" / "tiny_pretrain.yaml"
SELECTIVE = ["train.recompute=selective", "train.recompute_modules=[core_attn, moe, shared_experts]"]
VPP = ["parallel.pp=2", "parallel.vpp=2", "data.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=8"]
PLAN_CASES = [(SFT_CONFIG, 1, []), (SFT_CONFIG, 1, SELECTIVE), (PRETRAIN_CONFIG, 2, VPP)]
"""(config, GPUs, overrides) planned by test_activation_bytes_equal_closed_form_counts."""


@pytest.fixture(scope="module")
def fake_world_results() -> dict[str, list]:
    from tests.multiproc import run_in_processes

    (results,) = run_in_processes(_in_fake_worlds, 1, SCHEDULE_CASES, PLAN_CASES, timeout_s=200)
    return results


def test_activation_bytes_equal_closed_form_counts(fake_world_results):
    """The planner's activation bytes per stage, against counts written out here for the tiny preset:

    - SFT, one rank, eager attention (S = 96 encoder + R = 16 canvas tokens, micro-batch 4): every layer keeps its
      per-token tensors and the attention probabilities; the LM head's logits, softmax and gradient cover the
      encoder and canvas rows plus pass 1's canvas rows (self-conditioning);
    - the same with selective recompute of core_attn, moe and shared_experts: no probabilities, smaller layers;
    - pretraining at PP 2 x VPP 2 (S = R = 32, micro-batch 2, 4 micro-batches): one layer per model chunk; Megatron's
      interleaved schedule holds 2·(pp - i - 1) + (vpp - 1)·pp + 1 model-chunk micro-batches on stage i (5 and 3),
      each keeping a received and a sent [S + R, B, H] tensor; the first stage also keeps pass 1's final hidden
      [R, B, H] of all 4 micro-batches, the last one the loss logits.
    """
    got = fake_world_results["plans"]

    s, r, b = 96, CANVAS, 4  # SFT: one scored block per example
    tokens = (s + r) * b
    head = 3 * ((s + r) * b + r * b) * VOCAB * FP32  # logits, softmax, gradient
    assert got[0] == [(1, dict(layers=LAYERS * (tokens * KEPT_PER_TOKEN["none"] * FP32 + _eager_probabilities(b, s, r)),
                               logits=head, pipeline=0))]
    assert got[1] == [(1, dict(layers=LAYERS * tokens * KEPT_PER_TOKEN["selective"] * FP32, logits=head, pipeline=0))]

    s = r = 32  # pretraining scores every block: the canvas is the whole sequence
    b, microbatches = 2, 4
    layer = (s + r) * b * KEPT_PER_TOKEN["none"] * FP32 + _eager_probabilities(b, s, r)
    boundary = (s + r) * b * H * FP32  # one [S + R, B, H] pipeline tensor
    assert got[2] == [
        (5, dict(layers=5 * layer, logits=3 * r * b * VOCAB * FP32,
                 pipeline=5 * 2 * boundary + microbatches * r * b * H * FP32)),
        (3, dict(layers=3 * layer, logits=3 * (s + r) * b * VOCAB * FP32, pipeline=3 * 2 * boundary)),
    ]


def test_packed_rows_are_planned_at_their_canvas_bound():
    """A packed SFT row decodes one block per record with a response, and each such record lays out at least one block
    of the row, so the plan's canvas is ⌊S / block⌋ blocks (tiny SFT: S = 96, block 16 → R = 96, not 16) and says
    that this and the micro-batch count are bounds; the bound's activations exceed the unpacked plan's. Under
    pipeline parallelism the canvas is data.max_records_per_row blocks (the cap: tests/test_packed_pipeline.py).
    Pretraining documents: ⌈S / block⌉ + max_records_per_row − 1 blocks (canvas_blocks_bound, documents=True)."""
    unpacked, text = _plan(SFT_CONFIG, 2)
    packed, packed_text = _plan(SFT_CONFIG, 2, "data.packing=true")
    assert "micro-batch: 4 x (encoder S=96 + canvas R=16) tokens\n" in text
    assert ("micro-batch: 4 x (encoder S=96 + canvas R=96) tokens (packed rows: R is the most canvas a row can need; "
            "a step's rows, and so its micro-batches, are at most its records)\n") in packed_text
    assert packed["params_total"] == unpacked["params_total"]
    assert packed["peak_gib_per_rank"] > unpacked["peak_gib_per_rank"], (packed, unpacked)
    # Under pipeline parallelism every row's canvas is data.max_records_per_row blocks.
    _, pipelined_text = _plan(SFT_CONFIG, 2, "data.packing=true", "parallel.pp=2", "data.max_records_per_row=2")
    assert ("micro-batch: 4 x (encoder S=96 + canvas R=32) tokens (packed rows: R is every row's fixed canvas; a "
            "step's rows, and so its micro-batches, are at most its records)\n") in pipelined_text
    # Pretraining documents (tiny: S = 64, block 16) end in partial blocks: 3 per row need up to ⌈64/16⌉ + 2 blocks.
    _, documents_text = _plan(PRETRAIN_CONFIG, 2, "data.reset_document_masks=true", "data.packing=true",
                              "data.max_records_per_row=3")
    assert ("micro-batch: 4 x (encoder S=64 + canvas R=96) tokens (document rows: R is the most canvas a row can "
            "need, with at most 3 document(s) per row; a window of more takes more rows, so the micro-batch count "
            "varies)\n") in documents_text
