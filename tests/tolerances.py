"""How the fp32 equivalence tests compare training runs, and the record of how close each comparison came to its bound.

CPUs round fp32 differently (ATen's vector width, MKL's and oneDNN's kernel choice and blocking for the machine), so
a multi-rank run and the 1-process run it is compared with differ in their last bits in a machine-dependent way. In
the tiny fixtures the gradients themselves are ill-conditioned at that level: the q/k-norm weights' gradients (sums
over every token and head that largely cancel) and the self-conditioning path (the soft embedding of near-uniform
probabilities, a mean of random rows) carry ~3e-6 relative rounding noise, and the global grad norm, which they
dominate, ~1e-7 - 7e-7 already on the first step (1 process under AVX-512 vs AVX2 as well as layout vs 1 process).
Every Adam update then amplifies that noise in the grad norm: measured 2e-6 one update later and 1.8e-5 two updates
later (`test_layouts_match_one_process_and_reshard[tp2_sp]` on an AVX-512 + AMX machine, which failed at 1e-5).
The losses do not amplify it: they stayed within 6e-7 over five updates.

So a training comparison checks
- the losses (and held-out losses) of every step at 1e-5 relative;
- the grad norm at 1e-5 relative on the steps computed from weights both runs share bit for bit: the first steps
  (the first update runs at learning rate 0 in warmup, so steps 1 and 2 share the starting weights) and the first
  step after both load the same checkpoint. A layout whose gradients were halved or never reduced shows there; a
  wrong update (optimizer state sharded, restored or resharded wrongly) shows in the next steps' losses.
The training step cannot run in float64 instead: megatron-core 0.19's distributed optimizer casts gradients to fp32
(`_copy_model_grads_to_main_grads`), computes the grad norm in fp32 (`local_multi_tensor_l2_norm`) and keys its
checkpointed state by `torch.float32`.

Where float64 is possible, a comparison runs in it instead of loosening an fp32 bound: one forward/backward of a
layout against one process (tests/test_parallel_equivalence.py), chunked against plain losses
(tests/test_vocab_parallel.py), and DP=2 against one process through megatron's DDP and plain optimizer
(tests/test_runtime.py). A float64 model computes its norms, softmaxes, router, logits and losses in float64 too
(`megatron_bdgemma.precision.compute_dtype`), so what remains is float64 rounding: measured <= 1e-14 relative, bound
1e-12. The few fp32 steps megatron keeps in a float64 run (its vocab-parallel cross entropy, its MoE router's
softmax) are named where they matter.

Each bound is written next to its comparison with the worst relative difference measured with the defaults (AVX-512)
and with `ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2`. To measure again, set
`BDGEMMA_TOLERANCE_LOG=<file>`: every comparison appends one JSON line (test, what, worst, bound, per-step detail).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

LOG_ENV = "BDGEMMA_TOLERANCE_LOG"

TRAINING_METRICS = ("diffusion", "ar", "grad_norm")
"""A training step's diffusion loss, AR loss and global grad norm."""


def record(what: str, worst: float, bound: float, **detail: object) -> None:
    """Append the worst difference of one comparison to the `BDGEMMA_TOLERANCE_LOG` file (when set)."""
    path = os.environ.get(LOG_ENV)
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        with open(path, "a") as log:
            log.write(json.dumps(dict(test=test, what=what, worst=worst, bound=bound, **detail)) + "\n")


def assert_steps_close(ours: Sequence[Sequence[float]], reference: Sequence[Sequence[float]], what: str, *,
                       shared_weight_steps: int, rel: float = 1e-5, names: Sequence[str] = TRAINING_METRICS,
                       first_step: int = 1) -> None:
    """Per step, every metric within `rel` relative of the reference's, except the grad norm after the first
    `shared_weight_steps` steps (see the module docstring). Both lists hold the same steps; `first_step` numbers
    them in messages."""
    assert len(ours) == len(reference), (what, ours, reference)
    per_step, failures = [], []
    for index, (a, b) in enumerate(zip(ours, reference)):
        step = first_step + index
        assert len(a) == len(b), f"{what}, step {step}: metrics {a} vs {b}"
        differences = {name: abs(x - y) / abs(y) for name, x, y in zip(names, a, b)}
        per_step.append(differences)
        checked = [name for name in differences if name != "grad_norm" or index < shared_weight_steps]
        failures += [f"{what}, step {step}, {name}: {a[names.index(name)]} vs {b[names.index(name)]} "
                     f"(rel {differences[name]:.2e} > {rel:.0e})" for name in checked if differences[name] > rel]
    worst = max(d[name] for i, d in enumerate(per_step) for name in d if name != "grad_norm" or i < shared_weight_steps)
    record(what, worst, rel, first_step=first_step, shared_weight_steps=shared_weight_steps, per_step=per_step)
    assert not failures, "\n".join(failures)
