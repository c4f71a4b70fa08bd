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
LONGCONTEXT_26B = ROOT / "examples" / "configs" / "diffusiongemma_26b_longcontext.yaml"

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


def _hf_params(model: torch.nn.Module, experts_only: bool = False, vision: bool = True) -> int:
    """Unique parameters of the whole model (encoder and decoder stacks are tied copies), without `per_expert_scale`,
    which import folds into each expert's down projection; without the vision tower and embedder unless `vision`;
    or only the routed experts' (`experts_only`)."""
    seen, total = set(), 0
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen or (not vision and re.search(r"vision", name)) or name.endswith("per_expert_scale"):
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
    # Active per token: all but the experts a token is not routed to (top 2 of 4) and the vision tower.
    active = _hf_params(model, vision=False) - _hf_params(model, experts_only=True) // 2
    return str(hf_models.save(model, tmp_path_factory.mktemp("tiny") / "hf")), _hf_params(model), active


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
            assert name.startswith(("embedding.", "self_conditioning.", "vision.", "decoder.final_layernorm")), name
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
    """The real shape on the meta device: transformers' DiffusionGemma of the checkpoint's text config and the
    preset's vision tower (`GEMMA4_26B_VISION`), the planner on that config.json at the SFT recipe's layout, and the
    planner on the preset (its text numbers are the checkpoint's) count the same whole model, vision included, also
    at PP 2 (the README's example); active per token excludes the tower (3.84B: "A4B"); both recipes fit 80 GB.
    transformers' own defaults are not this model: `DiffusionGemmaConfig()` has neither its text config nor its tower
    (so they cannot stand in for the checkpoint's config)."""
    from transformers import AutoConfig, DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma import DiffusionGemmaTextConfig

    from megatron_bdgemma.config import GEMMA4_26B_VISION, config_from_hf, diffusiongemma_26b_a4b

    default = DiffusionGemmaConfig()
    assert (default.text_config.hidden_size, default.text_config.num_experts, default.vision_config.hidden_size) == (
        2304, None, 768)
    text = DiffusionGemmaTextConfig(**TEXT_26B, use_bidirectional_attention="vision")
    config = DiffusionGemmaConfig(text_config=text, vision_config=GEMMA4_26B_VISION, canvas_length=256)
    preset, converted = diffusiongemma_26b_a4b(), config_from_hf(config)
    for name in ("num_layers", "layer_types", "hidden_size", "num_attention_heads", "kv_channels", "num_query_groups",
                 "global_kv_channels", "num_global_query_groups", "ffn_hidden_size", "num_moe_experts",
                 "moe_router_topk", "moe_ffn_hidden_size", "vocab_size", "max_position_embeddings", "sliding_window",
                 "rope_parameters", "canvas_length", "image_token_id", "vision_bidirectional"):
        assert getattr(preset, name) == getattr(converted, name), name
    assert AutoConfig.for_model(**preset.vision_config).to_dict() == config.vision_config.to_dict()
    with torch.device("meta"):
        hf = DiffusionGemmaForBlockDiffusion(config)
        whole, text, experts = _hf_params(hf), _hf_params(hf, vision=False), _hf_params(hf, experts_only=True)
    assert whole - text == 572_792_112  # the ~0.57B tower and embedder
    config.save_pretrained(tmp_path / "hf")  # config.json only: the planner needs no weights
    from_hf, table = _plan(SFT_26B, 8, f"model.hf={tmp_path / 'hf'}")
    assert from_hf["params_total"] == whole, table
    assert from_hf["params_active_per_token"] == text - experts + experts * 8 // 128 == 3_840_371_712, table
    assert from_hf["peak_gib_per_rank"] <= 80 * 0.9, table
    from_preset, _ = _plan(PRETRAIN_26B, 64)
    assert (from_preset["params_total"], from_preset["params_active_per_token"]) == (whole, 3_840_371_712)
    assert from_preset["peak_gib_per_rank"] <= 80 * 0.9
    # The README's pipeline example: same model over two stages, its stage rows and RESULT line as printed there.
    pipelined, table = _plan(PRETRAIN_26B, 64, "parallel.pp=2")
    assert pipelined["params_total"] == whole, table
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
# K and V elements per position of one tiny layer at TP 1: sliding 2 groups x 16, full 1 group x 32 (2·g·d).
KV_WIDTH = {"sliding": 2 * 2 * 16, "full": 2 * 1 * 32}
TINY_KV = 3 * KV_WIDTH["sliding"] + KV_WIDTH["full"]  # the 4 layers' widths summed


