"""The dtype the numerically sensitive steps run in: norms, softmaxes, the router, the softcapped logits, the losses.

HF's Gemma 4 runs them in fp32 whatever the activation dtype (`.float()` and `softmax(dtype=torch.float32)`), which
for bf16 / fp16 / fp32 models means "at least fp32". Here that is `max(fp32, activation dtype)`: the same fp32 for
those dtypes (bit for bit; tests/test_backbone_parity.py, tests/test_bf16.py), and float64 for a float64 model,
which then is float64 end to end. A float64 model is the reference precision of the layout-equivalence tests
(tests/test_parallel_equivalence.py), where fp32 steps inside it would leave fp32 rounding noise in every output.
(HF casts a float64 model's logits and softmaxes down to fp32; no HF oracle compares float64 models.)
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """`max(fp32, dtype)`: fp32 for bf16, fp16 and fp32 activations, float64 for float64 ones."""
    return torch.promote_types(dtype, torch.float32)
