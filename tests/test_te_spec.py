"""The `te` spec (Transformer Engine linears, `TEGroupedMLP` experts) against `local` on the same weights: HF loading
fills both, their canvas logits agree (fp32 within 1e-4, bf16 within bf16 rounding), and a Megatron checkpoint
loads into the `te` spec with the same logits. Needs a CUDA GPU with Transformer Engine (tools/gpu_setup); on any
other machine every test here is skipped, saying so."""

from __future__ import annotations

import pytest
import torch

import megatron_bdgemma
from tests import hf_models
from tests.test_fp8 import GPU_WITH_TE, HAVE_TE

pytestmark = pytest.mark.skipif(  # missing hardware: a CUDA GPU with transformer_engine
    not GPU_WITH_TE,
    reason=f"the te spec needs a CUDA GPU and Transformer Engine (GPU: {torch.cuda.is_available()}, TE: {HAVE_TE})",
)

# bf16 keeps 8 bits of mantissa; two GEMM implementations differ in accumulation order, and the differences grow
# over the layers: 2% of the largest logit (softcapped at 30) is about 16 bf16 ulps at that size.
BF16_REL_TOL = 2e-2


def _logits(model, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(2, vocab, (2, 16), generator=generator).cuda()
    canvas = torch.randint(0, vocab, (2, 16), generator=generator).cuda()
    positions = (16 + torch.arange(16)).expand(2, 16).cuda()
    signal = 5 * torch.randn(2, 16, vocab, generator=generator).cuda()
    with torch.no_grad():
        return model.decode(canvas, model.encode(prompt), canvas_position_ids=positions,
                            self_conditioning_logits=signal).float()


@pytest.fixture(scope="module")
def saved_hf(tmp_path_factory):
    return hf_models.save(hf_models.diffusion_gemma(canvas_length=16), tmp_path_factory.mktemp("te") / "hf")


def _assert_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    worst = (got - expected).abs().max().item()
    limit = 1e-4 if dtype == torch.float32 else BF16_REL_TOL * expected.abs().max().item()
    assert worst <= limit, f"{dtype}: max-abs {worst:.3e} > {limit:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_te_spec_equals_local_on_the_same_hf_weights(saved_hf, model_parallel, dtype):
    local = megatron_bdgemma.from_hf(saved_hf, dtype=dtype)
    te = megatron_bdgemma.from_hf(saved_hf, dtype=dtype, backend="te")
    kinds = {type(m).__name__ for m in te.modules()}
    assert "TEGroupedMLP" in kinds and {"TEColumnParallelLinear", "TERowParallelLinear"} <= kinds, sorted(kinds)
    _assert_close(_logits(te), _logits(local), dtype)


def test_megatron_checkpoint_loads_into_the_te_spec(saved_hf, model_parallel, tmp_path):
    from megatron_bdgemma.conversion.megatron_checkpoint import convert_hf_to_megatron, load_model

    convert_hf_to_megatron(saved_hf, tmp_path / "megatron", log=lambda *_: None)
    te = load_model(tmp_path / "megatron", backend="te").cuda()
    local = megatron_bdgemma.from_hf(saved_hf)
    _assert_close(_logits(te), _logits(local), torch.float32)