def _eager_probabilities(batch: int, s: int, r: int, cp: int = 1) -> int:
    """Eager attention's fp32 probabilities and their dropout-free copy (x 2) per layer: the encoder's S x S
    scores, and the canvas' R queries over S + R keys; under context parallelism a rank's S/cp and R/cp queries
    over all keys."""
    return batch * HEADS * (s // cp * s + r // cp * (s + r)) * FP32 * 2


def _in_fake_worlds(rank: int, schedule_cases: list, plan_cases: list[tuple[Path, int, list[str]]]) -> dict[str, list]:
    """One spawned process (a spawn costs seconds) for both checks that need fake worlds: in-flight counts on
    Megatron's schedules, and the planner's (in-flight, activation bytes) per stage."""
    from megatron_bdgemma.training.config import load_run_config
    from megatron_bdgemma.training.plan import plan_run

    schedules = _schedules_in_flight(rank, schedule_cases)  # it leaves no world behind; plan_run makes its own
    plans, details = [], []
    for config, gpus, overrides in plan_cases:
        plan = plan_run(load_run_config(config, overrides), gpus)
        plans.append([(stage.in_flight, stage.activation_bytes) for stage in plan.stages])
        details.append(dict(dp=plan.dp, dp_cp=plan.dp_cp, expert_dp=plan.expert_dp,
                            optimizer=[stage.optimizer_bytes_distributed for stage in plan.stages],
                            gathered=[stage.gathered_kv_bytes for stage in plan.stages]))
    return dict(schedules=schedules, plans=plans, details=details)


SFT_CONFIG = ROOT / "examples" / "configs" / "tiny_sft.yaml"
PRETRAIN_CONFIG = ROOT / "examples" / "configs" / "tiny_pretrain.yaml"
SELECTIVE = ["train.recompute=selective", "train.recompute_modules=[core_attn, moe, shared_experts]"]
VPP = ["parallel.pp=2", "parallel.vpp=2", "data.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=8"]
CP2 = ["parallel.cp=2"]
PLAN_CASES = [(SFT_CONFIG, 1, []), (SFT_CONFIG, 1, SELECTIVE), (PRETRAIN_CONFIG, 2, VPP),
              (SFT_CONFIG, 2, CP2), (SFT_CONFIG, 2, [*CP2, "train.recompute=full"]), (PRETRAIN_CONFIG, 4, [*VPP, *CP2]),
              (SFT_CONFIG, 2, [])]
"""(config, GPUs, overrides) planned by test_activation_bytes_equal_closed_form_counts (the first three) and
test_context_parallel_plan_equals_closed_form_counts (the rest)."""


@pytest.fixture(scope="module")
def fake_world_results() -> dict[str, list]:
    from tests.multiproc import run_in_processes

    (results,) = run_in_processes(_in_fake_worlds, 1, SCHEDULE_CASES, PLAN_CASES, timeout_s=200)
    return results


def test_activation_bytes_equal_closed_form_counts(fake_world_results):
    """The planner's activation bytes per stage, against counts written out here for the tiny preset:

    - SFT, one rank, eager attention (S = 96 encoder + R = 16 canvas tokens, micro-batch 4): every layer keeps its
      per-token tensors and the attention probabilities; the LM head's logits, softmax and gradient cover the
      encoder and canvas rows plus pass 1's canvas rows (self-conditioning); pass 2's attention keeps each layer's
      `[encoder K ; canvas K]` and V's, (S + R)·2·g·d (`test_pass_two_keeps_the_concatenated_keys_the_plan_counts`);
    - the same with selective recompute of core_attn, moe and shared_experts: no probabilities, smaller layers, the
      concatenated K/V still kept (the checkpointed attention's input);
    - pretraining at PP 2 x VPP 2 (S = R = 32, micro-batch 2, 4 micro-batches): one layer per model chunk; Megatron's
      interleaved schedule holds 2·(pp - i - 1) + (vpp - 1)·pp + 1 model-chunk micro-batches on stage i (5 and 3),
      each keeping a received and a sent [S + R, B, H] tensor; the first stage also keeps pass 1's final hidden
      [R, B, H] of all 4 micro-batches, the last one the loss logits.
    """
    got = fake_world_results["plans"]

    s, r, b = 96, CANVAS, 4  # SFT: one scored block per example
    tokens = (s + r) * b
    head = 3 * ((s + r) * b + r * b) * VOCAB * FP32  # logits, softmax, gradient
    concatenated = b * (s + r) * TINY_KV * FP32  # the 4 layers' [encoder K ; canvas K] and V's
    assert got[0] == [(1, dict(layers=LAYERS * (tokens * KEPT_PER_TOKEN["none"] * FP32 + _eager_probabilities(b, s, r))
                               + concatenated, logits=head, pipeline=0))]
    assert got[1] == [(1, dict(layers=LAYERS * tokens * KEPT_PER_TOKEN["selective"] * FP32 + concatenated,
                               logits=head, pipeline=0))]

    s = r = 32  # pretraining scores every block: the canvas is the whole sequence
    b, microbatches = 2, 4
    layer = ((s + r) * b * KEPT_PER_TOKEN["none"] * FP32 + _eager_probabilities(b, s, r)
             + (s + r) * b * 64 * FP32)  # and its concatenated K/V (every tiny layer is 64 wide)
    boundary = (s + r) * b * H * FP32  # one [S + R, B, H] pipeline tensor
    assert got[2] == [
        (5, dict(layers=5 * layer, logits=3 * r * b * VOCAB * FP32,
                 pipeline=5 * 2 * boundary + microbatches * r * b * H * FP32)),
        (3, dict(layers=3 * layer, logits=3 * (s + r) * b * VOCAB * FP32, pipeline=3 * 2 * boundary)),
    ]


def test_pass_two_keeps_the_concatenated_keys_the_plan_counts(model_parallel):
    """The planner's `[encoder K ; canvas K]` term is real: in a tiny SFT step (eager attention, the encoder's 14
    positions + a 4-token canvas, batch 2), each layer's pass-2 call saves for backward tensors over the whole S + R
    keys, whose storages hold exactly the layer's (S + R)·2·g·d elements, what `_activation_bytes` adds per layer."""
    from megatron_bdgemma.config import tiny
    from megatron_bdgemma.diffusion import build_sft_batch, noise_batch
    from megatron_bdgemma.model import BDGemmaModel
    from megatron_bdgemma.training.plan import _kv_width

    torch.manual_seed(0)
    config = tiny(canvas_length=4)
    model = BDGemmaModel(config)
    ids = torch.randint(2, 500, (2, 12))
    loss_mask, valid = torch.zeros(2, 12, dtype=torch.bool), torch.ones(2, 12, dtype=torch.bool)
    loss_mask[:, 6:] = True
    batch = build_sft_batch(ids, loss_mask, valid, block_size=4, eos_id=1, pad_id=0)
    noised = noise_batch(batch, sample_indices=[0, 1], step=0, seed=1, vocab_size=512)
    s, r, b = batch.input_ids.shape[1], noised.canvas_ids.shape[1], 2
    assert (s, r) == (14, 4)  # 6 prompt tokens + the 6-token answer EOS-filled to 2 blocks; one scored block
    calls: list[dict[int, int]] = []  # per layer call: storage → bytes, of saved tensors spanning the S + R keys

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # Keys along any dim but the last (the mask bias `[B, 1, R, S + R]` has them last, K and V `[.., S + R, d]`).
        if s + r in tensor.shape[:-1] and calls:
            calls[-1][tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    hooks = [layer.register_forward_pre_hook(lambda module, args: calls.append({})) for layer in model.decoder.layers]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.training_forward(batch, noised)
    for hook in hooks:
        hook.remove()
    layers = config.num_layers
    assert len(calls) == 3 * layers  # encode, pass 1 (no grad: saves nothing), pass 2
    encode, pass_one, pass_two = calls[:layers], calls[layers:2 * layers], calls[2 * layers:]
    assert not any(encode + pass_one)  # the encoder's keys are its own S positions
    for n, saved in enumerate(pass_two):
        planned = b * (s + r) * _kv_width(config, config.layer_type(n), tp=1) * FP32
        assert sorted(saved.values()) == [planned // 2] * 2, (n, saved)  # K's storage and V's, (S + R)·g·d each


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


def test_context_parallel_plan_equals_closed_form_counts(fake_world_results):
    """`parallel.cp=2` in the planner, against counts written out here (docs/design.md §14): a rank holds S/2 encoder
    and R/2 canvas tokens, so every per-token term halves (layers, logits, the pipeline tensors and pass 1's hidden
    states), eager attention keeps (S/2 queries x S keys) + (R/2 x (S + R)) probabilities; each layer adds the whole
    sequence's gathered K/V, (S + R)·2·g·d, kept until backward (full recompute: the encoder's, S·2·g·d, per layer
    and one layer's S + R), which CP does not divide, and as many for pass 2's concatenation of them. The
    distributed optimizer shards dense state over DP x CP: at 2 GPUs, CP 2 (DP 1) shards it as DP 2 does."""
    got, details = fake_world_results["plans"], fake_world_results["details"]

    s, r, b = 96, CANVAS, 4  # tiny SFT, as in test_activation_bytes_equal_closed_form_counts, over 2 CP ranks
    tokens = (s + r) // 2 * b  # the rank's half
    gathered = b * (s + r) * TINY_KV * FP32  # the 4 layers' gathered K/V, every position of the row
    concatenated = gathered  # pass 2's [encoder K ; canvas K] and V's of the gathered ones: as many
    layer = tokens * KEPT_PER_TOKEN["none"] * FP32 + _eager_probabilities(b, s, r, cp=2)
    head = 3 * (tokens + r // 2 * b) * VOCAB * FP32
    assert got[3] == [(1, dict(layers=LAYERS * layer + gathered + concatenated, logits=head, pipeline=0))]
    assert details[3]["gathered"] == [gathered]
    # Against the unsplit plan: the per-token part of the layers and the logits are exactly half.
    unsplit = got[0][0][1]
    unsplit_per_token = unsplit["layers"] - LAYERS * _eager_probabilities(b, s, r) - concatenated
    assert 2 * LAYERS * tokens * KEPT_PER_TOKEN["none"] * FP32 == unsplit_per_token
    assert 2 * head == unsplit["logits"]

    # Full recompute: each layer keeps its input [S/2 + R/2, B, H] and the encoder's gathered K/V [S, B, 2·g·d];
    # one layer's working set, with its gathered and concatenated K/V, is live in backward (the widest: all tiny
    # layers are 64 wide).
    encoder_kv = b * s * TINY_KV * FP32
    one_gathered = b * (s + r) * KV_WIDTH["sliding"] * FP32
    assert got[4] == [(1, dict(layers=LAYERS * tokens * H * FP32 + encoder_kv + layer + 2 * one_gathered,
                               logits=head, pipeline=0))]
    assert details[4]["gathered"] == [encoder_kv + one_gathered]

    # Pretraining at PP 2 x VPP 2 x CP 2 (S = R = 32 over 2 ranks, micro-batch 2, 4 micro-batches), one layer per
    # model chunk: as in the unsplit case with half the tokens, plus each held layer's gathered and concatenated
    # K/V (64 wide each).
    s = r = 32
    b, microbatches = 2, 4
    layer = (s + r) // 2 * b * KEPT_PER_TOKEN["none"] * FP32 + _eager_probabilities(b, s, r, cp=2)
    layer_gathered = b * (s + r) * 64 * FP32
    boundary = (s + r) // 2 * b * H * FP32  # one [(S + R)/2, B, H] pipeline tensor
    assert got[5] == [
        (5, dict(layers=5 * (layer + 2 * layer_gathered), logits=3 * r // 2 * b * VOCAB * FP32,
                 pipeline=5 * 2 * boundary + microbatches * r // 2 * b * H * FP32)),
        (3, dict(layers=3 * (layer + 2 * layer_gathered), logits=3 * (s + r) // 2 * b * VOCAB * FP32,
                 pipeline=3 * 2 * boundary)),
    ]

    # Megatron's optimizer groups: CP 2 x DP 1 shards the dense state over 2 ranks, as DP 2 does; experts over
    # expert-DP = world / (EP x ETP x PP) = 2 either way.
    assert [(d["dp"], d["dp_cp"], d["expert_dp"]) for d in (details[3], details[6])] == [(1, 2, 2), (2, 2, 2)]
    assert details[3]["optimizer"] == details[6]["optimizer"] and details[6]["gathered"] == [0]


def test_context_parallel_bytes_by_hand():
    """The CP collectives' bytes per layer type and the gathered K/V, from the design's formula (docs/design.md §14)
    worked out here for the 26B-A4B's two layer types: sliding layers have 8 KV heads of 256, full layers 2 of 512
    with K = V, whose V is still a tensor of its own (gathered too). Per layer and sequence a rank receives
    (N − 1)/N of every gathered stream: the encoder's S once, the canvas R per pass (pass 1 with self-conditioning,
    pass 2), and sends as many in the backward reduce-scatters of the encoder's and pass 2's dK/dV."""
    from megatron_bdgemma.config import PRESETS
    from megatron_bdgemma.training.plan import context_parallel_bytes

    config = PRESETS["diffusiongemma-26b-a4b"]()
    assert config.self_conditioning and config.global_k_eq_v
    # TP 2, bf16: sliding K and V are 2·(8/2)·256 = 2048 elements, 4096 bytes per position; full 2·(2/2)·512 = 1024
    # elements, 2048 bytes. S = 64, R = 16, N = 2: a rank receives half of each stream.
    assert context_parallel_bytes(config, 64, 16, cp=2, tp=2, dtype_bytes=2) == {
        "sliding_attention": dict(all_gather=(64 + 16 + 16) * 4096 // 2, reduce_scatter=(64 + 16) * 4096 // 2,
                                  gathered=(64 + 16) * 4096),
        "full_attention": dict(all_gather=(64 + 16 + 16) * 2048 // 2, reduce_scatter=(64 + 16) * 2048 // 2,
                               gathered=(64 + 16) * 2048),
    }
    # Without self-conditioning (one canvas pass), N = 4, TP 1, fp32: 2·8·256·4 = 16384 and 2·2·512·4 = 8192 bytes
    # per position, 3/4 of them received.
    plain = PRESETS["diffusiongemma-26b-a4b"](self_conditioning=False)
    assert context_parallel_bytes(plain, 64, 16, cp=4, tp=1, dtype_bytes=4) == {
        "sliding_attention": dict(all_gather=3 * (64 + 16) * 16384 // 4, reduce_scatter=3 * (64 + 16) * 16384 // 4,
                                  gathered=(64 + 16) * 16384),
        "full_attention": dict(all_gather=3 * (64 + 16) * 8192 // 4, reduce_scatter=3 * (64 + 16) * 8192 // 4,
                               gathered=(64 + 16) * 8192),
    }
    zero = dict(all_gather=0, reduce_scatter=0, gathered=0)
    assert context_parallel_bytes(config, 64, 16, cp=1, tp=1, dtype_bytes=2) == {
        "sliding_attention": zero, "full_attention": zero}
    # The design's own figures at L = 128K, N = 2, bf16, TP 1 (encoder only): 512 MiB per sliding layer and 256 MiB
    # per full one each way, and the gathered K/V kept over the 30 layers, 27.5 GiB.
    encoder = context_parallel_bytes(config, 131072, 0, cp=2, tp=1, dtype_bytes=2)
    assert (encoder["sliding_attention"]["reduce_scatter"], encoder["full_attention"]["reduce_scatter"]) == (
        512 * 2**20, 256 * 2**20)
    kept = sum(encoder[t]["gathered"] for t in config.layer_types)
    assert kept == 27.5 * 2**30


@pytest.mark.parametrize("mode", ["sft", "pretrain"])
def test_sequence_length_must_split_into_2_cp_chunks(mode):
    """data.seq_length under CP: 2·cp equal chunks, each split over TP by sequence parallelism; one line naming both
    keys (and parallel.tp when it counts), in both modes; the lengths that split pass."""
    from megatron_bdgemma.training.config import load_run_config

    config = SFT_CONFIG if mode == "sft" else PRETRAIN_CONFIG
    cases = [
        (["parallel.cp=2", "data.seq_length=94"], 2,
         "data.seq_length (94) must be a multiple of 2 × parallel.cp (2) = 4: context parallelism splits each "
         "sequence into 2·cp equal chunks"),
        (["parallel.cp=2", "parallel.tp=2", "data.seq_length=100"], 4,
         "data.seq_length (100) must be a multiple of 2 × parallel.cp (2) × parallel.tp (2) = 8: context parallelism "
         "splits each sequence into 2·cp equal chunks, each split over the TP ranks by sequence parallelism"),
    ]
    for overrides, world, message in cases:
        run = load_run_config(config, [*overrides, "train.global_batch_size=4"])
        with pytest.raises(ValueError) as raised:
            run.validate(world)
        assert str(raised.value) == f"invalid run configuration: {message}"
    for overrides, world in ((["parallel.cp=2", "data.seq_length=96"], 2),
                             (["parallel.cp=2", "parallel.tp=2", "data.seq_length=96"], 4)):
        load_run_config(config, [*overrides, "train.global_batch_size=4"]).validate(world)


def test_longcontext_recipe_fits_80gb_and_the_readme_shows_its_plan():
    """The 128K-token recipe (CP 8 x TP 2 on 16 GPUs) fits 80 GB by the planner, the README shows the planner's
    output exactly, and its CP rows and gathered K/V are the design's formula at S = R = 131072, N = 8, TP 2, bf16
    (sliding K/V 2·4·256·2 = 4096 bytes per position, full 2·1·512·2 = 2048); a length that does not split is
    refused through the CLI with one line naming the keys."""
    result, table = _plan(LONGCONTEXT_26B, 16, "model.hf=null", "model.preset=diffusiongemma-26b-a4b")
    assert result["peak_gib_per_rank"] <= 80 * 0.9, table
    assert f"```\n{table}```" in (ROOT / "README.md").read_text(), table
    assert "layout: 16 GPUs = TP 2 x CP 8 x DP 1 (PP 1); experts: EP 8 x ETP 1, expert-DP 2;" in table
    assert "the distributed optimizer shards dense state over DP x CP = 8\n" in table
    length, mib = 131072, 2**20
    for layer_type, count, width in (("sliding_attention", 25, 4096), ("full_attention", 5, 2048)):
        received = 7 * (length + 2 * length) * width // 8  # encoder + both canvas passes, 7/8 from the other ranks
        sent = 7 * (length + length) * width // 8
        row = (f"| {layer_type} | {count} | {received / mib:,.2f} | {sent / mib:,.2f} | "
               f"{2 * length * width / mib:,.2f} |")
        assert row in table, row
    # Full recompute keeps each layer's gathered encoder K/V (13.75 GiB) and one sliding layer's S + R (1 GiB).
    kept = length * (25 * 4096 + 5 * 2048) + 2 * length * 4096
    assert f"(of which gathered K/V {kept / 2**30:.2f} GiB)" in table
    refused = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plan.py"), "--config", str(LONGCONTEXT_26B), "--gpus", "16",
         "model.hf=null", "model.preset=diffusiongemma-26b-a4b", "data.seq_length=131056"],
        capture_output=True, text=True, timeout=300, env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    assert (refused.returncode, refused.stdout, refused.stderr) == (1, "", (
        "error: invalid run configuration: data.seq_length (131056) must be a multiple of 2 × parallel.cp (8) × "
        "parallel.tp (2) = 32: context parallelism splits each sequence into 2·cp equal chunks, each split over the "
        "TP ranks by sequence parallelism\n"))
